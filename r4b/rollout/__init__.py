"""r4b.rollout: generate responses in a forced mode (auto / thinking / non-thinking) for RL and curation.

:class:`RolloutEngine` is the interface (``generate(prompts, n=, mode=, sampling=)``);
:class:`HFRolloutEngine` implements it with transformers' ``generate`` (the reference, CPU-friendly engine).
"""

from r4b.rollout.base import Prompt, Rollout, RolloutEngine, SamplingParams, check_mode
from r4b.rollout.hf import HFRolloutEngine, generation_attention
from r4b.rollout.prompts import EncodedPrompt, encode_prompt, render_prompt

__all__ = [
    "EncodedPrompt",
    "HFRolloutEngine",
    "Prompt",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "check_mode",
    "encode_prompt",
    "generation_attention",
    "render_prompt",
]
