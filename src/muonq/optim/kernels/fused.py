"""The stores' ``accumulate`` on the fused kernels (imported only when a fused path runs: it
imports Triton). Same contract as :meth:`muonq.optim.momentum.MomentumStore.accumulate`: the state
tensors are rewritten in place and the unquantized fp32 momentum is returned.
"""

from __future__ import annotations

import torch

from muonq.optim.codecs import Encoded, QuantCodec
from muonq.optim.kernels import quant_update as qk
from muonq.optim.kernels.spec import BLOCK, GRID, TENSOR, KernelSpec, kernel_spec
from muonq.optim.precision import fast_matmul_dtype
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


def quantized_update(
    codec: QuantCodec,
    encoded: Encoded,
    grad: torch.Tensor,
    *,
    beta: float,
    ema: bool,
    renormalize: bool,
    eps: float,
    nesterov: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Momentum stored whole with one codec: update it and return Newton–Schulz's input in ``dtype``
    (the new momentum, or its Nesterov combination with ``grad``).

    Block/grid scales without renormalization take one pass, which writes only the NS input, so the
    fp32 momentum never goes through memory. Otherwise an update pass writes the fp32 momentum and
    reduces (sum of squares, absmax), and the quantize pass (which also divides by the norm) writes
    the NS input as a by-product.
    """
    grad = grad.contiguous()
    spec = kernel_spec(codec, grad.shape)
    if spec.granularity in (BLOCK, GRID) and not renormalize:
        ns_input = torch.empty_like(grad, dtype=dtype)
        qk.decode_update(spec, encoded, grad.shape, grad=grad, beta=beta, ema=ema, requantize=True,
                         write_out=False, ns_out=ns_input, nesterov=nesterov)
        return ns_input
    momentum, partials = qk.decode_update(spec, encoded, grad.shape, grad=grad, beta=beta, ema=ema, stats=True)
    divisor = _norm(partials, eps) if renormalize else None
    if dtype == torch.float32 and not nesterov:  # the momentum itself is NS's input
        qk.quantize_into(spec, momentum, encoded, absmax=_absmax(spec, momentum, partials), divisor=divisor)
        return momentum
    ns_input = torch.empty_like(grad, dtype=dtype)
    qk.quantize_into(
        spec, momentum, encoded, absmax=_absmax(spec, momentum, partials), divisor=divisor, overwrite=False,
        ns_out=ns_input, grad=grad, beta=beta, nesterov=qk.nesterov_mode(nesterov, ema),
    )
    return ns_input


def decomposed_update(
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
    nesterov: bool = False,
    dtype: torch.dtype = torch.float32,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """B ~ P R^T + E (``parts`` holds the encodings of P, R and E): decode E, add the low-rank part
    and update in one pass (which also reduces ||B||^2 for renormalization), divide by the norm in a
    second, then run the power iteration with torch and re-encode the three parts. Returns NS's input
    in ``dtype``; when that is not the fp32 momentum itself, the update pass (or the division pass)
    writes it as a by-product, and the power iteration (in ``matmul_dtype``; None: the machine's
    faster dtype) reuses it as its copy of B when it is one.

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
    ns_input = None if dtype == torch.float32 and not nesterov else torch.empty_like(grad, dtype=dtype)
    momentum, partials = qk.decode_update(
        e_spec, parts["E"], grad.shape, grad=grad, addend=p_hat @ r_hat.mT, beta=beta, ema=ema, stats=renormalize,
        ns_out=None if renormalize else ns_input, nesterov=nesterov,
    )
    if renormalize:
        qk.divide(e_spec, momentum, _norm(partials, eps), ns_out=ns_input, grad=grad, beta=beta,
                  nesterov=qk.nesterov_mode(nesterov, ema))
    matmul_dtype = matmul_dtype or fast_matmul_dtype(momentum.device)
    cast = ns_input if ns_input is not None and not nesterov and dtype == matmul_dtype else None
    p, r = power_iteration_step(momentum, r_hat, matmul_dtype=matmul_dtype, cast=cast)
    encode_into(factor_codec, p.contiguous(), parts["P"])
    encode_into(factor_codec, r.contiguous(), parts["R"])
    encode_into(residual_codec, torch.addmm(momentum, p, r.mT, alpha=-1.0), parts["E"])
    return momentum if ns_input is None else ns_input
