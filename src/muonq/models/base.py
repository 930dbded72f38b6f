"""What every model family shares: the loss, parameter accounting for Muon and FLOPs for MFU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muonq.config import ModelConfig
from muonq.models.layers import RMSNorm


class CausalLM(nn.Module):
    """A decoder-only language model. Subclasses build ``lm_head`` and implement :meth:`logits`
    and :meth:`lookup_tables`."""

    lm_head: nn.Linear

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) logits."""
        raise NotImplementedError

    def lookup_tables(self) -> list[nn.Parameter]:
        """Embedding tables indexed rather than multiplied (token embeddings, learned positions)."""
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) without targets; otherwise the mean fp32 cross-entropy (ignore_index -100)."""
        logits = self.logits(idx)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for every matrix and embedding, zero biases, unit norm gains."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()

    def hidden_matrices(self) -> list[tuple[str, nn.Parameter]]:
        """The 2-D attention and MLP weights that Muon owns: every matrix except the lookup tables
        and the LM head (norm gains and biases are 1-D)."""
        excluded = {id(p) for p in self.lookup_tables()} | {id(self.lm_head.weight)}
        return [(name, p) for name, p in self.named_parameters() if p.ndim == 2 and id(p) not in excluded]

    def qkv_blocks(self) -> dict[str, int]:
        """Hidden matrices that stack the query, key and value weights along their rows, by name:
        3 each (none unless a family fuses them). Muon can treat each block as its own matrix."""
        return {}

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights once. ``exclude_embeddings`` drops the lookup tables (token
        embeddings, learned positions); an untied LM head is a matmul and stays counted."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= sum(p.numel() for p in self.lookup_tables())
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, for MFU: ``6 * N + 12 * n_layer * n_embd * seq_len``.

        N counts the weights used in matmuls (hidden matrices and the LM head, not lookups or
        biases): 2 FLOPs per weight forward, 4 backward. The second term is the attention scores
        and the weighted sum of values (2 * 2 * seq_len * n_embd forward per layer, times 3),
        counted over the full square as in PaLM's MFU, not halved for the causal mask.
        """
        matmul_params = sum(p.numel() for _, p in self.hidden_matrices()) + self.lm_head.weight.numel()
        return 6.0 * matmul_params + 12.0 * self.cfg.n_layer * self.cfg.n_embd * seq_len
