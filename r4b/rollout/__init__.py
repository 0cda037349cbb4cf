"""r4b.rollout: generate responses in a forced mode (auto / thinking / non-thinking) for RL and curation.

:class:`RolloutEngine` is the interface (``generate(prompts, n=, mode=, sampling=)``);
:class:`HFRolloutEngine` implements it with transformers' ``generate`` (the reference, CPU-friendly engine),
:class:`VLLMRolloutEngine` with a colocated vLLM (GPU; ``pip install r4b[vllm]``, imported only when built);
:func:`build_rollout_engine` builds either (BPO, ``r4b eval`` and ``r4b curate`` all go through it).
"""

from r4b.format import check_mode
from r4b.rollout.base import Prompt, Rollout, RolloutEngine, SamplingParams, check_suffixes
from r4b.rollout.factory import build_rollout_engine
from r4b.rollout.hf import HFRolloutEngine, generation_attention
from r4b.rollout.prompts import EncodedPrompt, encode_prompt, render_prompt
from r4b.rollout.vllm import VLLMRolloutEngine

__all__ = [
    "EncodedPrompt",
    "HFRolloutEngine",
    "Prompt",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "VLLMRolloutEngine",
    "build_rollout_engine",
    "check_mode",
    "check_suffixes",
    "encode_prompt",
    "generation_attention",
    "render_prompt",
]
