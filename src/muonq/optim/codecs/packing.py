"""Bit packing of unsigned integer codes into bytes: 8-bit codes one per byte, 4-bit codes two per
byte (element 2i in the low nibble, 2i + 1 in the high nibble; an odd count leaves the last high
nibble zero)."""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"code width must be one of {SUPPORTED_BITS} bits, got {bits}")
    return bits


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy."""
    return numel if check_bits(bits) == 8 else (numel + 1) // 2


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (any shape, values < 2**bits) into a flat uint8 tensor.

    8-bit codes come back as a flat view of ``codes`` (callers pass freshly made codes)."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if check_bits(bits) == 8:
        return flat
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return pack_pairs(flat)


def pack_pairs(flat: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``flat[0::2] | (flat[1::2] << 4)`` (an even count of 4-bit codes), into ``out`` if given.

    Read as little-endian 16-bit words w (when the codes are contiguous and aligned), each byte is
    ``(w & 0x0F) | ((w >> 4) & 0xF0)``: the same bytes, from contiguous instead of strided loads."""
    if flat.is_contiguous() and flat.storage_offset() % 2 == 0 and flat.device.type == "cpu":
        words = flat.view(torch.int16)
        high = (words >> 4).bitwise_and_(0xF0).bitwise_or_(words & 0x0F)
        return high.to(torch.uint8) if out is None else out.copy_(high)
    if out is None:
        return flat[0::2] | (flat[1::2] << 4)
    return torch.bitwise_or(flat[0::2], flat[1::2] << 4, out=out)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first ``numel`` codes (flat uint8) of ``packed``."""
    if packed.numel() != packed_numel(numel, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {numel} codes of {bits} bits")
    if bits == 8:
        return packed.reshape(-1)
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(-1)[:numel]
