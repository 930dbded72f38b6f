"""The names of every metric a run writes (``metrics.jsonl`` and W&B), and how bytes and ratios
are printed.

The trainer writes these keys, the compare report and the benchmarks read them, the tests check
them: each is spelled here once. One value has one key.
"""

from __future__ import annotations

# training, logged every ``logging_params.log_step`` optimizer steps
TRAIN_LOSS = "train/loss"  # mean over the steps since the last line, all ranks
TRAIN_GRAD_NORM = "train/grad_norm"  # global gradient norm before clipping, of the last step
TRAIN_LR_MULT = "train/lr_mult"  # the schedule's multiplier on every group's peak lr
TRAIN_TOKENS = "train/tokens"  # tokens consumed so far, all ranks
TRAIN_SKIPPED_STEPS = "train/skipped_steps"  # non-finite steps skipped so far (nonfinite=skip)
TRAIN_LR_PREFIX = "train/lr_"  # + an optimizer's name ("muon", "adamw"): its first group's lr

# throughput and memory
PERF_TOKENS_PER_S = "perf/tokens_per_s"
PERF_STEP_TIME_S = "perf/step_time_s"
PERF_PEAK_MEMORY_BYTES = "perf/peak_memory_bytes"  # this rank's peak: CUDA allocator, else max RSS
PERF_MFU = "perf/mfu"  # CUDA only: model FLOPs per second over the devices' dense bf16 peak

# validation
VAL_LOSS = "val/loss"
VAL_PPL = "val/ppl"
VAL_FINAL_LOSS = "val/final_loss"  # the validation at the end of the run (full split by default)

# optimizer state, logged once after the first step (bytes of the tensors the optimizer holds)
STATE_BYTES_TOTAL = "optim/state_bytes_total"  # summed over every rank
STATE_BYTES_RANK = "optim/state_bytes_rank"  # this (the logging) rank's share
STATE_BYTES_RANK_MAX = "optim/state_bytes_rank_max"  # the largest rank's share
STATE_BYTES_PREFIX = "optim/state_bytes_"  # + an optimizer's name ("muon", "adamw"): all ranks
MUON_BYTES_PER_PARAM = "optim/muon_bytes_per_param"
# parameters and gradients, logged with the state bytes: what the largest rank holds (its shards under fsdp)
PARAM_BYTES_RANK_MAX = "memory/param_bytes_rank_max"
GRAD_BYTES_RANK_MAX = "memory/grad_bytes_rank_max"
MUON_RATIO_VS_FP32 = "optim/muon_ratio_vs_fp32"  # 4 bytes / MUON_BYTES_PER_PARAM
# fp32 Muon + fp32 AdamW's state on this model / STATE_BYTES_TOTAL (muonq.optim.state_bytes.state_ratio_vs_fp32)
STATE_RATIO_VS_FP32 = "optim/state_ratio_vs_fp32"


def train_lr(optimizer: str) -> str:
    return TRAIN_LR_PREFIX + optimizer


def state_bytes_of(optimizer: str) -> str:
    return STATE_BYTES_PREFIX + optimizer


def format_ratio(ratio: float | None) -> str:
    """A state ratio (reference bytes / these bytes): ``3.43x smaller``, ``1.82x larger`` below 1,
    an em dash when unknown (None or NaN)."""
    if ratio is None or ratio != ratio:
        return "—"
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``1.50 KiB``; whole bytes below 1 KiB; ``None`` -> an em dash."""
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
