"""Every recipe x optimizer composes and validates; bad input fails naming the key."""

from __future__ import annotations

import re

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

from muonq.config import OPTIMIZERS, ConfigError, optimizer_spec, preset, register_configs, validate
from muonq.optim.spec import DecomposedMomentum, FullPrecisionMomentum, QuantizedMomentum

from .conftest import REPO

RECIPES = sorted(p.stem for p in (REPO / "hydra_conf" / "recipe").glob("*.yaml"))


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "hydra_conf")):
        return compose("test_hydra", overrides=list(overrides))


def test_recipe_and_optimizer_lists_are_complete() -> None:
    expected = {"llama-tiny", "gpt-tiny", "llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-1.1B",
                "gpt-small", "gpt-medium", "gpt-large"}
    assert expected <= set(RECIPES)
    yamls = {p.stem for p in (REPO / "hydra_conf" / "optimizer_params").glob("*.yaml")}
    assert set(OPTIMIZERS) == yamls
    assert {"adamw", "adamw8bit", "muon", "muon8bit", "muon8", "muon4", "muonq", "grasp", "muoneq"} <= yamls


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_with_every_optimizer_composes(recipe: str) -> None:
    for opt in OPTIMIZERS:
        cfg = _compose(f"recipe={recipe}", f"optimizer_params={opt}", "+logging_params.wandb.project=MuonQ",
                       "+logging_params.wandb.name=x")
        validate(cfg)
        assert cfg.optimizer_params.name == opt
        assert cfg.logging_params.wandb.project == "MuonQ"


def test_recipe_numbers_match_the_design() -> None:
    cfg = _compose("recipe=llama-60m")
    tp = cfg.recipe.training_params
    assert (tp.context_length, tp.tokens_processed, tp.batch_size) == (1024, 2**19, 64)
    assert cfg.recipe.dataset.total_tokens_B == 1.1 and cfg.recipe.dataset.tokenizer == "llama2"
    one_b, alias = _compose("recipe=llama-1b"), _compose("recipe=llama-1.1B")
    assert one_b.recipe == alias.recipe
    assert one_b.recipe.training_params.tokens_processed == 2**21
    gpt_large = _compose("recipe=gpt-large").recipe
    assert gpt_large.training_params.context_length == 8192 == gpt_large.model.block_size


def test_muonq_ablation_overrides() -> None:
    cfg = _compose("optimizer_params=muonq", "optimizer_params.args.norm=false", "optimizer_params.args.rank=0",
                   "optimizer_params.args.compand=false", "optimizer_params.args.lr=2e-3")
    assert (cfg.optimizer_params.args.norm, cfg.optimizer_params.args.rank, cfg.optimizer_params.args.compand) == (False, 0, False)
    assert cfg.optimizer_params.args.lr == 2e-3


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ConfigCompositionException, match="qbits"):
        _compose("optimizer_params.args.qbits=4")
    forced = _compose("+recipe.model.n_embdd=5")  # Hydra's '+' adds keys even to structured configs
    with pytest.raises(ConfigError, match=r"recipe\.model\.n_embdd: unknown key.*n_embd"):
        validate(forced)


def test_missing_recipe_lists_the_valid_ones() -> None:
    with pytest.raises(MissingConfigException) as err:
        _compose("recipe=llama-13b")
    assert "llama-60m" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optimizer_params.args.qbit=3", "optimizer_params.args.qbit"),
        ("optimizer_params.args.rank=-1", "optimizer_params.args.rank"),
        ("optimizer_params.args.lr=0", "optimizer_params.args.lr"),
        ("optimizer_params.args.lr=1e39", "optimizer_params.args.lr: must be in (0, 10]"),  # would overflow in the step
        ("optimizer_params.args.lr=inf", "optimizer_params.args.lr"),
        ("optimizer_params.args.ns_batch_size=0", "optimizer_params.args.ns_batch_size"),
        ("optimizer_params.name=sgd", "optimizer_params.name"),
        ("recipe.training_params.tokens_processed=1000", "recipe.training_params.tokens_processed"),
        ("lr_schedule.name=linear", "lr_schedule.name"),
        ("recipe.model.n_head=5", "recipe.model.n_head"),
        ("resume=maybe", "resume"),
        ("seed=-1", "seed"),
        ("recipe.training_params.max_consecutive_skips=0", "recipe.training_params.max_consecutive_skips"),
        ("logging_params.progress_every_s=-1", "logging_params.progress_every_s"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    cfg = _compose(override)
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(cfg)


def test_mu_law_keys_say_where_the_companding_sits() -> None:
    """compand (MuonQ): mu-law of the raw values before the scale, linear codes; the value map
    mulaw-after-scale: mu-law levels of x / absmax. The old name 'mulaw' fails, pointing to both."""
    d = preset("muonq").muon.store
    assert (d.residual.value_map, d.residual.compand, d.factor.compand) == ("linear", True, True)
    after = preset("muonq", compand=False, quant="mulaw-after-scale", mu=15.0).muon.store
    assert (after.residual.value_map, after.residual.compand, after.residual.mu) == ("mulaw-after-scale", False, 15.0)
    assert preset("muon8bit", quant="mulaw-after-scale").muon.store.codec.value_map == "mulaw-after-scale"
    with pytest.raises(ConfigError, match=r"optimizer_params\.args\.quant: got 'mulaw'.*compand=true.*mulaw-after-scale"):
        preset("muonq", compand=False, quant="mulaw")
    with pytest.raises(ConfigError, match=r"optimizer_params\.args\.compand: .*linear codes.*quant=mulaw-after-scale"):
        preset("muonq", quant="mulaw-after-scale")
    with pytest.raises(ConfigError, match=r"optimizer_params\.args\.mu"):
        preset("muonq", mu=0.0)


def test_residual_scale_search_reaches_only_the_residual_and_needs_a_decomposition() -> None:
    store = preset("muonq", residual_scale_search=True).muon.store
    assert store.residual.scale_search and not store.factor.scale_search
    assert not store.narrow.codec.scale_search
    for args, needs in (({"rank": 0}, "rank > 0"), ({"grid": True}, "grid=false"), ({"stochastic": True}, "stochastic=false")):
        with pytest.raises(ConfigError, match=r"optimizer_params\.args\.residual_scale_search: .*" + re.escape(needs)):
            preset("muonq", residual_scale_search=True, **args)
    with pytest.raises(ConfigError, match=r"optimizer_params\.args\.residual_scale_search"):
        preset("muon", residual_scale_search=True)


def test_factor_error_share_reaches_the_decomposed_store_and_needs_one() -> None:
    assert preset("muonq").muon.store.factor_error_share == 0.0
    assert preset("muonq", factor_error_share=0.25).muon.store.factor_error_share == 0.25
    for value in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"^optimizer_params\.args\.factor_error_share: must be in \[0, 1\]"):
            preset("muonq", factor_error_share=value)
    with pytest.raises(ConfigError, match=r"optimizer_params\.args\.factor_error_share: .*rank > 0"):
        preset("muon8bit", factor_error_share=0.25)


@pytest.mark.parametrize("optimizer", ["muonq", "adamw"])
def test_adamw_bits_takes_32_8_or_4(optimizer: str) -> None:
    """The AdamW side of every optimizer (Muon family and adamw family alike) in 32, 8 or 4 bits;
    anything else is one line naming the key."""
    for bits in (32, 8, 4):
        assert preset(optimizer, adamw_bits=bits).adamw.bits == bits
    with pytest.raises(ConfigError) as err:
        preset(optimizer, adamw_bits=6)
    assert str(err.value) == "optimizer_params.args.adamw_bits: got 6, expected one of 32, 8, 4"
    # two 4-bit codes per byte: torchao cannot pack an odd block
    with pytest.raises(ConfigError, match=r"^optimizer_params\.args\.adamw_block_size: adamw_bits=4 .*even block size, got 255$"):
        preset(optimizer, adamw_bits=4, adamw_block_size=255)
    assert preset(optimizer, adamw_bits=8, adamw_block_size=255).adamw.block_size == 255
    assert preset(optimizer, adamw_bits=8).adamw.block_size == 64  # the default
    if optimizer == "muonq":  # block_size: the blocks of Muon's momentum only
        assert preset(optimizer, adamw_bits=8, block_size=512).adamw.block_size == 64
    else:  # the adamw family has no Muon momentum
        with pytest.raises(ConfigError, match=r"^optimizer_params\.args\.block_size: set to 512, .*no Muon side"):
            preset(optimizer, block_size=512)


def test_skip_budget_applies_to_skip_only() -> None:
    validate(_compose("recipe.training_params.nonfinite=skip", "recipe.training_params.max_consecutive_skips=3"))
    with pytest.raises(ConfigError, match=r"max_consecutive_skips: applies to nonfinite=skip only, not stop"):
        validate(_compose("recipe.training_params.max_consecutive_skips=3"))


def test_divisibility_counts_the_world_size() -> None:
    cfg = _compose("recipe=llama-tiny")  # 2048 tokens = 16 x 128: fits 1 rank, not 3
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="world_size") as err:
        validate(cfg, world_size=3)
    assert "batch_size=" not in str(err.value)  # 2048 tokens are not whole sequences per rank at 3
    with pytest.raises(ConfigError, match=r"= 4096; recipe\.training_params\.batch_size=8 fits \(8 sequences per rank per step\)$"):
        validate(cfg, world_size=2)
    validate(_compose("recipe=llama-tiny", "recipe.training_params.batch_size=8"), world_size=2)


def test_entry_point_rejects_bad_value_with_one_line(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "run_hydra.py"), "optimizer_params.args.qbit=5", f"hydra.run.dir={tmp_path}/out"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert "optimizer_params.args.qbit" in proc.stderr and "4, 8, 32" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_derived_yamls_inherit_and_set_only_what_differs() -> None:
    """Every YAML but adamw.yaml and muon.yaml inherits a YAML of its family through Hydra defaults
    (muonq-hifi inherits muonq) and leaves lr to it; composing gives the family."""
    folder = REPO / "hydra_conf" / "optimizer_params"
    family = {name: _compose(f"optimizer_params={name}").optimizer_params.family for name in OPTIMIZERS}
    for name in OPTIMIZERS:
        if name in ("adamw", "muon"):
            continue
        text = (folder / f"{name}.yaml").read_text()
        parent = re.search(r"^defaults:\n  - (\S+)\n", text, re.M)
        assert parent and parent[1] != name and family[parent[1]] == family[name] and "lr:" not in text, name
    assert preset("muonq").muon.lr == preset("muon").muon.lr == 0.001


def test_spec_spells_out_each_store() -> None:
    """Which store a matrix gets is data in the spec, not precedence rules in code."""
    assert preset("adamw").muon is None and preset("adamw8bit").adamw.bits == 8
    assert preset("muon").muon.store == FullPrecisionMomentum()
    q = preset("muon8bit").muon.store
    assert isinstance(q, QuantizedMomentum) and (q.codec.bits, q.codec.granularity, q.codec.block_size) == (8, "block", 256)
    d = preset("muonq").muon.store
    assert isinstance(d, DecomposedMomentum) and d.rank_divisor == 16
    assert (d.factor.granularity, d.residual.granularity, d.residual.value_map) == ("column", "tensor", "linear")
    assert d.factor.compand and d.residual.compand and d.residual.mu == 255.0  # mu-law on raw values
    assert preset("muonq", residual_block_size=128).muon.store.residual.granularity == "block"
    grasp = preset("grasp").muon.store
    assert (grasp.factor.bits, grasp.residual.granularity, grasp.narrow.codec.granularity) == (8, "grid", "grid")
    assert preset("muon", adamw_bits=8).adamw.bits == 8  # the AdamW side of a Muon optimizer in 8 bits
    assert optimizer_spec(_compose("optimizer_params=muonq").optimizer_params) == preset("muonq")


@pytest.mark.parametrize("override, key", [
    ("optimizer_params.args.rank=16", "optimizer_params.args.rank"),
    ("optimizer_params.args.norm=true", "optimizer_params.args.norm"),
    ("optimizer_params.args.adamw_lr=0.01", "optimizer_params.args.adamw_lr"),
])
def test_muon_keys_are_refused_on_adamw(override: str, key: str) -> None:
    cfg = _compose("optimizer_params=adamw", override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*no Muon side"):
        validate(cfg)


@pytest.mark.parametrize("override", [
    "recipe.training_params.num_epochs=1", "recipe.training_params.val_tokens_processed=10", "recipe.model.flash_attention=true",
    "logging_params.load_ckpt_step=0", "optimizer_params.args.polar_method=Keller",
])
def test_keys_that_did_nothing_are_gone(override: str) -> None:
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].rsplit(".", 1)[1]):
        _compose(override)


def test_a_new_optimizer_from_existing_parts_is_one_yaml(tmp_path, shakespeare_data) -> None:
    """A YAML dropped into hydra_conf/optimizer_params/ (a copy of the project) trains, with no code change."""
    import json
    import shutil

    copy = tmp_path / "repo"
    for part in ("src", "hydra_conf", "run_hydra.py"):
        (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, copy / part)
    (copy / "hydra_conf" / "optimizer_params" / "muonq-mu15.yaml").write_text(
        "defaults:\n  - muonq\n  - _self_\nname: muonq-mu15\nargs:\n  mu: 15.0\n  min_quant_numel: 0\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(copy / "run_hydra.py"), "optimizer_params=muonq-mu15", f"data_dir={shakespeare_data}",
         f"hydra.run.dir={out}", "recipe.training_params.max_steps=2", "logging_params.log_step=1",
         "logging_params.val_step=0", "logging_params.final_full_val=false", "logging_params.val_tokens_processed=2048"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(copy / "src")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in rows)
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
