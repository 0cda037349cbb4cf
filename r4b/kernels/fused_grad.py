"""The fused linear + log-prob loss on cuBLAS: logits per token chunk, a Triton epilogue, gradients in the forward.

``method="cublas"`` of ``fused_linear_bpo_loss`` / ``fused_linear_cross_entropy`` (and, forward-only, of
``linear_logprobs``). For losses whose per-token gradient with respect to the log-prob is known in the
forward (BPO/GRPO, cross-entropy: advantages, old and reference log-probs are inputs), each token chunk
costs three N·H·V passes, all cuBLAS, and no recompute:

1. ``logits = h_chunk @ W.T`` by cuBLAS into a reusable fp32 ``[C, V]`` buffer (bf16/fp16 operands,
   fp32 accumulate and fp32 output where torch has ``mm(..., out_dtype=float32)``, i.e. on CUDA);
2. a Triton row kernel reads the chunk once: log-sum-exp, the target log-prob, the entropy;
   O(C) torch work turns the log-probs into the loss's per-token gradient ``g = dL/dlogp``;
   a second Triton kernel reads the chunk again and writes ``d_logits = g·(onehot - p)/T`` in the
   compute dtype (in place for fp32);
3. ``d_hidden[chunk] = d_logits @ W`` (complete per chunk, K = V) and ``d_W += d_logits.T @ h_chunk``
   by cuBLAS; ``d_W`` is accumulated in fp32 across chunks (``exact_dweight=True``, an fp32 ``[V, H]``
   buffer) or in the weight's dtype (``exact_dweight=False``: one rounding per chunk, no fp32 buffer).

The gradients are kept until backward, which scales them by the upstream gradient (any scale, and
autograd accumulates them into ``.grad`` across calls). Under ``torch.no_grad()`` or when neither
``hidden`` nor ``weight`` requires grad, only steps 1 and 2's statistics run. The chunk's rows come
from a byte budget (``chunk_bytes``, default ``DEFAULT_CHUNK_BYTES``) over the fp32 logits plus the
16-bit d_logits: see ``chunk_rows`` and ``peak_bytes``.

Precision. "cublas" matches "recompute": fp32 logits and softmax statistics, d_W accumulated in fp32.
"cublas-fast" rounds the logits to the compute dtype (the log-probs then carry bf16's ~2^-9 relative error
of each logit, as a materialized bf16 loss does) and rounds d_W once per chunk: a CPU simulation (bf16
d_logits, N=4096, H=128, V=8192) gave d_W relative errors of 2.37e-3 with fp32 accumulation and 2.63e-3,
3.30e-3, 4.55e-3 with bf16 accumulation over 2, 5, 15 chunks. Not measured on a GPU yet.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._backend import autotune_configs, interpreting

# Bytes of the per-chunk buffers (fp32 logits + 16-bit d_logits): 1 GiB.
DEFAULT_CHUNK_BYTES = 1 << 30
# GPU chunks are a multiple of this many rows (cuBLAS tiles), unless the whole batch is smaller.
_ROW_ALIGN = 64

# (logp_chunk fp32 [C], row slice) -> dL/dlogp for those rows, fp32 [C]
TokenGrad = Callable[[torch.Tensor, slice], torch.Tensor]


def _row_configs() -> list[triton.Config]:
    if interpreting():  # a few programs, several vocabulary blocks per row: fast and ragged in tests
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32}, num_warps=1)]
    configs = [
        triton.Config({"BLOCK_N": 1, "BLOCK_V": 2048}, num_warps=8),
        triton.Config({"BLOCK_N": 1, "BLOCK_V": 4096}, num_warps=8),
        triton.Config({"BLOCK_N": 2, "BLOCK_V": 1024}, num_warps=4),
    ]
    return autotune_configs(configs, pinned=0)


def _elementwise_config() -> dict:
    """The d_logits kernel's one config: it is never autotuned, since it may write over its input (an
    autotuner's repeated benchmark launches would then read d_logits as logits)."""
    if interpreting():
        return {"BLOCK_N": 16, "BLOCK_V": 64, "num_warps": 1}
    return {"BLOCK_N": 1, "BLOCK_V": 2048, "num_warps": 8}


@triton.autotune(configs=_row_configs(), key=["V"])
@triton.jit
def _row_stats_kernel(
    x_ptr,
    tgt_ptr,
    logp_ptr,
    lse_ptr,
    ent_ptr,
    N,
    V,
    stride_xn,
    inv_temp,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """BLOCK_N rows of fp32 (or 16-bit) raw logits, each read once: log-sum-exp of x/T, the target's log-prob and
    (optionally) the entropy, by an online softmax over vocabulary blocks."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    base = x_ptr + rows.to(tl.int64) * stride_xn
    offs = tl.arange(0, BLOCK_V)
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_x = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        col_ok = v0 + offs < V
        ptrs = base[:, None] + (v0 + offs)[None, :]
        raw = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32) * inv_temp
        x = tl.where(col_ok[None, :], raw, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(x, 1))  # finite from the first block on (V >= 1)
        alpha = tl.exp(run_max - new_max)
        e = tl.exp(x - new_max[:, None])  # 0 past V
        sum_exp = sum_exp * alpha + tl.sum(e, 1)
        if WITH_ENTROPY:
            sum_exp_x = sum_exp_x * alpha + tl.sum(e * raw, 1)  # raw is 0 past V: no 0 * -inf
        run_max = new_max
    lse = run_max + tl.log(sum_exp)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tgt_logit = tl.load(base + tgt, mask=row_ok, other=0.0).to(tl.float32) * inv_temp
    tl.store(logp_ptr + rows, tgt_logit - lse, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, lse - sum_exp_x / sum_exp, mask=row_ok)


@triton.jit
def _dlogits_kernel(
    x_ptr,
    out_ptr,
    tgt_ptr,
    lse_ptr,
    grad_ptr,
    N,
    V,
    stride_xn,
    stride_on,
    inv_temp,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """d_logits[n, v] = g[n] * ([v == t[n]] - softmax(x[n] / T)[v]) / T, w.r.t. the raw logits x.

    Each element is read and written by the same thread, so ``out`` may be ``x`` itself (same dtype)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < V)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xn + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    p = tl.exp(x * inv_temp - lse[:, None])
    d = (tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p) * inv_temp
    tl.store(out_ptr + rows64[:, None] * stride_on + cols[None, :], d.to(out_ptr.dtype.element_ty), mask=ok)


# --- cuBLAS products with fp32 outputs ------------------------------------------------------------------------


@functools.cache
def _has_out_dtype(device_type: str, op: str) -> bool:
    """Whether ``torch.mm`` / ``torch.addmm`` take ``out_dtype=float32`` with 16-bit operands and write into a
    given fp32 ``out`` (accumulating into it for addmm): probed once per device type, numerically."""
    try:
        a = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16, device=device_type)
        b = torch.tensor([[3.0], [4.0]], dtype=torch.bfloat16, device=device_type)
        acc = torch.full((1, 1), 0.5, dtype=torch.float32, device=device_type)
        if op == "mm":
            torch.mm(a, b, out_dtype=torch.float32, out=acc)
            return float(acc) == 11.0
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return float(acc) == 11.5
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a @ b, fp32 accumulation and no rounding of the products to a's dtype."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif _has_out_dtype(a.device.type, "mm"):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif a.device.type == "cpu":  # the CPU interpreter's tests: upcast (exact for 16-bit inputs)
        torch.mm(a.float(), b.float(), out=out)
    else:  # a CUDA torch without mm(out_dtype=): logits rounded to a's dtype
        out.copy_(torch.mm(a, b))


# Rows of d_W accumulated per fp32 temporary where addmm(out_dtype=) is missing (bounds that temporary).
_DW_FALLBACK_ROWS = 8192


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with 16-bit (or fp32) operands, fp32 accumulation."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _has_out_dtype(a.device.type, "addmm"):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        for lo in range(0, acc.shape[0], _DW_FALLBACK_ROWS):
            hi = min(acc.shape[0], lo + _DW_FALLBACK_ROWS)
            if a.device.type == "cpu":
                acc[lo:hi].addmm_(a[lo:hi].float(), b.float())
            elif _has_out_dtype(a.device.type, "mm"):
                acc[lo:hi] += torch.mm(a[lo:hi], b, out_dtype=torch.float32)
            else:
                acc[lo:hi] += torch.mm(a[lo:hi], b)


def accumulation_paths(device: torch.device | str, method: str = "cublas") -> dict[str, str]:
    """How a cuBLAS method's two fp32 products run on ``device`` with 16-bit operands, as the chunk loop picks them
    (the same probes, at run time): ``logits`` (``h @ W.T`` into the fp32 chunk) and ``d_weight`` (``d_W += d.T @ h``
    across chunks). ``mm-out_dtype`` / ``addmm-out_dtype``: cuBLAS writes (accumulates) fp32 itself;
    ``mm-out_dtype+add``: an fp32 temporary per 8,192 rows, then an add (extra traffic: this torch's addmm refuses
    an fp32 accumulator with 16-bit operands); ``upcast``: fp32 copies of the operands (the CPU interpreter);
    ``rounded``: a 16-bit product (no fp32 accumulation); ``native``: cublas-fast's products in the compute dtype by
    design; ``triton``: method "recompute" (no cuBLAS product)."""
    if method == "recompute":
        return {"logits": "triton", "d_weight": "triton"}
    if method == "cublas-fast":
        return {"logits": "native", "d_weight": "native"}
    device_type = torch.device(device).type
    has_mm, has_addmm = _has_out_dtype(device_type, "mm"), _has_out_dtype(device_type, "addmm")
    logits = "mm-out_dtype" if has_mm else "upcast" if device_type == "cpu" else "rounded"
    if has_addmm:
        d_weight = "addmm-out_dtype"
    elif device_type == "cpu":
        d_weight = "upcast"
    else:
        d_weight = "mm-out_dtype+add" if has_mm else "rounded"
    return {"logits": logits, "d_weight": d_weight}


def _mm_native(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """out (a's dtype) = a @ b, or += when accumulate: one rounding to a's dtype per call."""
    if a.device.type == "cpu" and a.dtype != torch.float32:
        product = torch.mm(a.float(), b.float())
        out.copy_(product + out.float() if accumulate else product)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


# --- the chunk loop ---------------------------------------------------------------------------------------------


def chunk_rows(
    n_rows: int, vocab: int, dtype: torch.dtype, with_grad: bool, chunk_bytes: int | None, logits_fp32: bool = True
) -> int:
    """Token rows per chunk: the logits (fp32, or in place in ``dtype``) and, for 16-bit inputs with fp32 logits,
    the d_logits buffer, within ``chunk_bytes``."""
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    esize = torch.finfo(dtype).bits // 8
    per_row = vocab * (4 if logits_fp32 else esize)
    if with_grad and logits_fp32 and dtype != torch.float32:
        per_row += vocab * esize
    rows = max(1, budget // per_row)
    if rows >= n_rows:
        return max(n_rows, 1)
    if rows >= _ROW_ALIGN and not interpreting():
        rows -= rows % _ROW_ALIGN
    return rows


def peak_bytes(
    n_rows: int,
    hidden_size: int,
    vocab: int,
    dtype: torch.dtype,
    *,
    need_hidden: bool = True,
    need_weight: bool = True,
    logits_fp32: bool = True,
    exact_dweight: bool = True,
    chunk_bytes: int | None = None,
    include_grads: bool = True,
) -> int:
    """What one call allocates beyond its inputs (the small per-token vectors of the loss aside): the chunk
    buffers, the fp32 d_weight accumulator and, with ``include_grads``, the returned d_hidden and d_weight
    (a training step that frees the previous ``.grad`` first allocates those at no net cost)."""
    with_grad = need_hidden or need_weight
    rows = chunk_rows(n_rows, vocab, dtype, with_grad, chunk_bytes, logits_fp32)
    esize = torch.finfo(dtype).bits // 8
    total = rows * vocab * (4 if logits_fp32 else esize) + 12 * n_rows  # the logits chunk; logp, lse, entropy
    if with_grad and logits_fp32 and dtype != torch.float32:
        total += rows * vocab * esize
    if need_hidden and include_grads:
        total += n_rows * hidden_size * esize
    if need_weight:
        total += vocab * hidden_size * esize if include_grads else 0
        if exact_dweight and dtype != torch.float32 and rows < n_rows:
            total += vocab * hidden_size * 4
    return total


def chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    inv_temp: float,
    with_entropy: bool,
    token_grad: TokenGrad | None,
    need_hidden: bool,
    need_weight: bool,
    logits_fp32: bool = True,
    exact_dweight: bool = True,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(logp[N], entropy[N] or None, d_hidden or None, d_weight or None), gradients of L with dL/dlogp from
    ``token_grad``; the gradient work runs only when ``token_grad`` is given and a gradient is needed."""
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    with_grad = token_grad is not None and (need_hidden or need_weight)
    need_hidden, need_weight = need_hidden and with_grad, need_weight and with_grad
    logits_fp32 = logits_fp32 or dtype == torch.float32
    rows = chunk_rows(n_rows, vocab, dtype, with_grad, chunk_bytes, logits_fp32)
    targets = targets.contiguous()

    logp = torch.empty(n_rows, dtype=torch.float32, device=device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=device)
    entropy = torch.empty(n_rows, dtype=torch.float32, device=device) if with_entropy else None
    grad_hidden = torch.empty(n_rows, hidden_size, dtype=dtype, device=device) if need_hidden else None
    multi_chunk = rows < n_rows
    fp32_dw = need_weight and exact_dweight and multi_chunk and dtype != torch.float32
    grad_weight = torch.empty(vocab, hidden_size, dtype=dtype, device=device) if need_weight else None
    grad_weight32 = torch.empty(vocab, hidden_size, dtype=torch.float32, device=device) if fp32_dw else None
    if n_rows == 0:
        if grad_weight is not None:
            grad_weight.zero_()
        return logp, entropy, grad_hidden, grad_weight

    logits = torch.empty(rows, vocab, dtype=torch.float32 if logits_fp32 else dtype, device=device)
    d_buffer = None
    if with_grad:  # d_logits in place where the logits have the compute dtype
        d_buffer = logits if logits.dtype == dtype else torch.empty(rows, vocab, dtype=dtype, device=device)
    weight_t = weight.t()
    config = _elementwise_config()
    for lo in range(0, n_rows, rows):
        hi = min(n_rows, lo + rows)
        c = hi - lo
        h_c = hidden[lo:hi]
        x = logits[:c]
        if logits_fp32:
            _mm_fp32_out(h_c, weight_t, x)
        else:
            _mm_native(h_c, weight_t, x, accumulate=False)

        def row_grid(meta, height=c):
            return (triton.cdiv(height, meta["BLOCK_N"]),)

        _row_stats_kernel[row_grid](
            x, targets[lo:hi], logp[lo:hi], lse[lo:hi], entropy[lo:hi] if with_entropy else lse[lo:hi],
            c, vocab, x.stride(0), inv_temp,
            WITH_ENTROPY=with_entropy,
        )  # fmt: skip
        if not with_grad:
            continue
        grad = token_grad(logp[lo:hi], slice(lo, hi)).to(torch.float32).contiguous()
        d = d_buffer[:c]

        grid = (triton.cdiv(c, config["BLOCK_N"]), triton.cdiv(vocab, config["BLOCK_V"]))
        _dlogits_kernel[grid](
            x, d, targets[lo:hi], lse[lo:hi], grad, c, vocab, x.stride(0), d.stride(0), inv_temp, **config
        )  # fmt: skip
        if need_hidden:
            _mm_native(d, weight, grad_hidden[lo:hi], accumulate=False)
        if need_weight:
            if fp32_dw and lo == 0:
                _mm_fp32_out(d.t(), h_c, grad_weight32)
            elif fp32_dw:
                _addmm_fp32(grad_weight32, d.t(), h_c)
            else:
                _mm_native(d.t(), h_c, grad_weight, accumulate=lo > 0)
    if fp32_dw:
        grad_weight.copy_(grad_weight32)
        del grad_weight32
    return logp, entropy, grad_hidden, grad_weight


class _GradCarrier(torch.autograd.Function):
    """A zero whose backward hands out gradients computed in the forward, scaled by its upstream gradient.

    ``loss = loss_value + carrier``: the value comes from O(N) torch work on the detached log-probs, the
    gradient through the carrier (d loss / d carrier = 1, so its upstream gradient is the loss's)."""

    @staticmethod
    def forward(ctx, hidden, weight, grad_hidden, grad_weight):
        ctx.grads = (grad_hidden, grad_weight)
        return hidden.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(
                "the cuBLAS fused loss hands out its gradients once: a second backward through the same graph "
                "(retain_graph=True) is not supported; use method='recompute'"
            )
        # Released here so that autograd can take them as .grad without a copy.
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        scale = float(grad_out)  # a host sync; 1.0 (a plain loss.backward()) hands the tensors out as they are
        if scale != 1.0:  # a Python scale: multiplied in fp32 (opmath), one rounding to the gradient's dtype
            grad_hidden = None if grad_hidden is None else grad_hidden.mul_(scale)
            grad_weight = None if grad_weight is None else grad_weight.mul_(scale)
        return grad_hidden, grad_weight, None, None


def fused_loss_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_grad: TokenGrad,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    logits_fp32: bool = True,
    exact_dweight: bool = True,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(logp[N] detached, entropy[N] detached or None, carrier): add ``carrier`` (a differentiable fp32 zero) to
    the loss computed from ``logp``; its backward gives hidden and weight the gradients of that loss, whose
    per-token derivative ``token_grad`` returns. 2-D ``hidden``, ``weight`` of its dtype."""
    grad_on = torch.is_grad_enabled()
    need_hidden = grad_on and hidden.requires_grad
    need_weight = grad_on and weight.requires_grad
    with torch.no_grad():
        logp, entropy, grad_hidden, grad_weight = chunked_forward(
            hidden.detach(), weight.detach(), targets, inv_temp=1.0 / temperature, with_entropy=with_entropy,
            token_grad=token_grad if (need_hidden or need_weight) else None, need_hidden=need_hidden,
            need_weight=need_weight, logits_fp32=logits_fp32, exact_dweight=exact_dweight, chunk_bytes=chunk_bytes,
        )  # fmt: skip
    if need_hidden or need_weight:
        carrier = _GradCarrier.apply(hidden, weight, grad_hidden, grad_weight)
    else:
        carrier = torch.zeros((), dtype=torch.float32, device=hidden.device)
    return logp, entropy, carrier


def logprobs_forward_only(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    logits_fp32: bool = True,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) without gradients: cuBLAS logits per chunk and the Triton row statistics."""
    with torch.no_grad():
        logp, entropy, _, _ = chunked_forward(
            hidden, weight, targets, inv_temp=1.0 / temperature, with_entropy=with_entropy, token_grad=None,
            need_hidden=False, need_weight=False, logits_fp32=logits_fp32, chunk_bytes=chunk_bytes,
        )  # fmt: skip
    return logp, entropy


# --- method selection ------------------------------------------------------------------------------------------

# "recompute": the Triton forward + recompute backward of linear_logprobs (the default until GPU figures say
# otherwise); "cublas": this module, fp32 logits and fp32 d_weight accumulation (as exact as "recompute");
# "cublas-fast": this module with the logits and the d_weight accumulation in the compute dtype (torch.compile's
# and liger-kernel's precision: logits rounded to bf16), half the epilogue's bytes and no fp32 [V, H] buffer.
METHODS = ("recompute", "cublas", "cublas-fast")
METHOD_ENV = "R4B_FUSED_LOSS_METHOD"


_default_method: list[str] = []  # set_default_method's, if any


def set_default_method(method: str | None) -> None:
    """The process-wide method of calls that pass none (a trainer's config key); ``None``: back to "recompute".
    ``R4B_FUSED_LOSS_METHOD``, where set, still overrides it."""
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown fused-loss method {method!r}; expected one of {METHODS}")
    _default_method[:] = [] if method is None else [method]


def resolve_method(method: str | None) -> str:
    """``method``, or where None the ``R4B_FUSED_LOSS_METHOD`` environment variable, or :func:`set_default_method`'s,
    or "recompute"."""
    if method is None and METHOD_ENV not in os.environ:
        return _default_method[0] if _default_method else "recompute"
    chosen = os.environ[METHOD_ENV] if method is None else method
    if chosen not in METHODS:
        source = f"{METHOD_ENV}={chosen!r}" if method is None else f"method={chosen!r}"
        raise ValueError(f"unknown {source}; expected one of {METHODS}")
    return chosen


def method_options(method: str) -> dict[str, bool]:
    """The chunked_forward precision flags of a cuBLAS method."""
    fast = method == "cublas-fast"
    return {"logits_fp32": not fast, "exact_dweight": not fast}
