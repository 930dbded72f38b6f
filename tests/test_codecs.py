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
def test_mulaw_error_is_half_a_step_in_the_companded_domain(gran):
    x = heavy_tailed((64, 128))
    codec = make_codec(4, "mulaw", gran, block_size=128, mu=MU)
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
        (4, "mulaw", "column", (512, 32), 8192 + 64),
        (4, "mulaw", "tensor", (513, 7), 1796 + 2),  # odd element count: one nibble of padding
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
    ("mulaw-4-tensor", lambda: make_codec(4, "mulaw", "tensor")),
    ("mulaw-4-column", lambda: make_codec(4, "mulaw", "column")),
    ("mulaw-4-row", lambda: make_codec(4, "mulaw", "row")),
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
    """Decoding spelled out: the value map's decode of the unpacked codes, times the scales."""
    from muonq.optim.codecs.grid import grid_scale

    numel = math.prod(shape)
    values = codec.value_map.decode(unpack(encoded["codes"], codec.bits, numel))
    if codec.granularity == "grid":
        return values.view(shape) * grid_scale(encoded["row_scale"], encoded["col_scale"], codec.tile_size)
    groups, dim = codec._groups(values.view(shape))
    view = [1, 1]
    view[1 - dim] = groups.shape[1 - dim]
    return (groups * encoded["scale"].float().view(view)).reshape(-1)[:numel].view(shape)


CPU_PATH_CASES = [
    (bits, value_map, gran)
    for bits in (8, 4)
    for value_map in ("linear", "mulaw", "dynamic")
    for gran in ("tensor", "block", "row", "column", "grid")
    if not (value_map == "dynamic" and bits == 4)
]


@pytest.mark.parametrize("bits,value_map,gran", CPU_PATH_CASES)
def test_cpu_encoding_and_decoding_paths_give_the_reference_bytes_and_values(bits, value_map, gran):
    g = torch.Generator().manual_seed(bits)
    # large enough to be encoded in slices; ragged blocks, tiles and an odd count of 4-bit codes
    for shape, block, tile in (((700, 300), 256, 128), ((257, 263), 100, 33), ((300, 700), 7, 5)):
        codec = make_codec(bits, value_map, gran, block_size=block, tile_size=tile)
        for kind in range(4):
            x = torch.randn(shape, generator=g) * 1e-3
            if kind == 1:
                x = x**3  # heavy tails, tiny values
            if kind == 2:
                x.view(-1)[::7], x.view(-1)[1::11] = 0.0, -0.0
            if kind == 3:
                x.view(-1)[3], x.view(-1)[4] = 1e38, -1e38  # saturated fp16 scales: values clip
            encoded = codec.encode(x.T.contiguous().T if kind == 1 else x)  # and a non-contiguous input
            whole = codec._encode_whole(torch.nan_to_num(x, nan=0.0), shape, None)
            assert encoded.keys() == whole.keys()
            for key in encoded:
                assert encoded[key].dtype == whole[key].dtype and torch.equal(encoded[key], whole[key]), key
            want = _reference_decode(codec, encoded, shape)
            out = torch.empty(shape)
            for got in (codec.decode(encoded, shape), codec.decode(encoded, shape, out=out)):
                assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bitwise, -0.0 included
            assert codec.decode(encoded, shape, out=out).data_ptr() == out.data_ptr()
    nan = torch.randn(600, 200, generator=g)
    nan[0, 0], nan[1, 1] = float("nan"), float("inf")  # non-finite input: the whole path sanitises
    assert torch.equal(codec.encode(nan)["codes"], codec._encode_whole(torch.nan_to_num(nan, nan=0.0), nan.shape, None)["codes"])
