"""r4b.kernels: fused Triton kernels for training auto-thinking LLMs.

The fused lm_head + log-prob / BPO / cross-entropy losses and packed
variable-length attention with shared prompts and bidirectional blocks.

Depends on torch and triton only, so any trainer can import it::

    from r4b.kernels import fused_linear_bpo_loss

CUDA tensors run the Triton kernels; CPU tensors run the plain-PyTorch
references in ``r4b.kernels.reference`` unless ``TRITON_INTERPRET=1`` is set
(then the Triton kernels run in Triton's CPU interpreter, as the tests do).

The fused losses take ``method=``: ``"recompute"`` (Triton logits, recomputed in the backward; the
default unless ``R4B_FUSED_LOSS_METHOD`` says otherwise), ``"cublas"`` or ``"cublas-fast"`` (cuBLAS
logits per token chunk, gradients made in the forward: ``r4b.kernels.fused_grad``).

``FusedLinearGRPOLoss`` is liger-kernel's ``LigerFusedLinearGRPOLoss`` (same constructor, call and return) on
``fused_linear_bpo_loss``: code written for liger switches by its import (``r4b.kernels.liger_compat``);
``linear_cross_entropy`` is verl's fused LM head, ``(log_probs, entropy)`` (``r4b.kernels.verl_compat``);
``use_r4b_fused_lm_head()`` makes TRL's ``add_fused_lm_head`` (TRL 1.16's GRPOTrainer) use r4b's kernels
(``r4b.kernels.trl_compat``).
"""

from . import fused_grad
from .fused_grad import DEFAULT_CHUNK_BYTES, METHODS
from .liger_compat import FusedLinearGRPOLoss
from .linear_logprobs import DEFAULT_CHUNK_ELEMENTS, linear_logprobs
from .losses import bpo_loss_from_logprobs, fused_linear_bpo_loss, fused_linear_cross_entropy
from .packed_layout import PackedLayout
from .reference import IMPORTANCE_LEVELS, LOSS_AGG_MODES, LOSS_TYPES
from .trl_compat import use_r4b_fused_lm_head
from .varlen_attention import varlen_attention
from .verl_compat import linear_cross_entropy

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CHUNK_ELEMENTS",
    "IMPORTANCE_LEVELS",
    "LOSS_AGG_MODES",
    "LOSS_TYPES",
    "METHODS",
    "FusedLinearGRPOLoss",
    "PackedLayout",
    "bpo_loss_from_logprobs",
    "fused_grad",
    "fused_linear_bpo_loss",
    "fused_linear_cross_entropy",
    "linear_cross_entropy",
    "linear_logprobs",
    "use_r4b_fused_lm_head",
    "varlen_attention",
]
