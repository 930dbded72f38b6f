"""What an optimizer is, as data: the typed description that the optimizer factory, the sharding
layer and the trainer read.

``muonq.config.optimizer_spec`` turns the flat ``optimizer_params`` keys users type into one
:class:`OptimizerSpec`; nothing below reads a config key or an optimizer's name. Plain Python (no
torch), so configs can be checked before torch is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar, Union

K = TypeVar("K")

Family = Literal["adamw", "muon"]
FAMILIES: tuple[str, ...] = ("adamw", "muon")
KERNEL_MODES: tuple[str, ...] = ("auto", "triton", "reference")
# "mulaw-after-scale": mu-law levels of x / absmax (the value is scaled first, then companded at full
# strength mu). MuonQ's own mu-law acts on the raw values before the scale: CodecSpec.compand.
VALUE_MAPS: tuple[str, ...] = ("linear", "dynamic", "mulaw-after-scale")
# The dtype of the Muon family's matmuls; auto: bf16 where the machine runs it natively (CUDA, CPUs
# with AMX-BF16 or AVX512-BF16), fp32 where bf16 is emulated (see muonq.optim.precision).
MATMUL_DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float32")
# Bits of the AdamW state: 32 = torch's fp32 moments, 8 and 4 = torchao's blockwise AdamW8bit / AdamW4bit.
ADAMW_BITS: tuple[int, ...] = (32, 8, 4)


@dataclass(frozen=True)
class CodecSpec:
    """One quantizer (see ``muonq.optim.codecs.make_codec``): ``bits`` 32 stores fp32 values;
    8 and 4 store codes of ``value_map`` with absmax scales per ``granularity`` (tensor, block of
    ``block_size``, column, or ``tile_size`` grid). ``compand``: MuonQ's quantizer, mu-law
    companding (``mu``) of the raw values clamped to [-1, 1] before the scale, then linear codes
    with the quantization step as the stored scale. ``scale_search``: each group's scale is the
    absmax ratio (1 ... 0.5) of least squared error, not the absmax."""

    bits: int
    value_map: str = "linear"
    granularity: str = "tensor"
    block_size: int = 256
    tile_size: int = 128
    mu: float = 255.0
    compand: bool = False
    stochastic: bool = False
    scale_search: bool = False


@dataclass(frozen=True)
class FullPrecisionMomentum:
    """fp32 momentum, 4 bytes per element."""


@dataclass(frozen=True)
class QuantizedMomentum:
    """Momentum stored with ``codec``. Matrices with fewer than ``min_numel`` elements, and
    blockwise codecs on matrices whose size is not a multiple of the block, keep fp32 momentum."""

    codec: CodecSpec
    min_numel: int = 4096


@dataclass(frozen=True)
class DecomposedMomentum:
    """MuonQ / GRASP: a rank k = min(m, n) // ``rank_divisor`` factorisation P R^T (tracked by
    power iteration, factors stored with ``factor``) plus the residual stored with ``residual``,
    which also holds ``factor_error_share`` of the factors' rounding error (see
    :class:`~muonq.optim.stores.DecomposedStore`). Matrices too narrow for k >= 1 use ``narrow``,
    whose ``min_numel`` applies to every matrix."""

    rank_divisor: int
    factor: CodecSpec
    residual: CodecSpec
    narrow: QuantizedMomentum
    factor_error_share: float = 0.0


MomentumSpec = Union[FullPrecisionMomentum, QuantizedMomentum, DecomposedMomentum]


@dataclass(frozen=True)
class EquilibrateSpec:
    """MuonEq's row / column equilibration of Newton–Schulz's input (``phase``: rowcol switches to
    row after that many steps; ``clip`` bounds the scales to [1/clip, clip])."""

    mode: str
    exponent: float = -0.5
    phase: int | None = None
    clip: float | None = None
    eps: float = 1e-8


@dataclass(frozen=True)
class MuonSpec:
    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    ns_steps: int
    ns_batch_size: int
    scale_mode: str
    momentum_form: str
    normalize: bool  # MuonQ's pre-quantization normalization of gradient and momentum
    store: MomentumSpec
    equilibrate: EquilibrateSpec | None = None
    matmul_dtype: str = "auto"  # Newton–Schulz, power iteration, low-rank products, NS input: one of MATMUL_DTYPES
    # A fused QKV weight (GPT) as its three matrices: momentum, normalisation, Newton–Schulz, rank
    # and update scale per block, as the original MuonQ does; False: one matrix.
    split_qkv: bool = True

    def row_blocks(self, qkv_blocks: Mapping[K, int]) -> dict[K, int]:
        """The row blocks Muon splits parameters into, given the model's fused QKV weights."""
        return dict(qkv_blocks) if self.split_qkv else {}


@dataclass(frozen=True)
class AdamWSpec:
    """AdamW: torch's (``bits`` 32) or torchao's blockwise AdamW8bit / AdamW4bit (``bits`` 8 / 4,
    one fp32 scale per ``block_size`` elements)."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    bits: int = 32
    block_size: int = 256


@dataclass(frozen=True)
class OptimizerSpec:
    """A whole optimizer. Family ``muon``: Muon on the hidden matrices, ``adamw`` on the rest;
    family ``adamw``: ``adamw`` on every parameter (``muon`` is None).
    ``zero``: shard the state over ranks (None: when there is more than one);
    ``kernels``: fused Triton kernels, or the codecs (with their C loops on the CPU), or the PyTorch
    reference, for quantized momentum."""

    name: str
    family: Family
    adamw: AdamWSpec
    muon: MuonSpec | None = None
    kernels: str = "auto"
    zero: bool | None = None

    def __post_init__(self) -> None:
        assert (self.family == "muon") == (self.muon is not None), "a Muon spec exactly for the muon family"
