"""A BPO batch (prompt entries and their responses) and how it is cut into packed micro-batches.

In BPO every prompt is rolled out twice: ``g`` responses after the thinking suffix ``<think>\\n`` and
``g`` after the non-thinking suffix ``<think>\\n\\n</think>``. The suffix belongs to the prompt, so the
two halves have *different* prompt ids. The unit of shared-prefix packing is therefore a **prompt
entry** = (prompt, mode): its own ids, its images, and the responses written after it. A prompt
contributes one entry per mode it was rolled out in.

Micro-batches are built from **chunks**: an entry with all its responses, or, when that does not fit
the token budget, runs of its responses that do (each chunk then repeats the prompt -- and its
images -- as a document of its own; a response never spans two micro-batches). A single response
whose prompt + response exceeds the budget is an error naming it.

Model families. R-4B / LLaVA-OneVision entries carry ``image_sizes`` and the packed row has 1-D positions.
Qwen2.5-VL / Qwen3-VL entries (built with a processor that has ``packed_position_ids``, as for SFT) carry
``image_grid_thw`` and the prompt's own mRoPE positions ``[3, P]`` (the model's ``get_rope_index``); the packed
row then has ``[3, N]`` positions: prompt tokens at the prompt's, response token j at the prompt's maximum + 1 + j
in all three rows (:func:`r4b.models.mrope.continued_mrope_position_ids`), in the shared and unshared layouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from r4b.data.image import ImageProcessor, decode_images
from r4b.models.mrope import continued_mrope_position_ids
from r4b.packed_row import PackedRow
from r4b.rollout.base import Rollout
from r4b.shared_prefix import pack_responses, pack_shared_prefix, pack_unshared

__all__ = ["Chunk", "RolloutBatch", "build_micro_batch", "plan_chunks"]


@dataclass
class RolloutBatch:
    """Rollouts ready for log-probs and the policy update; every field lives on the CPU (or any one device).

    Per prompt entry ``e`` (E of them): ``prompt_ids[e]`` 1-D int64 ids (image tokens expanded, ending
    with the mode suffix, or at ``<think>`` under mode-decision credit), ``entry_prompts[e]`` the prompt it
    came from, ``entry_modes[e]`` its mode, ``images[e]`` its PIL images and ``pixel_values[e]`` /
    ``image_sizes[e]`` the processor's tensors for them (None without images; the two entries of one prompt
    may share the same tensors). Qwen-VL
    batches have ``image_grid_thw[e]`` instead of ``image_sizes[e]`` (``pixel_values[e]`` then holds the
    images' patch rows) and ``mrope_positions[e]``, the prompt's ``[3, P]`` mRoPE positions (also without
    images); both are None for R-4B batches.

    Per response ``i`` (R of them): ``response_ids[i]`` right-padded ``[R, Lmax]``, ``response_lengths[i]``
    (>= 1), ``groups[i]`` its entry (sorted, each entry's responses contiguous), ``advantages[i]``,
    ``modes[i]``; optionally ``source[i]`` = (prompt index, column) in the rollouts / rewards it was
    built from and ``rollout_logprobs`` ``[R, Lmax]`` (the rollout engine's own log-probs, 0 past a length).
    """

    prompt_ids: list[Tensor]
    entry_prompts: list[int]
    entry_modes: list[str]
    images: list[list[Image.Image]]
    pixel_values: list[Tensor | None]
    image_sizes: list[Tensor | None]
    response_ids: Tensor
    response_lengths: Tensor
    groups: Tensor
    advantages: Tensor
    modes: list[str]
    source: list[tuple[int, int]] | None = None
    rollout_logprobs: Tensor | None = None
    image_grid_thw: list[Tensor | None] | None = None
    mrope_positions: list[Tensor] | None = None

    def __post_init__(self) -> None:
        entries, num = len(self.prompt_ids), self.response_ids.shape[0]
        for name in ("entry_prompts", "entry_modes", "images", "pixel_values", "image_sizes", "image_grid_thw",
                     "mrope_positions"):  # fmt: skip
            if getattr(self, name) is not None and len(getattr(self, name)) != entries:
                raise ValueError(f"RolloutBatch.{name} has {len(getattr(self, name))} items for {entries} entries")
        for name, tensor in (("response_lengths", self.response_lengths), ("groups", self.groups),
                             ("advantages", self.advantages)):  # fmt: skip
            if tensor.shape != (num,):
                raise ValueError(f"RolloutBatch.{name} must have shape ({num},), got {tuple(tensor.shape)}")
        if len(self.modes) != num:
            raise ValueError(f"RolloutBatch.modes has {len(self.modes)} items for {num} responses")
        groups = self.groups.tolist()
        if groups != sorted(groups) or sorted(set(groups)) != list(range(entries)):
            raise ValueError("RolloutBatch.groups must be sorted and give every entry at least one response")
        lengths = self.response_lengths.tolist()
        bad = [i for i, n in enumerate(lengths) if not 1 <= n <= self.response_ids.shape[1]]
        if bad:
            raise ValueError(
                f"response {bad[0]} has length {lengths[bad[0]]}, outside [1, {self.response_ids.shape[1]}]"
            )
        if self.mrope_positions is None:
            if self.image_grid_thw is not None:
                raise ValueError("RolloutBatch.image_grid_thw (Qwen-VL) needs mrope_positions")
            for e, (pixels, sizes) in enumerate(zip(self.pixel_values, self.image_sizes, strict=True)):
                if (pixels is None) != (sizes is None) or (pixels is not None and pixels.shape[0] != sizes.shape[0]):
                    raise ValueError(f"entry {e}: pixel_values and image_sizes must both be given, one row per image")
            return
        grids = self.image_grid_thw if self.image_grid_thw is not None else [None] * entries
        for e, (pixels, grid, sizes) in enumerate(zip(self.pixel_values, grids, self.image_sizes, strict=True)):
            if sizes is not None or (pixels is None) != (grid is None):
                raise ValueError(f"entry {e}: a Qwen-VL entry has pixel_values with image_grid_thw (no image_sizes)")
            if pixels is not None and pixels.shape[0] != int(grid.prod(-1).sum()):
                raise ValueError(f"entry {e}: {pixels.shape[0]} pixel rows for image_grid_thw {grid.tolist()}")
            if self.mrope_positions[e].shape != (3, self.prompt_ids[e].numel()):
                raise ValueError(
                    f"entry {e}: mrope_positions has shape {tuple(self.mrope_positions[e].shape)} for a prompt of "
                    f"{self.prompt_ids[e].numel()} tokens (want [3, P])"
                )

    @property
    def mrope(self) -> bool:
        """True for Qwen2.5-VL / Qwen3-VL batches (mRoPE positions, ``image_grid_thw``)."""
        return self.mrope_positions is not None

    @property
    def num_responses(self) -> int:
        return self.response_ids.shape[0]

    @property
    def num_entries(self) -> int:
        return len(self.prompt_ids)

    def entry_responses(self) -> list[list[int]]:
        """The response indices of each entry."""
        out: list[list[int]] = [[] for _ in range(self.num_entries)]
        for i, e in enumerate(self.groups.tolist()):
            out[e].append(i)
        return out

    @classmethod
    def from_rollouts(
        cls,
        rollouts: Sequence[Sequence[Rollout]],
        advantages: Tensor | Sequence[Sequence[float]],
        *,
        images: Sequence[Sequence[Image.Image | str | Path]] | None = None,
        processor: ImageProcessor | None = None,
        pad_id: int = 0,
        keep: Tensor | None = None,
    ) -> RolloutBatch:
        """Build a batch from ``rollouts[p][j]`` (prompt p, column j) and ``advantages[p][j]``.

        Each prompt's rollouts are grouped by mode into entries (modes in order of first appearance;
        rollouts of one entry must share their prompt ids). ``images[p]`` are prompt p's images (PIL or
        paths); ``processor`` turns them into ``pixel_values`` once per prompt. A Qwen-VL processor (one with
        ``packed_position_ids``) also gives each entry its mRoPE positions, so pass it for Qwen-VL models even
        without images. Responses must be non-empty; ``rollout_logprobs`` is filled when every rollout
        carries log-probs.

        ``keep[p][j]`` False leaves that rollout out of the batch (``reward.overlong: mask``): dropped, not given a
        zero weight, so no token of it counts in the loss or in token-mean's denominator. An entry left without
        responses is not built (a prompt may lose both; ``source`` keeps the kept rollouts' own columns).
        """
        if len(advantages) != len(rollouts):
            raise ValueError(f"advantages has {len(advantages)} rows for {len(rollouts)} prompts")
        if images is not None and len(images) != len(rollouts):
            raise ValueError(f"images has {len(images)} entries for {len(rollouts)} prompts")
        prompt_ids, entry_prompts, entry_modes, entry_images, pixels, sizes, grids = [], [], [], [], [], [], []
        mrope = hasattr(processor, "packed_position_ids")  # the SFT collate's family test
        positions: list[Tensor] = []
        picked: list[tuple[int, int, Rollout]] = []
        groups: list[int] = []
        for p, row in enumerate(rollouts):
            if len(advantages[p]) != len(row):
                raise ValueError(f"advantages[{p}] has {len(advantages[p])} values for {len(row)} rollouts")
            decoded = decode_images(images[p] if images is not None else [], where=f"prompt {p}")
            vision = _preprocess(decoded, processor, where=f"prompt {p}")
            for mode in dict.fromkeys(r.mode for r in row):
                columns = [j for j, r in enumerate(row) if r.mode == mode and (keep is None or bool(keep[p][j]))]
                if not columns:
                    continue
                ids = row[columns[0]].prompt_ids
                for j in columns:
                    if list(row[j].prompt_ids) != list(ids):
                        raise ValueError(
                            f"rollouts[{p}][{j}] ({mode}) has other prompt ids than rollouts[{p}][{columns[0]}]"
                        )
                    if len(row[j].response_ids) == 0:
                        raise ValueError(f"rollouts[{p}][{j}] has an empty response")
                    picked.append((p, j, row[j]))
                    groups.append(len(prompt_ids))
                prompt_ids.append(torch.tensor(list(ids), dtype=torch.long))
                entry_prompts.append(p)
                entry_modes.append(mode)
                entry_images.append(decoded)
                pixels.append(vision.get("pixel_values"))
                sizes.append(vision.get("image_sizes"))
                grids.append(vision.get("image_grid_thw"))
                if mrope:
                    positions.append(processor.packed_position_ids([prompt_ids[-1]], [grids[-1]]))
        if not picked:
            raise ValueError("no rollouts")
        width = max(len(r.response_ids) for _, _, r in picked)
        response_ids = torch.full((len(picked), width), pad_id, dtype=torch.long)
        with_logprobs = all(r.logprobs is not None for _, _, r in picked)
        logprobs = torch.zeros((len(picked), width), dtype=torch.float32) if with_logprobs else None
        for i, (_, _, r) in enumerate(picked):
            response_ids[i, : len(r.response_ids)] = torch.tensor(r.response_ids, dtype=torch.long)
            if logprobs is not None:
                logprobs[i, : len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
        adv = [float(advantages[p][j]) for p, j, _ in picked]
        return cls(
            prompt_ids=prompt_ids,
            entry_prompts=entry_prompts,
            entry_modes=entry_modes,
            images=entry_images,
            pixel_values=pixels,
            image_sizes=sizes,
            response_ids=response_ids,
            response_lengths=torch.tensor([len(r.response_ids) for _, _, r in picked], dtype=torch.long),
            groups=torch.tensor(groups, dtype=torch.long),
            advantages=torch.tensor(adv, dtype=torch.float32),
            modes=[r.mode for _, _, r in picked],
            source=[(p, j) for p, j, _ in picked],
            rollout_logprobs=logprobs,
            image_grid_thw=grids if mrope else None,
            mrope_positions=positions if mrope else None,
        )


def _preprocess(images: list[Image.Image], processor: ImageProcessor | None, *, where: str) -> dict[str, Tensor]:
    """The processor's tensors of ``images``: ``pixel_values`` and ``image_sizes`` or ``image_grid_thw``."""
    if not images:
        return {}
    if processor is None:
        raise ValueError(f"{where} has images: pass processor= to compute their pixel_values")
    return processor.preprocess(images)


# ---------------------------------------------------------------------------------------------------
# chunks and micro-batches


@dataclass(frozen=True)
class Chunk:
    """Responses of one entry packed as one document (shared) or one document each (unshared)."""

    entry: int
    responses: tuple[int, ...]


def chunk_tokens(batch: RolloutBatch, entry: int, responses: Sequence[int], *, shared: bool) -> int:
    """Packed tokens of these responses of ``entry``: shared ``P - 1 + sum(L + 1)``, unshared ``sum(P + L)``."""
    prompt = batch.prompt_ids[entry].numel()
    lengths = sum(int(batch.response_lengths[i]) for i in responses)
    return prompt - 1 + lengths + len(responses) if shared else len(responses) * prompt + lengths


def plan_chunks(batch: RolloutBatch, responses: Sequence[int], max_tokens: int, *, shared: bool) -> list[Chunk]:
    """Cut ``responses`` (indices into the batch) into chunks of at most ``max_tokens`` packed tokens.

    Each entry's responses (in index order) form one chunk when they fit, else runs that do, filled
    greedily in order. Raises ValueError naming a response whose prompt + response alone is too long.
    """
    by_entry: dict[int, list[int]] = {}
    for i in sorted(responses):
        by_entry.setdefault(int(batch.groups[i]), []).append(i)
    chunks = []
    for entry, members in by_entry.items():
        current: list[int] = []
        for i in members:
            alone = chunk_tokens(batch, entry, [i], shared=shared)
            if alone > max_tokens:
                raise ValueError(
                    f"response {i} (entry {entry}: prompt of {batch.prompt_ids[entry].numel()} tokens + "
                    f"{int(batch.response_lengths[i])} response tokens) is over the budget max_tokens={max_tokens}"
                )
            if current and chunk_tokens(batch, entry, [*current, i], shared=shared) > max_tokens:
                chunks.append(Chunk(entry, tuple(current)))
                current = []
            current.append(i)
        chunks.append(Chunk(entry, tuple(current)))
    return chunks


def build_micro_batch(
    batch: RolloutBatch,
    chunks: Sequence[Chunk],
    *,
    shared: bool,
    device: torch.device | str,
    pixel_dtype: torch.dtype = torch.float32,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    is_weights: Tensor | None = None,
) -> PackedRow:
    """Pack ``chunks`` (in entry order) into one row on ``device``; ``old``/``ref`` log-probs and the rollout
    correction's ``is_weights`` are ``[R, Lmax]`` of the batch.
    The row's ``responses`` are the batch indices of its responses, in packing order; its ``inputs()`` the
    objective's keyword arguments."""
    chunks = sorted(chunks, key=lambda c: (c.entry, c.responses))
    index = torch.tensor([i for c in chunks for i in c.responses], dtype=torch.long)
    lengths = batch.response_lengths[index]
    width = int(lengths.max())
    on = lambda t: None if t is None else t[index, :width].to(device)
    pack = pack_shared_prefix if shared else pack_unshared
    row = pack(
        [batch.prompt_ids[c.entry].to(device) for c in chunks],
        batch.response_ids[index, :width].to(device),
        lengths.to(device),
        torch.arange(len(chunks)).repeat_interleave(torch.tensor([len(c.responses) for c in chunks])).to(device),
        batch.advantages[index].to(device),
        old_logprobs=on(old_logprobs),
        ref_logprobs=on(ref_logprobs),
    )
    row.responses = tuple(index.tolist())
    if is_weights is not None:
        row.is_weights = pack_responses(row, on(is_weights).float())
    # One copy of an entry's images per packed document: per chunk (shared) or per response (unshared).
    docs = [c.entry for c in chunks for _ in (c.responses if not shared else (0,))]
    with_images = [e for e in docs if batch.pixel_values[e] is not None]
    if batch.mrope:
        row.position_ids = _mrope_position_ids(batch, docs, row)
        if with_images:  # patch rows and grids of every image, in document order
            row.pixel_values = torch.cat([batch.pixel_values[e] for e in with_images])
            row.image_grid_thw = torch.cat([batch.image_grid_thw[e] for e in with_images])
    elif with_images:
        row.pixel_values = _cat_tiles([batch.pixel_values[e] for e in with_images])
        row.image_sizes = torch.cat([batch.image_sizes[e] for e in with_images])
    return row.to(device, pixel_dtype=pixel_dtype, non_blocking=False)  # the images join the packed tokens


def _mrope_position_ids(batch: RolloutBatch, docs: Sequence[int], packed: PackedRow) -> Tensor:
    """``[3, N]`` mRoPE positions of the packed row: each document (entry ``docs[d]``) maps its 1-D positions
    through its prompt's mRoPE positions, responses continuing after the prompt."""
    bounds = packed.cu_seqlens_host
    device = packed.position_ids.device
    return torch.cat(
        [
            continued_mrope_position_ids(batch.mrope_positions[e].to(device), packed.position_ids[a:b])
            for e, a, b in zip(docs, bounds[:-1], bounds[1:], strict=True)
        ],
        dim=1,
    )


def _cat_tiles(pixels: list[Tensor]) -> Tensor:
    """Concatenate ``[n, tiles, 3, S, S]`` blocks, zero-padding the tile axis (the model slices by image_sizes)."""
    tiles = max(p.shape[1] for p in pixels)
    return torch.cat([F.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) if p.shape[1] < tiles else p for p in pixels])
