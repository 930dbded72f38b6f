"""Fused Triton kernels against the PyTorch codecs, and the kernel dispatcher.

Kernel tests run wherever Triton can run: on CUDA, and on the CPU in Triton's interpreter. The
interpreter has to be on before any kernel is defined (and stays on for the process), so on every
machine ``test_interpreter_suite`` reruns this file in a subprocess with ``TRITON_INTERPRET=1``; in
the parent process the kernel tests run on CUDA if there is one and are skipped otherwise. The
dispatcher tests need no kernels and run in the parent only.

Exactness (same inputs): decoding, scales, and linear and dynamic-map codes are bit-identical to
the codecs; mu-law codes may differ by one level at values within a few ulp of a decision boundary
(the codec rounds log1p in fp32, the kernel compares with exact boundaries). Companded codecs
(MuonQ's mu-law on the raw values) compute log1p / expm1 in the kernel from log / exp: decoded
values and fp32 scales agree to a few ulp, fp16 steps to one fp16 ulp, codes to one level at
boundary values. Through an optimizer
step, sum momentum without renormalization stays bit-identical (decomposed stores: on the CPU only,
as cuBLAS's addmm rounds its epilogue differently); EMA momentum (FMA in the kernel, none in the
interpreter) and renormalized momentum (the norm is reduced in another order) differ by about one
ulp, so their codes may differ by one level at a few boundary values.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from muonq.optim.codecs import MuLawMap, QuantCodec, RawCodec, make_codec, unpack
from muonq.optim.momentum import FullPrecisionStore
from muonq.optim.muon import Muon
from muonq.optim.stores import DecomposedStore, QuantizedStore
from muonq.config import VARIANTS, preset
from muonq.optim.selection import store_selector

CHILD_ENV = "MUONQ_KERNEL_TESTS_IN_INTERPRETER"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
if IN_CHILD:
    DEVICES = ["cpu"]
else:
    DEVICES = ["cuda"] if HAS_CUDA and HAS_TRITON else []

parent_only = pytest.mark.skipif(IN_CHILD, reason="dispatcher tests run once, in the parent process")
QUANTIZED_VARIANTS = [name for name in VARIANTS if name not in ("muon", "muon8bit-linear")]  # = muon8bit
MULAW_MISMATCH = 2e-3  # max fraction of codes one level apart (see the module docstring)
DECODE_RTOL = 1e-6  # companded codecs: decoded values, a few ulp (see the module docstring)


def companded(codec) -> bool:
    return getattr(codec, "compander", None) is not None


def exact_codec(codec) -> bool:
    """Whether the kernel reproduces ``codec`` bit for bit (module docstring)."""
    return not isinstance(codec.value_map, MuLawMap) and not companded(codec)


def make_test_codec(bits: int, value_map: str, gran: str, **kwargs) -> QuantCodec:
    """``value_map`` "compand": linear codes of mu-law companded raw values (MuonQ's quantizer)."""
    if value_map == "compand":
        return make_codec(bits, "linear", gran, compand=True, **kwargs)
    return make_codec(bits, value_map, gran, **kwargs)


@pytest.fixture(params=DEVICES or [None], ids=lambda d: d or "none")
def device(request) -> torch.device:
    if request.param is None:
        pytest.skip("needs CUDA; on the CPU these run in Triton's interpreter (test_interpreter_suite)")
    return torch.device(request.param)


def heavy(shape, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) ** 3).to(device)


def unpacked(codes: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    return unpack(codes.cpu(), bits, numel).long()


def assert_codes_match(ref: torch.Tensor, got: torch.Tensor, bits: int, numel: int, exact: bool) -> None:
    ref, got = unpacked(ref, bits, numel), unpacked(got, bits, numel)
    if exact:
        assert torch.equal(ref, got), f"{int((ref != got).sum())} of {numel} codes differ"
    else:
        diff = (ref - got).abs()
        assert diff.max() <= 1, "codes may differ by one level only"
        assert (diff > 0).float().mean() <= MULAW_MISMATCH


def assert_scales_match(codec: QuantCodec, ref: torch.Tensor, got: torch.Tensor, key: str) -> None:
    if companded(codec):  # a few fp32 ulp, then rounded to the scale dtype: one ulp of fp16
        rtol = max(torch.finfo(ref.dtype).eps, DECODE_RTOL)
        torch.testing.assert_close(got.cpu().float(), ref.cpu().float(), rtol=rtol, atol=0, msg=f"{key} differs")
    else:
        assert torch.equal(ref.cpu(), got.cpu()), f"{key} differs"


def assert_encodings_match(codec: QuantCodec, ref: dict, got: dict, shape, exact_codes: bool) -> None:
    assert ref.keys() == got.keys()
    for key in ref:
        if key != "codes":
            assert_scales_match(codec, ref[key], got[key], key)
    assert_codes_match(ref["codes"], got["codes"], codec.bits, math.prod(shape), exact_codes)


def assert_decoded_match(codec: QuantCodec, got: torch.Tensor, ref: torch.Tensor) -> None:
    if companded(codec):
        torch.testing.assert_close(got.cpu(), ref.cpu(), rtol=DECODE_RTOL, atol=0)
    else:
        assert torch.equal(got.cpu(), ref.cpu())


# -- kernels against the codecs ---------------------------------------------------------------------

CODECS = [(8, "linear"), (8, "dynamic"), (4, "linear"), (4, "mulaw-after-scale"), (8, "mulaw-after-scale"),
          (4, "compand"), (8, "compand")]
GRANS = ["tensor", "block", "row", "column", "grid"]


@pytest.mark.parametrize("shape", [(96, 200), (33, 15)], ids=str)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("bits,value_map", CODECS, ids=lambda v: str(v))
def test_encode_and_decode_match_the_codec(device, bits, value_map, gran, shape):
    from muonq.optim.kernels import quant_update as qk
    from muonq.optim.kernels.fused import encode_into
    from muonq.optim.kernels.spec import kernel_spec

    codec = make_test_codec(bits, value_map, gran, block_size=128 if shape[1] % 2 == 0 else 99, tile_size=32)
    x = heavy(shape, 0, device)
    if companded(codec):
        x = x / x.norm()  # momentum scale (the companding acts on raw values in [-1, 1])
        x[6, 6] = 1.5  # and one value that clamps
    x[:5].zero_()  # all-zero blocks, rows and tiles
    x[:, :3] = 0.0  # and columns
    ref = codec.encode(x)
    got = codec.zeros(shape, device)
    encode_into(codec, x.contiguous(), got)
    assert_encodings_match(codec, ref, got, shape, exact_codes=exact_codec(codec))
    decoded, _ = qk.decode_update(kernel_spec(codec, shape), ref, torch.Size(shape))
    assert_decoded_match(codec, decoded, codec.decode(ref, shape))
    assert torch.all(decoded[:5] == 0)


@pytest.mark.parametrize("bits,value_map", [(8, "linear"), (4, "linear"), (8, "dynamic")])
def test_non_finite_and_huge_inputs_encode_like_the_codec(device, bits, value_map):
    from muonq.optim.kernels.fused import encode_into

    codec = make_codec(bits, value_map, "block", block_size=64)
    x = heavy((32, 64), 1, device)
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = float("nan"), float("inf"), -float("inf"), 3e38
    x[4, :] = 1e-40  # subnormal block
    got = codec.zeros(x.shape, device)
    encode_into(codec, x, got)
    assert_encodings_match(codec, codec.encode(x), got, x.shape, exact_codes=True)


def run_store(store, shape, device, *, steps: int, ema: bool, renormalize: bool, seed: int = 0):
    param = torch.empty(shape, device=device)
    state: dict[str, torch.Tensor] = {}
    store.init(state, param)
    momenta = []
    for step in range(steps):
        grad = heavy(shape, seed + step, device)
        if step == 0:
            grad.zero_()  # an all-zero momentum must stay exactly zero
        else:
            grad.view(-1)[:512] = 0.0  # all-zero blocks among live ones
        # fp32 matmuls: the fused path keeps the decomposition's low-rank products in fp32
        momenta.append(store.accumulate(state, grad, beta=0.95, ema=ema, renormalize=renormalize,
                                        matmul_dtype=torch.float32).clone())
    return state, momenta


def part_layout(store, part: str) -> tuple[QuantCodec, int]:
    """(codec, element count) of one stored part ("momentum", "P", "R" or "E")."""
    if isinstance(store, QuantizedStore):
        return store.codec, store.shape.numel()
    if part == "E":
        return store.residual_codec, store.shape.numel()
    return store.factor_codec, math.prod(store.factor_shapes[part == "R"])


STORE_CASES = [  # (shape, ema, renormalize); 80 x 112 has ragged 32 x 32 tiles
    ((64, 96), False, False), ((64, 96), True, False), ((64, 96), False, True), ((64, 96), True, True),
    ((80, 112), False, False), ((80, 112), True, True),
]


@pytest.mark.parametrize("shape,ema,renormalize", STORE_CASES,
                         ids=[f"{s[0]}x{s[1]}-{'ema' if e else 'sum'}{'-renorm' if r else ''}" for s, e, r in STORE_CASES])
@pytest.mark.parametrize("name", QUANTIZED_VARIANTS)
def test_fused_accumulate_matches_the_reference(device, name, shape, ema, renormalize):
    overrides = dict(min_quant_numel=0, tile_size=32)
    fused = store_selector(preset(name, **overrides).muon.store, kernels="triton")(torch.empty(shape))
    reference = store_selector(preset(name, **overrides).muon.store, kernels="reference")(torch.empty(shape))
    if isinstance(fused, FullPrecisionStore):
        pytest.skip(f"{name} keeps fp32 momentum for {shape}")
    # cuBLAS's addmm epilogue rounds differently from the kernel's separate add (CPU BLAS does not);
    # companded codecs decode to a few ulp
    exact = not ema and not renormalize and (isinstance(fused, QuantizedStore) or device.type == "cpu")
    codecs = [fused.codec] if isinstance(fused, QuantizedStore) else [fused.factor_codec, fused.residual_codec]
    exact = exact and all(map(exact_codec, codecs))
    got_state, got = run_store(fused, shape, device, steps=3, ema=ema, renormalize=renormalize)
    ref_state, ref = run_store(reference, shape, device, steps=3, ema=ema, renormalize=renormalize)
    assert torch.count_nonzero(got[0]) == 0
    for b_got, b_ref in zip(got, ref):
        if exact:
            assert torch.equal(b_got, b_ref)
        else:
            torch.testing.assert_close(b_got, b_ref, rtol=0, atol=1e-6 * b_ref.abs().max().item())
    for key in ref_state:
        if key.endswith(".codes"):
            codec, numel = part_layout(fused, key.split(".")[0])
            assert_codes_match(ref_state[key], got_state[key], codec.bits, numel, exact=exact)
        elif exact:
            assert torch.equal(ref_state[key], got_state[key]), key
        else:
            rtol = max(1e-5, torch.finfo(ref_state[key].dtype).eps)  # companded fp16 steps: one ulp
            torch.testing.assert_close(got_state[key].float(), ref_state[key].float(), rtol=rtol, atol=0)


@pytest.mark.parametrize(
    "codec,shape",
    [
        (make_codec(8, "linear", "column"), (48, 80)),
        (make_codec(4, "mulaw-after-scale", "row"), (48, 81)),  # odd rows: 4-bit pairs straddle rows
        (make_codec(8, "dynamic", "grid", tile_size=16), (48, 80)),
        (make_codec(4, "linear", "grid", tile_size=16), (47, 81)),  # odd rows, ragged tiles
        (make_codec(4, "linear", "grid", tile_size=24), (48, 80)),  # tile not a power of two
        (make_codec(4, "linear", "block", block_size=100), (48, 80)),  # ragged last block
        (make_codec(4, "linear", "block", block_size=99), (48, 80)),  # odd blocks
        (make_codec(4, "linear", "row", compand=True), (48, 81)),
        (make_codec(4, "linear", "grid", tile_size=16, compand=True), (47, 81)),
    ],
    ids=["column-linear8", "row-mulaw4-odd", "grid-dynamic8", "grid-linear4-odd", "grid24-linear4", "block100-linear4",
         "block99-linear4", "row-compand4-odd", "grid-compand4-odd"],
)
def test_other_layouts_accumulate_like_the_reference(device, codec, shape):
    got_state, got = run_store(QuantizedStore(codec, shape, kernels="triton"), shape, device, steps=3, ema=False,
                               renormalize=False)
    ref_state, ref = run_store(QuantizedStore(codec, shape, kernels="reference"), shape, device, steps=3, ema=False,
                               renormalize=False)
    exact = exact_codec(codec)
    for b_got, b_ref in zip(got, ref):
        torch.testing.assert_close(b_got, b_ref, rtol=0, atol=0 if exact else 1e-6 * b_ref.abs().max().item())
    assert_encodings_match(codec, {k[9:]: v for k, v in ref_state.items()}, {k[9:]: v for k, v in got_state.items()},
                           shape, exact_codes=exact)


NS_INPUT_CASES = [  # (codec, renormalize, nesterov): one-pass (block) and two-pass (tensor) layouts
    (make_codec(8, "linear", "block", block_size=256), False, True),
    (make_codec(8, "linear", "block", block_size=256), False, False),
    (make_codec(4, "linear", "grid", tile_size=32), False, True),
    (make_codec(4, "mulaw-after-scale", "tensor"), True, True),
    (make_codec(4, "mulaw-after-scale", "tensor"), True, False),
    (make_codec(8, "linear", "tensor"), False, True),
    (make_codec(4, "linear", "tensor", compand=True), True, True),
    (make_codec(4, "linear", "block", block_size=128, compand=True), False, False),
]


@pytest.mark.parametrize("ema", [False, True], ids=["sum", "ema"])
@pytest.mark.parametrize("codec,renormalize,nesterov", NS_INPUT_CASES,
                         ids=["block-nesterov", "block", "grid-nesterov", "tensor-renorm-nesterov", "tensor-renorm",
                              "tensor-nesterov", "compand-tensor-renorm-nesterov", "compand-block"])
def test_fused_ns_input_in_bf16_matches_the_reference(device, codec, renormalize, nesterov, ema):
    """The kernels write Newton–Schulz's bf16 input (momentum or its Nesterov form) as a by-product
    of the update; it equals the reference's fp32 result cast to bf16 up to one bf16 rounding step,
    and the stored codes are those of the plain update."""
    shape = (64, 96)
    stores = {mode: QuantizedStore(codec, shape, kernels=mode) for mode in ("triton", "reference")}
    states = {mode: {} for mode in stores}
    for mode, store in stores.items():
        store.init(states[mode], torch.empty(shape, device=device))
    for step in range(3):
        grad = heavy(shape, step, device)
        grad.view(-1)[:512] = 0.0
        kwargs = dict(beta=0.9, ema=ema, renormalize=renormalize, nesterov=nesterov, dtype=torch.bfloat16)
        got = stores["triton"].ns_input(states["triton"], grad, **kwargs)
        ref = stores["reference"].ns_input(states["reference"], grad, **kwargs)
        assert got.dtype == torch.bfloat16 and got.shape == shape
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=1e-6 * ref.float().abs().max().item())
    exact = not ema and not renormalize and exact_codec(codec)
    for key in states["reference"]:
        if key.endswith(".codes"):
            assert_codes_match(states["reference"][key], states["triton"][key], codec.bits, math.prod(shape), exact=exact)


@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("name", ["muonq", "grasp"])
def test_decomposed_ns_input_in_bf16_matches_the_reference(device, name, nesterov):
    """MuonQ (renormalized: the division pass writes the bf16 input) and GRASP (the update pass does).
    In Triton's CPU interpreter the power iteration runs in fp32: in bf16 it would take the two
    paths' bf16 copies of B, which there may differ by one rounding step, and its factors would
    drift apart over the steps; this test is about the kernels."""
    shape = (64, 96)
    args = preset(name, min_quant_numel=0, tile_size=32).muon
    stores = {mode: store_selector(args.store, kernels=mode)(torch.empty(shape)) for mode in ("triton", "reference")}
    states = {mode: {} for mode in stores}
    for mode, store in stores.items():
        assert isinstance(store, DecomposedStore)
        store.init(states[mode], torch.empty(shape, device=device))
    for step in range(3):
        grad = heavy(shape, step, device)
        if args.normalize:
            grad = grad / grad.norm()
        kwargs = dict(beta=0.95, ema=False, renormalize=args.normalize, nesterov=nesterov, dtype=torch.bfloat16,
                      matmul_dtype=torch.float32 if device.type == "cpu" else None)
        got = stores["triton"].ns_input(states["triton"], grad, **kwargs)
        ref = stores["reference"].ns_input(states["reference"], grad, **kwargs)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=1e-6 * ref.float().abs().max().item())


@pytest.mark.parametrize("name", QUANTIZED_VARIANTS)
def test_muon_runs_each_variant_on_the_kernels(device, name):
    """A few Muon steps on fused kernels land where the reference path lands (in Triton's CPU
    interpreter with fp32 matmuls: there the kernels' bf16 copy of B may differ from torch's by a
    rounding step, which bf16 Newton–Schulz would carry into every update)."""
    shapes = [(64, 96), (96, 64)]  # wide and tall
    torch.manual_seed(0)
    start = [torch.randn(s) * 0.02 for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    args = preset(name, min_quant_numel=0, tile_size=32).muon
    finals = {}
    for kernels in ("triton", "reference"):
        params = [torch.nn.Parameter(w.clone().to(device)) for w in start]
        opt = Muon(params, lr=0.02, weight_decay=0.1, store=store_selector(args.store, kernels=kernels), normalize=args.normalize,
                   matmul_dtype="float32" if device.type == "cpu" else "auto")
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(device)
            opt.step()
        if kernels == "triton":
            assert all(not isinstance(opt.store_for(p), FullPrecisionStore) for p in params)
            assert all(opt.store_for(p).kernels.applies(p.grad) for p in params)
        finals[kernels] = [p.detach().cpu() for p in params]
    for got, ref, w0 in zip(finals["triton"], finals["reference"], start):
        assert torch.isfinite(got).all()
        assert (got - ref).norm() <= 1e-2 * (ref - w0).norm()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or IN_CHILD, reason="needs CUDA")
def test_auto_picks_triton_on_cuda_and_the_reference_on_cpu():
    store = store_selector(preset("muonq").muon.store, kernels="auto")(torch.empty(256, 256))
    assert store.kernels.applies(torch.empty(1, device="cuda"))
    assert not store.kernels.applies(torch.empty(1))


# -- the dispatcher (no kernels run) ----------------------------------------------------------------


@parent_only
@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_auto_and_reference_run_the_reference_on_cpu(mode):
    shape = (64, 96)
    store = store_selector(preset("muon8bit", min_quant_numel=0).muon.store, kernels=mode)(torch.empty(shape))
    assert not store.kernels.applies(torch.empty(shape))
    plain = store_selector(preset("muon8bit", min_quant_numel=0).muon.store, kernels="reference")(torch.empty(shape))
    got_state, got = run_store(store, shape, "cpu", steps=2, ema=False, renormalize=False)
    ref_state, ref = run_store(plain, shape, "cpu", steps=2, ema=False, renormalize=False)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert all(torch.equal(got_state[k], ref_state[k]) for k in ref_state)


@parent_only
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton installed")
def test_triton_mode_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    store = QuantizedStore(make_codec(8, "linear", "block"), (64, 64), kernels="triton")
    state: dict[str, torch.Tensor] = {}
    store.init(state, torch.empty(64, 64))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        store.accumulate(state, torch.randn(64, 64), beta=0.95, ema=False, renormalize=False)


@parent_only
def test_triton_mode_without_triton_fails_when_the_optimizer_is_built(monkeypatch):
    import muonq.optim.kernels as kernels

    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="needs the triton package"):
        store_selector(preset("muonq").muon.store, kernels="triton")
    store_selector(preset("muonq").muon.store, kernels="auto")  # auto just falls back


@parent_only
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton installed")
def test_triton_mode_refuses_codecs_without_kernels_and_auto_falls_back():
    args = preset("muonq", stochastic=True).muon
    with pytest.raises(ValueError, match="stochastic rounding"):
        store_selector(args.store, kernels="triton")(torch.empty(256, 256))
    store = store_selector(args.store, kernels="auto")(torch.empty(256, 256))
    assert isinstance(store, DecomposedStore) and "stochastic" in store.kernels.unfusable
    searched = store_selector(preset("muonq", residual_scale_search=True).muon.store, kernels="auto")(torch.empty(256, 256))
    assert "scale search" in searched.kernels.unfusable


@parent_only
def test_only_stochastic_rounding_scale_search_and_foreign_codecs_lack_kernels():
    from muonq.optim.kernels.spec import unfusable_reason

    for gran in ("tensor", "block", "row", "column", "grid"):
        assert unfusable_reason(make_codec(4, "mulaw-after-scale", gran, block_size=99, tile_size=24)) is None
        assert unfusable_reason(make_codec(4, "linear", gran, block_size=99, tile_size=24, compand=True)) is None
    assert "not a quantizing codec" in unfusable_reason(RawCodec())
    assert "stochastic" in unfusable_reason(make_codec(8, "linear", "block", stochastic=True))
    assert "PyTorch encoder" in unfusable_reason(make_codec(4, "linear", "block", compand=True, scale_search=True))


@parent_only
def test_bad_mode_is_a_value_error():
    with pytest.raises(ValueError, match="kernels must be one of"):
        store_selector(preset("muon8bit").muon.store, kernels="cuda")


@parent_only
def test_build_optimizer_passes_the_kernels_setting_to_the_stores():
    from muonq.optim.build import build_optimizer

    cfg = dataclasses.replace(preset("muonq"), kernels="reference")
    param = torch.nn.Parameter(torch.zeros(256, 256))
    opt = build_optimizer(cfg, hidden=[param], others=[])
    assert opt.optimizers["muon"].store_for(param).kernels.mode == "reference"


def _has_ptxas() -> bool:
    if not HAS_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None:
        return False
    import triton.backends.nvidia

    return (Path(triton.backends.nvidia.__file__).parent / "bin" / "ptxas").is_file()


@parent_only
@pytest.mark.skipif(not _has_ptxas(), reason="needs triton with its NVIDIA backend (ptxas)")
def test_kernel_configurations_compile_for_cuda_without_a_gpu(monkeypatch):
    """The interpreter runs Python, not the compiler: compile each code path of the kernel for
    sm_90 (ptxas ships with triton, no GPU needed) to catch what only the NVIDIA backend rejects."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from muonq.optim.kernels import quant_update as qk
    from muonq.optim.kernels.spec import kernel_spec

    kernel = qk._kernel
    pointer_types = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.uint8: "*u8"}
    compiled = []

    class CompileInsteadOfLaunch:
        def __getitem__(self, grid):
            def compile_only(*args, num_warps, enable_fp_fusion, **kwargs):
                values = {**dict(zip(kernel.arg_names, args)), **kwargs}
                constants = {p.name: values[p.name] for p in kernel.params if p.is_constexpr}
                signature = {
                    name: "constexpr" if name in constants else pointer_types[value.dtype]
                    if isinstance(value, torch.Tensor) else ("fp32" if isinstance(value, float) else "i32")
                    for name, value in values.items()
                }
                options = dict(num_warps=num_warps, enable_fp_fusion=enable_fp_fusion)
                triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32), options=options)
                compiled.append(constants)
            return compile_only

    monkeypatch.setattr(qk, "_kernel", CompileInsteadOfLaunch())

    def setup(codec, shape):
        return kernel_spec(codec, shape), codec.zeros(shape), torch.zeros(shape), torch.Size(shape)

    # every feature at least once: rules, granularities, paired / odd 4-bit layouts, scale dtypes, passes
    spec, enc, x, shape = setup(make_codec(8, "dynamic", "block"), (64, 64))
    qk.decode_update(spec, enc, shape, grad=x, requantize=True)
    spec, enc, x, shape = setup(make_codec(4, "mulaw-after-scale", "tensor"), (64, 64))
    qk.decode_update(spec, enc, shape, grad=x, ema=True, stats=True)
    qk.dense_stats(spec, x)
    qk.quantize_into(spec, x, enc, absmax=torch.ones(1), divisor=torch.ones(1))
    spec, enc, x, shape = setup(make_codec(4, "linear", "grid", tile_size=32), (64, 63))
    qk.decode_update(spec, enc, shape, grad=x, addend=x, requantize=True)
    spec, enc, x, shape = setup(make_codec(8, "linear", "column"), (64, 8))
    qk.decode_update(spec, enc, shape)
    qk.quantize_into(spec, x, enc, absmax=torch.ones(8))
    spec, enc, x, shape = setup(make_codec(4, "linear", "block", block_size=128, scale_dtype=torch.bfloat16), (64, 64))
    qk.quantize_into(spec, x, enc, divisor=torch.ones(1))
    # Newton–Schulz input in bf16 as a by-product: one-pass (Nesterov, EMA) and quantize pass (sum)
    ns = torch.empty(64, 64, dtype=torch.bfloat16)
    spec, enc, x, shape = setup(make_codec(8, "linear", "block"), (64, 64))
    qk.decode_update(spec, enc, shape, grad=x, ema=True, requantize=True, write_out=False, ns_out=ns, nesterov=True)
    spec, enc, x, shape = setup(make_codec(4, "mulaw-after-scale", "tensor"), (64, 64))
    qk.quantize_into(spec, x, enc, absmax=torch.ones(1), divisor=torch.ones(1), overwrite=False, ns_out=ns, grad=x,
                     beta=0.9, nesterov=qk.UPDATE_SUM)
    # MuonQ's quantizer: compand, step scales (tensor and column two-pass, block in the tile), expand
    spec, enc, x, shape = setup(make_codec(4, "linear", "tensor", compand=True), (64, 64))
    qk.decode_update(spec, enc, shape, grad=x, stats=True, addend=x)
    qk.quantize_into(spec, x, enc, absmax=torch.ones(1), divisor=torch.ones(1))
    spec, enc, x, shape = setup(make_codec(4, "linear", "column", compand=True), (64, 8))
    qk.quantize_into(spec, x, enc, absmax=torch.ones(8))
    spec, enc, x, shape = setup(make_codec(8, "linear", "block", block_size=128, compand=True), (64, 64))
    qk.decode_update(spec, enc, shape, grad=x, requantize=True)
    assert len(compiled) == 14


@parent_only
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton installed")
def test_interpreter_suite():
    """Every kernel test above, on the CPU in Triton's interpreter (a fresh process: the interpreter
    must be on before the kernels are defined)."""
    env = {**os.environ, CHILD_ENV: "1", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
