"""The codec abstraction: a float tensor <-> a small dict of tensors (codes, scales, metadata).

A codec never keeps data of its own. What ``encode`` returns is exactly what is stored (in an
optimizer's state dict, in a checkpoint), so the storage cost of a tensor is the sum of the
``nbytes`` of the returned tensors, and :meth:`Codec.nbytes` predicts that sum from the shape.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

Encoded = dict[str, torch.Tensor]
Shape = Sequence[int]


def encoded_nbytes(encoded: Mapping[str, torch.Tensor]) -> int:
    """Exact storage of an encoding: the sum of its tensors' ``nbytes``."""
    return sum(t.nbytes for t in encoded.values())


class Codec(ABC):
    """Encodes float tensors of a known shape and decodes them back to fp32."""

    @abstractmethod
    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Encoded:
        """Encode ``x`` (any float dtype). ``generator`` feeds stochastic rounding, if enabled."""

    @abstractmethod
    def decode(self, encoded: Mapping[str, torch.Tensor], shape: Shape, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode to an fp32 tensor of ``shape`` (the shape that was encoded): a fresh one, or
        ``out`` (fp32, contiguous, of ``shape``) when given."""

    @abstractmethod
    def zeros(self, shape: Shape, device: torch.device | str = "cpu") -> Encoded:
        """The encoding of an all-zero tensor, built without encoding (works on the meta device)."""

    @abstractmethod
    def nbytes(self, shape: Shape) -> int:
        """Exact bytes of the encoding of a tensor of ``shape``."""

    @abstractmethod
    def dtypes(self) -> dict[str, torch.dtype]:
        """The dtype of every tensor an encoding holds, by key (used to restore cast state)."""


class ValueMap(ABC):
    """Maps normalised values y in [-1, 1] to integer codes in [0, 2**bits) and back.

    Scaling is not the map's business: the codec divides by the group scale before ``encode`` and
    multiplies after ``decode``.
    """

    bits: int
    # Whether ``decode`` is a few arithmetic passes, cheaper on the CPU than a gather from the table
    # of all 2**bits decoded values (which :class:`~muonq.optim.codecs.QuantCodec` uses otherwise).
    cheap_decode: bool = False

    @abstractmethod
    def encode(
        self, y: torch.Tensor, *, stochastic: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Codes (uint8, same shape as ``y``). Stochastic rounding picks one of the two neighbouring
        levels with probabilities that make the result unbiased in the map's rounding domain."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """fp32 values in [-1, 1] of uint8 ``codes``."""

    def decode_into(self, codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` written into ``out`` (fp32, the shape of ``codes``)."""
        return out.copy_(self.decode(codes))

    @property
    @abstractmethod
    def zero_code(self) -> int:
        """The code that decodes to exactly 0."""


def uniform_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) noise shaped like ``like``, from ``generator`` or the global RNG."""
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def check_shape(shape: Shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"a shape needs non-negative sizes, got {shape}")
    return shape
