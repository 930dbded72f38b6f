"""The dtype of the optimizer's matmuls (Newton–Schulz, the decomposition's power iteration and
low-rank products, the NS input the stores write): bf16 where the machine multiplies bf16
natively, fp32 where bf16 is emulated (there a bf16 matmul is several times *slower* than an fp32
one).

- CUDA: bf16.
- x86 CPUs: bf16 when the CPU has AMX-BF16 or AVX512-BF16 (the ``amx_bf16`` / ``avx512_bf16``
  flags of ``/proc/cpuinfo``; where that file is missing, torch's own CPU queries) and torch has
  oneDNN, which runs bf16 GEMMs on those units; fp32 otherwise.
- Other CPUs (ARM, ...), or x86 without readable flags: one timing of a bf16 against an fp32
  matmul, the faster wins.
- Any other device: fp32.

The CPU's answer is found once per process and cached. ``optimizer_params.args.matmul_dtype``
(``auto`` | ``bfloat16`` | ``float32``) overrides the choice.
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from muonq.optim.spec import MATMUL_DTYPES, MuonSpec

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_X86 = ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU runs bf16 matmuls natively, and how that was found out."""

    native: bool
    reason: str  # e.g. "avx512_bf16", "no amx_bf16/avx512_bf16 flag", "timed: bf16 1.2 ms, fp32 3.4 ms"
    model: str  # the CPU's model name


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, set[str] | None]:
    """(model name, x86 flags) from ``/proc/cpuinfo``; flags None where the file or its x86
    ``flags`` line is missing."""
    model, flags = "", None
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return model, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    return model, flags


def _torch_flags() -> set[str] | None:
    """The native-bf16 flags by torch's CPU queries (cpuinfo inside torch), or None if torch
    lacks them."""
    try:
        return {flag for flag, query in (("avx512_bf16", torch.cpu._is_avx512_bf16_supported),
                                         ("amx_bf16", torch.cpu._is_amx_tile_supported)) if query()}
    except AttributeError:  # pragma: no cover - older torch
        return None


def _timed(size: int = 512, repeats: int = 3) -> CpuBf16:
    """Time one ``size`` x ``size`` matmul in bf16 and in fp32 (best of ``repeats``, one thread)."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {}
        for dtype in (torch.float32, torch.bfloat16):
            x = a.to(dtype)
            x @ x  # warm-up (library dispatch, packing buffers)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                x @ x
                times.append(time.perf_counter() - start)
            best[dtype] = min(times)
    finally:
        torch.set_num_threads(threads)
    bf16, fp32 = best[torch.bfloat16], best[torch.float32]
    return CpuBf16(bf16 < fp32, f"timed: bf16 {1e3 * bf16:.2f} ms, fp32 {1e3 * fp32:.2f} ms", "")


def detect_cpu_bf16(cpuinfo: str = "/proc/cpuinfo", machine: str | None = None) -> CpuBf16:
    """Whether this CPU has native bf16 matmuls (uncached; :func:`cpu_bf16` caches it)."""
    machine = (machine or platform.machine()).lower()
    model, flags = _cpuinfo(cpuinfo)
    model = model or platform.processor() or machine
    if machine in _X86:
        if flags is None:
            flags = _torch_flags()
        if flags is not None:
            found = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
            if not found:
                return CpuBf16(False, "no " + "/".join(NATIVE_BF16_FLAGS) + " flag: bf16 is emulated", model)
            if not torch.backends.mkldnn.is_available():
                return CpuBf16(False, f"{found[0]}, but torch is built without oneDNN", model)
            return CpuBf16(True, found[0], model)
    timed = _timed()
    return CpuBf16(timed.native, timed.reason, model)


@functools.cache
def cpu_bf16() -> CpuBf16:
    """:func:`detect_cpu_bf16`, once per process."""
    return detect_cpu_bf16()


def fast_matmul_dtype(device: torch.device | str) -> torch.dtype:
    """The faster matmul dtype on ``device`` (see the module docstring)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16
    if kind == "cpu":
        return torch.bfloat16 if cpu_bf16().native else torch.float32
    return torch.float32


def check_matmul_dtype(setting: str | torch.dtype | None) -> str | torch.dtype | None:
    """``setting`` if it is one of :data:`MATMUL_DTYPES`, None, bf16 or fp32; else ValueError."""
    if setting is None or setting in MATMUL_DTYPES or setting in _DTYPES.values():
        return setting
    raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES} (or torch.bfloat16 / torch.float32), "
                     f"got {setting!r}")


def resolve_matmul_dtype(setting: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The dtype ``setting`` means on ``device``: ``auto`` / None -> :func:`fast_matmul_dtype`."""
    if isinstance(setting, torch.dtype):
        return setting
    if setting is None or setting == "auto":
        return fast_matmul_dtype(device)
    try:
        return _DTYPES[setting]
    except KeyError:
        raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {setting!r}") from None


def describe_matmul_dtype(setting: str | torch.dtype | None, device: torch.device | str) -> str:
    """One line for logs and benchmarks: the chosen dtype and why."""
    dtype = str(resolve_matmul_dtype(setting, device)).removeprefix("torch.")
    kind = torch.device(device).type
    if setting not in (None, "auto"):
        why = "set by optimizer_params.args.matmul_dtype"
    elif kind == "cpu":
        cpu = cpu_bf16()
        why = f"auto: {cpu.model}, bf16 {'native' if cpu.native else 'emulated'} ({cpu.reason})"
    else:
        why = f"auto: {kind}"
    return f"optimizer matmuls in {dtype} ({why})"


def matmul_dtype_line(muon: MuonSpec | None, device: torch.device | str) -> str:
    """The trainer's startup line about the Muon side's matmul dtype (``muon``: the spec's)."""
    return describe_matmul_dtype(muon.matmul_dtype, device) if muon is not None else "no Muon matmuls (adamw family)"
