"""Structured schemas for every Hydra config group, and the value checks that run before any work.

Hydra merges the YAML files of ``hydra_conf/`` into :class:`RunConfig`; a key that is not declared
here fails at compose time ("Key 'x' is not in struct"). :func:`validate` then rejects bad values
with a message that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

OPTIMIZERS = ("adamw", "adamw8bit", "muon", "muon8bit", "muon8", "muon4", "muonq", "grasp", "muoneq")
MUON_FAMILY = tuple(name for name in OPTIMIZERS if name.startswith("muon") or name == "grasp")
MODEL_TYPES = ("llama", "gpt")
SCHEDULES = ("warm-up-cosine", "cosine", "constant")
PRECISIONS = ("bfloat16", "float16", "float32")
QUANT_SCHEMES = ("linear", "dynamic", "mulaw")
GRANULARITIES = ("tensor", "block")
EQUILIBRATE_MODES = ("none", "row", "col", "rowcol")
KERNEL_MODES = ("auto", "triton", "reference")
NONFINITE_POLICIES = ("skip", "stop", "abort")


@dataclass
class TrainingParams:
    tokens_processed: int = 2048  # global tokens per optimizer step (all ranks, all micro-steps)
    batch_size: int = 16  # per-rank micro-batch, in sequences
    context_length: int = 128
    gradnorm: float = 1.0  # global-norm clip; 0 disables clipping
    autocast: bool = True  # bf16/fp16 autocast on CUDA (always fp32 on CPU)
    mixed_precision: str = "bfloat16"
    compile: bool = False
    max_steps: Optional[int] = None  # cap on optimizer steps (None: the token budget decides)
    num_epochs: int = 1  # accepted for compatibility with the original recipes; the budget decides
    tensorcore_precision: str = "high"  # torch.set_float32_matmul_precision on CUDA
    val_tokens_processed: Optional[int] = None  # original recipes set it here; logging_params wins
    # what a non-finite loss/grad does: skip the step, or stop with a checkpoint of the last good
    # step (both read a verdict before the optimizer: one host sync per step); abort: the verdict is
    # read a step late (no sync in the step) and the run stops without saving the damaged state
    nonfinite: str = "stop"


@dataclass
class ModelConfig:
    model_type: str = "llama"
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    intermediate_size: Optional[int] = None  # LLaMA SwiGLU width; GPT uses 4 * n_embd
    vocab_size: int = 8192
    rope_theta: float = 10000.0
    block_size: int = 1024  # GPT: learned positions available
    norm_eps: float = 1e-5
    init_std: float = 0.02
    flash_attention: bool = True  # accepted for compatibility; attention is always SDPA


@dataclass
class DatasetConfig:
    name: str = "tiny_shakespeare"
    tokenizer: str = "bpe-8192"
    total_tokens_B: float = 0.001  # token budget in billions; steps = budget / tokens_processed


@dataclass
class RecipeConfig:
    training_params: TrainingParams = field(default_factory=TrainingParams)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)


@dataclass
class OptimizerArgs:
    """Constructor arguments of every optimizer; each YAML in optimizer_params/ sets its own."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = False
    ns_steps: int = 5
    ns_batch_size: int = 1  # same-shape matrices stacked into one batched Newton–Schulz call (1 = per matrix)
    polar_method: str = "Keller"  # Newton–Schulz quintic (the only one implemented)
    scale_mode: str = "match_rms_adamw"  # or "original"
    momentum_form: str = "sum"  # or "ema" (torch.optim.Muon's form)
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adamw_eps: float = 1e-8
    adamw_lr: Optional[float] = None  # lr of the AdamW side of Muon optimizers (None: same as lr)
    # quantized state
    qbit: int = 32  # 32 = full precision; 8 or 4
    quant: str = "linear"  # linear | dynamic | mulaw
    gran: str = "block"  # tensor | block (per-tensor or blockwise scales)
    block_size: int = 256
    min_quant_numel: int = 4096  # smaller matrices keep fp32 momentum
    stochastic: bool = False  # stochastic rounding when encoding
    # MuonQ parts
    norm: bool = False  # pre-quantization normalization
    compand: bool = False  # mu-law companding
    mu: float = 255.0
    rank: int = 0  # structural decomposition rank divisor: k = min(m, n) // rank; 0 = off
    residual_block_size: int = 0  # MuonQ residual: 0 = one scale per tensor, else per block
    factor_bits: int = 4  # bits of the decomposition factors P and R
    # GRASP
    grid: bool = False  # grid scales (min of row and column absmax) on the residual
    tile_size: int = 128
    # MuonEq
    equilibrate: str = "none"  # none | row | col | rowcol
    phase: Optional[int] = None  # rowcol switches to row after this many steps
    eq_exponent: float = -0.5
    eq_clip: Optional[float] = None  # clamp the equilibration scales to [1/clip, clip]
    eq_eps: float = 1e-8


@dataclass
class OptimizerParams:
    name: str = "muon"
    args: OptimizerArgs = field(default_factory=OptimizerArgs)
    zero: Optional[bool] = None  # shard optimizer state across ranks (None: on when world size > 1)
    kernels: str = "auto"  # auto (Triton on CUDA) | triton | reference


@dataclass
class LRSchedule:
    name: str = "warm-up-cosine"
    warm_up_fraction: float = 0.01
    min_lr_ratio: float = 0.1


@dataclass
class LoggingParams:
    log_step: int = 10  # optimizer steps between console/W&B lines
    val_step: int = 100  # optimizer steps between validations (0: only at the end)
    val_tokens_processed: int = 65536  # tokens per validation (0: whole validation split)
    save_checkpoint: bool = False
    save_ckpt_step: int = 100
    keep_last: int = 2
    load_ckpt_step: int = 0  # accepted for compatibility with the original recipes
    checkpoint_dir: Optional[str] = None  # default: checkpoints/<run name>
    final_full_val: bool = True  # validate on the whole validation split at the end
    wandb: dict[str, Any] = field(default_factory=dict)  # passed to wandb.init (project, name, ...)
    var_tracking: dict[str, Any] = field(default_factory=dict)  # accepted for compatibility


@dataclass
class RunConfig:
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    optimizer_params: OptimizerParams = field(default_factory=OptimizerParams)
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    logging_params: LoggingParams = field(default_factory=LoggingParams)
    seed: int = 0
    resume: str = "false"  # false | true | auto (resume when a checkpoint exists)
    device: str = "auto"  # auto | cpu | cuda
    data_dir: Optional[str] = None  # default: $DATA_DIR, else ./data
    run_name: Optional[str] = None  # default: logging_params.wandb.name, else <recipe>_<optimizer>


CONF_DIR = Path(__file__).resolve().parents[2] / "hydra_conf"


def optimizer_params_from_yaml(name: str, **arg_overrides: Any) -> OptimizerParams:
    """``hydra_conf/optimizer_params/<name>.yaml`` as a typed :class:`OptimizerParams` (for
    benchmarks and tests that build optimizers without composing a whole run)."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "optimizer_params" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    merged = OmegaConf.merge(OmegaConf.structured(OptimizerParams), OmegaConf.load(path), {"args": arg_overrides})
    return OmegaConf.to_object(merged)


def compose_config(overrides: list[str]) -> Any:
    """The run config exactly as ``run_hydra.py`` composes it (``hydra.*`` overrides left out)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("test_hydra", overrides=[o for o in overrides if not o.startswith("hydra.")])
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(f"bad override in {' '.join(overrides)}: {err}") from err
    finally:
        GlobalHydra.instance().clear()


def register_configs() -> None:
    """Make :class:`RunConfig` the schema of ``hydra_conf/test_hydra.yaml``."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"got {value!r}, expected one of {', '.join(choices)}")


def _reject_unknown_keys(node: Any, schema: type, prefix: str) -> None:
    """Hydra's ``+key=value`` adds keys even to structured configs; catch what the schema lacks."""
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        return
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{path}: unknown key; valid keys under {prefix.rstrip('.') or 'the root'}: {', '.join(known)}")
        sub = known[key].type  # a string under `from __future__ import annotations`
        sub_type = globals().get(sub) if isinstance(sub, str) else sub
        if isinstance(sub_type, type) and dataclasses.is_dataclass(sub_type):
            _reject_unknown_keys(node[key], sub_type, path + ".")


def validate(cfg: RunConfig | Any, world_size: int = 1) -> None:
    """Reject values that cannot work, before any data or device work starts."""
    _reject_unknown_keys(cfg, RunConfig, "")
    tp, model, ds = cfg.recipe.training_params, cfg.recipe.model, cfg.recipe.dataset
    for key in ("tokens_processed", "batch_size", "context_length"):
        _check(getattr(tp, key) > 0, f"recipe.training_params.{key}", f"must be > 0, got {getattr(tp, key)}")
    per_micro_step = world_size * tp.batch_size * tp.context_length
    _check(
        tp.tokens_processed % per_micro_step == 0,
        "recipe.training_params.tokens_processed",
        f"{tp.tokens_processed} is not divisible by world_size x batch_size x context_length = "
        f"{world_size} x {tp.batch_size} x {tp.context_length} = {per_micro_step}",
    )
    _check(tp.gradnorm >= 0, "recipe.training_params.gradnorm", f"must be >= 0 (0 = no clipping), got {tp.gradnorm}")
    _check(tp.max_steps is None or tp.max_steps > 0, "recipe.training_params.max_steps", f"must be > 0, got {tp.max_steps}")
    _check_choice(tp.mixed_precision, "recipe.training_params.mixed_precision", PRECISIONS)
    _check_choice(tp.nonfinite, "recipe.training_params.nonfinite", NONFINITE_POLICIES)
    _check_choice(model.model_type, "recipe.model.model_type", MODEL_TYPES)
    for key in ("n_embd", "n_layer", "n_head", "vocab_size"):
        _check(getattr(model, key) > 0, f"recipe.model.{key}", f"must be > 0, got {getattr(model, key)}")
    _check(
        model.n_embd % model.n_head == 0,
        "recipe.model.n_head",
        f"n_embd={model.n_embd} is not divisible by n_head={model.n_head}",
    )
    if model.model_type == "llama":
        _check(
            model.intermediate_size is not None and model.intermediate_size > 0,
            "recipe.model.intermediate_size",
            "LLaMA models need a positive SwiGLU width",
        )
        _check((model.n_embd // model.n_head) % 2 == 0, "recipe.model.n_head", "RoPE needs an even head dimension")
    else:
        _check(
            model.block_size >= tp.context_length,
            "recipe.model.block_size",
            f"{model.block_size} learned positions cannot cover context_length={tp.context_length}",
        )
    _check(ds.total_tokens_B > 0, "recipe.dataset.total_tokens_B", f"must be > 0, got {ds.total_tokens_B}")

    opt, args = cfg.optimizer_params, cfg.optimizer_params.args
    _check_choice(opt.name, "optimizer_params.name", OPTIMIZERS)
    _check_choice(opt.kernels, "optimizer_params.kernels", KERNEL_MODES)
    _check(args.lr > 0, "optimizer_params.args.lr", f"must be > 0, got {args.lr}")
    _check(args.adamw_lr is None or args.adamw_lr > 0, "optimizer_params.args.adamw_lr", f"must be > 0, got {args.adamw_lr}")
    _check(args.weight_decay >= 0, "optimizer_params.args.weight_decay", f"must be >= 0, got {args.weight_decay}")
    _check(0 <= args.momentum < 1, "optimizer_params.args.momentum", f"must be in [0, 1), got {args.momentum}")
    _check(args.ns_steps >= 1, "optimizer_params.args.ns_steps", f"must be >= 1, got {args.ns_steps}")
    _check(args.ns_batch_size >= 1, "optimizer_params.args.ns_batch_size", f"must be >= 1, got {args.ns_batch_size}")
    _check(args.polar_method == "Keller", "optimizer_params.args.polar_method", f"got {args.polar_method!r}, expected Keller")
    _check_choice(args.scale_mode, "optimizer_params.args.scale_mode", ("match_rms_adamw", "original"))
    _check_choice(args.momentum_form, "optimizer_params.args.momentum_form", ("sum", "ema"))
    _check(
        len(args.adamw_betas) == 2 and all(0 <= b < 1 for b in args.adamw_betas),
        "optimizer_params.args.adamw_betas",
        f"expected two values in [0, 1), got {list(args.adamw_betas)}",
    )
    _check(args.qbit in (4, 8, 32), "optimizer_params.args.qbit", f"got {args.qbit}, expected one of 4, 8, 32")
    _check(args.factor_bits in (4, 8, 32), "optimizer_params.args.factor_bits", f"got {args.factor_bits}, expected one of 4, 8, 32")
    _check_choice(args.quant, "optimizer_params.args.quant", QUANT_SCHEMES)
    _check(not (args.quant == "dynamic" and args.qbit == 4), "optimizer_params.args.quant", "the dynamic code map is 8-bit; use qbit=8 or quant=linear")
    _check_choice(args.gran, "optimizer_params.args.gran", GRANULARITIES)
    _check(args.block_size > 0, "optimizer_params.args.block_size", f"must be > 0, got {args.block_size}")
    _check(args.residual_block_size >= 0, "optimizer_params.args.residual_block_size", f"must be >= 0, got {args.residual_block_size}")
    _check(args.rank >= 0, "optimizer_params.args.rank", f"must be >= 0 (0 = no decomposition), got {args.rank}")
    _check(args.tile_size > 0, "optimizer_params.args.tile_size", f"must be > 0, got {args.tile_size}")
    _check(args.mu > 0, "optimizer_params.args.mu", f"must be > 0, got {args.mu}")
    _check_choice(args.equilibrate, "optimizer_params.args.equilibrate", EQUILIBRATE_MODES)
    _check(args.phase is None or args.phase >= 0, "optimizer_params.args.phase", f"must be >= 0, got {args.phase}")
    _check(args.eq_clip is None or args.eq_clip >= 1, "optimizer_params.args.eq_clip", f"must be >= 1, got {args.eq_clip}")

    sched = cfg.lr_schedule
    _check_choice(sched.name, "lr_schedule.name", SCHEDULES)
    _check(0 <= sched.warm_up_fraction < 1, "lr_schedule.warm_up_fraction", f"must be in [0, 1), got {sched.warm_up_fraction}")
    _check(0 <= sched.min_lr_ratio <= 1, "lr_schedule.min_lr_ratio", f"must be in [0, 1], got {sched.min_lr_ratio}")

    log = cfg.logging_params
    _check(log.log_step > 0, "logging_params.log_step", f"must be > 0, got {log.log_step}")
    _check(log.val_step >= 0, "logging_params.val_step", f"must be >= 0, got {log.val_step}")
    _check(log.save_ckpt_step > 0, "logging_params.save_ckpt_step", f"must be > 0, got {log.save_ckpt_step}")
    _check(log.keep_last >= 1, "logging_params.keep_last", f"must be >= 1, got {log.keep_last}")
    _check(log.val_tokens_processed >= 0, "logging_params.val_tokens_processed", f"must be >= 0, got {log.val_tokens_processed}")
    _check(str(cfg.resume).lower() in ("false", "true", "auto"), "resume", f"got {cfg.resume!r}, expected false, true or auto")
    _check_choice(cfg.device, "device", ("auto", "cpu", "cuda"))
