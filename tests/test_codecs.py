"""Codecs: error bounds, exact bytes, packing, zeros, edge inputs, stochastic rounding, grid."""

from __future__ import annotations

import math

import pytest
import torch

from muonq.optim.codecs import (
    DynamicMap,
    LinearMap,
    MuLawMap,
    QuantCodec,
    RawCodec,
    dynamic_code_values,
    encoded_nbytes,
    make_codec,
    pack,
    packed_numel,
    unpack,
)

MU = 255.0


def heavy_tailed(shape, df=3.0, seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(df).sample(shape)


def gaussian(shape, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def elementwise_scale(codec: QuantCodec, encoded: dict, shape) -> torch.Tensor:
    """The scale applied to each element: decode with every code set to the code of +1."""
    top = codec.value_map.encode(torch.ones(math.prod(shape)))
    return codec.decode({**encoded, "codes": pack(top, codec.bits)}, shape)


LINEAR_CASES = [
    (bits, gran)
    for bits in (8, 4)
    for gran in ("tensor", "block", "row", "column", "grid")
]


@pytest.mark.parametrize("bits,gran", LINEAR_CASES)
@pytest.mark.parametrize("make_input", [gaussian, heavy_tailed], ids=["gauss", "student-t"])
def test_linear_error_is_at_most_half_a_step(bits, gran, make_input):
    shape = (96, 200)  # ragged last block (19200 = 75 * 256) is fine, ragged grid tiles too
    x = make_input(shape)
    codec = make_codec(bits, "linear", gran, block_size=256, tile_size=64)
    encoded = codec.encode(x)
    x_hat = codec.decode(encoded, shape)
    scale = elementwise_scale(codec, encoded, shape)
    assert torch.all(scale >= x.abs() * (1 - 1e-6)), "stored scales must cover every element"
    step = scale / codec.value_map.levels
    assert torch.all((x - x_hat).abs() <= step / 2 * (1 + 1e-5) + 1e-12)


@pytest.mark.parametrize("gran", ["tensor", "block", "column"])
def test_mulaw_after_scale_error_is_half_a_step_in_the_companded_domain(gran):
    x = heavy_tailed((64, 128))
    codec = make_codec(4, "mulaw-after-scale", gran, block_size=128, mu=MU)
    encoded = codec.encode(x)
    x_hat = codec.decode(encoded, x.shape)
    scale = elementwise_scale(codec, encoded, x.shape)

    def compand(v):
        return torch.sign(v) * torch.log1p(MU * v.abs()) / math.log1p(MU)

    gap = (compand(x / scale) - compand(x_hat / scale)).abs()
    assert gap.max() <= 0.5 / 7 + 1e-5
    # mu-law spends its levels near zero: small entries come back far better than with linear codes
    linear = make_codec(4, "linear", gran, block_size=128)
    small = x.abs() < 0.05 * scale
    err_mulaw = (x_hat - x)[small].abs().mean()
    err_linear = (linear.decode(linear.encode(x), x.shape) - x)[small].abs().mean()
    assert err_mulaw < 0.5 * err_linear


def test_dynamic_map_is_the_256_value_tree_and_rounds_to_nearest():
    values = dynamic_code_values()
    assert values.numel() == 256 and values[0] > -1 and values[-1] == 1.0 and (values == 0).sum() == 1
    assert torch.all(values[1:] > values[:-1])
    # decades: 1 + 2 + ... + 64 positive non-unit values between 1e-7 and 1
    positive = values[(values > 0) & (values < 1)]
    assert positive.numel() == 127 and positive.min() < 1e-6
    x = heavy_tailed((4096,))
    codec = make_codec(8, "dynamic", "block", block_size=256)
    encoded = codec.encode(x)
    scale = elementwise_scale(codec, encoded, x.shape)
    y, y_hat = x / scale, codec.decode(encoded, x.shape) / scale
    nearest = (y[:, None] - values[None, :]).abs().min(dim=1).values
    assert torch.allclose((y - y_hat).abs(), nearest, atol=1e-6)


@pytest.mark.parametrize(
    "bits,value_map,gran,shape,expected",
    [
        (8, "linear", "block", (512, 512), 512 * 512 + 1024 * 4),
        (8, "dynamic", "block", (1000,), 1000 + 4 * 4),  # ragged last block
        (8, "linear", "tensor", (33, 7), 231 + 4),
        (4, "linear", "tensor", (512, 512), 131072 + 2),
        (4, "mulaw-after-scale", "column", (512, 32), 8192 + 64),
        (4, "mulaw-after-scale", "tensor", (513, 7), 1796 + 2),  # odd element count: one nibble of padding
        (4, "linear", "block", (512, 512), 131072 + 2048 * 2),
        (4, "linear", "grid", (300, 200), 30000 + (300 * 2 + 3 * 200) * 2),
        (32, "linear", "tensor", (10, 10), 400),
    ],
)
def test_exact_byte_counts(bits, value_map, gran, shape, expected):
    codec = make_codec(bits, value_map, gran, block_size=256 if gran == "block" and bits == 8 else 128)
    assert codec.nbytes(shape) == expected
    assert encoded_nbytes(codec.encode(gaussian(shape))) == expected
    assert encoded_nbytes(codec.zeros(shape)) == expected
    assert encoded_nbytes(codec.zeros(shape, device="meta")) == expected


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("numel", [1, 2, 3, 7, 8, 1001])
def test_packing_round_trip(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(numel))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(numel, bits)
    assert torch.equal(unpack(packed, bits, numel), codes)


def test_packing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        pack(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 7)


ALL_CODECS = [
    ("linear-8-block", lambda: make_codec(8, "linear", "block", block_size=64)),
    ("dynamic-8-block", lambda: make_codec(8, "dynamic", "block", block_size=64)),
    ("linear-8-tensor", lambda: make_codec(8, "linear", "tensor")),
    ("linear-4-tensor", lambda: make_codec(4, "linear", "tensor")),
    ("mulaw-4-tensor", lambda: make_codec(4, "mulaw-after-scale", "tensor")),
    ("mulaw-4-column", lambda: make_codec(4, "mulaw-after-scale", "column")),
    ("mulaw-4-row", lambda: make_codec(4, "mulaw-after-scale", "row")),
    ("compand-4-tensor", lambda: make_codec(4, "linear", "tensor", compand=True)),
    ("compand-4-column", lambda: make_codec(4, "linear", "column", compand=True)),
    ("compand-8-block", lambda: make_codec(8, "linear", "block", block_size=64, compand=True)),
    ("compand-4-grid", lambda: make_codec(4, "linear", "grid", tile_size=16, compand=True)),
    ("linear-4-block", lambda: make_codec(4, "linear", "block", block_size=64)),
    ("linear-4-grid", lambda: make_codec(4, "linear", "grid", tile_size=16)),
    ("raw", lambda: RawCodec()),
]
CODEC_IDS = [name for name, _ in ALL_CODECS]
CODEC_MAKERS = [make for _, make in ALL_CODECS]


@pytest.mark.parametrize("make", CODEC_MAKERS, ids=CODEC_IDS)
def test_zeros_and_all_zero_groups_decode_to_exact_zeros(make):
    codec = make()
    shape = (40, 48)
    for x in (torch.zeros(shape), torch.zeros(shape).index_fill_(0, torch.arange(0, 40, 3), 1.5)):
        encoded = codec.encode(x)
        x_hat = codec.decode(encoded, shape)
        assert torch.all(x_hat[x == 0] == 0)
        assert torch.isfinite(x_hat).all()
    zero = codec.zeros(shape)
    assert torch.equal(codec.decode(zero, shape), torch.zeros(shape))
    encoded = codec.encode(torch.zeros(shape))
    assert all(torch.equal(encoded[k], zero[k]) for k in zero)


@pytest.mark.parametrize("make", CODEC_MAKERS, ids=CODEC_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 5), (17, 1)])
def test_tiny_and_odd_shapes_round_trip(make, shape):
    codec = make()
    x = gaussian(shape, seed=sum(shape))
    x_hat = codec.decode(codec.encode(x), shape)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    assert torch.allclose(x_hat, x, atol=0.6 * x.abs().max().item())
    assert torch.sign(x_hat)[x_hat != 0].eq(torch.sign(x)[x_hat != 0]).all()


@pytest.mark.parametrize("make", CODEC_MAKERS[:-1], ids=CODEC_IDS[:-1])
def test_extreme_inputs_never_give_nan_or_inf(make):
    codec = make()
    big = torch.finfo(torch.float32).max
    x = torch.zeros(32, 64)
    x[0, :8] = 1e-40  # subnormal
    x[1, :8] = torch.tensor([big, -big, 3e38, -1e30, 1e6, 7e4, 65504.0, -65520.0])
    x[2, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e-45])
    x[3:] = gaussian((29, 64)) * 1e-8
    x_hat = codec.decode(codec.encode(x), x.shape)
    assert torch.isfinite(x_hat).all()
    assert x_hat[2, 2] == 0  # NaN is stored as zero
    assert x_hat[1, 0] > 0 and x_hat[1, 1] < 0 and x_hat[2, 0] > 0 and x_hat[2, 1] < 0


def test_fp16_scales_round_up_and_saturate():
    codec = make_codec(4, "linear", "block", block_size=4, scale_dtype=torch.float16)
    x = torch.tensor([0.1, 1e-6, 3e-9, 7e4, 1e-3, 0.3337, 0.0, -1e5])
    encoded = codec.encode(x.repeat_interleave(4))
    scale = encoded["scale"]
    assert scale.dtype == torch.float16 and torch.isfinite(scale).all()
    finite = x.abs() <= 65504
    assert torch.all(scale.float()[finite] >= x.abs()[finite])
    assert scale[3] == scale[7] == 65504  # saturated, not inf


@pytest.mark.parametrize("value_map", ["linear", "dynamic"])
def test_stochastic_rounding_is_unbiased(value_map):
    bits = 8 if value_map == "dynamic" else 4
    codec = make_codec(bits, value_map, "tensor", stochastic=True)
    # scale 1 (the last value); the others fall between code levels, inside the map's range
    # (the dynamic map's most negative value is -0.993, so -1 itself would clip)
    x = torch.cat([torch.linspace(-0.95, 0.95, 255), torch.ones(1)])
    generator = torch.Generator().manual_seed(1234)
    trials = 400
    mean = sum(codec.decode(codec.encode(x, generator=generator), x.shape) for _ in range(trials)) / trials
    step = 1 / 7 if bits == 4 else 0.015  # coarsest level spacing
    assert (mean - x).abs().max() < 5 * step / 2 / math.sqrt(trials)
    deterministic = make_codec(bits, value_map, "tensor")
    bias = (deterministic.decode(deterministic.encode(x), x.shape) - x).abs().mean()
    assert (mean - x).abs().mean() < bias / 3


def test_stochastic_rounding_is_reproducible_from_a_generator_and_uses_global_rng_otherwise():
    codec = make_codec(4, "linear", "tensor", stochastic=True)
    x = gaussian((50, 50))
    a = codec.encode(x, generator=torch.Generator().manual_seed(7))["codes"]
    b = codec.encode(x, generator=torch.Generator().manual_seed(7))["codes"]
    assert torch.equal(a, b)
    torch.manual_seed(3)
    c = codec.encode(x)["codes"]
    torch.manual_seed(3)
    assert torch.equal(c, codec.encode(x)["codes"])


def outlier_matrix() -> torch.Tensor:
    """Gaussian 512 x 512 with a few large rows and a few large columns."""
    x = gaussian((512, 512), seed=5)
    x[[3, 200, 410]] *= 50.0
    x[:, [17, 300]] *= 50.0
    return x


def test_grid_scales_beat_per_group_scales_with_row_and_column_outliers():
    x = outlier_matrix()
    grid = make_codec(4, "linear", "grid", tile_size=128)

    def rel_err(codec):
        return ((codec.decode(codec.encode(x), x.shape) - x).norm() / x.norm()).item()

    grid_err = rel_err(grid)
    others = {
        "tensor": make_codec(4, "linear", "tensor"),
        "row": make_codec(4, "linear", "row"),
        "column": make_codec(4, "linear", "column"),
        "block-128": make_codec(4, "linear", "block", block_size=128),
        # as many scales as the grid (4096): a block per 64 elements
        "block-64": make_codec(4, "linear", "block", block_size=64),
    }
    for name, codec in others.items():
        assert grid_err < 0.8 * rel_err(codec), name


def test_raw_codec_is_lossless_and_decodes_to_a_fresh_tensor():
    codec = RawCodec()
    x = gaussian((5, 7))
    encoded = codec.encode(x)
    out = codec.decode(encoded, x.shape)
    assert torch.equal(out, x)
    out.add_(1.0)
    assert torch.equal(encoded["values"], x)


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="granularity"):
        QuantCodec(LinearMap(8), "diagonal")
    with pytest.raises(ValueError, match="matrix"):
        make_codec(4, "linear", "grid").encode(torch.ones(10))
    with pytest.raises(ValueError, match="matrix"):
        make_codec(4, "linear", "row").nbytes((2, 3, 4))
    with pytest.raises(ValueError, match="8-bit"):
        make_codec(4, "dynamic")
    with pytest.raises(ValueError, match="bits"):
        LinearMap(2)
    with pytest.raises(ValueError, match="empty"):
        make_codec(8).encode(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="block_size"):
        make_codec(8, "linear", "block", block_size=0)
    with pytest.raises(ValueError, match="mu"):
        MuLawMap(4, mu=0.0)
    with pytest.raises(ValueError, match="scale dtype"):
        make_codec(8, scale_dtype=torch.int8)
    with pytest.raises(ValueError, match="value map"):
        make_codec(8, "log")


def test_value_maps_share_one_interface():
    y = torch.linspace(-1, 1, 101)
    for value_map in (LinearMap(8), LinearMap(4), MuLawMap(4), MuLawMap(8), DynamicMap()):
        codes = value_map.encode(y)
        assert codes.dtype == torch.uint8 and int(codes.max()) < 2**value_map.bits
        back = value_map.decode(codes)
        assert back.abs().max() <= 1.0
        assert value_map.decode(torch.tensor([value_map.zero_code], dtype=torch.uint8)).item() == 0.0


# -- the CPU paths: sliced encoding and table decoding are the whole-tensor arithmetic, bit for bit --


def _reference_decode(codec: QuantCodec, encoded: dict, shape) -> torch.Tensor:
    """Decoding spelled out: the value map's decode (levels, when companding) of the unpacked
    codes, times the scales, expanded when companding."""
    from muonq.optim.codecs.grid import grid_scale

    numel = math.prod(shape)
    codes = unpack(encoded["codes"], codec.bits, numel)
    values = codec.value_map.decode(codes) if codec.compander is None else codec.value_map.decode_steps(codes)
    if codec.granularity == "grid":
        scaled = values.view(shape) * grid_scale(encoded["row_scale"], encoded["col_scale"], codec.tile_size)
    else:
        groups, dim = codec._groups(values.view(shape))
        view = [1, 1]
        view[1 - dim] = groups.shape[1 - dim]
        scaled = (groups * encoded["scale"].float().view(view)).reshape(-1)[:numel].view(shape)
    return scaled if codec.compander is None else codec.compander.expand(scaled)


# (bits, value map, compand before the scale, granularity); "linear" with compand is MuonQ's quantizer
CPU_PATH_CASES = [
    (bits, value_map, compand, gran)
    for bits in (8, 4)
    for value_map, compand in (("linear", False), ("mulaw-after-scale", False), ("dynamic", False), ("linear", True))
    for gran in ("tensor", "block", "row", "column", "grid")
    if not (value_map == "dynamic" and bits == 4)
]


def _cpu_path_inputs(shape, g: torch.Generator, scale: float):
    x = torch.randn(shape, generator=g) * scale
    yield x
    yield (x**3).T.contiguous().T  # heavy tails, tiny values; a non-contiguous input
    zeros = x.clone()
    zeros.view(-1)[::7], zeros.view(-1)[1::11] = 0.0, -0.0
    yield zeros
    big = x.clone()
    big.view(-1)[3], big.view(-1)[4] = 1e38, -1e38  # saturated fp16 scales clip; companding clamps
    yield big
    inf = x.clone()
    inf.view(-1)[5], inf.view(-1)[-1] = float("inf"), -float("inf")
    yield inf
    nan = x.clone()
    nan.view(-1)[6] = float("nan")
    yield nan


@pytest.mark.parametrize("bits,value_map,compand,gran", CPU_PATH_CASES)
def test_cpu_encoding_and_decoding_paths_give_the_reference_bytes_and_values(bits, value_map, compand, gran, monkeypatch):
    import muonq.optim.codecs.quant as quant

    monkeypatch.setattr(quant, "CHUNK", 1 << 13)  # many slices per matrix, ragged last ones
    g = torch.Generator().manual_seed(bits)
    # ragged blocks, tiles and an odd count of 4-bit codes; momentum-sized entries and entries
    # beyond [-1, 1], which companding clamps
    cases = (((700, 300), 256, 128, 1e-3), ((257, 263), 100, 33, 0.5), ((300, 700), 7, 5, 3.0))
    for shape, block, tile, scale in cases:
        codec = make_codec(bits, value_map, gran, block_size=block, tile_size=tile, compand=compand)
        for x in _cpu_path_inputs(shape, g, scale):
            encoded = codec.encode(x)
            whole = codec._encode_whole(x.float(), shape, None)
            assert encoded.keys() == whole.keys()
            for key in encoded:
                assert encoded[key].dtype == whole[key].dtype and torch.equal(encoded[key], whole[key]), key
            want = _reference_decode(codec, encoded, shape)
            out = torch.empty(shape)
            for got in (codec.decode(encoded, shape), codec.decode(encoded, shape, out=out)):
                assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bitwise, -0.0 included
            assert codec.decode(encoded, shape, out=out).data_ptr() == out.data_ptr()


@pytest.mark.parametrize("columns", [1, 2, 4, 3])
def test_table_gather_moves_every_rows_bytes_unchanged(columns):
    """The CPU decoder gathers table rows as single 4/8/16-byte words: any bit pattern (NaN payloads,
    -0.0, subnormals) must arrive as it was, into fresh and offset outputs alike."""
    from muonq.optim.codecs.quant import _gather_rows

    g = torch.Generator().manual_seed(columns)
    bits = torch.randint(-(2**31), 2**31 - 1, (256, columns), generator=g, dtype=torch.int32)
    bits[:4] = torch.tensor([0x7FC00001, 0x7F800001, -(2**31), 1], dtype=torch.int32).view(4, 1)  # NaNs, -0.0, subnormal
    table = bits.view(torch.float32)
    index = torch.randint(0, 256, (1001,), generator=g, dtype=torch.int32)
    index[:256] = torch.arange(256, dtype=torch.int32)
    want = bits[index.long()]
    buffer = torch.empty((1001 + 1) * columns)
    for out in (torch.empty(1001, columns), buffer[columns:].view(1001, columns), buffer[1:1 + 1001 * columns].view(1001, columns)):
        got = _gather_rows(table, index, out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got.view(torch.int32), want)


@pytest.mark.parametrize("gran", ["tensor", "column", "block"])
def test_companded_cpu_encoder_falls_back_when_the_absmax_it_predicts_is_not_the_one_it_meets(gran):
    """The one-pass encoder takes the companded absmax to be the companding of the raw absmax; a
    compander whose :meth:`compand` disagrees with the magnitudes the slices compute (standing in
    for a log1p that is not monotone) must send the encoding to the whole path, not keep scales
    that do not bound the slices."""
    from muonq.optim.codecs import MuLawCompander

    class Inflated(MuLawCompander):
        def compand(self, x):
            return super().compand(x) * (1 + 2**-8)

    codec = make_codec(4, "linear", gran, block_size=256, compand=True, native=False)  # PyTorch's one pass
    codec.compander = Inflated(MU)
    x = gaussian((512, 512)) * 1e-3
    encoded, whole = codec.encode(x), codec._encode_whole(x, x.shape, None)
    assert all(torch.equal(encoded[key], whole[key]) for key in whole)
    honest = make_codec(4, "linear", gran, block_size=256, compand=True, native=False)
    assert not torch.equal(honest.encode(x)["scale"], encoded["scale"])  # the inflation shows in the scales


# -- MuonQ's quantizer: mu-law on the raw values, before the scale ---------------------------------


def original_quantize(x: torch.Tensor, dim: int | None, mu: float = 255.0, levels: int = 7, eps: float = 1e-8):
    """The original MuonQ quantizer, written out here (nothing of the codec used): clamp to
    [-1, 1]; compand the raw values, y = sign(x) ln(1 + mu |x|) / ln(1 + mu) (as a product with
    1 / ln(1 + mu)); per group (the whole tensor, or each column with ``dim=0``) the step
    s = max(absmax(y) / 7, eps) in fp32; codes = round-half-even(y / s) clamped to [-7, 7]; s is
    stored as fp16. Decoded: expand(code * fp16 s), expand(z) = sign(z) ((1 + mu)**|z| - 1) / mu
    (as expm1(|z| ln(1 + mu)) times 1 / mu). Returns (integer codes, fp16 steps, decoded fp32)."""
    v = x.float().clamp(-1.0, 1.0)
    y = v.sign() * torch.log1p(mu * v.abs()) * (1.0 / math.log1p(mu))
    absmax = y.abs().amax() if dim is None else y.abs().amax(dim=dim, keepdim=True)
    s = (absmax / levels).clamp(min=eps)
    q = torch.round(y / s).clamp(-levels, levels)
    s16 = s.to(torch.float16)
    z = q * s16.float()
    return q, s16, z.sign() * torch.expm1(z.abs() * math.log1p(mu)) * (1.0 / mu)


def unit_norm_gaussian(shape, seed=0) -> torch.Tensor:
    x = gaussian(shape, seed)
    return x / x.norm()


ORIGINAL_CASES = {
    "unit-norm 256x256": lambda: unit_norm_gaussian((256, 256)),
    "odd 513x7": lambda: unit_norm_gaussian((513, 7), seed=1),
    "odd 77x33": lambda: unit_norm_gaussian((77, 33), seed=2),
    "beyond [-1, 1]": lambda: gaussian((64, 48), seed=3) * 0.7,  # a third of the entries clamp
    "zero rows and columns": lambda: unit_norm_gaussian((40, 24), seed=4).index_fill_(0, torch.arange(0, 40, 3), 0.0)
    .index_fill_(1, torch.tensor([0, 5, 23]), 0.0),
    "tiny (steps at the 1e-8 floor, below fp16)": lambda: unit_norm_gaussian((16, 16), seed=5) * 1e-8,
    "all zero": lambda: torch.zeros(32, 8),
}


@pytest.mark.parametrize("gran", ["tensor", "column"])
@pytest.mark.parametrize("case", list(ORIGINAL_CASES))
def test_compander_codec_is_the_original_quantizer_bit_for_bit(case, gran):
    """MuonQ's E (per tensor) and P, R (per column): codes, fp16 steps and decoded values equal
    the original quantizer's exactly (same fp32 arithmetic on the CPU)."""
    x = ORIGINAL_CASES[case]()
    codec = make_codec(4, "linear", gran, compand=True, mu=MU)
    encoded = codec.encode(x)
    q, s, decoded = original_quantize(x, None if gran == "tensor" else 0, MU)
    assert encoded["scale"].dtype == torch.float16
    assert torch.equal(encoded["scale"], s.reshape(-1))
    codes = unpack(encoded["codes"], 4, x.numel()).float() - codec.value_map.zero_code
    assert torch.equal(codes.view(x.shape), q)
    assert torch.equal(codec.decode(encoded, x.shape), decoded)
    assert torch.all(decoded[x == 0] == 0) and torch.isfinite(decoded).all()


def test_muonq_preset_stores_momentum_with_the_original_quantizer():
    """The muonq YAML's stores: E per tensor and P, R per column with the original quantizer, and
    exactly 147,586 bytes for a 512 x 512 matrix (E 131072 + 2, P and R 8192 + 64 each)."""
    from muonq.config import preset
    from muonq.optim.selection import store_selector
    from muonq.optim.stores import DecomposedStore

    store = store_selector(preset("muonq").muon.store)(torch.zeros(512, 512))
    assert isinstance(store, DecomposedStore) and store.rank == 32
    e, p = unit_norm_gaussian((512, 512), seed=6), torch.linalg.qr(gaussian((512, 32), seed=7))[0]
    for codec, x, dim in ((store.residual_codec, e, None), (store.factor_codec, p, 0)):
        encoded = codec.encode(x)
        q, s, decoded = original_quantize(x, dim, MU)
        assert torch.equal(encoded["scale"], s.reshape(-1))
        assert torch.equal(codec.decode(encoded, x.shape), decoded)
    sizes = [store.residual_codec.nbytes((512, 512)), store.factor_codec.nbytes((512, 32)),
             store.factor_codec.nbytes((512, 32))]
    assert sizes == [131072 + 2, 8192 + 64, 8192 + 64] and sum(sizes) == 147_586


def test_compander_order_is_gentler_than_companding_after_the_scale():
    """The original order compands raw entries ~1/sqrt(mn): on a unit-norm Gaussian 256 x 256 its
    4-bit error is ~0.135, where companding x / absmax with mu = 255 gives ~0.235."""
    x = unit_norm_gaussian((256, 256))
    original = make_codec(4, "linear", "tensor", compand=True)
    err = ((original.decode(original.encode(x), x.shape) - x).norm() / x.norm()).item()
    assert err == pytest.approx(0.135, abs=0.005)


def spiked(shape, seed=0) -> torch.Tensor:
    """Unit-norm Gaussian with one entry in 1000 made 10 times larger: outliers that set the absmax
    scale of their group and leave its bulk a few codes."""
    x = gaussian(shape, seed)
    spikes = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))[: x.numel() // 1000]
    x.view(-1)[spikes] *= 10.0
    return x / x.norm()


def test_scale_search_keeps_per_block_the_clipped_scale_of_least_squared_error():
    """Reference written here: per block, each ratio r of 1, 0.9, ..., 0.5 quantizes with the
    original quantizer's arithmetic at the step max(r absmax(y) / 7, 1e-8) (entries beyond it
    saturate at code +-7); the kept one has the least squared error, the larger r on ties."""
    x = spiked((48, 80), seed=8)
    block, ratios = 64, (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    codec = make_codec(4, "linear", "block", block_size=block, compand=True, mu=MU, scale_search=True)
    decoded = codec.decode(codec.encode(x), x.shape).view(-1, block)
    y = x.clamp(-1.0, 1.0).view(-1, block)
    y = y.sign() * torch.log1p(MU * y.abs()) * (1.0 / math.log1p(MU))
    expected, chosen = [], []
    for row, target in zip(y, x.view(-1, block)):
        candidates = []
        for r in ratios:
            step = (r * row.abs().amax() / 7).clamp(min=1e-8)
            z = torch.round(row / step).clamp(-7, 7) * step.to(torch.float16).float()
            value = z.sign() * torch.expm1(z.abs() * math.log1p(MU)) * (1.0 / MU)
            candidates.append((((value - target) ** 2).sum().item(), value))
        best = min(range(len(ratios)), key=lambda i: (candidates[i][0], i))
        expected.append(candidates[best][1])
        chosen.append(ratios[best])
    assert torch.equal(decoded, torch.stack(expected))
    assert len(set(chosen)) > 1  # blocks with spikes clip them, the others keep the absmax
    plain = make_codec(4, "linear", "block", block_size=block, compand=True, mu=MU)
    assert plain.nbytes(x.shape) == codec.nbytes(x.shape)


@pytest.mark.parametrize("gran", ["block", "row"])
def test_scale_search_in_slices_gives_the_whole_tensors_codes(monkeypatch, gran):
    """The CPU search goes through slices of CHUNK elements made of whole groups: with slices of
    four groups (and a ragged last block, and a last slice of fewer groups) the codes and scales
    are those of the tensor searched at once."""
    import muonq.optim.codecs.quant as quant

    x = spiked((50, 64), seed=10)
    for compand, value_map in ((True, "linear"), (False, "mulaw-after-scale")):
        codec = make_codec(4, value_map, gran, block_size=60, mu=MU if compand else 3.0, compand=compand,
                           scale_search=True)
        whole = codec.encode(x)
        monkeypatch.setattr(quant, "CHUNK", 4 * (60 if gran == "block" else 64))
        sliced = codec.encode(x)
        monkeypatch.setattr(quant, "CHUNK", 1 << 17)
        assert whole.keys() == sliced.keys() and all(torch.equal(whole[k], sliced[k]) for k in whole), (gran, value_map)


@pytest.mark.parametrize("value_map, compand, gran", [("linear", True, "tensor"), ("mulaw-after-scale", False, "block"),
                                                      ("linear", False, "column")])
def test_scale_search_never_loses_to_the_absmax_scale_and_decodes_as_usual(value_map, compand, gran):
    """Per group the searched encoding is at most the absmax encoding's squared error (ratio 1 is a
    candidate) and lower overall with outliers, and the ordinary decoder reads it; a ragged last
    block and NaN (stored as zero) included."""
    x = spiked((37, 50), seed=9)
    x[3, 4] = float("nan")
    kwargs = dict(block_size=128, mu=15.0 if value_map != "linear" else MU, compand=compand)
    searched = make_codec(4, value_map, gran, scale_search=True, **kwargs)
    plain = make_codec(4, value_map, gran, **kwargs)
    target = torch.nan_to_num(x, nan=0.0)
    errors = [(c.decode(c.encode(x), x.shape) - target) ** 2 for c in (searched, plain)]
    per_group = {"tensor": lambda e: e.sum().view(1), "column": lambda e: e.sum(0),
                 "block": lambda e: torch.nn.functional.pad(e.reshape(-1), (0, -e.numel() % 128)).view(-1, 128).sum(1)}[gran]
    mine, theirs = per_group(errors[0]), per_group(errors[1])
    assert torch.all(mine <= theirs) and mine.sum() < 0.95 * theirs.sum()


def test_scale_search_refuses_grid_scales_and_stochastic_rounding():
    with pytest.raises(ValueError, match="scale search"):
        make_codec(4, "linear", "grid", scale_search=True)
    with pytest.raises(ValueError, match="scale search"):
        make_codec(4, "linear", "block", stochastic=True, scale_search=True)


@pytest.mark.parametrize("gran", ["tensor", "block", "column", "grid"])
def test_compander_error_is_half_a_step_in_the_companded_domain(gran):
    x = heavy_tailed((64, 128))
    x = x / x.norm()  # momentum scale: the companding acts on raw values
    codec = make_codec(4, "linear", gran, block_size=128, tile_size=32, compand=True, mu=MU)
    encoded = codec.encode(x)
    x_hat = codec.decode(encoded, x.shape)
    plain = QuantCodec(codec.value_map, gran, block_size=128, tile_size=32, scale_dtype=codec.scale_dtype)
    step = elementwise_scale(plain, encoded, x.shape)  # the stored step of each element
    compand = codec.compander.compand
    gap = (compand(x) - compand(x_hat)).abs()
    # codes round y / (fp32 step); decoding multiplies by the fp16 step: up to 7 x 2**-11 steps more
    assert torch.all(gap <= step * (0.5 + 4e-3) + 1e-7)
    # finer levels near zero than linear codes with the same scales
    linear = make_codec(4, "linear", gran, block_size=128, tile_size=32)
    small = x.abs() < 0.1 * x.abs().max()
    err_compand = (x_hat - x)[small].abs().mean()
    err_linear = (linear.decode(linear.encode(x), x.shape) - x)[small].abs().mean()
    assert err_compand < 0.7 * err_linear


def test_compander_needs_linear_codes_and_a_positive_mu():
    from muonq.optim.codecs import MuLawCompander

    with pytest.raises(ValueError, match="linear codes"):
        make_codec(8, "dynamic", compand=True)
    with pytest.raises(ValueError, match="mu"):
        MuLawCompander(mu=0.0)
