"""A few-layer decoder on varlen_attention, for layout-equivalence tests (RoPE from position_ids)."""

from __future__ import annotations

import torch
from torch import nn

from r4b.kernels import varlen_attention


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None, :]
    cos, sin = angles.cos()[:, None, :].to(x.dtype), angles.sin()[:, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, x, positions, cu_seqlens, max_seqlen, segment_ids):
        n = x.shape[0]
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = rope(q.view(n, self.heads, self.head_dim), positions)
        k = rope(k.view(n, self.kv_heads, self.head_dim), positions)
        v = v.view(n, self.kv_heads, self.head_dim)
        attn = varlen_attention(q, k, v, cu_seqlens, max_seqlen, segment_ids=segment_ids)
        x = x + self.out(attn.reshape(n, -1))
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    def __init__(self, vocab: int = 61, dim: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, positions, cu_seqlens, max_seqlen, segment_ids=None) -> torch.Tensor:
        """Final hidden states [N, dim]; the loss takes them with lm_head.weight."""
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, positions, cu_seqlens, max_seqlen, segment_ids)
        return self.norm(x)
