"""The one place rollout engines are built: BPO's (``rollout.engine``), ``r4b eval``'s and ``r4b curate``'s.

:func:`build_rollout_engine` takes what to generate with (a model object for ``hf``, a checkpoint directory for
``vllm``, or an engine already built) and returns a :class:`~r4b.rollout.RolloutEngine`. Loading a model by name,
and each caller's own defaults (vLLM's seed and memory share, the device), stay with the caller; the engines'
constructors are called here only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .base import RolloutEngine
from .hf import HFRolloutEngine
from .vllm import VLLMRolloutEngine

__all__ = ["ROLLOUT_ENGINES", "build_rollout_engine"]

ROLLOUT_ENGINES = ("hf", "vllm")


def build_rollout_engine(
    source: torch.nn.Module | str | Path | RolloutEngine,
    tokenizer: Any,
    processor: Any = None,
    *,
    engine: str = "hf",
    batch_size: int = 32,
    device: torch.device | str | None = None,
    suffixes: Mapping[str, str] | None = None,
    sleep_level: int | None = None,
    kv_cache_gib: float | None = None,
    vllm_args: Mapping[str, Any] | None = None,
) -> RolloutEngine:
    """A rollout engine on ``source``.

    Args:
        source: an engine (returned as it is), a model (``engine="hf"``) or a checkpoint directory
            (``engine="vllm"``: vLLM loads the weights itself).
        tokenizer, processor: the model's; ``processor=None`` lets the transformers engine take the model's default.
        engine: ``hf`` (:class:`~r4b.rollout.HFRolloutEngine`, anywhere) or ``vllm``
            (:class:`~r4b.rollout.VLLMRolloutEngine`: ``r4b[vllm]`` on a GPU, or vLLM's CPU build).
        batch_size: rows (prompt x sample) per ``generate`` call (``hf``).
        device: where the model is moved first (``hf``; None: where it is).
        suffixes: per-mode suffixes replacing the chat template's (:attr:`RolloutEngine.suffixes`).
        sleep_level, vllm_args: the vLLM engine's sleep level and ``vllm.LLM`` keyword arguments (``vllm`` only).
        kv_cache_gib: vLLM's KV-cache budget (``vllm`` only; None: :func:`r4b.rollout.vllm.kv_cache_args`' default).
    """
    if isinstance(source, RolloutEngine):
        return source
    if engine == "vllm":
        if device is not None:
            raise ValueError("device is for the hf engine; vLLM places the model itself")
        return VLLMRolloutEngine.from_pretrained(
            source,
            tokenizer,
            processor,
            sleep_level=sleep_level,
            suffixes=suffixes,
            kv_cache_gib=kv_cache_gib,
            **dict(vllm_args or {}),
        )
    if engine != "hf":
        raise ValueError(f"the rollout engine must be one of {ROLLOUT_ENGINES}, got {engine!r}")
    if sleep_level is not None or kv_cache_gib is not None or vllm_args:
        raise ValueError("sleep_level, kv_cache_gib and vllm_args are for the vllm engine")
    if device is not None:
        source = source.to(device)
    return HFRolloutEngine(source, tokenizer, processor, batch_size=batch_size, suffixes=suffixes)
