"""Reinforcement learning: rewards, BPO advantages, rollout batches and the BPO policy update."""

from r4b.answers import answers_match, extract_answer

from .advantages import ADVANTAGE_MODES, compute_advantages
from .batch import RolloutBatch
from .reward import REWARDS, answer_reward, format_reward, register_reward
from .update import BPOObjective, UpdateConfig, compute_logprobs, policy_update

__all__ = [
    "ADVANTAGE_MODES",
    "REWARDS",
    "BPOObjective",
    "RolloutBatch",
    "UpdateConfig",
    "answer_reward",
    "answers_match",
    "compute_advantages",
    "compute_logprobs",
    "extract_answer",
    "format_reward",
    "policy_update",
    "register_reward",
]
