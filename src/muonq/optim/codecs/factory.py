"""Builds a codec from plain settings (what configs and benchmarks speak)."""

from __future__ import annotations

from typing import Literal

import torch

from muonq.optim.codecs.base import Codec, ValueMap
from muonq.optim.codecs.dynamic import DynamicMap
from muonq.optim.codecs.linear import LinearMap
from muonq.optim.codecs.mulaw import MuLawCompander, MuLawMap
from muonq.optim.codecs.quant import Granularity, QuantCodec
from muonq.optim.codecs.raw import RawCodec
from muonq.optim.spec import VALUE_MAPS

ValueMapName = Literal["linear", "dynamic", "mulaw-after-scale"]


def make_value_map(name: ValueMapName, bits: int, *, mu: float = 255.0) -> ValueMap:
    if name == "linear":
        return LinearMap(bits)
    if name == "mulaw-after-scale":
        return MuLawMap(bits, mu)
    if name == "dynamic":
        if bits != 8:
            raise ValueError(f"the dynamic code map is 8-bit only, got bits={bits}")
        return DynamicMap()
    raise ValueError(f"value map must be one of {VALUE_MAPS}, got {name!r}")


def make_codec(
    bits: int,
    value_map: ValueMapName = "linear",
    granularity: Granularity = "tensor",
    *,
    block_size: int = 256,
    tile_size: int = 128,
    mu: float = 255.0,
    compand: bool = False,
    scale_dtype: torch.dtype | None = None,
    stochastic: bool = False,
    scale_search: bool = False,
    native: bool = True,
) -> Codec:
    """``bits`` 32 gives the lossless :class:`RawCodec`; 8 or 4 a :class:`QuantCodec`.

    ``compand``: mu-law companding (``mu``) of the raw values before the scale, MuonQ's quantizer
    (linear codes only). ``scale_search`` and ``native``: see :class:`QuantCodec`.

    ``scale_dtype`` defaults to fp32 for 8-bit codes (the 8-bit Muon layout: one fp32 absmax per
    block) and fp16 for 4-bit codes (MuonQ's layout).
    """
    if bits == 32:
        return RawCodec(torch.float32)
    if scale_dtype is None:
        scale_dtype = torch.float32 if bits == 8 else torch.float16
    return QuantCodec(
        make_value_map(value_map, bits, mu=mu),
        granularity,
        block_size=block_size,
        tile_size=tile_size,
        scale_dtype=scale_dtype,
        stochastic=stochastic,
        compander=MuLawCompander(mu) if compand else None,
        scale_search=scale_search,
        native=native,
    )
