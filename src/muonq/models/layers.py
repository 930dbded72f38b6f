"""Pieces shared by the model families: RMSNorm, rotary embeddings, the causal attention core."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in fp32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.type_as(x)


def rope_cos_sin(
    seq_len: int, head_dim: int, *, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables of shape (seq_len, head_dim) in the rotate-half layout.

    Computed per call rather than cached in a buffer: a buffer would be garbage after building on
    the meta device and ``to_empty``, and the tables are tiny next to the attention itself.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys; the first and second halves of D form the pairs (HF convention)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, n_head, T, C // n_head)."""
    batch, seq_len, width = x.shape
    return x.view(batch, seq_len, n_head, width // n_head).transpose(1, 2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of (B, H, T, D) heads, merged back to (B, T, H * D)."""
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).flatten(2)
