"""Reinforcement learning: rewards and their shaping, BPO advantages and mode-decision credit, rollout batches, the
BPO policy update and a step's rollout metrics."""

from r4b.answers import answers_match, extract_answer

from .advantages import ADVANTAGE_MODES, compute_advantages
from .batch import RolloutBatch
from .credit import credit_mode_decision, decision_token_counts, move_decision_tokens
from .metrics import rollout_metrics
from .reward import REWARDS, answer_reward, format_reward, register_reward
from .shaping import ShapedRewards, shape_rewards
from .update import BPOObjective, UpdateConfig, compute_logprobs, policy_update

__all__ = [
    "ADVANTAGE_MODES",
    "REWARDS",
    "BPOObjective",
    "RolloutBatch",
    "ShapedRewards",
    "UpdateConfig",
    "answer_reward",
    "answers_match",
    "compute_advantages",
    "compute_logprobs",
    "credit_mode_decision",
    "decision_token_counts",
    "extract_answer",
    "format_reward",
    "move_decision_tokens",
    "policy_update",
    "register_reward",
    "rollout_metrics",
    "shape_rewards",
]
