"""The one Muon engine. Every variant (fp32, 8-bit, MuonQ, GRASP, MuonEq) is this optimizer with a
different :class:`~muonq.optim.momentum.MomentumStore` and optional transforms around Newton–Schulz."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Iterable, Literal

import torch

from muonq.optim.momentum import FullPrecisionStore, MomentumStore, StoreSelector
from muonq.optim.stores import Scratch, preserve_state_dtypes
from muonq.optim.newton_schulz import QUINTIC_COEFFS, zeropower_via_newtonschulz
from muonq.optim.precision import check_matmul_dtype, resolve_matmul_dtype

ScaleMode = Literal["match_rms_adamw", "original"]
MomentumForm = Literal["sum", "ema"]
# Maps (update U, step index) -> transformed U, applied right before Newton–Schulz (e.g. MuonEq).
PreNSTransform = Callable[[torch.Tensor, int], torch.Tensor]


def update_scale(shape: torch.Size, mode: ScaleMode) -> float:
    """Multiplier on the orthogonalised update of an m x n matrix.

    ``match_rms_adamw`` gives the update an RMS of about 0.2, AdamW's typical update RMS, so AdamW's
    learning rate and weight decay carry over; ``original`` is Keller Jordan's sqrt(max(1, m/n)).
    """
    rows, cols = shape[-2], shape[-1]
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if mode == "original":
        return math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"unknown scale_mode {mode!r}; expected 'match_rms_adamw' or 'original'")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices: momentum, Newton–Schulz, scaled update, decoupled weight decay.

    ``momentum_form='sum'`` keeps B <- mu B + G (the form MuonQ and the 8-bit paper use);
    ``'ema'`` keeps B <- mu B + (1 - mu) G, the form of ``torch.optim.Muon``. ``normalize`` is MuonQ's
    pre-quantization normalisation: G and the new B are scaled to unit Frobenius norm.
    ``matmul_dtype`` is the dtype of Newton–Schulz and of the store's matmuls (the decomposition's
    power iteration): ``auto`` (or None) picks bf16 where the machine runs it natively (CUDA, CPUs
    with AMX-BF16 or AVX512-BF16) and fp32 where bf16 is emulated (see :mod:`muonq.optim.precision`);
    ``bfloat16`` / ``float32`` (or the torch dtypes) force one. The store hands NS its input already
    in that dtype (fused kernels write it in the same pass as the momentum update).
    ``ns_batch_size`` > 1 stacks up to that many same-shape matrices of a group into one batched NS
    call (fewer, larger matmuls: it pays where small matrices leave a GPU idle); 1 runs NS per matrix.
    ``row_blocks`` maps a parameter that stacks k matrices along its rows (GPT's fused QKV weight:
    3) to k: each block is then its own matrix, with its own momentum state (keys ``block<i>.*``),
    normalisation, Newton–Schulz and update scale; every other parameter is one matrix.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = False,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = QUINTIC_COEFFS,
        matmul_dtype: str | torch.dtype | None = "auto",
        ns_batch_size: int = 1,
        eps: float = 1e-7,
        scale_mode: ScaleMode = "match_rms_adamw",
        momentum_form: MomentumForm = "sum",
        normalize: bool = False,
        store: MomentumStore | StoreSelector | None = None,
        pre_ns: PreNSTransform | None = None,
        row_blocks: Mapping[torch.Tensor, int] | None = None,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"Muon lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Muon weight_decay must be >= 0, got {weight_decay}")
        if ns_steps < 1:
            raise ValueError(f"Muon ns_steps must be >= 1, got {ns_steps}")
        if ns_batch_size < 1:
            raise ValueError(f"Muon ns_batch_size must be >= 1, got {ns_batch_size}")
        if momentum_form not in ("sum", "ema"):
            raise ValueError(f"Muon momentum_form must be 'sum' or 'ema', got {momentum_form!r}")
        update_scale(torch.Size((1, 1)), scale_mode)  # validates the name
        check_matmul_dtype(matmul_dtype)
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            eps=eps,
            scale_mode=scale_mode,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got one of shape {tuple(p.shape)}")
        self._row_blocks = {p: k for p, k in (row_blocks or {}).items() if k != 1}
        for p, k in self._row_blocks.items():
            if k < 1 or p.shape[0] % k:
                raise ValueError(f"a {tuple(p.shape)} parameter cannot be split into {k} row blocks")
        self.ns_coefficients = ns_coefficients
        self.matmul_dtype = matmul_dtype
        self.ns_batch_size = ns_batch_size
        self.momentum_form = momentum_form
        self.normalize = normalize
        self.pre_ns = pre_ns
        if store is None:
            store = FullPrecisionStore()
        self._select_store: StoreSelector = store if not isinstance(store, MomentumStore) else (lambda _p, s=store: s)
        self._stores: dict[torch.Tensor, MomentumStore] = {}
        self._scratch = Scratch()  # the normalized gradient's CPU buffer (the store consumes it)
        # torch casts loaded state to the parameter dtype; codes and fp16 scales must stay as saved.
        preserve_state_dtypes(self)
        self.register_load_state_dict_post_hook(_check_loaded_state)

    def row_blocks(self, param: torch.Tensor) -> int:
        """How many matrices ``param`` stacks along its rows (1: it is one matrix)."""
        return self._row_blocks.get(param, 1)

    def store_for(self, param: torch.Tensor) -> MomentumStore:
        """The momentum store that serves each of ``param``'s row blocks (chosen once, from the
        block's shape and size; a store is stateless, so the blocks of one parameter share it)."""
        store = self._stores.get(param)
        if store is None:
            store = self._stores[param] = self._select_store(self._blocks(param)[0])
        return store

    def _blocks(self, tensor: torch.Tensor, param: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``tensor`` (``param`` or a tensor of its shape) as its row blocks: views, in order."""
        k = self.row_blocks(tensor if param is None else param)
        return tensor.chunk(k) if k > 1 else (tensor,)

    def _prefixes(self, param: torch.Tensor) -> list[str]:
        """The state-key prefix of each row block: none for one matrix, ``block<i>.`` for k > 1."""
        k = self.row_blocks(param)
        return [f"block{i}." for i in range(k)] if k > 1 else [""]

    def block_states(self, param: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The momentum state of each row block of ``param``, keyed as its store names it (the
        tensors of ``self.state[param]``, not copies)."""
        state = self.state[param]
        return [{key[len(pre):]: value for key, value in state.items() if key.startswith(pre) and key != "step"}
                for pre in self._prefixes(param)]

    def _joined(self, param: torch.Tensor, blocks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The per-block states as the keys of ``self.state[param]``."""
        return {pre + key: value for pre, block in zip(self._prefixes(param), blocks) for key, value in block.items()}

    def expected_state(self, param: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every momentum-state tensor this optimizer makes for ``param``, from
        its store's init on the meta device (nothing is allocated; ``step`` not included)."""
        meta = torch.empty(tuple(param.shape), dtype=param.dtype, device="meta")
        blocks = [{} for _ in self._prefixes(param)]
        for state, block in zip(blocks, self._blocks(meta, param)):
            self.store_for(param).init(state, block)
        return {key: (tuple(t.shape), t.dtype) for key, t in self._joined(param, blocks).items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for batch in self._ns_batches(group):
                updates = [self._ns_input(p, group) for p in batch]
                if len(batch) == 1:
                    orthos = [self._orthogonalize(updates[0], group)]
                else:  # (batch, [blocks,] m, n) -> one batch of matrices for NS, and back
                    stacked = torch.stack(updates)
                    orthos = self._orthogonalize(stacked.flatten(0, -3), group).reshape(stacked.shape).unbind(0)
                del updates
                for p, ortho in zip(batch, orthos):
                    self._apply(p, ortho, group)
        return loss

    def _ns_batches(self, group: dict) -> list[list[torch.Tensor]]:
        """The group's parameters with a gradient, in order, as lists that share one NS call:
        singletons, or up to ``ns_batch_size`` parameters of the same shape, row blocks, dtype and
        device (a parameter of k row blocks is k matrices of one NS call already)."""
        params = [p for p in group["params"] if p.grad is not None]
        if self.ns_batch_size == 1:
            return [[p] for p in params]
        same: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            same.setdefault((p.shape, self.row_blocks(p), p.dtype, p.device), []).append(p)
        return [ps[i : i + self.ns_batch_size] for ps in same.values() for i in range(0, len(ps), self.ns_batch_size)]

    def resolved_matmul_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the matmuls of a step on ``device`` (``auto`` resolved, cached per process)."""
        return resolve_matmul_dtype(self.matmul_dtype, device)

    def _ns_input(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Update ``p``'s stored momentum and return Newton–Schulz's input for it: a matrix, or
        the stack of its row blocks' inputs (k x m/k x n)."""
        state = self.state[p]
        store = self.store_for(p)
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            blocks = [{} for _ in self._prefixes(p)]
            for block_state, block in zip(blocks, self._blocks(p)):
                store.init(block_state, block)
            state.update(self._joined(p, blocks))
        blocks = self.block_states(p)
        updates = [self._block_ns_input(s, store, g, group, state["step"])
                   for s, g in zip(blocks, self._blocks(p.grad.float(), p))]
        state.update(self._joined(p, blocks))  # a store may add keys, as init does
        return updates[0] if len(updates) == 1 else torch.stack(updates)

    def _block_ns_input(self, state: dict, store: MomentumStore, grad: torch.Tensor, group: dict,
                        step: torch.Tensor) -> torch.Tensor:
        """One matrix's momentum update through ``store`` and its Newton–Schulz input."""
        divisor = None
        if self.normalize:
            norm = torch.linalg.vector_norm(grad).clamp_min(group["eps"])
            if store.folds_grad_division:
                divisor = norm
            else:
                buffer = self._scratch.get("grad", grad)
                grad = grad / norm if buffer is None else torch.div(grad, norm, out=buffer)
        matmul_dtype = self.resolved_matmul_dtype(grad.device)
        update = store.ns_input(
            state, grad, beta=group["momentum"], ema=self.momentum_form == "ema", renormalize=self.normalize,
            nesterov=group["nesterov"], dtype=matmul_dtype if self.pre_ns is None else torch.float32,
            matmul_dtype=matmul_dtype, grad_divisor=divisor,
        )
        if self.pre_ns is not None:
            update = self.pre_ns(update, int(step.item())).to(matmul_dtype)
        return update

    def _orthogonalize(self, update: torch.Tensor, group: dict) -> torch.Tensor:
        return zeropower_via_newtonschulz(
            update, group["ns_steps"], coefficients=self.ns_coefficients, eps=group["eps"],
            dtype=self.resolved_matmul_dtype(update.device),
        )

    def _apply(self, p: torch.Tensor, ortho: torch.Tensor, group: dict) -> None:
        lr = group["lr"]
        if group["weight_decay"]:
            p.mul_(1.0 - lr * group["weight_decay"])
        # ortho: the matrix, or its k row blocks (k x m/k x n), each scaled for its own shape
        p.add_(ortho.reshape(p.shape).to(p.dtype), alpha=-lr * update_scale(ortho.shape, group["scale_mode"]))
        self.state[p]["step"] += 1


def _check_loaded_state(opt: Muon) -> None:
    """After ``load_state_dict``: every parameter's momentum state must be what this optimizer's
    stores make (same keys, shapes and dtypes), else the state comes from another configuration
    (another rank, codec, or QKV split) and would fail, or be misread, at the next step."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue
            got = {k: (tuple(v.shape), v.dtype) for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor)}
            want = opt.expected_state(p)
            if got != want:
                differences = {
                    "saved only": sorted(got.keys() - want.keys()),
                    "this run's only": sorted(want.keys() - got.keys()),
                    "of another shape or dtype": sorted(k for k in got.keys() & want.keys() if got[k] != want[k]),
                }
                detail = "; ".join(f"{label}: {', '.join(keys[:3])}" for label, keys in differences.items() if keys)
                raise ValueError(
                    f"the saved Muon state of a {tuple(p.shape)} matrix is not what this run's optimizer keeps "
                    f"({detail}): it was written with other optimizer_params.args (qbit, rank, block sizes, "
                    "split_qkv, ...)"
                )
