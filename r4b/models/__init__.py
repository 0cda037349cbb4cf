"""Model-side glue: r4b's kernels plugged into stock transformers model classes."""

from .attention import ATTENTION_NAME, register_varlen_attention

__all__ = ["ATTENTION_NAME", "register_varlen_attention"]
