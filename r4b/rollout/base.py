"""What every rollout engine takes and returns: prompts, sampling parameters, rollouts, and the engine protocol.

An engine answers ``generate(prompts, n=..., mode=..., sampling=...)`` with ``n`` rollouts per prompt. The
mode is forced by the prompt: the chat template renders ``<|im_start|>assistant\\n`` followed by the mode
suffix (``<think>``, ``<think>\\n`` or ``<think>\\n\\n</think>``), so the suffix belongs to the prompt and the
response is what the model writes after it. :attr:`Rollout.full_text` puts the two back together, which
is what answer rewards should read (an unfinished ``<think>`` then has no answer).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from PIL import Image

from r4b.data.image import decode_images
from r4b.format import MODE_SUFFIX, check_mode, full_text

__all__ = [
    "Prompt",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "Weights",
    "check_suffixes",
    "weight_pairs",
]


@dataclass
class Prompt:
    """A conversation to continue and its images.

    Attributes:
        messages: ChatML messages (``system`` / ``user`` / ``assistant``) without the assistant turn to
            generate; ``content`` is a string or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}``
            parts (a literal ``<image>`` in text is a placeholder too).
        images: one per placeholder, in order: PIL images or paths.
    """

    messages: list[dict[str, Any]]
    images: list[Image.Image | str | Path] = field(default_factory=list)

    @classmethod
    def from_sample(cls, sample: Any) -> Prompt:
        """The prompt of an :class:`r4b.data.Sample` (its messages up to, not including, the first assistant turn)."""
        messages = list(sample.messages)
        roles = [message["role"] for message in messages]
        if "assistant" in roles:
            messages = messages[: roles.index("assistant")]
        return cls(messages, list(sample.images))

    def decoded(self) -> Prompt:
        """This prompt with its images decoded (RGB PIL images, :func:`r4b.data.image.decode_images`): a caller
        that reads the images several times (BPO: each mode's rollouts, then the update's pixel values) decodes
        them once."""
        return Prompt(self.messages, decode_images(self.images, where="prompt"))


@dataclass(frozen=True)
class SamplingParams:
    """How to sample.

    Attributes:
        temperature: softmax temperature; ``0`` means greedy decoding.
        top_p: nucleus sampling threshold (``1.0`` = off).
        top_k: keep the ``k`` most likely tokens (``0`` = off).
        max_new_tokens: the most tokens a response may have (the stop token included).
        seed: seeds the sampling RNG (in a forked RNG: the caller's global RNG state is untouched).
        stop_token_ids: extra stop tokens besides ``<|im_end|>`` and the tokenizer's eos.
        logprobs: also return each response token's log-prob under the model at ``temperature``
            (before top-p / top-k truncation; at temperature 0, under the untempered model).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollout:
    """One generated response.

    Attributes:
        prompt_ids: the prompt's token ids, each ``<image>`` expanded to its image's token count; they end
            with the mode suffix's ids.
        response_ids: the generated ids, including the stop token when one was generated.
        text: the decoded response without the stop token.
        finished: True when generation stopped at a stop token, False when it hit ``max_new_tokens``.
        mode: ``auto``, ``thinking`` or ``non_thinking``.
        logprobs: one per response token when asked for (:attr:`SamplingParams.logprobs`), else None.
        prompt_suffix: the mode suffix the prompt ended with when the engine was given another than the
            template's (``suffixes=``); None means ``MODE_SUFFIX[mode]``.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finished: bool
    mode: str
    logprobs: list[float] | None = None
    prompt_suffix: str | None = None

    @property
    def suffix(self) -> str:
        """The mode suffix the prompt ends with."""
        return self.prompt_suffix if self.prompt_suffix is not None else MODE_SUFFIX[self.mode]

    @property
    def full_text(self) -> str:
        """The assistant turn as written: mode suffix + response text (what answer rewards read)."""
        return full_text(self.mode, self.text, self.suffix)


Weights = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def weight_pairs(weights: Weights) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a state dict or of a stream of pairs (e.g. one broadcast tensor at a time)."""
    return weights.items() if isinstance(weights, Mapping) else weights


def check_suffixes(suffixes: Mapping[str, str] | None) -> dict[str, str]:
    """Per-mode suffix overrides as a dict (keys: modes; values: non-empty strings), or a ValueError."""
    out = dict(suffixes or {})
    for mode, suffix in out.items():
        check_mode(mode)
        if not isinstance(suffix, str) or not suffix:
            raise ValueError(f"the {mode} suffix must be a non-empty string, got {suffix!r}")
    return out


class RolloutEngine(abc.ABC):
    """Generates responses for prompts in a forced mode.

    Attributes:
        needs_weights: True when the engine has lost its weights (a vLLM level-2 sleep) and needs
            :meth:`load_weights` before generating again.
        suffixes: per-mode suffixes that replace the chat template's (``MODE_SUFFIX``) at the end of the prompt,
            e.g. ``{"thinking": "<think>\\nLet me think step by step.\\n"}``; empty: the template's.
    """

    needs_weights: bool = False
    suffixes: Mapping[str, str] = MappingProxyType({})

    @abc.abstractmethod
    def generate(
        self, prompts: Sequence[Prompt], *, n: int, mode: str, sampling: SamplingParams
    ) -> list[list[Rollout]]:
        """For each prompt, in order, ``n`` rollouts in ``mode`` sampled with ``sampling``."""

    def load_weights(self, weights: Weights) -> None:
        """Take the policy's new weights: its full Hugging Face state dict (``model.language_model.*``, ...), as a
        mapping or as ``(name, tensor)`` pairs consumed once, in order (see :func:`weight_pairs`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot take new weights")

    def sleep(self) -> None:
        """Release memory between rollout phases (engines that hold their own copy of the model); default no-op."""
        return None
