"""The 4-bit codecs' C loops (muonq.optim.codecs.native*) against the PyTorch codecs they replace."""

from __future__ import annotations

import dataclasses
import math
import platform
from pathlib import Path

import pytest
import torch

from muonq.config import preset
from muonq.optim.build import build_optimizer
from muonq.optim.codecs import make_codec, native, native_codec, quant
from muonq.optim.codecs.quant import SEARCH_RATIOS
from muonq.optim.codecs.scales import store_scale
from muonq.optim.subspace import add_low_rank

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler to build the codecs' C loops")

CAPTURED = Path(__file__).resolve().parent.parent / "benchmarks" / "data"

CODECS = {  # the codecs of the shipped presets, and the variants the C loops also take
    "muonq residual": dict(granularity="tensor", compand=True),
    "muonq factor": dict(granularity="column", compand=True),
    "muonq residual, blocks of 128": dict(granularity="block", block_size=128, compand=True),
    "muonq-hifi factor": dict(value_map="mulaw-after-scale", granularity="column", mu=3.0),
    "mu-law after the scale, blocks": dict(value_map="mulaw-after-scale", granularity="block", mu=3.0),
    "grasp residual": dict(granularity="grid", tile_size=128),
    # other scale dtypes (the C loops round the scales themselves) and value maps (decoded in C)
    "muonq factor, bf16 scales": dict(granularity="column", compand=True, scale_dtype=torch.bfloat16),
    "muonq residual, fp32 scales": dict(granularity="tensor", compand=True, scale_dtype=torch.float32),
    "mu-law after the scale, bf16 row scales": dict(value_map="mulaw-after-scale", granularity="row", mu=3.0,
                                                     scale_dtype=torch.bfloat16),
    "mu-law after the scale, fp32 column scales": dict(value_map="mulaw-after-scale", granularity="column", mu=3.0,
                                                        scale_dtype=torch.float32),
    "linear, per tensor": dict(granularity="tensor"),
    "linear, bf16 row scales": dict(granularity="row", scale_dtype=torch.bfloat16),
    "grasp factor (8-bit linear, columns)": dict(bits=8, granularity="column"),
    "muon8bit (8-bit linear, blocks)": dict(bits=8, granularity="block", block_size=256),
    "8-bit linear, fp16 blocks of 100": dict(bits=8, granularity="block", block_size=100, scale_dtype=torch.float16),
}


def _is_mulaw(settings: dict) -> bool:
    return settings.get("compand", False) or settings.get("value_map") == "mulaw-after-scale"


def _pair(bits: int = 4, **settings):
    return make_codec(bits, **settings), make_codec(bits, native=False, **settings)


def _matrices() -> list[torch.Tensor]:
    """Captured momentum of two models at unit Frobenius norm (as MuonQ stores it), and heavy-tailed
    synthetic matrices with ragged shapes."""
    captured = [m / m.norm() for name in ("momentum_llama-tiny-256.pt", "momentum_llama-2x512.pt")
                for m in list(torch.load(CAPTURED / name, weights_only=True).values())[:3]]
    g = torch.Generator().manual_seed(0)
    synthetic = []
    for shape in [(1376, 512), (300, 40), (129, 25)]:
        x = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * torch.rand(shape, generator=g) ** 3
        synthetic.append(x * 10.0 ** float(torch.empty(()).uniform_(-4, 0, generator=g)))
    # rows from 1e-9 to 1e6: subnormal and saturating 16-bit scales, the floor of the step
    wide = torch.randn(256, 64, generator=g) * torch.logspace(-9, 6, 256).view(-1, 1)
    return captured + synthetic + [wide]


def _assert_c_loops_match_pytorch(name: str, monkeypatch) -> None:
    """Codec ``name``'s bytes and decoded values with the C loops equal the PyTorch codec's on every
    test matrix, and the C encoder, decoder and (mu-law) redo ran."""
    fast, reference = _pair(**CODECS[name])
    redone = []
    redo = native_codec._redo_listed
    monkeypatch.setattr(native_codec, "_redo_listed", lambda *a, **k: redone.append(1) or redo(*a, **k))
    encoded = decoded = 0
    for x in _matrices():
        if name == "grasp residual" and x.shape[1] % 2:
            continue
        shape = tuple(x.shape)
        encoded += native_codec.encode(fast, x.float(), shape) is not None
        got, want = fast.encode(x), reference.encode(x)
        assert got.keys() == want.keys()
        for field in want:
            assert torch.equal(got[field], want[field]), (name, shape, field)
        decoded += native_codec.decode(fast, want, shape, None) is not None
        assert torch.equal(fast.decode(want, shape), reference.decode(want, shape)), (name, shape)
    mulaw = _is_mulaw(CODECS[name])
    assert encoded >= 6 or mulaw and "row" in name, "the C encoder did not run"
    assert decoded >= 6 or "fp32" in name and fast.compander is not None, "the C decoder did not run"
    if mulaw and "row" not in name:  # some chunks had an element too close to a threshold
        assert redone


@pytest.mark.parametrize(("name", "band"), [(name, native_codec.BAND) for name in CODECS] + [
    pytest.param(name, 0.5, id=f"{name}-most chunks redone") for name in CODECS if _is_mulaw(CODECS[name])])
def test_c_loops_give_the_pytorch_codecs_bytes(name, band, monkeypatch):
    monkeypatch.setattr(native_codec, "BAND", band)  # 0.5: the redo's arithmetic on most elements
    _assert_c_loops_match_pytorch(name, monkeypatch)


def _errors(codec, encoded, x) -> torch.Tensor:
    """Squared error of each 256-element block of the decoded x (fp64)."""
    decoded = codec.decode(encoded, tuple(x.shape)).double()
    return (decoded - x.double()).square().view(-1, codec.block_size).sum(dim=1)


@pytest.mark.parametrize(("band", "scale_dtype"), [(native_codec.BAND, torch.float16), (0.5, torch.float16),
                                                   (native_codec.BAND, torch.bfloat16)],
                         ids=["band", "most chunks redone", "bf16 scales"])
def test_scale_search_agrees_with_pytorch_up_to_ties(band, scale_dtype, monkeypatch):
    monkeypatch.setattr(native_codec, "BAND", band)
    fast, reference = _pair(value_map="mulaw-after-scale", granularity="block", mu=3.0, scale_search=True,
                            scale_dtype=scale_dtype)
    assert fast.block_size == 256
    blocks = differ = 0
    for x in _matrices():
        if x.numel() % 256:
            continue
        assert native_codec.encode(fast, x.float(), tuple(x.shape)) is not None
        got, want = fast.encode(x), reference.encode(x)
        same = got["scale"] == want["scale"]
        blocks += same.numel()
        differ += int((~same).sum())
        codes = lambda e: torch.stack([e["codes"] & 15, e["codes"] >> 4], -1).view(-1, 256)
        assert torch.equal(codes(got)[same], codes(want)[same])
        if not same.all():  # only where an element within rounding of a level boundary tips a near-tie
            error_got, error_want = _errors(fast, got, x)[~same], _errors(reference, want, x)[~same]
            assert torch.allclose(error_got, error_want, rtol=1e-3, atol=0.0), (error_got, error_want)
    assert blocks == 6656
    assert differ <= blocks // 2000, f"{differ} of {blocks} blocks chose another scale"


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_scale_search_rounds_candidate_scales_as_store_scale_from_subnormal_to_saturated(scale_dtype):
    """Blocks whose absmax runs from 1e-12 to 1e6 (fp16: zero, subnormal, normal and saturated
    scales; the C search rounds fp16 candidates in hardware where F16C is there): the same scale
    as the PyTorch search in every block."""
    fast, reference = _pair(value_map="mulaw-after-scale", granularity="block", mu=3.0, scale_search=True,
                            scale_dtype=scale_dtype)
    x = torch.randn(2048, 256, generator=torch.Generator().manual_seed(4)) * torch.logspace(-12, 6, 2048).view(-1, 1)
    assert native_codec.encode(fast, x.view(-1), (x.numel(),)) is not None
    got, want = fast.encode(x.view(-1)), reference.encode(x.view(-1))
    assert torch.equal(got["scale"], want["scale"])


@pytest.mark.parametrize("settings", [dict(granularity="column"), dict(granularity="row"),
                                      dict(granularity="block", block_size=128)], ids=["column", "row", "block"])
def test_group_table_decode_is_the_expansion_of_level_times_scale(settings):
    """Codes companded before a per-group scale decode to sign(q) ((1 + mu)^(|q| s) - 1) / mu, q the
    level and s its group's stored step (written here from that definition, in fp64), in C and in
    PyTorch alike."""
    fast, reference = _pair(compand=True, **settings)
    mu = reference.compander.mu
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 42, generator=g) * torch.rand(300, 1, generator=g) * 1e-2  # 12,600: a ragged last block
    encoded = reference.encode(x)
    low, high = encoded["codes"] & 15, encoded["codes"] >> 4
    q = torch.stack([low, high], -1).view(-1)[: x.numel()].double() - 8
    scale = encoded["scale"].double()
    if settings["granularity"] == "column":
        s = scale.repeat(300)
    elif settings["granularity"] == "row":
        s = scale.repeat_interleave(42)
    else:
        s = scale.repeat_interleave(128)[: x.numel()]
    y = q * s
    want = torch.sign(y) * torch.expm1(y.abs() * torch.log1p(torch.tensor(mu, dtype=torch.float64))) / mu
    got = fast.decode(encoded, tuple(x.shape))
    assert torch.equal(got, reference.decode(encoded, tuple(x.shape)))
    torch.testing.assert_close(got.double().view(-1), want, rtol=1e-6, atol=0.0)


def test_search_ratios_are_the_ones_the_c_loop_gets():
    # the C search takes the candidates in this order and keeps the first on ties, like PyTorch's
    assert SEARCH_RATIOS[0] == 1.0 and list(SEARCH_RATIOS) == sorted(SEARCH_RATIOS, reverse=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_takes_the_pytorch_path(bad):
    searched = dict(CODECS["mu-law after the scale, blocks"], scale_search=True)
    for where in [(3, 5), (255, 63)]:  # the search's first block, and its last (set up ahead, mid-matrix)
        x = torch.randn(256, 64) * 1e-3
        x[where] = bad
        for settings in (CODECS["muonq residual"], CODECS["grasp residual"], searched):
            fast, reference = _pair(**settings)
            assert native_codec.encode(fast, x, tuple(x.shape)) is None
            got, want = fast.encode(x), reference.encode(x)
            assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture
def fresh_library():
    native.library.cache_clear()
    yield
    native.library.cache_clear()


def test_library_is_built_once_into_the_cache(tmp_path, monkeypatch, fresh_library):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.library() is not None
    built = list((tmp_path / "muonq" / "native").glob("codecs-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None
    assert [p.stat().st_mtime_ns for p in (tmp_path / "muonq" / "native").glob("*")] == [stamp]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set levels")
def test_c_loops_built_without_avx512_give_the_same_bytes(tmp_path, monkeypatch, fresh_library):
    """The plain C twins of the AVX-512 loops, which CPUs without AVX-512 run: the library built for
    x86-64-v3 (AVX2; generic x86-64 where the compiler does not know that level)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_NATIVE_ISA", "-march=x86-64-v3")
    assert native.library() is not None
    for name in CODECS:
        _assert_c_loops_match_pytorch(name, monkeypatch)
    # no AVX512-BF16 in this build: the low-rank product takes torch's bf16 matmul
    assert native.call("mq_has_bf16_dot") == 0
    base, p, r = torch.randn(40, 24), torch.randn(40, 6), torch.randn(24, 6)
    expected = base + (p.bfloat16() @ r.bfloat16().mT).float()
    assert torch.equal(add_low_rank(base, p, r, alpha=1.0, dtype=torch.bfloat16), expected)


def _threshold_blocks(scale_dtype: torch.dtype) -> torch.Tensor:
    """Blocks of 256 of absmax 1 (then 2^-10) whose other elements lie on, and one ulp either side
    of, every search candidate's seven thresholds and sixteen cell ends (j / 16 of its scale): the
    thresholds written from the mu-law definition, the scale as the search stores it."""
    mu = 3.0
    fracs = [math.expm1((k + 0.5) / 7 * math.log1p(mu)) / mu for k in range(7)]
    points = []
    for ratio in SEARCH_RATIOS:
        s = float(store_scale(torch.tensor([ratio]), scale_dtype).float())
        points += [s * f for f in fracs] + [s * j / 16 for j in range(1, 17)]
    at = torch.tensor(points, dtype=torch.float64).float()  # fp32 nearest, as C rounds its fp64 products
    values = torch.cat([at, torch.nextafter(at, torch.zeros(())), torch.nextafter(at, torch.full((), math.inf))])
    values = torch.cat([values, torch.zeros(-values.numel() % 255)]).view(-1, 255)
    blocks = torch.cat([torch.ones(values.shape[0], 1), values], dim=1)
    blocks = torch.cat([blocks, blocks * 2.0**-10])
    return blocks * (torch.randint(0, 2, blocks.shape, generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set levels")
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="no AVX-512: one build only")
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_scale_search_vector_loops_count_the_levels_of_the_plain_loop(scale_dtype, tmp_path, monkeypatch,
                                                                       fresh_library):
    """The search's AVX-512 loops (levels by cells of the scale, or by binary search; candidates
    three at a time in one pass) give every candidate's error bit for bit as the plain C loop does,
    on elements at and next to each threshold and cell end, for the candidate list and for shorter
    ones (the passes' remainders of one and two); hence the same scales and codes."""
    codec = make_codec(4, value_map="mulaw-after-scale", granularity="block", mu=3.0, scale_search=True,
                       scale_dtype=scale_dtype)
    x = _threshold_blocks(scale_dtype)
    counts = (len(SEARCH_RATIOS), 5, 4, 2, 1)
    runs = []
    for isa in (native._NATIVE_ISA, "-march=x86-64-v3"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / isa))
        monkeypatch.setattr(native, "_NATIVE_ISA", isa)
        native.library.cache_clear()
        for count in counts:
            monkeypatch.setattr(quant, "SEARCH_RATIOS", SEARCH_RATIOS[:count])
            errors = torch.full((x.shape[0], count), math.nan)
            runs.append((native_codec._encode_searched(codec, x.reshape(-1), (x.numel(),), errors=errors), errors))
    for count, (vector, vector_errors), (plain, plain_errors) in zip(counts, runs[: len(counts)], runs[len(counts):]):
        assert not vector_errors.isnan().any() and (count == 1 or (vector_errors != vector_errors[:, :1]).any())
        assert torch.equal(vector_errors, plain_errors), count
        for field in plain:
            assert torch.equal(vector[field], plain[field]), (count, field)


def test_without_a_compiler_the_codecs_stay_in_pytorch(tmp_path, monkeypatch, fresh_library):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert native.library() is None
    fast, reference = _pair(**CODECS["muonq residual"])
    x = torch.randn(512, 512)
    assert native_codec.encode(fast, x, (512, 512)) is None
    assert torch.equal(fast.encode(x)["codes"], reference.encode(x)["codes"])


def _run(name: str, kernels: str, steps: int = 4):
    """Steps with the optimizer's matmuls pinned to fp32: in bf16, the decomposition's low-rank
    product differs by design between the C loops and PyTorch (tested on its own below)."""
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02) for shape in [(192, 128), (128, 320)]]
    spec = dataclasses.replace(preset(name, matmul_dtype="float32"), kernels=kernels)
    muon = build_optimizer(spec, hidden=params, others=[]).optimizers["muon"]
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        muon.step()
    codecs = {muon.store_for(p).residual_codec.native for p in params}
    return [p.detach().clone() for p in params], codecs


@pytest.mark.parametrize("name", ["muonq", "grasp"])
def test_training_steps_are_bit_identical_with_and_without_the_c_loops(name):
    fast, fast_native = _run(name, "auto")
    reference, reference_native = _run(name, "reference")
    assert fast_native == {True} and reference_native == {False}
    for a, b in zip(fast, reference):
        assert torch.equal(a, b)


def test_muonq_hifi_steps_match_the_pytorch_codecs_up_to_search_ties():
    fast, _ = _run("muonq-hifi", "auto")
    reference, _ = _run("muonq-hifi", "reference")
    for a, b in zip(fast, reference):
        assert torch.allclose(a, b, rtol=0, atol=1e-6 * float(b.abs().max()))


def _exact_low_rank(base: torch.Tensor, p: torch.Tensor, r: torch.Tensor, alpha: float):
    """base + alpha P R^T in fp64 from the bf16-rounded factors, and a bound on an fp32 evaluation's
    error: each of the k/2 pair sums and the final scale and add rounds once (2^-24 relative), on
    magnitudes at most |base| + sum |p_t r_t|."""
    p64, r64 = p.bfloat16().double(), r.bfloat16().double()
    exact = base.double() + alpha * (p64 @ r64.mT)
    size = base.double().abs() + abs(alpha) * (p64.abs() @ r64.abs().mT)
    return exact, (p.shape[1] // 2 + 3) * 2.0**-24 * size


@pytest.mark.skipif(not (native.available() and native.call("mq_has_bf16_dot")), reason="no AVX512-BF16 build")
@pytest.mark.parametrize(("rows", "cols", "k"), [(512, 512, 32), (1376, 512, 25), (37, 67, 5), (3, 17, 1), (129, 80, 50)])
def test_bf16_low_rank_product_in_c_sums_exact_pair_products_in_fp32(rows, cols, k):
    """Row counts off the 4-row blocks, column counts off the 64-column blocks and odd k (padded)."""
    g = torch.Generator().manual_seed(rows * cols + k)
    base, p, r = (torch.randn(shape, generator=g) for shape in [(rows, cols), (rows, k), (cols, k)])
    for alpha in (1.0, -1.0, 0.5):
        exact, bound = _exact_low_rank(base, p, r, alpha)
        out = add_low_rank(base, p, r, alpha=alpha, dtype=torch.bfloat16)
        assert ((out.double() - exact).abs() <= bound).all()
        in_place = base.clone()
        assert add_low_rank(in_place, p, r, alpha=alpha, dtype=torch.bfloat16, out=in_place) is in_place
        assert torch.equal(in_place, out)
    # the momentum update in the same pass rounds as the separate operations do, the gradient's
    # division (MuonQ's normalisation) included; so does the torch path's
    grad = torch.randn(rows, cols, generator=g) * 3.0
    updated = add_low_rank(base, p, r, alpha=1.0, dtype=torch.bfloat16, update=(0.95, grad))
    assert torch.equal(updated, add_low_rank(base, p, r, alpha=1.0, dtype=torch.bfloat16).mul_(0.95).add_(grad))
    norm = grad.norm()
    for dtype, native_loops in [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)]:
        divided = add_low_rank(base, p, r, alpha=1.0, dtype=dtype, native_loops=native_loops, update=(0.95, grad),
                               grad_divisor=norm)
        separate = add_low_rank(base, p, r, alpha=1.0, dtype=dtype, native_loops=native_loops)
        assert torch.equal(divided, separate.mul_(0.95).add_(grad / norm)), (dtype, native_loops)
    # torch's bf16 matmul (kernels=reference, or builds without AVX512-BF16) rounds the product to bf16
    torch_path = add_low_rank(base, p, r, alpha=-1.0, dtype=torch.bfloat16, native_loops=False)
    assert torch.equal(torch_path, base - (p.bfloat16() @ r.bfloat16().mT).float())
    exact, _ = _exact_low_rank(base, p, r, -1.0)
    in_c = add_low_rank(base, p, r, alpha=-1.0, dtype=torch.bfloat16)
    assert (in_c.double() - exact).abs().max() < (torch_path.double() - exact).abs().max()
