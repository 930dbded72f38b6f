"""Warm-started power (subspace) iteration for the top-k singular subspace of a matrix.

One step per optimizer step is enough in training because the momentum moves slowly: the previous
step's right factor is an excellent start, so the estimate tracks the dominant subspace at the cost
of two thin matmuls and one thin QR.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from muonq.optim.codecs import native
from muonq.optim.momentum import accumulate_into
from muonq.optim.precision import fast_matmul_dtype


def shape_seed(shape: Sequence[int], k: int, base_seed: int = 0) -> int:
    """A seed that depends only on the matrix shape, k and ``base_seed`` (so every rank, every
    process and every resume derives the same starting basis, with no global RNG involved)."""
    seed = base_seed
    for value in (*shape, k):
        seed = (seed * 1_000_003 + int(value)) % (2**63 - 1)
    return seed


def initial_basis(cols: int, k: int, *, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A Gaussian cols x k starting basis drawn from a local CPU generator (device-independent), with
    unit-norm columns: the power iteration normalises its start anyway, and at this scale a codec
    that clamps to [-1, 1] (mu-law companding) stores the basis without clipping it."""
    if k < 1 or cols < k:
        raise ValueError(f"need 1 <= k <= cols for a basis, got k={k}, cols={cols}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.randn(cols, k, generator=generator, dtype=torch.float32)
    return (basis / basis.norm(dim=0, keepdim=True)).to(device)


def power_iteration_step(
    matrix: torch.Tensor,
    basis: torch.Tensor,
    *,
    eps: float = 1e-30,
    matmul_dtype: torch.dtype | None = None,
    cast: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of subspace iteration on ``matrix`` (m x n, fp32) from ``basis`` (n x k).

    Q = basis with unit-norm columns (a zero column stays zero), P = Q factor of the reduced QR of
    matrix @ Q, R = matrix^T @ P. Returns fp32 (P, R): P (m x k) has orthonormal columns, P R^T is
    the projection of ``matrix`` onto span(P), and the singular values of R estimate the top-k
    singular values of ``matrix``.

    The two thin matmuls run in ``matmul_dtype`` (None: the machine's faster dtype, see
    :func:`~muonq.optim.precision.fast_matmul_dtype`) and the QR in fp32. bf16 only moves the split
    between P R^T and the residual a little (callers form the residual as matrix - P R^T from the
    returned factors, so the sum stays exact), far below the 4-bit error the parts are then stored
    with. ``cast`` is ``matrix`` already in ``matmul_dtype`` (a fused kernel's by-product), which
    saves the cast.
    """
    if matrix.ndim != 2 or basis.ndim != 2 or basis.shape[0] != matrix.shape[1]:
        raise ValueError(f"basis of shape {tuple(basis.shape)} does not fit a matrix of shape {tuple(matrix.shape)}")
    dtype = matmul_dtype or fast_matmul_dtype(matrix.device)
    if cast is not None and (cast.dtype != dtype or cast.shape != matrix.shape):
        raise ValueError(f"cast must be the matrix in {dtype}, got {cast.dtype} of shape {tuple(cast.shape)}")
    q = basis / torch.linalg.vector_norm(basis, dim=0, keepdim=True).clamp_min(eps)
    low = matrix.to(dtype) if cast is None else cast
    p, _ = torch.linalg.qr((low @ q.to(dtype)).float(), mode="reduced")
    return p, (low.mT @ p.to(dtype)).float()


def add_low_rank(base: torch.Tensor, p: torch.Tensor, r: torch.Tensor, *, alpha: float, dtype: torch.dtype,
                 out: torch.Tensor | None = None, native_loops: bool = True,
                 update: tuple[float, torch.Tensor] | None = None,
                 grad_divisor: torch.Tensor | None = None) -> torch.Tensor:
    """base + alpha P R^T (base: m x n fp32, P: m x k, R: n x k), into ``out`` (may be ``base``)
    when given, with the product in ``dtype``; with ``update`` = (beta, G) the momentum update
    follows: (base + alpha P R^T) x beta + G (G / ``grad_divisor`` with a 0-dim divisor), rounded
    as those separate operations round.

    fp32: one BLAS call with the sum in its epilogue. bf16 on a CPU whose C loops were built for
    AVX512-BF16 (unless ``native_loops`` is off): one C pass whose pair products are exact and
    summed in fp32 straight into the result, the update included (the thin inner dimension k keeps
    BLAS far from its peak, and no m x n product is written and read back); elsewhere the product
    is a bf16 matmul rounded to bf16, added in fp32.
    """
    written = (base,) if out is None else (base, out)
    if (dtype == torch.bfloat16 and native_loops and _bf16_dot_available()
            and all(type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.float32
                    for t in (*written, p, r, *(() if update is None else (update[1],))))
            and all(t.is_contiguous() for t in written)):
        return _add_low_rank_native(base, p, r, alpha=alpha, out=out, update=update, grad_divisor=grad_divisor)
    into = {} if out is None else {"out": out}
    if dtype == torch.float32:
        result = base.addmm_(p, r.mT, alpha=alpha) if out is base else torch.addmm(base, p, r.mT, alpha=alpha, **into)
    else:
        product = p.to(dtype) @ r.to(dtype).mT
        result = base.add_(product, alpha=alpha) if out is base else torch.add(base, product, alpha=alpha, **into)
    return result if update is None else accumulate_into(result, update[1], update[0], ema=False, divisor=grad_divisor)


def _bf16_dot_available() -> bool:
    return native.available() and bool(native.call("mq_has_bf16_dot"))


def _add_low_rank_native(base: torch.Tensor, p: torch.Tensor, r: torch.Tensor, *, alpha: float,
                         out: torch.Tensor | None, update: tuple[float, torch.Tensor] | None,
                         grad_divisor: torch.Tensor | None) -> torch.Tensor:
    assert base.dtype == p.dtype == r.dtype == torch.float32 and base.ndim == 2, (base.dtype, p.dtype, r.dtype)
    assert p.shape[1] == r.shape[1] and (p.shape[0], r.shape[0]) == tuple(base.shape), (base.shape, p.shape, r.shape)
    assert update is None or (update[1].dtype == torch.float32 and update[1].shape == base.shape), update[1].shape
    if out is None:
        out = torch.empty_like(base)
    beta, grad = (update[0], update[1].contiguous()) if update is not None else (1.0, None)
    rows, cols = base.shape
    result = native.call("mq_add_low_rank_bf16", base, out, p.data_ptr(), *p.stride(), r.data_ptr(), *r.stride(),
                         rows, cols, p.shape[1], alpha, grad, beta,
                         1.0 if grad_divisor is None else float(grad_divisor))
    if result == -1:
        raise MemoryError("out of memory packing the low-rank factors")
    assert result == 0, result
    return out
