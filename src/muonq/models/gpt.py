"""GPT-2-style decoder: pre-norm LayerNorm, learned positions, GELU (tanh) MLP, biases, tied head.

Parameter names are those of Hugging Face ``GPT2LMHeadModel``. HF stores c_attn, c_proj and c_fc
as ``Conv1D`` whose weight is the transpose of our ``nn.Linear`` weight (in, out) vs (out, in):
:func:`muonq.models.hf.to_hf_state_dict` transposes them on export.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from muonq.config import ModelConfig
from muonq.models.base import CausalLM
from muonq.models.layers import causal_attention, split_heads


class GPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.n_head) for t in self.c_attn(x).chunk(3, dim=-1))
        return self.c_proj(causal_attention(q, k, v))


class GPTMLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = GPTAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = GPTMLP(cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPTBackbone(nn.Module):
    """Embeddings, blocks and final norm: HF's ``GPT2Model`` (the ``transformer.`` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        seq_len = idx.shape[1]
        if seq_len > self.wpe.num_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds model.block_size={self.wpe.num_embeddings}")
        x = self.wte(idx) + self.wpe(torch.arange(seq_len, device=idx.device))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT(CausalLM):
    """GPT-2 language model whose LM head shares ``transformer.wte.weight``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.transformer = GPTBackbone(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.init_weights()

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer(idx))

    def lookup_tables(self) -> list[nn.Parameter]:
        return [self.transformer.wte.weight, self.transformer.wpe.weight]

    def qkv_blocks(self) -> dict[str, int]:
        return {f"{name}.c_attn.weight": 3 for name, module in self.named_modules() if isinstance(module, GPTAttention)}

    @torch.no_grad()
    def init_weights(self) -> None:
        """The shared init, then GPT-2's residual projections (attn.c_proj, mlp.c_proj) at
        init_std / sqrt(2 * n_layer) so the residual stream's variance does not grow with depth."""
        super().init_weights()
        std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=std)
