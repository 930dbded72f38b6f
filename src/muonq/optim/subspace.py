"""Warm-started power (subspace) iteration for the top-k singular subspace of a matrix.

One step per optimizer step is enough in training because the momentum moves slowly: the previous
step's right factor is an excellent start, so the estimate tracks the dominant subspace at the cost
of two thin matmuls and one thin QR.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
    q = basis / basis.norm(dim=0, keepdim=True).clamp_min(eps)
    low = matrix.to(dtype) if cast is None else cast
    p, _ = torch.linalg.qr((low @ q.to(dtype)).float(), mode="reduced")
    return p, (low.mT @ p.to(dtype)).float()
