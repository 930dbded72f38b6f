"""Newton–Schulz orthogonalisation: the polar factor that Muon applies to its momentum."""

from __future__ import annotations

import torch

# Quintic coefficients tuned for fast convergence of the singular values into a band near 1.
QUINTIC_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz(
    update: torch.Tensor,
    steps: int = 5,
    *,
    coefficients: tuple[float, float, float] = QUINTIC_COEFFS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Approximate U V^T of ``update`` (m x n, or a batch b x m x n of same-shape matrices).

    Works on the wide orientation (m <= n) so that X X^T is the small Gram matrix; the input is
    scaled to unit Frobenius norm first, which puts every singular value in (0, 1].
    Returns a tensor of ``dtype`` with the input's shape.
    """
    if update.ndim not in (2, 3):
        raise ValueError(f"Newton-Schulz needs a matrix or a batch of matrices, got shape {tuple(update.shape)}")
    a, b, c = coefficients
    x = update.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    fma = torch.addmm if x.ndim == 2 else torch.baddbmm  # fused: beta * input + alpha * (m1 @ m2)
    for _ in range(steps):
        gram = x @ x.mT
        poly = fma(gram, gram, gram, beta=b, alpha=c)
        x = fma(x, poly, x, beta=a)
    if tall:
        x = x.mT
    return x
