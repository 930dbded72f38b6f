"""Structured schemas for every Hydra config group, and the value checks that run before any work.

Hydra merges the YAML files of ``hydra_conf/`` into :class:`RunConfig`; a key that is not declared
here fails at compose time ("Key 'x' is not in struct"). :func:`validate` then rejects bad values
with a message that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from muonq.errors import UserError
from muonq.optim.spec import ADAMW_BITS, FAMILIES, KERNEL_MODES, MATMUL_DTYPES, VALUE_MAPS, OptimizerSpec

MODEL_TYPES = ("llama", "gpt")
SCHEDULES = ("warm-up-cosine", "cosine", "constant")
PRECISIONS = ("bfloat16", "float16", "float32")
GRANULARITIES = ("tensor", "block")
EQUILIBRATE_MODES = ("none", "row", "col", "rowcol")
NONFINITE_POLICIES = ("skip", "stop", "abort")


@dataclass
class TrainingParams:
    tokens_processed: int = 2048  # global tokens per optimizer step (all ranks, all micro-steps)
    batch_size: int = 16  # per-rank micro-batch, in sequences
    context_length: int = 128
    gradnorm: float = 1.0  # global-norm clip; 0 disables clipping
    autocast: bool = True  # bf16/fp16 autocast on CUDA (always fp32 on CPU)
    mixed_precision: str = "bfloat16"
    compile: bool = False  # torch.compile: the whole model (ddp), each transformer block (fsdp)
    # recompute each transformer block's activations in the backward pass: only the blocks' inputs
    # are kept, for about one more forward pass of compute
    activation_checkpointing: bool = False
    max_steps: Optional[int] = None  # cap on optimizer steps (None: the token budget decides)
    tensorcore_precision: str = "high"  # torch.set_float32_matmul_precision on CUDA
    # what a non-finite loss/grad does: skip the step, or stop with a checkpoint of the last good
    # step (both read a verdict before the optimizer: one host sync per step); abort: the verdict is
    # read a step late (no sync in the step) and the run stops without saving the damaged state
    nonfinite: str = "stop"
    # nonfinite=skip: this many skipped steps in a row stop the run (the weights, not a batch, are broken)
    max_consecutive_skips: int = 10


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
    scale_mode: str = "match_rms_adamw"  # or "original"
    momentum_form: str = "sum"  # or "ema" (torch.optim.Muon's form)
    matmul_dtype: str = "auto"  # NS, power iteration, low-rank products: auto (bf16 where native, else fp32) | bfloat16 | float32
    split_qkv: bool = True  # Muon: a fused QKV weight (GPT) is three matrices, as in the original; false: one
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adamw_eps: float = 1e-8
    adamw_lr: Optional[float] = None  # lr of the AdamW side of Muon optimizers (None: same as lr)
    adamw_bits: int = 32  # AdamW state: 32 = torch's fp32 moments; 8 / 4 = torchao's AdamW8bit / AdamW4bit
    adamw_block_size: int = 64  # 8-/4-bit AdamW state: one scale per this many elements
    # quantized state
    qbit: int = 32  # 32 = full precision; 8 or 4
    quant: str = "linear"  # code map after the scale: linear | dynamic | mulaw-after-scale (mu-law of x / absmax)
    gran: str = "block"  # tensor | block (per-tensor or blockwise scales)
    block_size: int = 256  # blockwise scales of Muon momentum (gran=block)
    min_quant_numel: int = 4096  # smaller matrices keep fp32 momentum
    stochastic: bool = False  # stochastic rounding when encoding
    # MuonQ parts
    norm: bool = False  # pre-quantization normalization
    compand: bool = False  # MuonQ's mu-law: compand the raw values, then the scale and linear codes
    mu: float = 255.0
    rank: int = 0  # structural decomposition rank divisor: k = min(m, n) // rank; 0 = off
    residual_block_size: int = 0  # MuonQ residual: 0 = one scale per tensor, else per block
    factor_bits: int = 4  # bits of the decomposition factors P and R
    residual_scale_search: bool = False  # residual scales: absmax x the ratio in 1 ... 0.5 of least squared error
    factor_error_share: float = 0.0  # the share (0..1) of the factors' rounding error the residual also stores
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
    name: str = "muon"  # the YAML's name in hydra_conf/optimizer_params/ (labels runs and checkpoints)
    family: str = "muon"  # muon: Muon on hidden matrices + AdamW on the rest; adamw: AdamW everywhere
    args: OptimizerArgs = field(default_factory=OptimizerArgs)
    zero: Optional[bool] = None  # shard optimizer state across ranks (None: on when world size > 1)
    kernels: str = "auto"  # auto (Triton on CUDA, C codec loops on CPU) | triton | reference


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
    checkpoint_dir: Optional[str] = None  # default: checkpoints/<run name>
    final_full_val: bool = True  # validate on the whole validation split at the end
    progress_every_s: float = 30.0  # seconds between plain progress lines when stderr is no terminal (0: every step)
    wandb: dict[str, Any] = field(default_factory=dict)  # passed to wandb.init (project, name, ...)


@dataclass
class ParallelismConfig:
    """How the model is spread over the ranks (``hydra_conf/parallelism/``)."""

    name: str = "ddp"  # ddp: replicated parameters + ZeRO-1 | fsdp: FSDP2 fully_shard per block and root
    reshard_after_forward: bool = True  # fsdp: free the gathered parameters after each block's forward
    # fsdp: ranks per shard group; the groups are replicas of each other (HSDP: a 2-D mesh,
    # all-reduce across groups). None: one group of every rank (plain FSDP)
    dp_shard: Optional[int] = None


@dataclass
class RunConfig:
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    optimizer_params: OptimizerParams = field(default_factory=OptimizerParams)
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    logging_params: LoggingParams = field(default_factory=LoggingParams)
    seed: int = 0
    resume: str = "false"  # false | true | auto (resume when a checkpoint exists)
    device: str = "auto"  # auto | cpu | cuda
    data_dir: Optional[str] = None  # default: $DATA_DIR, else ./data
    run_name: Optional[str] = None  # default: logging_params.wandb.name, else <recipe>_<optimizer>


CONF_DIR = Path(__file__).resolve().parents[2] / "hydra_conf"


def checkpoint_dir_for(cfg: RunConfig | Any, run_name: str) -> Path:
    """``logging_params.checkpoint_dir``, else ``checkpoints/<run name>``."""
    return Path(cfg.logging_params.checkpoint_dir or Path("checkpoints") / run_name)


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
        raise ConfigError(f"bad override in {' '.join(overrides)}: {err}") from err
    finally:
        GlobalHydra.instance().clear()


def register_configs() -> None:
    """Make :class:`RunConfig` the schema of ``hydra_conf/test_hydra.yaml``."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


class ConfigError(UserError):
    """A config value that cannot run; the message names the key."""


# Learning rates run around 1e-3 (AdamW) and 0.02 (Muon); a step of more than MAX_LR diverges at
# once, and from ~1e37 on, lr x the update scale cannot even be formed in float32 (a traceback from
# inside the optimizer step, not a message). Such a value is a typo: refuse it.
MAX_LR = 10.0


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


def _batch_hint(tp: Any, world_size: int) -> str:
    """The largest per-rank batch_size up to the set one that divides each rank's sequences per
    step, as a hint after the divisibility error (nothing when no batch_size can fit)."""
    sequences, rest = divmod(tp.tokens_processed, world_size * tp.context_length)
    if rest or not sequences:
        return ""
    fits = max(b for b in range(1, min(sequences, tp.batch_size) + 1) if sequences % b == 0)
    return f"; recipe.training_params.batch_size={fits} fits ({sequences} sequences per rank per step)"


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
        f"{world_size} x {tp.batch_size} x {tp.context_length} = {per_micro_step}{_batch_hint(tp, world_size)}",
    )
    _check(tp.gradnorm >= 0, "recipe.training_params.gradnorm", f"must be >= 0 (0 = no clipping), got {tp.gradnorm}")
    _check(tp.max_steps is None or tp.max_steps > 0, "recipe.training_params.max_steps", f"must be > 0, got {tp.max_steps}")
    _check_choice(tp.mixed_precision, "recipe.training_params.mixed_precision", PRECISIONS)
    _check_choice(tp.nonfinite, "recipe.training_params.nonfinite", NONFINITE_POLICIES)
    _check(tp.max_consecutive_skips >= 1, "recipe.training_params.max_consecutive_skips",
           f"must be >= 1, got {tp.max_consecutive_skips}")
    _check(tp.nonfinite == "skip" or tp.max_consecutive_skips == TrainingParams.max_consecutive_skips,
           "recipe.training_params.max_consecutive_skips", f"applies to nonfinite=skip only, not {tp.nonfinite}")
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

    optimizer_spec(cfg.optimizer_params)

    sched = cfg.lr_schedule
    _check_choice(sched.name, "lr_schedule.name", SCHEDULES)
    _check(0 <= sched.warm_up_fraction < 1, "lr_schedule.warm_up_fraction", f"must be in [0, 1), got {sched.warm_up_fraction}")
    _check(0 <= sched.min_lr_ratio <= 1, "lr_schedule.min_lr_ratio", f"must be in [0, 1], got {sched.min_lr_ratio}")

    log = cfg.logging_params
    _check(log.log_step > 0, "logging_params.log_step", f"must be > 0, got {log.log_step}")
    _check(log.val_step >= 0, "logging_params.val_step", f"must be >= 0, got {log.val_step}")
    _check(log.save_ckpt_step > 0, "logging_params.save_ckpt_step", f"must be > 0, got {log.save_ckpt_step}")
    _check(log.keep_last >= 1, "logging_params.keep_last", f"must be >= 1, got {log.keep_last}")
    _check(log.progress_every_s >= 0, "logging_params.progress_every_s", f"must be >= 0, got {log.progress_every_s}")
    _check(log.val_tokens_processed >= 0, "logging_params.val_tokens_processed", f"must be >= 0, got {log.val_tokens_processed}")
    _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    _check(str(cfg.resume).lower() in ("false", "true", "auto"), "resume", f"got {cfg.resume!r}, expected false, true or auto")
    _check_choice(cfg.device, "device", ("auto", "cpu", "cuda"))
    _check_parallelism(cfg, world_size)


def _check_parallelism(cfg: Any, world_size: int) -> None:
    par = cfg.parallelism
    _check_choice(par.name, "parallelism", ("ddp", "fsdp"))
    if par.name != "fsdp":
        _check(par.dp_shard is None, "parallelism.dp_shard", "applies to parallelism=fsdp only")
        return
    if par.dp_shard is not None:
        _check(1 <= par.dp_shard <= world_size and world_size % par.dp_shard == 0, "parallelism.dp_shard",
               f"{par.dp_shard} ranks per shard group do not divide the {world_size} processes")
    _check(world_size > 1, "parallelism", "fsdp shards over ranks and needs more than one process; run it under "
           "torchrun --nproc-per-node=N with N > 1, or use parallelism=ddp")
    _check(cfg.optimizer_params.zero is not False, "optimizer_params.zero",
           "false (replicated optimizer state) does not apply under parallelism=fsdp, which always shards it")


# -- the optimizer: flat keys -> one typed spec -------------------------------------------------------

# Every YAML in hydra_conf/optimizer_params/ is an optimizer: adding one made of existing parts is a
# YAML file and nothing else.
OPTIMIZERS: tuple[str, ...] = tuple(sorted(p.stem for p in (CONF_DIR / "optimizer_params").glob("*.yaml")))

# Named variants for benchmarks and tests: an optimizer YAML with overrides of its args.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "muon": ("muon", {}),
    "muon8bit": ("muon8bit", {}),
    "muon8bit-dynamic": ("muon8bit", {"quant": "dynamic"}),
    "muon8bit-linear": ("muon8bit", {"quant": "linear"}),
    "muon8": ("muon8", {}),
    "muon4": ("muon4", {}),
    "muonq": ("muonq", {}),
    "muonq-block128": ("muonq", {"residual_block_size": 128}),
    "grasp": ("grasp", {}),
}

_ARGS = "optimizer_params.args."


# What the adamw family reads of optimizer_params.args; every other key is Muon's.
_ADAMW_ARGS = {"lr", "weight_decay", "adamw_betas", "adamw_eps", "adamw_bits", "adamw_block_size"}


def _reject_muon_args_on_adamw(opt: OptimizerParams) -> None:
    """A Muon key set on an adamw-family optimizer would be silently ignored: refuse it. (Within the
    Muon family the precedence of the store keys is spelled out in :func:`optimizer_spec`.)"""
    if opt.family != "adamw":
        return
    defaults = OptimizerArgs()
    for f in dataclasses.fields(OptimizerArgs):
        value, default = getattr(opt.args, f.name), getattr(defaults, f.name)
        if f.name in _ADAMW_ARGS or (list(value) if isinstance(default, list) else value) == default:
            continue
        raise ConfigError(f"{_ARGS}{f.name}: set to {value!r}, but {opt.name} (family adamw) has no Muon side; "
                          f"its keys are {', '.join(sorted(_ADAMW_ARGS))}")


def _check_optimizer_values(opt: OptimizerParams) -> None:
    args = opt.args
    _check(opt.name in OPTIMIZERS, "optimizer_params.name",
           f"got {opt.name!r}, expected the name of a YAML in hydra_conf/optimizer_params/: {', '.join(OPTIMIZERS)}")
    _check_choice(opt.family, "optimizer_params.family", FAMILIES)
    _check_choice(opt.kernels, "optimizer_params.kernels", KERNEL_MODES)
    for key, lr in (("lr", args.lr), ("adamw_lr", args.adamw_lr)):
        _check(lr is None or 0 < lr <= MAX_LR, _ARGS + key, f"must be in (0, {MAX_LR:g}], got {lr}")
    _check(args.weight_decay >= 0, _ARGS + "weight_decay", f"must be >= 0, got {args.weight_decay}")
    _check(0 <= args.momentum < 1, _ARGS + "momentum", f"must be in [0, 1), got {args.momentum}")
    _check(args.ns_steps >= 1, _ARGS + "ns_steps", f"must be >= 1, got {args.ns_steps}")
    _check(args.ns_batch_size >= 1, _ARGS + "ns_batch_size", f"must be >= 1, got {args.ns_batch_size}")
    _check_choice(args.scale_mode, _ARGS + "scale_mode", ("match_rms_adamw", "original"))
    _check_choice(args.momentum_form, _ARGS + "momentum_form", ("sum", "ema"))
    _check_choice(args.matmul_dtype, _ARGS + "matmul_dtype", MATMUL_DTYPES)
    _check(
        len(args.adamw_betas) == 2 and all(0 <= b < 1 for b in args.adamw_betas),
        _ARGS + "adamw_betas",
        f"expected two values in [0, 1), got {list(args.adamw_betas)}",
    )
    _check(args.adamw_eps > 0, _ARGS + "adamw_eps", f"must be > 0, got {args.adamw_eps}")
    _check(args.adamw_bits in ADAMW_BITS, _ARGS + "adamw_bits",
           f"got {args.adamw_bits}, expected one of {', '.join(map(str, ADAMW_BITS))}")
    _check(args.qbit in (4, 8, 32), _ARGS + "qbit", f"got {args.qbit}, expected one of 4, 8, 32")
    _check(args.factor_bits in (4, 8, 32), _ARGS + "factor_bits", f"got {args.factor_bits}, expected one of 4, 8, 32")
    _check(args.quant != "mulaw", _ARGS + "quant",
           "got 'mulaw': MuonQ's mu-law (on the raw values, before the scale) is compand=true with quant=linear; "
           "mu-law levels of x / absmax (the value scaled first) are quant=mulaw-after-scale")
    _check_choice(args.quant, _ARGS + "quant", VALUE_MAPS)
    _check(not (args.quant == "dynamic" and args.qbit == 4), _ARGS + "quant",
           "the dynamic code map is 8-bit; use qbit=8 or quant=linear")
    _check(not args.compand or args.quant == "linear", _ARGS + "compand",
           f"mu-law companding of the raw values is followed by linear codes; it cannot be combined with "
           f"quant={args.quant}")
    _check_choice(args.gran, _ARGS + "gran", GRANULARITIES)
    _check(args.block_size > 0, _ARGS + "block_size", f"must be > 0, got {args.block_size}")
    _check(args.adamw_block_size > 0, _ARGS + "adamw_block_size", f"must be > 0, got {args.adamw_block_size}")
    _check(args.adamw_bits != 4 or args.adamw_block_size % 2 == 0, _ARGS + "adamw_block_size",
           f"adamw_bits=4 packs two codes per byte and needs an even block size, got {args.adamw_block_size}")
    _check(args.min_quant_numel >= 0, _ARGS + "min_quant_numel", f"must be >= 0, got {args.min_quant_numel}")
    _check(args.residual_block_size >= 0, _ARGS + "residual_block_size", f"must be >= 0, got {args.residual_block_size}")
    _check(args.rank >= 0, _ARGS + "rank", f"must be >= 0 (0 = no decomposition), got {args.rank}")
    _check(args.tile_size > 0, _ARGS + "tile_size", f"must be > 0, got {args.tile_size}")
    _check(args.mu > 0, _ARGS + "mu", f"must be > 0, got {args.mu}")
    if args.residual_scale_search:
        _check(args.qbit != 32 and args.rank > 0, _ARGS + "residual_scale_search",
               "searches the scales of the decomposition's residual and needs rank > 0 and qbit 4 or 8")
        _check(not args.grid and not args.stochastic, _ARGS + "residual_scale_search",
               "needs deterministic rounding (stochastic=false) and tensor or block residual scales (grid=false)")
    _check(0.0 <= args.factor_error_share <= 1.0, _ARGS + "factor_error_share",
           f"must be in [0, 1], got {args.factor_error_share}")
    if args.factor_error_share:
        _check(args.qbit != 32 and args.rank > 0, _ARGS + "factor_error_share",
               "shares the factors' rounding error with the decomposition's residual and needs rank > 0 and qbit 4 or 8")
    _check_choice(args.equilibrate, _ARGS + "equilibrate", EQUILIBRATE_MODES)
    _check(args.phase is None or args.phase >= 0, _ARGS + "phase", f"must be >= 0, got {args.phase}")
    _check(args.eq_clip is None or args.eq_clip >= 1, _ARGS + "eq_clip", f"must be >= 1, got {args.eq_clip}")
    _reject_muon_args_on_adamw(opt)


def optimizer_spec(opt: OptimizerParams | Any) -> OptimizerSpec:
    """The one place where ``optimizer_params`` (the flat keys users type) becomes the typed
    :class:`~muonq.optim.spec.OptimizerSpec` that is built; bad values raise :class:`ConfigError`.

    Momentum store of the Muon family: ``qbit`` 32 -> fp32. Otherwise codes of ``qbit`` bits with
    the map ``quant``, of the raw values mu-law companded (``mu``) before the scale when ``compand``
    (MuonQ's quantizer); with ``rank`` > 0 the MuonQ / GRASP
    decomposition: factors of ``factor_bits`` bits with one scale per column, the residual with
    ``grid`` scales (``tile_size``), else one per ``residual_block_size`` block when > 0, else one
    per tensor (scales of least squared error with ``residual_scale_search``; holding also the
    ``factor_error_share`` of the factors' rounding error); matrices too
    narrow for the rank, and every matrix without ``rank``, use scales per ``gran`` (per
    ``tile_size`` grid when ``grid``). 8-bit codes keep fp32 scales, 4-bit fp16.
    """
    from muonq.optim.spec import (
        AdamWSpec, CodecSpec, DecomposedMomentum, EquilibrateSpec, FullPrecisionMomentum, MuonSpec, QuantizedMomentum,
    )  # fmt: skip

    _check_optimizer_values(opt)
    a, muon_family = opt.args, opt.family == "muon"
    adamw_lr = a.adamw_lr if muon_family and a.adamw_lr is not None else a.lr
    adamw = AdamWSpec(lr=adamw_lr, weight_decay=a.weight_decay, betas=tuple(float(b) for b in a.adamw_betas),
                      eps=a.adamw_eps, bits=a.adamw_bits, block_size=a.adamw_block_size)
    if not muon_family:
        return OptimizerSpec(name=opt.name, family="adamw", adamw=adamw, kernels=opt.kernels, zero=opt.zero)

    def codec(bits: int, granularity: str, block_size: int = a.block_size, scale_search: bool = False) -> CodecSpec:
        return CodecSpec(bits, a.quant, granularity, block_size=block_size, tile_size=a.tile_size, mu=a.mu,
                         compand=a.compand, stochastic=a.stochastic, scale_search=scale_search)

    store: Any = FullPrecisionMomentum()
    if a.qbit != 32:
        store = QuantizedMomentum(codec(a.qbit, "grid" if a.grid else a.gran), min_numel=a.min_quant_numel)
        if a.rank > 0:
            residual_gran = "grid" if a.grid else ("block" if a.residual_block_size else "tensor")
            store = DecomposedMomentum(
                a.rank, factor=codec(a.factor_bits, "column"),
                residual=codec(a.qbit, residual_gran, block_size=a.residual_block_size or a.block_size,
                               scale_search=a.residual_scale_search),
                narrow=store, factor_error_share=float(a.factor_error_share),
            )
    equilibrate = None
    if a.equilibrate != "none":
        equilibrate = EquilibrateSpec(a.equilibrate, exponent=a.eq_exponent, phase=a.phase, clip=a.eq_clip, eps=a.eq_eps)
    muon = MuonSpec(
        lr=a.lr, weight_decay=a.weight_decay, momentum=a.momentum, nesterov=a.nesterov, ns_steps=a.ns_steps,
        ns_batch_size=a.ns_batch_size, scale_mode=a.scale_mode, momentum_form=a.momentum_form, normalize=a.norm,
        store=store, equilibrate=equilibrate, matmul_dtype=a.matmul_dtype, split_qkv=a.split_qkv,
    )
    return OptimizerSpec(name=opt.name, family="muon", adamw=adamw, muon=muon, kernels=opt.kernels, zero=opt.zero)


def preset(name: str, **arg_overrides: Any) -> OptimizerSpec:
    """The spec of an optimizer YAML (``hydra_conf/optimizer_params/<name>.yaml``, inheritance
    resolved) or a named variant (:data:`VARIANTS`), with ``optimizer_params.args`` overrides."""
    from omegaconf import OmegaConf

    if name not in OPTIMIZERS and name not in VARIANTS:
        known = ", ".join(sorted(set(OPTIMIZERS) | set(VARIANTS)))
        raise ConfigError(f"unknown variant {name!r}; expected an optimizer YAML or a named variant: {known}")
    yaml_name, variant_args = VARIANTS.get(name, (name, {}))
    merged = OmegaConf.merge(_optimizer_yaml(yaml_name), {"args": {**variant_args, **arg_overrides}})
    return optimizer_spec(OmegaConf.to_object(merged))


@functools.cache
def _optimizer_yaml(name: str) -> Any:
    return compose_config([f"optimizer_params={name}"]).optimizer_params
