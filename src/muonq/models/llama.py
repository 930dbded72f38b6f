"""LLaMA-style decoder: pre-norm RMSNorm, RoPE, SwiGLU, untied head, no biases.

Parameter names are those of Hugging Face ``LlamaForCausalLM``, so a state dict loads there as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muonq.config import ModelConfig
from muonq.models.base import CausalLM
from muonq.models.layers import RMSNorm, apply_rope, causal_attention, rope_cos_sin, split_heads


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = apply_rope(split_heads(self.q_proj(x), self.n_head), cos, sin)
        k = apply_rope(split_heads(self.k_proj(x), self.n_head), cos, sin)
        v = split_heads(self.v_proj(x), self.n_head)
        return self.o_proj(causal_attention(q, k, v))


class SwiGLU(nn.Module):
    def __init__(self, n_embd: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.n_embd, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """Embeddings, blocks and final norm: HF's ``LlamaModel`` (the ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.n_embd // cfg.n_head
        self.rope_theta = cfg.rope_theta
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_cos_sin(idx.shape[1], self.head_dim, theta=self.rope_theta, device=idx.device)
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class Llama(CausalLM):
    """LLaMA language model; ``init_weights`` is HF's (plain normal init, no residual scaling)."""

    def __init__(self, cfg: ModelConfig) -> None:
        if not cfg.intermediate_size:
            raise ValueError("LLaMA models need model.intermediate_size (the SwiGLU width)")
        if (cfg.n_embd // cfg.n_head) % 2:
            raise ValueError(f"RoPE needs an even head dimension, got n_embd / n_head = {cfg.n_embd} / {cfg.n_head}")
        super().__init__(cfg)
        self.model = LlamaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.init_weights()

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(idx))

    def lookup_tables(self) -> list[nn.Parameter]:
        return [self.model.embed_tokens.weight]
