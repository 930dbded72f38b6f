"""Which momentum store each matrix gets, from a :class:`~muonq.optim.spec.MomentumSpec`."""

from __future__ import annotations

import torch

from muonq.optim.codecs import Codec, make_codec
from muonq.optim.kernels import KernelMode, choose_kernels
from muonq.optim.momentum import FullPrecisionStore, MomentumStore, StoreSelector
from muonq.optim.spec import CodecSpec, DecomposedMomentum, FullPrecisionMomentum, MomentumSpec, QuantizedMomentum
from muonq.optim.stores import DecomposedStore, QuantizedStore, Scratch


def make_spec_codec(spec: CodecSpec, *, native: bool = True) -> Codec:
    """The codec a :class:`CodecSpec` describes (8-bit codes keep fp32 scales, 4-bit fp16);
    ``native``: its C loops on CPU tensors (see :class:`~muonq.optim.codecs.quant.QuantCodec`)."""
    return make_codec(
        spec.bits, spec.value_map, spec.granularity, block_size=spec.block_size, tile_size=spec.tile_size,
        mu=spec.mu, compand=spec.compand, stochastic=spec.stochastic, scale_search=spec.scale_search,
        native=native,
    )


def store_selector(
    spec: MomentumSpec, *, kernels: KernelMode = "auto", generator: torch.Generator | None = None
) -> StoreSelector:
    """A function that picks the momentum store of each parameter.

    - :class:`FullPrecisionMomentum`, a non-matrix, or a matrix below ``min_numel`` elements: fp32.
    - :class:`DecomposedMomentum`: a :class:`DecomposedStore` where k = min(m, n) // rank_divisor
      >= 1, else its ``narrow`` store.
    - :class:`QuantizedMomentum`: a :class:`QuantizedStore`; blockwise codecs need the element count
      to be a multiple of the block, else fp32.

    ``stochastic`` rounding draws from ``generator`` (default: the global RNG, which training
    checkpoints save). ``kernels`` (``optimizer_params.kernels``) picks fused Triton kernels, the
    codecs' C loops on the CPU, or the PyTorch codecs for the quantized stores (see
    :mod:`muonq.optim.kernels`). The stores of one
    selector share one :class:`~muonq.optim.stores.Scratch` (CPU buffers of their PyTorch update).
    """
    choose_kernels(kernels, [])  # a bad mode or kernels=triton without triton fails here, not at step 1
    full, scratch = FullPrecisionStore(), Scratch()
    if isinstance(spec, FullPrecisionMomentum):
        return lambda param: full
    decomposed = spec if isinstance(spec, DecomposedMomentum) else None
    plain_spec: QuantizedMomentum = spec.narrow if decomposed else spec
    native = kernels != "reference"
    plain = make_spec_codec(plain_spec.codec, native=native)
    if decomposed:
        factor = make_spec_codec(decomposed.factor, native=native)
        residual = make_spec_codec(decomposed.residual, native=native)

    def select(param: torch.Tensor) -> MomentumStore:
        if param.ndim != 2 or param.numel() < plain_spec.min_numel:
            return full
        if decomposed and min(param.shape) // decomposed.rank_divisor >= 1:
            return DecomposedStore(
                param.shape, rank_divisor=decomposed.rank_divisor, factor_codec=factor, residual_codec=residual,
                factor_error_share=decomposed.factor_error_share, generator=generator, kernels=kernels,
                scratch=scratch,
            )
        if plain_spec.codec.granularity == "block" and param.numel() % plain_spec.codec.block_size:
            return full
        return QuantizedStore(plain, param.shape, generator=generator, kernels=kernels, scratch=scratch)

    return select
