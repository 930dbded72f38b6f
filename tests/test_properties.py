"""Property tests (hypothesis) for what optimizer state and data reading must never do.

* Codecs: any shape, any mix of zeros, subnormals, ordinary and huge values (incl. inf/NaN)
  decodes to finite values; zeros stay exact zeros; signs never flip; wherever the stored scale
  covers an element, the error is at most one gap of the code map times that scale (companded
  codecs: at most one stored step in the companded domain, of the value clamped to [-1, 1]).
* Shard reading: tests/test_data_shards.py already fuzzes ``parse_header`` field by field and
  truncations of real shards; here, whole files of arbitrary bytes, and random damage to a
  complete dataset folder (any shard or meta.json byte, truncation, extension), must end in a
  ``UserError`` (a ``ValueError``; ``MissingInputError`` for a missing file) naming the problem or
  in a consistent read, never in another exception (which the entry points would report as a
  bug) or a silently wrong token count.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from muonq.data.loader import check_dataset
from muonq.data.shards import HEADER_BYTES, MAGIC, list_shards, open_tokens, read_header, write_shard
from muonq.errors import UserError
from muonq.optim.codecs import QuantCodec, make_codec

# -- codecs ------------------------------------------------------------------------------------

F32_MAX = torch.finfo(torch.float32).max
MAGNITUDES = {  # (low, high) of |x| for each kind of value
    "zero": (0.0, 0.0),
    "subnormal": (1e-45, 1e-38),
    "tiny": (1e-30, 1e-8),
    "normal": (1e-3, 1e3),
    "large": (6e4, 1e8),  # around and above fp16's max (4-bit codecs keep fp16 scales)
    "huge": (1e30, F32_MAX),
}


@st.composite
def codec_cases(draw):
    bits = draw(st.sampled_from([4, 8]))
    value_map = draw(st.sampled_from(["linear", "mulaw-after-scale"] + (["dynamic"] if bits == 8 else [])))
    gran = draw(st.sampled_from(["tensor", "block", "row", "column", "grid"]))
    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    codec = make_codec(bits, value_map, gran, block_size=draw(st.sampled_from([1, 3, 16, 64])),
                       tile_size=draw(st.sampled_from([1, 4, 16])), stochastic=draw(st.booleans()),
                       compand=value_map == "linear" and draw(st.booleans()))
    kinds = draw(st.lists(st.sampled_from(sorted(MAGNITUDES)), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(rows * cols)
    which = torch.randint(len(kinds), (rows * cols,), generator=gen)
    for k, kind in enumerate(kinds):
        low, high = MAGNITUDES[kind]
        mask = which == k
        if high > 0:  # log-uniform magnitudes, random signs
            u = torch.rand(int(mask.sum()), generator=gen, dtype=torch.float64)
            mag = torch.exp(math.log(low) + u * (math.log(high) - math.log(low))).clamp(max=F32_MAX)
            sign = torch.where(torch.rand(int(mask.sum()), generator=gen) < 0.5, -1.0, 1.0)
            x[mask] = (mag * sign).float()
    if draw(st.booleans()):  # whole rows of zeros: all-zero groups must not divide 0 by 0
        x.view(rows, cols)[:: draw(st.integers(1, 3))] = 0.0
    return codec, x.view(rows, cols), seed


def max_level_gap(codec) -> float:
    """The widest gap between neighbouring values the map can decode to (in [-1, 1] units)."""
    codes = codec.value_map.encode(torch.linspace(-1, 1, 20001))
    levels = torch.unique(codec.value_map.decode(codes)).sort().values
    return float(levels.diff().max())


def elementwise_scale(codec, encoded, shape) -> torch.Tensor:
    """Each element's stored scale: decode with every code set to the code of +1."""
    from muonq.optim.codecs import pack

    top = codec.value_map.encode(torch.ones(math.prod(shape)))
    unit = float(codec.value_map.decode(top[:1]))
    return codec.decode({**encoded, "codes": pack(top, codec.bits)}, shape) / unit


@settings(max_examples=300, deadline=None)
@given(case=codec_cases())
def test_codec_round_trip_is_finite_exact_at_zero_and_bounded(case) -> None:
    codec, x, seed = case
    encoded = codec.encode(x, generator=torch.Generator().manual_seed(seed))
    assert sum(t.nbytes for t in encoded.values()) == codec.nbytes(x.shape)
    x_hat = codec.decode(encoded, x.shape)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    assert torch.isfinite(x_hat).all()
    assert torch.all(x_hat[x == 0] == 0)
    assert torch.all(torch.sign(x_hat) * torch.sign(x) >= 0), "a sign flipped"
    if codec.compander is not None:
        check_companded(codec, encoded, x, x_hat)
        return
    scale = elementwise_scale(codec, encoded, x.shape)
    assert torch.isfinite(scale).all() and (scale >= 0).all()
    covered = scale >= x.abs()  # false only where an fp16 scale saturated at 65504
    err = (x.double() - x_hat.double()).abs()
    bound = scale.double() * max_level_gap(codec) * (1 + 1e-5) + 1e-30
    assert torch.all(err[covered] <= bound[covered]), float((err - bound)[covered].max())
    # requantizing what was decoded changes nothing (symmetric maps; the dynamic map's most
    # negative level is -0.993, so a group whose absmax is negative shrinks by 0.7% per pass)
    again = codec.decode(codec.encode(x_hat), x.shape)
    if not codec.stochastic and codec.value_map.__class__.__name__ != "DynamicMap":
        assert torch.all((again - x_hat).abs() <= scale * max_level_gap(codec) * 1e-3 + 1e-30)


def check_companded(codec, encoded, x, x_hat) -> None:
    """Companded codecs: in the companded domain, the error is at most half a stored step (one step
    with stochastic rounding) of the value clamped to [-1, 1], and requantizing changes nothing
    (beyond the fp16 rounding of the step)."""
    plain = QuantCodec(codec.value_map, codec.granularity, block_size=codec.block_size, tile_size=codec.tile_size,
                       scale_dtype=codec.scale_dtype)
    step = elementwise_scale(plain, encoded, x.shape)  # the stored step of each element
    assert torch.isfinite(step).all() and (step >= 0).all()
    compand = codec.compander.compand
    target = compand(torch.nan_to_num(x, nan=0.0).clamp(-1.0, 1.0))
    gap = (target - compand(x_hat)).abs()
    rounding = 1.0 if codec.stochastic else 0.5
    # codes round y / (fp32 step); decoding multiplies by the stored step, 2**-11 away in fp16
    assert torch.all(gap <= step * (rounding + 4e-3) + 1e-6), float((gap - step * rounding).max())
    if not codec.stochastic:
        again = codec.decode(codec.encode(x_hat), x.shape)
        assert torch.all((compand(again) - compand(x_hat)).abs() <= step * 1e-3 + 1e-6)


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 64), cols=st.integers(1, 64), bits=st.sampled_from([4, 8]),
       gran=st.sampled_from(["tensor", "block", "row", "column", "grid"]), compand=st.booleans())
def test_all_zero_state_encodes_to_the_zero_encoding(rows: int, cols: int, bits: int, gran: str, compand: bool) -> None:
    codec = make_codec(bits, "linear", gran, block_size=32, tile_size=8, compand=compand)
    encoded = codec.encode(torch.zeros(rows, cols))
    zero = codec.zeros((rows, cols))
    assert encoded.keys() == zero.keys() and all(torch.equal(encoded[k], zero[k]) for k in zero)
    assert torch.equal(codec.decode(encoded, (rows, cols)), torch.zeros(rows, cols))


# -- shard reading -----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=HEADER_BYTES + 64), magic=st.sampled_from([None, MAGIC, 20240520, 20240801, 20250401]))
def test_arbitrary_bytes_are_rejected_or_read_consistently(tmp_path: pathlib.Path, data: bytes, magic) -> None:
    raw = bytearray(data)
    if magic is not None and len(raw) >= 4:  # a plausible start, so the fuzzing gets past the magic
        raw[:4] = np.int32(magic).tobytes()
    path = tmp_path / "train_000001.bin"
    path.write_bytes(bytes(raw))
    try:
        header = read_header(path)
    except UserError as err:
        assert str(path) in str(err)
        return
    assert path.stat().st_size == HEADER_BYTES + header.num_tokens * header.dtype.itemsize
    assert len(open_tokens(header)) == header.num_tokens


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> pathlib.Path:
    """A complete MuonQ dataset folder, as prepare() writes it, with 2 train shards and 1 val."""
    folder = tmp_path_factory.mktemp("ds") / "tiny-bpe-300"
    folder.mkdir()
    rng = np.random.default_rng(0)
    shards = {"val": ["val_000000.bin"], "train": ["train_000001.bin", "train_000002.bin"]}
    counts = {}
    for split, names in shards.items():
        counts[split] = 0
        for name in names:
            tokens = rng.integers(0, 300, size=int(rng.integers(200, 400)))
            write_shard(folder / name, tokens, vocab_size=300, eos_id=0)
            counts[split] += len(tokens)
    meta = {"format_version": 1, "vocab_size": 300, "eos_id": 0, "tokenizer": "bpe-300",
            "splits": {s: {"tokens": counts[s], "shards": shards[s]} for s in shards}}
    (folder / "meta.json").write_text(json.dumps(meta))
    check_dataset(folder, seq_len=16, model_vocab_size=300)
    return folder


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["tokens", "shards", "train", "val"]), inner, max_size=3),
    max_leaves=6,
)
META_FIELDS = [("format_version",), ("vocab_size",), ("eos_id",), ("tokenizer",), ("splits",), ("splits", "train"),
               ("splits", "val", "tokens"), ("splits", "train", "shards")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          report_multiple_bugs=False)
@given(field=st.sampled_from(META_FIELDS), value=JSON_VALUES)
def test_malformed_meta_json_is_rejected_cleanly(tmp_path: pathlib.Path, small_dataset: pathlib.Path, field, value) -> None:
    folder = tmp_path / small_dataset.name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(small_dataset, folder)
    meta = json.loads((folder / "meta.json").read_text())
    node = meta
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = value
    (folder / "meta.json").write_text(json.dumps(meta))
    try:
        got = check_dataset(folder, seq_len=16, model_vocab_size=300)
    except UserError:
        return
    assert got.vocab_size <= 300 and got.train_tokens == sum(read_header(p).num_tokens for p in list_shards(folder, "train"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(["meta.json", "val_000000.bin", "train_000001.bin", "train_000002.bin"]),
       how=st.sampled_from(["flip", "truncate", "extend", "replace"]), where=st.floats(0, 1),
       value=st.integers(0, 255), junk=st.binary(min_size=1, max_size=40))
def test_damaged_dataset_is_rejected_or_read_consistently(
    tmp_path: pathlib.Path, small_dataset: pathlib.Path, target: str, how: str, where: float, value: int, junk: bytes
) -> None:
    folder = tmp_path / small_dataset.name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(small_dataset, folder)
    path = folder / target
    data = bytearray(path.read_bytes())
    at = min(int(where * len(data)), len(data) - 1)
    if target.endswith(".bin") and how == "flip":
        at = min(at, HEADER_BYTES - 1)  # token bytes carry no redundancy; damage the header
    if how == "flip":
        assume(data[at] != value)
        data[at] = value
    elif how == "truncate":
        data = data[:at]
    elif how == "extend":
        data += junk
    else:
        data = bytearray(junk)
    path.write_bytes(bytes(data))
    try:
        meta = check_dataset(folder, seq_len=16, model_vocab_size=300)
    except UserError:
        return
    # accepted: then what is read must agree with the files
    for split in ("train", "val"):
        headers = [read_header(p) for p in list_shards(folder, split)]
        assert sum(h.num_tokens for h in headers) == (meta.train_tokens if split == "train" else meta.val_tokens)
        for h in headers:
            tokens = open_tokens(h)
            assert len(tokens) == h.num_tokens
    assert meta.vocab_size <= 300
