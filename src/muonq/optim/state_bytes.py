"""Optimizer-state bytes, counted from the tensors an optimizer actually holds (and, for planning,
from the real store code on the meta device)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from muonq.optim.momentum import StoreSelector


def state_tensors(value: Any) -> Iterator[torch.Tensor]:
    """The plain tensors inside ``value`` (a tensor, or dicts / lists / tuples of them).

    Wrapper tensor subclasses (torchao's ``OptimState8bit`` and ``OptimState4bit``, DTensor, ...) are
    opened through ``__tensor_flatten__`` so their inner tensors, what they really hold on this rank,
    are seen.
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


def adamw_state_nbytes(shape: Sequence[int], *, element_size: int, bits: int, block_size: int) -> int:
    """AdamW's state bytes for one parameter without building it: two moments of ``element_size``
    bytes (``bits`` 32), or torchao's AdamW8bit / AdamW4bit layout (``bits`` 8 / 4) for tensors of
    at least 4096 elements that fill whole blocks: per moment the codes (``bits`` per element,
    packed in uint8), one fp32 scale per block and a ``2**bits``-entry fp32 code map (smaller
    tensors keep plain moments there too)."""
    numel = math.prod(shape)
    if bits in (8, 4) and numel >= 4096 and numel % block_size == 0:
        return 2 * (numel * bits // 8 + 4 * (numel // block_size) + 4 * 2**bits)
    return 2 * numel * element_size


# The reference of the whole-optimizer ratio: fp32 Muon (one fp32 momentum per element of the
# hidden matrices) with fp32 AdamW (two fp32 moments per element of every other parameter).
FP32_MUON_BYTES_PER_ELEMENT = 4
FP32_ADAMW_BYTES_PER_ELEMENT = 8


def fp32_reference_nbytes(*, hidden_numel: int, other_numel: int) -> int:
    """State bytes of fp32 Muon + fp32 AdamW on a model with these element counts (hidden
    matrices, everything else), whatever optimizer the run itself uses."""
    return FP32_MUON_BYTES_PER_ELEMENT * hidden_numel + FP32_ADAMW_BYTES_PER_ELEMENT * other_numel


def state_ratio_vs_fp32(state_nbytes: float, *, hidden_numel: int, other_numel: int) -> float:
    """How many times less state the whole optimizer (Muon side + AdamW side, ``state_nbytes``)
    holds than fp32 Muon + fp32 AdamW on the same model (below 1: more; NaN without state)."""
    if not state_nbytes:
        return float("nan")
    return fp32_reference_nbytes(hidden_numel=hidden_numel, other_numel=other_numel) / state_nbytes
