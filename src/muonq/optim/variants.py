"""From :class:`~muonq.config.OptimizerArgs` to the momentum store of each matrix, and the count of
optimizer-state bytes from the tensors an optimizer actually holds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from muonq.config import OptimizerArgs, optimizer_params_from_yaml
from muonq.optim.codecs import GRANULARITIES, VALUE_MAPS, Codec, make_codec
from muonq.optim.kernels import KernelMode, choose_kernels
from muonq.optim.momentum import FullPrecisionStore, MomentumStore
from muonq.optim.muon import StoreSelector
from muonq.optim.stores import DecomposedStore, QuantizedStore

# Named variants for benchmarks and tests: an optimizer YAML of hydra_conf/optimizer_params/, with
# overrides. The YAML files stay the one source of each optimizer's settings.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "muon": ("muon", {}),
    "muon8bit": ("muon8bit", {}),
    "muon8bit-dynamic": ("muon8bit", {"quant": "dynamic"}),
    "muon8bit-linear": ("muon8bit", {"quant": "linear"}),
    "muon8": ("muon8", {}),
    "muon4": ("muon4", {}),
    "muonq": ("muonq", {}),
    "muonq-block128": ("muonq", {"residual_block_size": 128}),
    "grasp": ("grasp", {}),
}


def variant_args(name: str, **overrides: Any) -> OptimizerArgs:
    """OptimizerArgs of a named variant (see :data:`VARIANTS`), with ``overrides`` applied."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
    yaml_name, preset = VARIANTS[name]
    return optimizer_params_from_yaml(yaml_name, **{**preset, **overrides}).args


def _value_map(args: OptimizerArgs) -> str:
    if args.quant not in VALUE_MAPS:
        raise ValueError(f"quant must be one of {VALUE_MAPS}, got {args.quant!r}")
    if args.compand and args.quant == "dynamic":
        raise ValueError("compand (mu-law) cannot be combined with quant='dynamic'")
    return "mulaw" if args.compand else args.quant


def _check(args: OptimizerArgs) -> None:
    if args.qbit not in (4, 8, 32):
        raise ValueError(f"qbit must be 4, 8 or 32, got {args.qbit}")
    if args.factor_bits not in (4, 8, 32):
        raise ValueError(f"factor_bits must be 4, 8 or 32, got {args.factor_bits}")
    if args.gran not in GRANULARITIES or args.gran == "grid":
        raise ValueError(f"gran must be one of tensor, block, row, column (grid: set grid=true), got {args.gran!r}")
    if args.rank < 0 or args.residual_block_size < 0 or args.min_quant_numel < 0:
        raise ValueError("rank, residual_block_size and min_quant_numel must be >= 0")


def store_selector(
    args: OptimizerArgs, *, kernels: KernelMode = "auto", generator: torch.Generator | None = None
) -> StoreSelector:
    """A function that picks the momentum store of each parameter.

    - ``qbit`` 32, a non-matrix, or fewer than ``min_quant_numel`` elements: fp32 momentum.
    - ``rank`` > 0 (and k = min(m, n) // rank >= 1): :class:`DecomposedStore`; factors with
      ``factor_bits`` bits, one scale per column; residual with ``qbit`` bits, its scales per
      ``tile_size`` grid if ``grid``, else per ``residual_block_size`` block if > 0, else one per
      tensor (``gran`` and ``block_size`` do not apply to it).
    - otherwise :class:`QuantizedStore` with ``gran`` scales (grid scales if ``grid``); blockwise
      scales need the element count to be a multiple of ``block_size``, else fp32 momentum.

    Values are mu-law companded if ``compand`` (or ``quant='mulaw'``), else ``quant``'s map.
    8-bit codes keep fp32 scales and 4-bit codes fp16 scales. ``stochastic`` rounding draws from
    ``generator`` (default: the global RNG, which training checkpoints save). ``kernels``
    (``optimizer_params.kernels``) picks fused Triton kernels or the PyTorch codecs for the
    quantized stores (see :mod:`muonq.optim.kernels`).
    """
    _check(args)
    choose_kernels(kernels, [])  # a bad mode or kernels=triton without triton fails here, not at step 1
    value_map = _value_map(args)

    def codec(bits: int, granularity: str, block_size: int = args.block_size) -> Codec:
        return make_codec(
            bits, value_map, granularity, block_size=block_size, tile_size=args.tile_size, mu=args.mu,
            stochastic=args.stochastic,
        )

    full = FullPrecisionStore()
    if args.qbit == 32:
        return lambda param: full
    plain = codec(args.qbit, "grid" if args.grid else args.gran)
    factor = residual = None
    if args.rank > 0:
        factor = codec(args.factor_bits, "column")
        residual_gran = "grid" if args.grid else ("block" if args.residual_block_size else "tensor")
        residual = codec(args.qbit, residual_gran, block_size=args.residual_block_size or args.block_size)

    def select(param: torch.Tensor) -> MomentumStore:
        if param.ndim != 2 or param.numel() < args.min_quant_numel:
            return full
        if args.rank > 0 and min(param.shape) // args.rank >= 1:
            return DecomposedStore(
                param.shape, rank_divisor=args.rank, factor_codec=factor, residual_codec=residual, generator=generator,
                kernels=kernels,
            )
        if not args.grid and args.gran == "block" and param.numel() % args.block_size:
            return full
        return QuantizedStore(plain, param.shape, generator=generator, kernels=kernels)

    return select


# -- counting state bytes -------------------------------------------------------------------------


def state_tensors(value: Any) -> Iterator[torch.Tensor]:
    """The plain tensors inside ``value`` (a tensor, or dicts / lists / tuples of them).

    Wrapper tensor subclasses (torchao's ``OptimState8bit``, DTensor, ...) are opened through
    ``__tensor_flatten__`` so their inner tensors, what they really hold on this rank, are seen.
    """
    if isinstance(value, torch.Tensor):
        flatten = getattr(value, "__tensor_flatten__", None)
        if flatten is None:
            yield value
            return
        try:
            inner = [getattr(value, name) for name in flatten()[0]]
        except (AttributeError, NotImplementedError, TypeError):
            yield value
            return
        for tensor in inner:
            yield from state_tensors(tensor)
    elif isinstance(value, dict):
        for item in value.values():
            yield from state_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from state_tensors(item)


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor inside ``value`` (see :func:`state_tensors`)."""
    return sum(t.nbytes for t in state_tensors(value))


_FULL_PRECISION = {torch.float32, torch.float64}


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer-state bytes counted from the tensors in ``optimizer.state``.

    Step counters (state key ``step``) are not state data and are reported apart, in ``step``.
    A parameter counts as ``quantized`` when any of its state tensors is not fp32/fp64 (codes,
    low-precision scales), else as ``full_precision``. Returns ``total``, ``per_group`` (list, in
    ``param_groups`` order), ``quantized``, ``full_precision``, ``step``, ``numel`` (elements of
    the parameters that have state) and ``params`` ({kind: number of parameters}).
    """
    report: dict[str, Any] = dict(total=0, per_group=[], quantized=0, full_precision=0, step=0, numel=0)
    counts = {"quantized": 0, "full_precision": 0}
    for group in optimizer.param_groups:
        group_bytes = 0
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            data = {key: value for key, value in state.items() if key != "step"}
            nbytes = tensor_bytes(data)
            full = all(t.dtype in _FULL_PRECISION for t in state_tensors(data))
            kind = "full_precision" if full else "quantized"
            report[kind] += nbytes
            counts[kind] += 1
            report["step"] += tensor_bytes(state.get("step"))
            report["numel"] += param.numel()
            group_bytes += nbytes
        report["per_group"].append(group_bytes)
        report["total"] += group_bytes
    report["params"] = counts
    return report


def momentum_nbytes(select: StoreSelector, shape: Sequence[int]) -> int:
    """Bytes of the state that the selected store creates for a parameter of ``shape``, built with
    the real store code on the meta device (nothing is allocated)."""
    param = torch.empty(tuple(shape), device="meta")
    state: dict[str, torch.Tensor] = {}
    select(param).init(state, param)
    return tensor_bytes(state)


def bytes_per_element(optimizer: torch.optim.Optimizer) -> float:
    """State bytes (step counters excluded) per element of the parameters that have state."""
    report = state_bytes(optimizer)
    return report["total"] / report["numel"] if report["numel"] else 0.0
