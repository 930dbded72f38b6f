"""The stores' ``accumulate`` on the fused kernels (imported only when a fused path runs: it
imports Triton). Same contract as :meth:`muonq.optim.momentum.MomentumStore.accumulate`: the state
tensors are rewritten in place and the unquantized fp32 momentum is returned.
"""

from __future__ import annotations

import torch

from muonq.optim.codecs import Encoded, QuantCodec
from muonq.optim.kernels import quant_update as qk
from muonq.optim.kernels.spec import BLOCK, GRID, TENSOR, KernelSpec, kernel_spec
from muonq.optim.subspace import power_iteration_step


def _norm(partials: torch.Tensor, eps: float) -> torch.Tensor:
    return partials[:, 0].sum().sqrt().clamp_min(eps).reshape(1)


def _absmax(spec: KernelSpec, x: torch.Tensor, partials: torch.Tensor | None) -> torch.Tensor | None:
    """The absmax a tensor/column-scaled codec needs before quantizing x (None for in-tile scales)."""
    if spec.granularity in (BLOCK, GRID):
        return None
    if spec.granularity == TENSOR:
        return (partials if partials is not None else qk.dense_stats(spec, x))[:, 1].amax().reshape(1)
    return torch.nan_to_num(x, nan=0.0).abs().amax(dim=0)  # columns of a small factor


def encode_into(codec: QuantCodec, x: torch.Tensor, encoded: Encoded) -> None:
    """``codec.encode(x)`` written into ``encoded`` in place (x: fp32, contiguous)."""
    spec = kernel_spec(codec, x.shape)
    qk.quantize_into(spec, x, encoded, absmax=_absmax(spec, x, None))


def quantized_accumulate(
    codec: QuantCodec, encoded: Encoded, grad: torch.Tensor, *, beta: float, ema: bool, renormalize: bool, eps: float
) -> torch.Tensor:
    """Momentum stored whole with one codec: one pass for block/grid scales without
    renormalization, else an update pass that also reduces (sum of squares, absmax) and a
    quantize pass (which also divides by the norm)."""
    grad = grad.contiguous()
    spec = kernel_spec(codec, grad.shape)
    one_pass = spec.granularity in (BLOCK, GRID) and not renormalize
    momentum, partials = qk.decode_update(
        spec, encoded, grad.shape, grad=grad, beta=beta, ema=ema, requantize=one_pass, stats=not one_pass
    )
    if not one_pass:
        divisor = _norm(partials, eps) if renormalize else None
        qk.quantize_into(spec, momentum, encoded, absmax=_absmax(spec, momentum, partials), divisor=divisor)
    return momentum


def decomposed_accumulate(
    factor_codec: QuantCodec,
    residual_codec: QuantCodec,
    parts: dict[str, Encoded],
    grad: torch.Tensor,
    rank: int,
    *,
    beta: float,
    ema: bool,
    renormalize: bool,
    eps: float,
) -> torch.Tensor:
    """B ~ P R^T + E (``parts`` holds the encodings of P, R and E): decode E, add the low-rank part
    and update in one pass, then run the power iteration with torch and re-encode the three parts.

    The low-rank product and the residual B - P R^T are cuBLAS matmuls (the residual one with the
    subtraction fused as an addmm epilogue); only the elementwise work is in the kernels.
    """
    grad = grad.contiguous()
    rows, cols = grad.shape
    p_spec = kernel_spec(factor_codec, (rows, rank))
    r_spec = kernel_spec(factor_codec, (cols, rank))
    e_spec = kernel_spec(residual_codec, grad.shape)
    p_hat, _ = qk.decode_update(p_spec, parts["P"], torch.Size((rows, rank)))
    r_hat, _ = qk.decode_update(r_spec, parts["R"], torch.Size((cols, rank)))
    momentum, partials = qk.decode_update(
        e_spec, parts["E"], grad.shape, grad=grad, addend=p_hat @ r_hat.mT, beta=beta, ema=ema, stats=renormalize
    )
    if renormalize:
        momentum.div_(_norm(partials, eps))
    p, r = power_iteration_step(momentum, r_hat)
    encode_into(factor_codec, p.contiguous(), parts["P"])
    encode_into(factor_codec, r.contiguous(), parts["R"])
    encode_into(residual_codec, torch.addmm(momentum, p, r.mT, alpha=-1.0), parts["E"])
    return momentum
