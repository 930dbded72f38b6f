"""The optimizer's matmul dtype: read from the CPU's flags, cached, overridden by the config key, and
handed by Muon to Newton–Schulz and to the stores' power iteration."""

from __future__ import annotations

import pytest
import torch

from muonq.config import ConfigError, compose_config, optimizer_spec, preset
from muonq.optim import precision
from muonq.optim.build import build_optimizer
from muonq.optim.precision import (
    cpu_bf16, describe_matmul_dtype, detect_cpu_bf16, fast_matmul_dtype, resolve_matmul_dtype,
)  # fmt: skip

CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: fpu sse sse2 avx avx2 fma avx512f {flags}

processor\t: 1
model name\t: {model}
flags\t\t: fpu sse sse2 avx avx2 fma avx512f {flags}
"""


def _cpuinfo(tmp_path, model: str, flags: str, vendor: str = "GenuineIntel"):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(model=model, flags=flags, vendor=vendor))
    return str(path)


@pytest.mark.parametrize("flags,native", [
    ("avx512_bf16 avx512_vnni", True),  # Zen 4/5, Cooper Lake
    ("amx_bf16 amx_tile amx_int8 avx512_bf16", True),  # Sapphire Rapids and later
    ("avx512bw avx512_vnni", False),  # Skylake/Ice Lake: bf16 emulated
    ("", False),
])
def test_the_cpu_flags_decide(tmp_path, flags, native):
    got = detect_cpu_bf16(_cpuinfo(tmp_path, "Some CPU", flags), machine="x86_64")
    assert got.native is native and got.model == "Some CPU"
    assert ("amx_bf16" if "amx_bf16" in flags else "avx512_bf16") in got.reason if native else "emulated" in got.reason


def test_without_cpuinfo_torch_is_asked_and_off_x86_a_timing_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "_torch_flags", lambda: {"avx512_bf16"})
    assert detect_cpu_bf16(str(tmp_path / "missing"), machine="x86_64").native
    monkeypatch.setattr(precision, "_torch_flags", lambda: set())
    assert not detect_cpu_bf16(str(tmp_path / "missing"), machine="x86_64").native
    timed = []
    monkeypatch.setattr(precision, "_timed", lambda: timed.append(1) or precision.CpuBf16(True, "timed: ...", ""))
    assert detect_cpu_bf16(str(tmp_path / "missing"), machine="aarch64").native and timed == [1]
    monkeypatch.setattr(precision, "_torch_flags", lambda: None)  # torch without the queries
    assert detect_cpu_bf16(str(tmp_path / "missing"), machine="x86_64").native and timed == [1, 1]


def test_a_timing_picks_the_faster_dtype():
    result = precision._timed(size=64, repeats=1)
    assert result.reason.startswith("timed: bf16") and isinstance(result.native, bool)


def test_without_onednn_bf16_counts_as_emulated(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    got = detect_cpu_bf16(_cpuinfo(tmp_path, "X", "avx512_bf16"), machine="x86_64")
    assert not got.native and "oneDNN" in got.reason


def test_the_answer_is_cached_and_auto_follows_it(monkeypatch):
    assert cpu_bf16() is cpu_bf16()
    assert fast_matmul_dtype("cuda") == torch.bfloat16
    assert fast_matmul_dtype("meta") == torch.float32
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "cpu_bf16", lambda native=native: precision.CpuBf16(native, "test", "X"))
        assert fast_matmul_dtype("cpu") == resolve_matmul_dtype("auto", "cpu") == resolve_matmul_dtype(None, "cpu") == dtype
        assert resolve_matmul_dtype("float32", "cpu") == torch.float32
        assert resolve_matmul_dtype("bfloat16", "cpu") == torch.bfloat16
        assert f"in {str(dtype)[6:]} (auto: X, bf16 {'native' if native else 'emulated'}" in describe_matmul_dtype("auto", "cpu")
    assert "set by optimizer_params.args.matmul_dtype" in describe_matmul_dtype("float32", "cpu")


def test_the_config_key_is_checked_and_reaches_the_spec():
    assert preset("muonq").muon.matmul_dtype == "auto"
    assert preset("muonq", matmul_dtype="float32").muon.matmul_dtype == "float32"
    with pytest.raises(ConfigError, match=r"optimizer_params\.args\.matmul_dtype"):
        preset("muon", matmul_dtype="fp16")
    with pytest.raises(ConfigError, match=r"optimizer_params\.args\.matmul_dtype"):  # Muon family only
        optimizer_spec(compose_config(["optimizer_params=adamw", "optimizer_params.args.matmul_dtype=float32"]).optimizer_params)


@pytest.mark.parametrize("setting,dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_muon_hands_the_dtype_to_newton_schulz_and_the_power_iteration(monkeypatch, setting, dtype):
    from muonq.optim import muon as muon_module
    from muonq.optim import stores as stores_module

    seen: dict[str, list] = {"ns": [], "ns_input": [], "power": []}
    ns, power = muon_module.zeropower_via_newtonschulz, stores_module.power_iteration_step
    monkeypatch.setattr(muon_module, "zeropower_via_newtonschulz",
                        lambda u, *a, **k: seen["ns"].append(k["dtype"]) or seen["ns_input"].append(u.dtype) or ns(u, *a, **k))
    monkeypatch.setattr(stores_module, "power_iteration_step",
                        lambda m, b, **k: seen["power"].append(k["matmul_dtype"]) or power(m, b, **k))
    param = torch.nn.Parameter(torch.zeros(128, 256))
    opt = build_optimizer(preset("muonq", matmul_dtype=setting), hidden=[param], others=[]).optimizers["muon"]
    param.grad = torch.randn(128, 256)
    opt.step()
    assert seen == {"ns": [dtype], "ns_input": [dtype], "power": [dtype]}
