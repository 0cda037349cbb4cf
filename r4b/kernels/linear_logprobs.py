"""Fused ``lm_head`` + log-softmax + gather: per-token log-probs without [N, V] logits.

Forward: one Triton kernel tiles the vocabulary; each program owns BLOCK_N rows
and one slice ("split") of the vocabulary, runs an online log-sum-exp over its
slice, and writes four fp32 statistics per row (running max, sum of exps,
sum of exp * logit for the entropy, and the target logit). A tiny torch reduce
over the splits gives log-probs, the log-normalizer and the entropy. Extra
memory: 4 * splits * N floats, nothing of size V.

Backward: the vocabulary is walked in column chunks of at most
``chunk_elements / N`` columns. A second Triton kernel recomputes each chunk's
logits in fp32 and writes d_logits straight into a reusable [N, chunk] buffer;
two cuBLAS matmuls then produce that chunk's rows of d_weight (complete, no
cross-chunk accumulation) and add its share of d_hidden into an fp32
accumulator. Chunking over the vocabulary, not the tokens, is what keeps both
gradients accumulated in fp32 without an fp32 [V, H] buffer.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import fused_grad, reference
from ._backend import autotune_configs, interpreting, use_triton
from ._tl_helpers import dot

# Upper bound on the elements of the backward's d_logits chunk buffer; the
# test-suite lowers it to prove no [N, V] tensor is ever allocated.
DEFAULT_CHUNK_ELEMENTS = 1 << 27


def _autotune_configs() -> list[triton.Config]:
    if interpreting():
        # The interpreter runs numpy per block: the smallest legal dot tiles keep
        # CPU tests fast and make every small test shape ragged.
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_K": 16}, num_warps=1)]
    configs = [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]
    return autotune_configs(configs, pinned=3)  # R4B_AUTOTUNE=0: the smallest K slices


_CONFIGS = _autotune_configs()
# A forward split is a whole number of vocabulary tiles for every config.
_SPLIT_ALIGN = max(c.kwargs["BLOCK_V"] for c in _CONFIGS)


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    offs_n,
    offs_v,
    N,
    v_end,
    H,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_temp,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 tile of hidden[offs_n] @ weight[offs_v].T / temperature."""
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_n < N
    col_ok = offs_v < v_end
    h_ptrs = h_ptr + offs_n[:, None].to(tl.int64) * stride_hn + offs_k[None, :] * stride_hk
    w_ptrs = w_ptr + offs_v[None, :].to(tl.int64) * stride_wv + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = offs_k + k0 < H
        a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = dot(a, b, acc, UPCAST, IEEE)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    return acc * inv_temp


@triton.autotune(configs=_CONFIGS, key=["H", "V"])
@triton.jit
def _logprobs_fwd_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    stats_ptr,
    N,
    V,
    H,
    split_width,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_temp,
    WITH_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=-1)

    v_start = split * split_width
    v_end = tl.minimum(v_start + split_width, V)
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_x = tl.zeros((BLOCK_N,), tl.float32)
    tgt_logit = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < v_end
        raw = _logits_tile(
            h_ptr, w_ptr, offs_n, offs_v, N, v_end, H,
            stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
            UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        x = tl.where(col_ok[None, :], raw, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(x, 1))
        alpha = tl.exp(run_max - new_max)
        e = tl.exp(x - new_max[:, None])  # 0 on columns past the split
        sum_exp = sum_exp * alpha + tl.sum(e, 1)
        if WITH_ENTROPY:
            # raw (0 past the split), not x (-inf there): 0 * -inf would be NaN
            sum_exp_x = sum_exp_x * alpha + tl.sum(e * raw, 1)
        tgt_logit += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], raw, 0.0), 1)
        run_max = new_max

    # stats layout: [4, num_splits, N]
    out = stats_ptr + split * N + offs_n
    plane = num_splits * N
    tl.store(out, run_max, mask=row_ok)
    tl.store(out + plane, sum_exp, mask=row_ok)
    tl.store(out + 2 * plane, sum_exp_x, mask=row_ok)
    tl.store(out + 3 * plane, tgt_logit, mask=row_ok)


@triton.autotune(configs=_CONFIGS, key=["H", "V"])
@triton.jit
def _dlogits_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    lse_ptr,
    grad_lp_ptr,
    ent_ptr,
    grad_ent_ptr,
    out_ptr,
    N,
    V,
    H,
    v_lo,
    v_hi,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_on,
    inv_temp,
    HAS_ENT_GRAD: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """d_logits[n, v - v_lo] for the column chunk [v_lo, v_hi), w.r.t. the raw logits."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_n < N
    col_ok = offs_v < v_hi
    x = _logits_tile(
        h_ptr, w_ptr, offs_n, offs_v, N, v_hi, H,
        stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
        UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    g_lp = tl.load(grad_lp_ptr + offs_n, mask=row_ok, other=0.0)
    p = tl.exp(x - lse[:, None])
    # d logp_t / d x_v = [v == t] - p_v
    d = tl.where(offs_v[None, :] == tgt[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
    if HAS_ENT_GRAD:
        # d H / d x_v = -p_v * (log p_v + H)
        ent = tl.load(ent_ptr + offs_n, mask=row_ok, other=0.0)
        g_ent = tl.load(grad_ent_ptr + offs_n, mask=row_ok, other=0.0)
        d -= g_ent[:, None] * p * (x - lse[:, None] + ent[:, None])
    d = d * inv_temp
    out = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + (offs_v - v_lo)[None, :]
    tl.store(out, d.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _dtype_flags(dtype: torch.dtype) -> dict[str, bool]:
    return {
        "UPCAST": interpreting() and dtype == torch.bfloat16,
        # fp32 inputs get true fp32 products, not TF32: exactness first.
        "IEEE": dtype == torch.float32,
    }


def _num_splits(n_rows: int, vocab: int, device: torch.device) -> int:
    """Vocabulary splits: enough programs to fill the GPU when N is small."""
    max_splits = triton.cdiv(vocab, _SPLIT_ALIGN)
    if interpreting():
        return min(3, max_splits)  # exercise the cross-split reduction in tests
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(n_rows, 128)
    return max(1, min(max_splits, triton.cdiv(2 * sms, row_blocks)))


def _forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    inv_temp: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    splits = _num_splits(n_rows, vocab, hidden.device)
    split_width = triton.cdiv(triton.cdiv(vocab, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    splits = triton.cdiv(vocab, split_width)
    stats = torch.empty((4, splits, n_rows), dtype=torch.float32, device=hidden.device)
    if n_rows > 0:

        def grid(meta):
            return (triton.cdiv(n_rows, meta["BLOCK_N"]), splits)

        _logprobs_fwd_kernel[grid](
            hidden, weight, targets, stats,
            n_rows, vocab, hidden_size, split_width,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            inv_temp,
            WITH_ENTROPY=with_entropy,
            **_dtype_flags(hidden.dtype),
        )  # fmt: skip
    run_max, sum_exp, sum_exp_x, tgt_logit = stats.unbind(0)
    top = run_max.amax(0)
    scale = torch.exp(run_max - top)
    total = (sum_exp * scale).sum(0)
    lse = top + torch.log(total)
    logprobs = tgt_logit.sum(0) - lse
    entropy = lse - (sum_exp_x * scale).sum(0) / total if with_entropy else None
    return logprobs, lse, entropy


@functools.cache
def _has_mm_out_dtype(device_type: str) -> bool:
    try:
        a = torch.zeros(1, 1, dtype=torch.bfloat16, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _add_matmul(acc32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc32 += a @ b with fp32 products, whatever the inputs' dtype."""
    if a.dtype == torch.float32:
        acc32.addmm_(a, b)
    elif _has_mm_out_dtype(a.device.type):
        acc32 += torch.mm(a, b, out_dtype=torch.float32)
    else:
        acc32 += torch.mm(a, b)


def chunk_columns(n_rows: int, vocab: int, chunk_elements: int | None) -> int:
    """Columns of the backward's d_logits buffer: at most chunk_elements / N."""
    budget = DEFAULT_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    return max(1, min(vocab, budget // max(n_rows, 1)))


# The Triton path as torch.library custom ops (forward, backward and their fake implementations), so that
# torch.compile traces a model calling linear_logprobs without a graph break: Dynamo sees an opaque op of known
# output shapes, never the Triton launches. Absent outputs are empty tensors (an op returns tensors only).


@torch.library.custom_op("r4b::linear_logprobs", mutates_args=())
def _logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    inv_temp: float,
    with_entropy: bool,
    chunk_elements: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs[N], lse[N], entropy[N] or [0]); ``chunk_elements`` is the backward's."""
    logprobs, lse, entropy = _forward(hidden, weight, targets, inv_temp, with_entropy)
    return logprobs, lse, entropy if entropy is not None else lse.new_empty(0)


@_logprobs_op.register_fake
def _(hidden, weight, targets, inv_temp, with_entropy, chunk_elements):
    n_rows = hidden.shape[0]
    stat = functools.partial(hidden.new_empty, dtype=torch.float32)
    return stat(n_rows), stat(n_rows), stat(n_rows if with_entropy else 0)


@torch.library.custom_op("r4b::linear_logprobs_backward", mutates_args=())
def _logprobs_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_temp: float,
    chunk_elements: int | None,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden or [0], grad_weight or [0]): d_logits per vocabulary chunk (Triton), then cuBLAS."""
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    grad_logprobs = grad_logprobs.float().contiguous()
    has_ent_grad = grad_entropy is not None
    grad_entropy = grad_entropy.float().contiguous() if has_ent_grad else lse
    grad_hidden32 = torch.zeros(n_rows, hidden_size, dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    cols = chunk_columns(n_rows, vocab, chunk_elements)
    buffer = torch.empty(n_rows, cols, dtype=hidden.dtype, device=hidden.device)
    for v_lo in range(0, vocab, cols):
        v_hi = min(vocab, v_lo + cols)
        d_logits = buffer[:, : v_hi - v_lo]

        def grid(meta, width=v_hi - v_lo):
            return (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(width, meta["BLOCK_V"]))

        _dlogits_kernel[grid](
            hidden, weight, targets, lse, grad_logprobs, entropy if has_ent_grad else lse, grad_entropy,
            d_logits,
            n_rows, vocab, hidden_size, v_lo, v_hi,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), d_logits.stride(0),
            inv_temp,
            HAS_ENT_GRAD=has_ent_grad,
            **_dtype_flags(hidden.dtype),
        )  # fmt: skip
        if need_weight:
            torch.mm(d_logits.t(), hidden, out=grad_weight[v_lo:v_hi])
        if need_hidden:
            _add_matmul(grad_hidden32, d_logits, weight[v_lo:v_hi])
    grad_hidden = grad_hidden32.to(hidden.dtype) if need_hidden else hidden.new_empty(0)
    return grad_hidden, grad_weight


@_logprobs_backward_op.register_fake
def _(hidden, weight, targets, lse, entropy, grad_logprobs, grad_entropy, inv_temp, chunk_elements, need_hidden,
      need_weight):  # fmt: skip
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
    )


def _logprobs_setup_context(ctx, inputs, output) -> None:
    hidden, weight, targets, inv_temp, _, chunk_elements = inputs
    _, lse, entropy = output
    ctx.save_for_backward(hidden, weight, targets, lse, entropy)
    ctx.inv_temp, ctx.chunk_elements = inv_temp, chunk_elements
    ctx.set_materialize_grads(False)  # an unused entropy gets no gradient pass (None, not zeros)


def _logprobs_backward(ctx, grad_logprobs, grad_lse, grad_entropy):
    hidden, weight, targets, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight = ctx.needs_input_grad[:2]
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if grad_entropy is not None and grad_entropy.numel() == 0:  # with_entropy=False: the empty placeholder
        grad_entropy = None
    grad_hidden, grad_weight = _logprobs_backward_op(
        hidden, weight, targets, lse, entropy, grad_logprobs, grad_entropy, ctx.inv_temp, ctx.chunk_elements,
        need_hidden, need_weight,
    )  # fmt: skip
    return (grad_hidden if need_hidden else None), (grad_weight if need_weight else None), None, None, None, None


_logprobs_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup_context)


def check_logprob_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or devices disagree."""
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [N, H] (or [..., H]), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32 or int64, got {targets.dtype}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden, weight and targets must share a device, got {hidden.device}, {weight.device}, {targets.device}"
        )
    if targets.numel() and not torch.compiler.is_compiling():  # a host read: eager calls only
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            bad = lo if lo < 0 else hi
            index = tuple(int(i) for i in (targets == bad).nonzero()[0])
            raise ValueError(f"targets{list(index)} = {bad} is outside the vocabulary [0, {weight.shape[0]})")


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_elements: int | None = None,
    method: str | None = None,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``log softmax(hidden @ weight.T / temperature)[n, targets[n]]`` in fp32.

    ``hidden`` is [N, H] or [..., H] with ``targets`` of shape [...]; outputs
    take the shape of ``targets``.

    Never allocates an [N, V] tensor: the backward's d_logits buffer holds at
    most ``chunk_elements`` elements (default ``DEFAULT_CHUNK_ELEMENTS``).
    ``weight`` is cast to ``hidden.dtype`` when they differ (autocast keeps an
    fp32 ``lm_head`` beside bf16 activations); the cast is differentiable.
    A NaN or inf in a row of ``hidden`` yields NaN for that row only.

    ``method`` (default ``$R4B_FUSED_LOSS_METHOD``, else ``"recompute"``): ``"cublas"`` /
    ``"cublas-fast"`` compute forward-only calls (under ``torch.no_grad()``, or neither input requiring
    grad) as cuBLAS logits per token chunk of at most ``chunk_bytes`` plus a Triton row kernel
    (``r4b.kernels.fused_grad``); calls that need gradients always take ``"recompute"``.

    Returns ``(logprobs[N], entropy[N] or None)``, both fp32 and differentiable
    in ``hidden`` and ``weight``.
    """
    check_logprob_inputs(hidden, weight, targets)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if chunk_elements is not None and chunk_elements < 1:
        raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    method = fused_grad.resolve_method(method)
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    weight = weight.to(hidden.dtype)
    forward_only = not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad))
    if method != "recompute" and forward_only and use_triton(hidden, weight):
        logprobs, entropy = fused_grad.logprobs_forward_only(
            hidden, weight, targets, temperature=temperature, with_entropy=with_entropy, chunk_bytes=chunk_bytes,
            **{k: v for k, v in fused_grad.method_options(method).items() if k == "logits_fp32"},
        )  # fmt: skip
    elif use_triton(hidden, weight):
        logprobs, _, entropy = _logprobs_op(hidden, weight, targets, 1.0 / temperature, with_entropy, chunk_elements)
        entropy = entropy if with_entropy else None
    else:
        logprobs, entropy = reference.linear_logprobs_reference(
            hidden, weight, targets, temperature=temperature, with_entropy=with_entropy
        )
    return logprobs.view(shape), None if entropy is None else entropy.view(shape)
