"""The codecs' CPU inner loops in C (``native.c``), compiled on first use; the same library holds
the decomposition's bf16 low-rank product (:func:`muonq.optim.subspace.add_low_rank`) for CPUs
with AVX512-BF16.

PyTorch runs a codec's encode as a dozen elementwise passes over the matrix (abs, compand, max,
sign, divide, round, convert, shift, pack), each through memory; the C loops make one pass that
keeps every element in registers, and make the scales too. They serve
:class:`~muonq.optim.codecs.quant.QuantCodec` on CPU tensors and give the PyTorch encoder's bytes
and decoder's values (mu-law codes: see ``native.c`` for how; the scale search: see
:mod:`~muonq.optim.codecs.native_codec`).

The library is built once per machine with the system C compiler (``$CC``, else ``cc``) for the
machine's own instruction set (``-march=native``, dropped where the compiler refuses it), into
``$XDG_CACHE_HOME/muonq/native`` (default ``~/.cache/muonq/native``), keyed by the source, the
compiler and the CPU's flags; concurrent processes (the ranks of one node) each build and
atomically rename the same file. Without a working compiler, or where the cache cannot be
written, the codecs stay in PyTorch (a warning says so, once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
CHUNK = 64  # elements per flag of the mu-law encoders (native.c's CHUNK)
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
_NATIVE_ISA = "-march=native"  # dropped where the compiler does not know it

_I64, _PTR, _INT, _DBL, _FLT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_float
_SIGNATURES = {  # name: (argument types, result type)
    "mq_encode4_mulaw": ((_PTR, _I64, _I64, _I64, _PTR, _FLT, _INT, _FLT, _PTR, _PTR, _INT, _DBL, _DBL, _PTR, _PTR),
                         _I64),
    "mq_redo_args": ((_PTR, _I64, _I64, _I64, _PTR, _INT, _FLT, _PTR, _I64, _PTR), None),
    "mq_redo_codes": ((_PTR, _I64, _I64, _I64, _PTR, _INT, _FLT, _PTR, _I64, _PTR, _PTR), None),
    "mq_search4_blocks": ((_PTR, _I64, _I64, _I64, _PTR, _INT, _PTR, _PTR, _PTR, _DBL, _DBL, _PTR, _PTR, _PTR), _I64),
    "mq_encode4_grid": ((_PTR, _I64, _I64, _I64, _PTR, _PTR, _INT, _PTR, _PTR), None),
    "mq_absmax": ((_PTR, _I64, _I64, _I64, _FLT, _PTR), _INT),
    "mq_decode4_grid": ((_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR), None),
    "mq_decode4_groups": ((_PTR, _I64, _I64, _I64, _PTR, _INT, _INT, _PTR, _PTR), _INT),
    "mq_encode_linear": ((_PTR, _I64, _I64, _I64, _PTR, _INT, _PTR, _PTR, _INT, _PTR), _INT),
    "mq_decode8_linear": ((_PTR, _I64, _I64, _I64, _PTR, _INT, _PTR), _INT),
    "mq_chunk": ((), _I64),
    "mq_grid_absmax": ((_PTR, _I64, _I64, _I64, _PTR, _PTR), _INT),
    "mq_has_bf16_dot": ((), _INT),
    "mq_add_low_rank_bf16": ((_PTR, _PTR, _PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _FLT, _PTR, _FLT, _FLT),
                             _INT),
}
COMPAND_FIRST, COMPAND_AFTER = 0, 1  # native.c's modes of mq_encode4_mulaw
SCALE_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # native.c's stored scale formats
TABLE_GIVEN, TABLE_EXPANDED, TABLE_SCALED = 0, 1, 2  # native.c's sources of mq_decode4_groups' tables


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "muonq" / "native"


def _build(compiler: str) -> Path:
    """The compiled library's path (built now unless the cache has it). The key names the compiler
    by its resolved file, size and time, so that no process but a building one runs a subprocess
    (the ranks of a job find the library without forking next to their communication threads)."""
    source = SOURCE.read_bytes()
    binary = os.path.realpath(compiler)
    info = os.stat(binary)
    identity = f"{binary} {info.st_size} {info.st_mtime_ns}"
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), identity.encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"codecs-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        command = [compiler, _NATIVE_ISA, *_FLAGS, str(SOURCE), "-o", partial, "-lm"]
        if subprocess.run(command, capture_output=True, text=True).returncode:
            subprocess.run([c for c in command if c != _NATIVE_ISA], capture_output=True, text=True, check=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded C library, or None where it cannot be built (warned once)."""
    compiler = _compiler()
    try:
        if compiler is None:
            raise FileNotFoundError(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        warnings.warn(f"the 4-bit codecs' C loops could not be built ({detail.strip()[:300]}); they run in "
                      "PyTorch, which gives the same codes more slowly", RuntimeWarning, stacklevel=2)
        return None
    for name, (argtypes, restype) in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = restype
    assert lib.mq_chunk() == CHUNK, (lib.mq_chunk(), CHUNK)
    return lib


def available() -> bool:
    return library() is not None


def _ptr(tensor: torch.Tensor) -> int:
    assert tensor.is_contiguous() and tensor.is_cpu, (tensor.device, tensor.stride())
    return tensor.data_ptr()


def call(name: str, *args: object) -> int | None:
    """Calls ``name`` of the library with tensors passed as their data pointers (contiguous CPU
    tensors of the dtypes ``native.c`` reads) and numbers as they are; returns its result."""
    lib = library()
    assert lib is not None, "callers check available() first"
    return getattr(lib, name)(*[_ptr(a) if isinstance(a, torch.Tensor) else a for a in args])
