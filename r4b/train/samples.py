"""BPO's sample tables (``logging.samples_every``): a few of a step's prompts with every response, its reward and
whether it left its forced mode, for a person to read beside the curves. One record per prompt, the shape of a
samples.jsonl line (:class:`r4b.train.logging.RunLogger` adds the step) and what the sinks render
(:mod:`r4b.train.sinks`). Built from what the step already holds; nothing is generated or drawn for it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from r4b.rl.shaping import ShapedRewards
from r4b.rollout.base import Rollout


def sample_records(
    samples: Sequence[Any], rollouts: Sequence[Sequence[Rollout]], shaped: ShapedRewards, limit: int
) -> list[dict[str, Any]]:
    """The first ``limit`` prompts of a step (its :class:`r4b.data.Sample` objects, rollouts in their layout and
    shaped rewards): prompt text, image paths, reference answer and, per response, its mode, the assistant turn as
    written (mode suffix included), the reward the advantages read and the off-mode flag."""
    rewards, off = shaped.rewards.tolist(), shaped.off.tolist()
    records = []
    for index, sample in enumerate(samples[:limit]):
        responses = [
            {"mode": r.mode, "response": r.full_text, "reward": float(reward), "off_mode": bool(flag)}
            for r, reward, flag in zip(rollouts[index], rewards[index], off[index], strict=True)
        ]
        records.append(
            {
                "prompt": prompt_text(sample.messages),
                "images": [str(path) for path in sample.images],
                "answer": sample.answer,
                "responses": responses,
            }
        )
    return records


def prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The conversation's text without the system prompt, ``<image>`` where an image goes."""
    turns = []
    for message in messages:
        if message["role"] == "system":
            continue
        content = message["content"]
        if not isinstance(content, str):
            content = "".join(part.get("text", "") if part.get("type") == "text" else "<image>" for part in content)
        turns.append(content)
    return "\n\n".join(turns)
