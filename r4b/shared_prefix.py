"""Shared-prefix packing of BPO groups: a prompt and all its responses in one packed document.

A BPO group is one prompt ``p[0..P-1]`` and R responses ``r_k`` (k = 1..R). Packed, it is the document::

    [p_0 .. p_{P-2}]  then for each k:  [p_{P-1}, r_k[0], ..., r_k[L_k-1]]

The last prompt token is repeated at the head of every response segment, so every position's
next-token target lies inside its own segment: the repeated ``p_{P-1}`` predicts ``r_k[0]`` and the
last response token predicts nothing. With ``segment_ids`` (0 = prompt body, k = response k) the
varlen attention of ``r4b.kernels`` lets each response see the prompt and itself only, so the prompt
is stored and attended once per group instead of once per response.

Per position: ``input_ids``; ``position_ids`` (prompt body 0..P-2, segment k P-1..P-1+L_k, so
``r_k[j]`` sits at P+j as if it followed the prompt alone); ``segment_ids``; ``targets`` (``r_k[j]`` at
local index j < L_k of segment k, else -100); ``loss_mask``; ``advantages`` (A_k on loss tokens, else
0); optional ``old_logprobs`` / ``ref_logprobs`` (the value for ``r_k[j]`` at local index j, else 0);
``seq_ids`` (the global response index on loss tokens, else -1). Groups are packed back to back,
one document each, delimited by ``cu_seqlens``. The result is a :class:`~r4b.packed_row.PackedRow` (its loss
inputs and the bookkeeping :func:`unpack_responses` reads filled in), on the responses' device.

Three implementations compute the same function: CUDA kernels (``r4b._cuda``, one launch to pack,
one to unpack) for CUDA tensors where the extension was built, vectorized torch everywhere else,
and the layout above transcribed as a loop over groups, responses and tokens (the oracle of
tests/kernels/test_shared_prefix.py). Packing reads the response lengths and group indices on
the host once (validation and the output size need them); the per-token work stays on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from r4b.packed_row import PackedRow

try:
    from r4b import _cuda
except ImportError:  # no CUDA build (a CPU machine): the torch implementation does the same work
    _cuda = None

__all__ = [
    "IGNORE_INDEX",
    "pack_responses",
    "pack_shared_prefix",
    "pack_unshared",
    "unpack_responses",
]

IGNORE_INDEX = -100
_INT32_MAX = 2**31 - 1


def pack_shared_prefix(
    prompts: Sequence[Tensor],
    responses: Tensor,
    response_lengths: Tensor,
    group_index: Tensor,
    advantages: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
) -> PackedRow:
    """Pack every group (a prompt and its responses) into one document; all groups in one call.

    Args:
        prompts: G 1-D integer tensors, the token ids of each group's prompt (at least one token each).
        responses: [R, Lmax] integer token ids, right-padded (padding is never read).
        response_lengths: [R] token count of each response, 1 <= L <= Lmax.
        group_index: [R] the prompt each response answers; a group's responses are contiguous, groups
            in order 0..G-1, and every prompt has at least one response.
        advantages: [R] one advantage per response.
        old_logprobs, ref_logprobs: optional [R, Lmax] per-token log-probs of the responses' tokens.

    Returns:
        The packed row on ``responses.device``, its host ``cu_seqlens`` handed to the attention
        (:meth:`PackedRow.to`); CUDA tensors take one kernel launch (plus small host-computed index
        tables), others the vectorized torch implementation.

    Raises:
        ValueError: naming the argument and index: an empty prompt, a length outside [1, Lmax], a
            ``group_index`` that is not sorted, contiguous and covering every prompt, shape, dtype
            or device mismatches.
    """
    lengths, groups = _validate(
        prompts, responses, response_lengths, group_index, advantages, old_logprobs, ref_logprobs
    )
    return _pack(prompts, responses, lengths, groups, advantages, old_logprobs, ref_logprobs, shared=True)


def pack_unshared(
    prompts: Sequence[Tensor],
    responses: Tensor,
    response_lengths: Tensor,
    group_index: Tensor,
    advantages: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
) -> PackedRow:
    """The naive layout, for comparisons: each response its own document, full prompt + response.

    Same arguments as :func:`pack_shared_prefix`. Positions run 0..P+L-1 and ``segment_ids`` is None
    (plain causal documents). It is the shared layout of one-response groups, so it is computed by
    the same code with each prompt repeated per response.
    """
    lengths, groups = _validate(
        prompts, responses, response_lengths, group_index, advantages, old_logprobs, ref_logprobs
    )
    prompts, groups = _one_group_per_response(prompts, groups)
    return _pack(prompts, responses, lengths, groups, advantages, old_logprobs, ref_logprobs, shared=False)


def unpack_responses(packed: PackedRow, values: Tensor) -> Tensor:
    """Gather per-token values at the predicting positions back to [response, token].

    Args:
        packed: a row of :func:`pack_shared_prefix` or :func:`pack_unshared` (or
            :func:`r4b.rl.batch.build_micro_batch`).
        values: [N, ...] per packed position, e.g. log-probs of ``packed.targets``.

    Returns:
        [R, Lmax, ...] where ``out[i, j]`` is the value at the position whose target is response i's
        token j, and 0 past each response's length. Any dtype. On CUDA one kernel launch (a byte
        copy, not differentiable); elsewhere, or when ``values`` requires grad, torch indexing.
    """
    if values.dim() < 1 or values.shape[0] != packed.num_tokens:
        raise ValueError(
            f"values has shape {tuple(values.shape)}; its first dimension must be the packing's "
            f"{packed.num_tokens} tokens"
        )
    if values.device != packed.response_starts.device:
        raise ValueError(f"values is on {values.device}, the packing on {packed.response_starts.device}")
    out = values.new_empty((packed.num_responses, packed.max_response_len, *values.shape[1:]))
    if _use_cuda(values) and not (values.requires_grad and torch.is_grad_enabled()):
        _cuda.unpack_responses(values.contiguous(), out, packed.response_starts, packed.response_lengths)
        return out
    token = torch.arange(packed.max_response_len, device=values.device)
    valid = token < packed.response_lengths[:, None]
    out = out.zero_()
    out[valid] = values[(packed.response_starts[:, None] + token)[valid]]
    return out


def pack_responses(packed: PackedRow, values: Tensor) -> Tensor:
    """The inverse of :func:`unpack_responses`: ``values`` [R, >= Lmax] per (response, token) placed at the packed
    positions that predict those tokens, ``[N]``, 0 elsewhere (a per-token loss input the packing kernel does not
    carry: the rollout correction's importance weights)."""
    if values.shape[0] != packed.num_responses or values.shape[1] < packed.max_response_len:
        raise ValueError(
            f"values has shape {tuple(values.shape)}; want [{packed.num_responses}, >= {packed.max_response_len}]"
        )
    values = values.to(packed.response_starts.device)
    token = torch.arange(packed.max_response_len, device=values.device)
    valid = token < packed.response_lengths[:, None]
    out = values.new_zeros(packed.num_tokens)
    out[(packed.response_starts[:, None] + token)[valid]] = values[:, : packed.max_response_len][valid]
    return out


# ---------------------------------------------------------------------------------------------------
# Validation and the index tables shared by the torch and CUDA implementations


def _validate(
    prompts, responses, response_lengths, group_index, advantages, old_logprobs, ref_logprobs
) -> tuple[Tensor, Tensor]:
    """Raise ValueError naming the argument (and index) of the first thing wrong with the inputs.

    Returns the lengths and group indices as int64 host tensors (one device sync), which the index
    tables are computed from.
    """
    if isinstance(prompts, Tensor) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty sequence of 1-D token-id tensors, one per group")
    for g, prompt in enumerate(prompts):
        if not isinstance(prompt, Tensor) or prompt.dim() != 1 or not _is_integer(prompt):
            raise ValueError(f"prompts[{g}] must be a 1-D integer tensor of token ids, got {_describe(prompt)}")
        if prompt.numel() == 0:
            raise ValueError(f"prompts[{g}] is empty: a prompt needs at least one token")
    if not isinstance(responses, Tensor) or responses.dim() != 2 or responses.numel() == 0:
        raise ValueError(f"responses must be a non-empty [R, Lmax] integer tensor, got {_describe(responses)}")
    _require("responses", responses, responses.shape, floating=False)
    num, width, device = responses.shape[0], responses.shape[1], responses.device
    _require("response_lengths", response_lengths, (num,), floating=False)
    _require("group_index", group_index, (num,), floating=False)
    _require("advantages", advantages, (num,), floating=True, device=device)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            _require(name, t, responses.shape, floating=True, device=device)

    # One device-to-host copy, wherever the two live.
    lengths, groups = torch.stack([response_lengths.long(), group_index.to(response_lengths.device).long()]).cpu()
    bad = ((lengths < 1) | (lengths > width)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"response_lengths[{i}] = {int(lengths[i])} is outside [1, {width}] (responses.shape[1])")
    bad = ((groups < 0) | (groups >= len(prompts))).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"group_index[{i}] = {int(groups[i])} is out of range for {len(prompts)} prompts")
    if groups[0] != 0:
        raise ValueError(f"group_index[0] = {int(groups[0])}: prompts[0] has no responses")
    steps = groups.diff()
    bad = ((steps < 0) | (steps > 1)).nonzero()
    if bad.numel():
        i = int(bad[0]) + 1
        problem = (
            "a group's responses must be contiguous and groups in order"
            if steps[i - 1] < 0
            else f"prompts[{int(groups[i - 1]) + 1}] has no responses"
        )
        raise ValueError(f"group_index[{i}] = {int(groups[i])} follows {int(groups[i - 1])}: {problem}")
    if groups[-1] != len(prompts) - 1:
        raise ValueError(f"prompts[{int(groups[-1]) + 1}] has no responses (group_index ends at {int(groups[-1])})")
    return lengths, groups


def _require(name: str, t: object, shape, *, floating: bool, device: torch.device | None = None) -> None:
    """Raise unless ``t`` is a tensor of this shape and kind (and device, when given)."""
    ok = isinstance(t, Tensor) and t.shape == shape and (t.is_floating_point() if floating else _is_integer(t))
    if not ok:
        kind = "a floating" if floating else "an integer"
        raise ValueError(f"{name} must be {kind} tensor of shape {tuple(shape)}, got {_describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, responses on {device}")


def _is_integer(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _describe(t: object) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _one_group_per_response(prompts: Sequence[Tensor], groups: Tensor) -> tuple[list[Tensor], Tensor]:
    """The unshared layout is the shared one with every response alone in a group of its own."""
    return [prompts[g] for g in groups.tolist()], torch.arange(groups.numel())


@dataclass
class _Plan:
    """Host-computed index tables, on the packing's device. int64 unless noted."""

    prompt_tokens: Tensor  # every prompt, concatenated
    prompt_offsets: Tensor  # [G+1] where each prompt starts in prompt_tokens
    doc_starts: Tensor  # [G] packed index of each group's document
    response_starts: Tensor  # [R] packed index of each response segment (its repeated prompt token)
    response_lengths: Tensor  # [R]
    group_index: Tensor  # [R]
    segment_index: Tensor  # [R] each response's segment id: k within its group, or 0 unshared
    cu_seqlens: tuple[int, ...]  # [G+1], host ints
    num_tokens: int
    max_seqlen: int
    max_segment_len: int  # longest prompt body or response segment (sizes the CUDA grid)


def _plan(prompts: Sequence[Tensor], lengths: Tensor, groups: Tensor, *, shared: bool, device) -> _Plan:
    """Where every prompt body and response segment goes, from host lengths and group indices: O(G + R)
    on the host, then one copy of the tables (and one of the prompts) to the device."""
    prompt_lengths = torch.tensor([p.numel() for p in prompts])
    num_groups = len(prompts)
    counts = torch.bincount(groups, minlength=num_groups)
    segment_lengths = lengths + 1  # the repeated last prompt token, then the response
    doc_lengths = (prompt_lengths - 1).index_add(0, groups, segment_lengths)
    doc_starts = _exclusive_cumsum(doc_lengths)
    num_tokens = int(doc_lengths.sum())
    if num_tokens > _INT32_MAX:
        raise ValueError(f"the packing has {num_tokens} tokens; cu_seqlens (int32) holds at most {_INT32_MAX}")
    first_response = _exclusive_cumsum(counts)
    seg_starts = _exclusive_cumsum(segment_lengths)  # within the concatenation of all segments
    response_starts = doc_starts[groups] + prompt_lengths[groups] - 1 + seg_starts - seg_starts[first_response[groups]]
    segment_index = torch.arange(groups.numel()) - first_response[groups] + 1
    tables = torch.cat([
        _exclusive_cumsum(prompt_lengths, total=True), doc_starts, response_starts, lengths, groups,
        segment_index if shared else torch.zeros_like(segment_index),
    ]).to(device)  # fmt: skip
    offsets, starts, resp_starts, lengths_d, groups_d, segments = tables.split(
        [num_groups + 1, num_groups] + [groups.numel()] * 4
    )
    source = prompts[0].device
    return _Plan(
        prompt_tokens=torch.cat([p.to(source, torch.long) for p in prompts]).to(device),
        prompt_offsets=offsets,
        doc_starts=starts,
        response_starts=resp_starts,
        response_lengths=lengths_d,
        group_index=groups_d,
        segment_index=segments,
        cu_seqlens=(*doc_starts.tolist(), num_tokens),
        num_tokens=num_tokens,
        max_seqlen=int(doc_lengths.max()),
        max_segment_len=max(int(segment_lengths.max()), int(prompt_lengths.max()) - 1),
    )


def _exclusive_cumsum(x: Tensor, *, total: bool = False) -> Tensor:
    """[0, x0, x0+x1, ...]: len(x) entries, or len(x)+1 with the total at the end."""
    out = torch.cat([x.new_zeros(1), x.cumsum(0)])
    return out if total else out[:-1]


# ---------------------------------------------------------------------------------------------------
# The scatter: CUDA kernel or vectorized torch, into the same freshly allocated outputs


def _pack(prompts, responses, lengths, groups, advantages, old_logprobs, ref_logprobs, *, shared: bool) -> PackedRow:
    """Allocate the outputs and fill them in one scatter; ``lengths``/``groups`` are validated host tensors. The
    unshared layout's segment ids (all 0) are written, then left out of the row."""
    device = responses.device
    plan = _plan(prompts, lengths, groups, shared=shared, device=device)
    responses = responses.long().contiguous()
    advantages = advantages.float().contiguous()
    old_logprobs, ref_logprobs = (None if t is None else t.float().contiguous() for t in (old_logprobs, ref_logprobs))

    n = plan.num_tokens
    empty = lambda dtype: torch.empty(n, dtype=dtype, device=device)
    packed = PackedRow(
        input_ids=empty(torch.long),
        position_ids=empty(torch.long),
        cu_seqlens=torch.tensor(plan.cu_seqlens, dtype=torch.int32),
        max_seqlen=plan.max_seqlen,
        targets=empty(torch.long),
        cu_seqlens_host=plan.cu_seqlens,
        loss_tokens=int(lengths.sum()),
        segment_ids=empty(torch.int32),
        loss_mask=empty(torch.bool),
        advantages=empty(torch.float32),
        seq_ids=empty(torch.long),
        old_logprobs=None if old_logprobs is None else empty(torch.float32),
        ref_logprobs=None if ref_logprobs is None else empty(torch.float32),
        response_starts=plan.response_starts,
        response_lengths=plan.response_lengths,
        max_response_len=responses.shape[1],
    )
    if _use_cuda(responses):
        _cuda.pack_shared_prefix(
            plan.prompt_tokens, plan.prompt_offsets, plan.doc_starts, responses, plan.response_lengths,
            plan.response_starts, plan.group_index, plan.segment_index, advantages, old_logprobs, ref_logprobs,
            plan.max_segment_len, packed.input_ids, packed.position_ids, packed.segment_ids, packed.targets,
            packed.loss_mask, packed.advantages, packed.old_logprobs, packed.ref_logprobs, packed.seq_ids,
        )  # fmt: skip
    else:
        _scatter_torch(plan, responses, advantages, old_logprobs, ref_logprobs, packed)
    if not shared:
        packed.segment_ids = None
    return packed.to(device, non_blocking=False)  # cu_seqlens (built on the host) joins the rest


def _use_cuda(t: Tensor) -> bool:
    return t.is_cuda and _cuda is not None


def _scatter_torch(plan: _Plan, responses, advantages, old_logprobs, ref_logprobs, out: PackedRow) -> None:
    """The CUDA kernel's work in vectorized torch: O(tokens) memory, no loop over groups or tokens."""
    for t, ignored in ((out.targets, IGNORE_INDEX), (out.seq_ids, -1), (out.segment_ids, 0), (out.advantages, 0)):
        t.fill_(ignored)
    out.loss_mask.fill_(False)
    for t in (out.old_logprobs, out.ref_logprobs):
        if t is not None:
            t.zero_()
    prompt_lengths = plan.prompt_offsets.diff()

    # Prompt bodies: every prompt token but the last, at the head of its group's document.
    group = torch.repeat_interleave(torch.arange(len(prompt_lengths), device=prompt_lengths.device), prompt_lengths)
    i = torch.arange(plan.prompt_tokens.numel(), device=group.device) - plan.prompt_offsets[group]
    body = i < prompt_lengths[group] - 1
    dest = (plan.doc_starts[group] + i)[body]
    out.input_ids[dest] = plan.prompt_tokens[body]
    out.position_ids[dest] = i[body]

    # Response segments: local index j = 0..L holds the repeated last prompt token then the response.
    width = responses.shape[1]
    r, j = (torch.arange(width + 1, device=responses.device) <= plan.response_lengths[:, None]).nonzero(as_tuple=True)
    g = plan.group_index[r]
    dest = plan.response_starts[r] + j
    last_prompt_token = plan.prompt_tokens[plan.prompt_offsets[g + 1] - 1]
    out.input_ids[dest] = torch.where(j == 0, last_prompt_token, responses[r, (j - 1).clamp(min=0)])
    out.position_ids[dest] = prompt_lengths[g] - 1 + j
    out.segment_ids[dest] = plan.segment_index[r].int()

    # Loss tokens: position j of segment r predicts r's token j.
    in_loss = j < plan.response_lengths[r]
    dest, r, j = dest[in_loss], r[in_loss], j[in_loss]
    out.targets[dest] = responses[r, j]
    out.loss_mask[dest] = True
    out.advantages[dest] = advantages[r]
    out.seq_ids[dest] = r
    for src, dst in ((old_logprobs, out.old_logprobs), (ref_logprobs, out.ref_logprobs)):
        if src is not None:
            dst[dest] = src[r, j]
