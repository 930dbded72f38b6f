"""Codecs for optimizer state: float tensor <-> packed codes + scales, with exact byte counts."""

from muonq.optim.codecs.base import Codec, Encoded, ValueMap, encoded_nbytes
from muonq.optim.codecs.dynamic import DynamicMap, dynamic_code_values
from muonq.optim.codecs.factory import VALUE_MAPS, make_codec, make_value_map
from muonq.optim.codecs.linear import LinearMap
from muonq.optim.codecs.mulaw import MuLawCompander, MuLawMap
from muonq.optim.codecs.packing import pack, packed_numel, unpack
from muonq.optim.codecs.quant import GRANULARITIES, QuantCodec
from muonq.optim.codecs.raw import RawCodec

__all__ = [
    "Codec",
    "DynamicMap",
    "Encoded",
    "GRANULARITIES",
    "LinearMap",
    "MuLawCompander",
    "MuLawMap",
    "QuantCodec",
    "RawCodec",
    "VALUE_MAPS",
    "ValueMap",
    "dynamic_code_values",
    "encoded_nbytes",
    "make_codec",
    "make_value_map",
    "pack",
    "packed_numel",
    "unpack",
]
