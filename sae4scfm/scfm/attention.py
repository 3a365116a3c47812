"""Fused multi-head self-attention shared by every family: ``F.scaled_dot_product_attention``.

One code path for the attention of all adapters, so that every family runs the fused kernel
(flash / memory-efficient on GPU, the fused CPU kernel otherwise) and keys marked as padding are
never attended to. In float32 it equals the unfused ``softmax(q kᵀ / √d_head) v`` (and
``nn.MultiheadAttention``) to ~1e-6 (tests/test_fused_attention.py, and the fidelity tests of
every family against the official code at 1e-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int,
           padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v [B, T, d] (projected), padding_mask [B, T] bool (True = pad: never attended to)
    or None -> [B, T, d], heads of width d / n_heads. The mask is dropped when nothing is padded
    (the unmasked fused kernels are faster; the result is the same)."""
    B, T, d = q.shape
    q, k, v = (t.view(B, T, n_heads, d // n_heads).transpose(1, 2) for t in (q, k, v))
    mask = None
    if padding_mask is not None and bool(padding_mask.any()):
        mask = ~padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # [B, H, T, d_head]
    return out.transpose(1, 2).reshape(B, T, d)


class PackedSelfAttention(nn.Module):
    """Self-attention with the parameters (names, shapes, initialisation and RNG order) of
    ``nn.MultiheadAttention(d, n_heads, batch_first=True)``: ``in_proj_weight`` [3d, d],
    ``in_proj_bias`` [3d], ``out_proj`` — so official state dicts load unchanged — computed by
    :func:`attend`. ``forward(x, padding_mask)``: [B, T, d], [B, T] bool (True = pad) -> [B, T, d]."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)  # draws from the RNG first, as in MultiheadAttention
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        out = attend(q, k, v, self.n_heads, padding_mask, self.dropout if self.training else 0.0)
        return self.out_proj(out)
