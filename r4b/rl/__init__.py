"""Reinforcement learning: rewards (and, with BPO, rollouts, advantages and the policy update)."""

from .reward import REWARDS, answer_reward, answers_match, extract_answer, register_reward

__all__ = ["REWARDS", "answer_reward", "answers_match", "extract_answer", "register_reward"]
