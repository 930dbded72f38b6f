"""The fp32 Muon engine: parity with torch.optim.Muon, NS really runs, MuonEq transform, factory."""

from __future__ import annotations

import pytest
import torch

from muonq.optim.equilibrate import Equilibrate
from muonq.optim.muon import Muon, update_scale
from muonq.optim.newton_schulz import zeropower_via_newtonschulz


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("scale_mode", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", [(64, 96), (96, 64)])
def test_matches_torch_muon(nesterov: bool, scale_mode: str, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen)
    ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = Muon([ours], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, momentum_form="ema",
               scale_mode=scale_mode, matmul_dtype="bfloat16")  # torch.optim.Muon always runs NS in bf16
    ref_opt = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, adjust_lr_fn=scale_mode)
    for _ in range(6):
        g = torch.randn(*shape, generator=gen)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_newton_schulz_output_is_near_orthogonal() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 384, generator=gen) @ torch.diag(torch.logspace(-2, 0, 384))
    sv = torch.linalg.svdvals(zeropower_via_newtonschulz(x, 5).float())
    assert sv.min() > 0.5 and sv.max() < 1.25  # quintic band, not the input's 100x spread
    batched = zeropower_via_newtonschulz(torch.stack([x, x.flip(0)]), 5)
    torch.testing.assert_close(batched[0], zeropower_via_newtonschulz(x, 5))


def test_update_is_orthogonal_like_and_decay_is_decoupled() -> None:
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(96, 256, generator=gen))
    before = p.detach().clone()
    lr, wd = 0.01, 0.1
    opt = Muon([p], lr=lr, weight_decay=wd, momentum=0.9)
    p.grad = torch.randn(96, 256, generator=gen) * torch.logspace(-3, 0, 256)
    opt.step()
    delta = (before * (1 - lr * wd) - p.detach()) / (lr * update_scale(p.shape, "match_rms_adamw"))
    sv = torch.linalg.svdvals(delta)
    assert 0.5 < sv.min() and sv.max() < 1.3


def test_rejects_non_matrices_and_bad_values() -> None:
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="lr"):
        Muon([torch.nn.Parameter(torch.zeros(3, 3))], lr=0)
    with pytest.raises(ValueError, match="scale_mode"):
        Muon([torch.nn.Parameter(torch.zeros(3, 3))], scale_mode="rms")


def test_zero_gradient_gives_no_nan() -> None:
    p = torch.nn.Parameter(torch.ones(32, 32))
    opt = Muon([p], lr=0.1, normalize=True)
    p.grad = torch.zeros(32, 32)
    opt.step()
    assert torch.isfinite(p).all()


def test_equilibrate_row_gives_unit_rows_and_rowcol_uses_one_input() -> None:
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(16, 24, generator=gen) * torch.logspace(-2, 2, 16)[:, None]
    row = Equilibrate(mode="row", eps=0.0)(u, 0)
    torch.testing.assert_close(row.norm(dim=1), torch.ones(16))
    rowcol = Equilibrate(mode="rowcol", eps=0.0)(u, 0)
    r = u.square().sum(1, keepdim=True).rsqrt()
    c = u.square().sum(0, keepdim=True).rsqrt()
    torch.testing.assert_close(rowcol, u * r * c)  # both scales from the same U, not sequential
    phased = Equilibrate(mode="rowcol", phase=5)
    assert phased.mode_at(4) == "rowcol" and phased.mode_at(5) == "row"
    clipped = Equilibrate(mode="row", clip=2.0)(u, 0)
    scales = clipped.norm(dim=1) / u.norm(dim=1)
    assert scales.min() >= 0.5 - 1e-6 and scales.max() <= 2.0 + 1e-6


def _steps(opt: Muon, params: list[torch.nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("variant", ["muon", "muonq", "muon8bit"])
def test_batched_newton_schulz_groups_same_shapes_and_changes_nothing(monkeypatch, variant: str) -> None:
    """ns_batch_size stacks same-shape matrices (in chunks) into one NS call; the updates equal the
    per-matrix ones (fp32 on the CPU: the batched matmul computes each slice like the single one)."""
    from muonq.optim import muon as muon_module
    from muonq.config import preset
    from muonq.optim.selection import store_selector

    shapes = [(32, 48), (48, 32), (32, 48), (32, 48), (16, 16), (48, 32), (32, 48)]
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    calls: list[tuple[int, ...]] = []
    real = muon_module.zeropower_via_newtonschulz
    monkeypatch.setattr(muon_module, "zeropower_via_newtonschulz", lambda u, *a, **k: calls.append(tuple(u.shape)) or real(u, *a, **k))
    args = preset(variant, min_quant_numel=0).muon
    finals = {}
    for batch in (1, 3):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = Muon(params, lr=0.02, weight_decay=0.1, nesterov=True, normalize=args.normalize, ns_batch_size=batch,
                   store=store_selector(args.store, kernels="reference"), matmul_dtype="float32")
        calls.clear()
        _steps(opt, params, grads)
        finals[batch] = [p.detach().clone() for p in params]
        per_step = calls[: len(calls) // 3]
        if batch == 1:
            assert per_step == [s for s in shapes]
        else:  # four 32 x 48 -> a batch of 3 and a single; two 48 x 32 -> one batch of 2
            assert sorted(per_step) == sorted([(3, 32, 48), (32, 48), (2, 48, 32), (16, 16)])
    for got, ref in zip(finals[3], finals[1]):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["muon", "muonq", "muon8bit", "muoneq", "grasp"])
def test_a_fused_qkv_weight_steps_as_its_three_matrices(variant: str) -> None:
    """row_blocks=3 (split_qkv): a 192 x 64 weight's update, state and bytes are exactly those of
    three 64 x 64 matrices stepped side by side (momentum, normalisation, rank, MuonEq, NS, scale)."""
    from muonq.config import preset
    from muonq.optim.build import build_muon
    from muonq.optim.state_bytes import state_bytes

    spec = preset(variant, matmul_dtype="float32", ns_batch_size=3).muon
    gen = torch.Generator().manual_seed(4)
    start = torch.randn(192, 64, generator=gen)
    grads = [[torch.randn(192, 64, generator=gen)] for _ in range(4)]
    fused = torch.nn.Parameter(start.clone())
    opt = build_muon(spec, [fused], kernels="reference", qkv_blocks={fused: 3})
    _steps(opt, [fused], grads)
    parts = [torch.nn.Parameter(w.clone()) for w in start.chunk(3)]
    ref = build_muon(spec, parts, kernels="reference")  # NS of the three in one batch, as the split does
    _steps(ref, parts, [list(g[0].chunk(3)) for g in grads])
    assert torch.equal(fused.detach(), torch.cat([p.detach() for p in parts]))
    blocks = opt.block_states(fused)
    assert len(blocks) == 3 and all(blocks[i].keys() == ref.state[q].keys() - {"step"} for i, q in enumerate(parts))
    assert all(torch.equal(blocks[i][k], ref.state[q][k]) for i, q in enumerate(parts) for k in blocks[i])
    assert state_bytes(opt)["total"] == state_bytes(ref)["total"]
    unsplit = build_muon(preset(variant, matmul_dtype="float32", split_qkv=False).muon, [fused], qkv_blocks={fused: 3})
    assert unsplit.row_blocks(fused) == 1


def test_split_weights_batch_with_their_like_and_a_bad_split_is_refused(monkeypatch) -> None:
    """ns_batch_size stacks split weights' blocks into one NS call of 2 x 3 matrices; the result is
    the per-weight one (fp32 here, to 1e-6)."""
    from muonq.config import preset
    from muonq.optim import muon as muon_module
    from muonq.optim.build import build_muon

    calls: list[tuple[int, ...]] = []
    real = muon_module.zeropower_via_newtonschulz
    monkeypatch.setattr(muon_module, "zeropower_via_newtonschulz", lambda u, *a, **k: calls.append(tuple(u.shape)) or real(u, *a, **k))

    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(96, 32, generator=gen) for _ in range(2)]
    grads = [[torch.randn(96, 32, generator=gen) for _ in range(2)] for _ in range(3)]
    finals = []
    for batch in (1, 2):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = build_muon(preset("muonq", matmul_dtype="float32", ns_batch_size=batch, min_quant_numel=0).muon, params,
                         qkv_blocks={p: 3 for p in params})
        calls.clear()
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        finals.append(torch.cat([p.detach() for p in params]))
        assert calls == ([(3, 32, 32)] * 2 if batch == 1 else [(6, 32, 32)]) * 3
    torch.testing.assert_close(finals[1], finals[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="3 row blocks"):
        p = torch.nn.Parameter(torch.zeros(10, 4))
        Muon([p], row_blocks={p: 3})


@pytest.mark.parametrize("saved,loaded,differs", [
    ({"split": False}, {"split": True}, "block0"),  # a fused checkpoint into a split run
    ({"rank": 8}, {"rank": 4}, "P.codes"),
])
def test_saved_state_of_another_configuration_is_refused_at_load(saved, loaded, differs) -> None:
    from muonq.config import preset
    from muonq.optim.build import build_muon

    def build(split: bool = True, rank: int = 8) -> tuple[Muon, torch.nn.Parameter]:
        p = torch.nn.Parameter(torch.ones(192, 64))
        return build_muon(preset("muonq", rank=rank, split_qkv=split).muon, [p], qkv_blocks={p: 3}), p

    opt, p = build(**saved)
    p.grad = torch.randn(192, 64)
    opt.step()
    other, _ = build(**loaded)
    with pytest.raises(ValueError, match=rf"other optimizer_params.args .*split_qkv") as err:
        other.load_state_dict(opt.state_dict())
    assert differs in str(err.value)


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_store_ns_input_is_the_momentum_or_its_nesterov_form_in_the_ns_dtype(ema: bool, nesterov: bool) -> None:
    from muonq.optim.momentum import FullPrecisionStore

    gen = torch.Generator().manual_seed(4)
    store, state, param = FullPrecisionStore(), {}, torch.empty(8, 12)
    store.init(state, param)
    momentum = torch.zeros(8, 12)
    for _ in range(3):
        g = torch.randn(8, 12, generator=gen)
        u = store.ns_input(state, g, beta=0.9, ema=ema, renormalize=False, nesterov=nesterov, dtype=torch.bfloat16)
        momentum = momentum.lerp(g, 0.1) if ema else momentum * 0.9 + g
        want = (g.lerp(momentum, 0.9) if ema else g + 0.9 * momentum) if nesterov else momentum
        assert u.dtype == torch.bfloat16
        torch.testing.assert_close(u, want.to(torch.bfloat16), rtol=0, atol=0)
        torch.testing.assert_close(state["momentum_buffer"], momentum, rtol=1e-6, atol=1e-6)
