"""Quantized momentum stores: the momentum of one matrix kept as codec encodings in ``state``.

State keys are ``<part>.<field>``: ``momentum.codes`` / ``momentum.scale`` for a
:class:`QuantizedStore`; ``P.*``, ``R.*``, ``E.*`` for a :class:`DecomposedStore`.

A store is bound to one parameter shape (decoding 4-bit codes needs it and the stored tensors must
hold only momentum bytes), so a selector builds one store per parameter.

torch's ``Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype, which
would turn uint8 codes and fp16 scales into fp32. :func:`preserve_state_dtypes` undoes that
exactly; an optimizer that holds these stores must install it (the stores refuse cast state).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from muonq.optim.codecs import Codec
from muonq.optim.codecs.base import Encoded
from muonq.optim.kernels import KernelChoice, KernelMode, choose_kernels
from muonq.optim.momentum import MomentumStore, StateDict, accumulate_into, renormalize_
from muonq.optim.precision import fast_matmul_dtype
from muonq.optim.subspace import add_low_rank, initial_basis, power_iteration_step, shape_seed


def _write(state: StateDict, part: str, encoded: Encoded) -> None:
    for field, tensor in encoded.items():
        key = f"{part}.{field}"
        if key in state:
            state[key].copy_(tensor)
        else:
            state[key] = tensor


def _read(state: StateDict, part: str, codec: Codec) -> Encoded:
    encoded = {}
    for field, dtype in codec.dtypes().items():
        tensor = state[f"{part}.{field}"]
        if tensor.dtype != dtype:
            raise ValueError(
                f"state '{part}.{field}' is {tensor.dtype}, expected {dtype}: it was cast by "
                "Optimizer.load_state_dict; call muonq.optim.stores.preserve_state_dtypes(optimizer) "
                "before loading"
            )
        encoded[field] = tensor
    return encoded


class Scratch:
    """Reusable CPU matrices for the temporaries of the stores' PyTorch update that never leave it
    (the decoded momentum when NS gets a separate copy of it, B - P R^T): one fp32 buffer per role
    and element count, shared by the stores of one optimizer and kept between steps. Without it,
    each is a fresh matrix-sized allocation per matrix and step, whose pages the CPU faults in
    again every time. Off the CPU (where allocators cache) it hands out nothing."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, role: str, like: torch.Tensor) -> torch.Tensor | None:
        """An fp32 buffer of ``like``'s shape for ``role`` (its contents are garbage), or None
        when ``like`` is not on the CPU."""
        if like.device.type != "cpu":
            return None
        buffer = self._buffers.get((role, like.numel()))
        if buffer is None:
            buffer = self._buffers[(role, like.numel())] = torch.empty(like.numel(), dtype=torch.float32)
        return buffer.view(like.shape)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())


class _ShapeBound(MomentumStore):
    """A store for one parameter shape whose update runs on fused kernels when ``self.kernels``
    applies (subclasses set it and implement :meth:`_fused`), else on the PyTorch reference
    (subclasses implement :meth:`_load` and :meth:`_save`)."""

    kernels: KernelChoice

    def __init__(self, shape: Sequence[int], generator: torch.Generator | None, scratch: Scratch | None) -> None:
        self.shape = torch.Size(shape)
        self.generator = generator
        self.scratch = scratch if scratch is not None else Scratch()

    def load(self, state: StateDict, *, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._load(state, matmul_dtype=matmul_dtype)[0]

    def save(self, state: StateDict, momentum: torch.Tensor, *, matmul_dtype: torch.dtype | None = None) -> None:
        self._save(state, momentum, matmul_dtype=matmul_dtype)

    def _load(self, state: StateDict, out: torch.Tensor | None = None,
              matmul_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, object]:
        """The stored momentum (fp32; in ``out`` when given) and what :meth:`_save` may reuse.
        ``matmul_dtype``: as in :meth:`save`."""
        raise NotImplementedError

    def _load_accumulated(self, state: StateDict, grad: torch.Tensor, *, beta: float, ema: bool,
                          out: torch.Tensor | None, matmul_dtype: torch.dtype | None,
                          grad_divisor: torch.Tensor | None = None) -> tuple[torch.Tensor, object]:
        """:meth:`_load`, then the momentum update (``accumulate_into``, of grad / ``grad_divisor``
        when given) in place; a store may fold the update into its load."""
        momentum, loaded = self._load(state, out=out, matmul_dtype=matmul_dtype)
        return accumulate_into(momentum, grad, beta, ema, divisor=grad_divisor), loaded

    def _save(self, state: StateDict, momentum: torch.Tensor, *, matmul_dtype: torch.dtype | None = None,
              loaded: object = None, cast: torch.Tensor | None = None) -> None:
        """:meth:`save`; ``loaded``: what :meth:`_load` returned besides B, ``cast``: B in
        ``matmul_dtype`` if the caller has it."""
        raise NotImplementedError

    def accumulate(self, state, grad, *, beta, ema, renormalize, eps=1e-12, matmul_dtype=None):
        if not self.kernels.applies(grad):
            return super().accumulate(state, grad, beta=beta, ema=ema, renormalize=renormalize, eps=eps,
                                      matmul_dtype=matmul_dtype)
        return self._fused(state, grad, beta=beta, ema=ema, renormalize=renormalize, eps=eps,
                           matmul_dtype=matmul_dtype)

    def ns_input(self, state, grad, *, beta, ema, renormalize, nesterov, dtype, eps=1e-12, matmul_dtype=None,
                 grad_divisor=None):
        if grad_divisor is not None and (nesterov or self.kernels.applies(grad)):
            # NS's input needs the divided gradient itself, or the fused kernels take it divided
            divided = self.scratch.get("grad", grad)
            grad, grad_divisor = torch.div(grad, grad_divisor, **({} if divided is None else {"out": divided})), None
        if self.kernels.applies(grad):
            return self._fused(state, grad, beta=beta, ema=ema, renormalize=renormalize, eps=eps, nesterov=nesterov,
                               dtype=dtype, matmul_dtype=matmul_dtype)
        # The reference: MomentumStore.ns_input's arithmetic. Unless NS's input is B itself (fp32,
        # no Nesterov), B stays inside this call, so it is decoded into a scratch buffer; and the
        # one cast of B serves NS and the power iteration.
        matmul_dtype = matmul_dtype or fast_matmul_dtype(grad.device)
        is_b = not nesterov and dtype == torch.float32
        momentum, loaded = self._load_accumulated(state, grad, beta=beta, ema=ema, matmul_dtype=matmul_dtype,
                                                  out=None if is_b else self.scratch.get("momentum", grad),
                                                  grad_divisor=grad_divisor)
        if renormalize:
            renormalize_(momentum, eps)
        update = None if nesterov else momentum.to(dtype)
        self._save(state, momentum, matmul_dtype=matmul_dtype, loaded=loaded,
                   cast=update if update is not None and dtype == matmul_dtype else None)
        if nesterov:
            update = (grad.lerp(momentum, beta) if ema else grad.add(momentum, alpha=beta)).to(dtype)
        return update

    def _fused(self, state: StateDict, grad: torch.Tensor, **kwargs) -> torch.Tensor:
        """The fused update (kwargs of :meth:`ns_input`); returns NS's input."""
        raise NotImplementedError

    def _check_param(self, param: torch.Tensor) -> None:
        if param.shape != self.shape:
            raise ValueError(f"{type(self).__name__} built for shape {tuple(self.shape)} got a parameter of shape {tuple(param.shape)}")


class QuantizedStore(_ShapeBound):
    """The momentum encoded whole with one codec (muon8bit, muon8, muon4).

    ``kernels`` picks fused Triton kernels or the codec's PyTorch code (see muonq.optim.kernels).
    """

    def __init__(
        self,
        codec: Codec,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        kernels: KernelMode = "auto",
        scratch: Scratch | None = None,
    ) -> None:
        super().__init__(shape, generator, scratch)
        self.codec = codec
        self.name = f"quantized[{codec!r}]"
        self.kernels = choose_kernels(kernels, [codec])

    def init(self, state: StateDict, param: torch.Tensor) -> None:
        self._check_param(param)
        _write(state, "momentum", self.codec.zeros(self.shape, param.device))

    def _load(self, state: StateDict, out: torch.Tensor | None = None,
              matmul_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, object]:
        return self.codec.decode(_read(state, "momentum", self.codec), self.shape, out=out), None

    def _save(self, state, momentum, *, matmul_dtype=None, loaded=None, cast=None) -> None:
        _write(state, "momentum", self.codec.encode(momentum, generator=self.generator))

    def _fused(self, state: StateDict, grad: torch.Tensor, *, matmul_dtype=None, **kwargs) -> torch.Tensor:
        from muonq.optim.kernels.fused import quantized_update

        return quantized_update(self.codec, _read(state, "momentum", self.codec), grad, **kwargs)


class DecomposedStore(_ShapeBound):
    """B ~ P R^T + E: a rank-k part tracked by warm-started power iteration, plus a residual.

    k = min(m, n) // rank_divisor. Each save runs one power-iteration step from the stored R
    (R starts as a Gaussian with unit-norm columns, seeded by the shape), then stores P (m x k),
    R (n x k) with ``factor_codec`` and E = B - P R^T (m x n) with ``residual_codec``. Quantization
    error in the factors then mostly perturbs singular values instead of rotating the dominant
    directions.

    The products P R^T (in the load and in the residual) run in the matmul dtype, like the power
    iteration (see :func:`~muonq.optim.subspace.add_low_rank`): in bf16 they cost the CPU a
    fraction of the fp32 product, and the factors' rounding to bf16 (2^-9) is far below the 4-bit
    error they are stored with. The fused CUDA kernels keep them in fp32.

    With ``factor_error_share`` s > 0 the residual also stores that share of the factors' rounding
    error: E = B - P R^T - s (P' R'^T - P R^T), P' and R' the decoded factors, so the stored
    momentum misses B by (1 - s) of that error (plus E's own rounding). That error barely shows in
    one save, but it is nearly the same at every step, so it builds up along the momentum's
    recursion; the residual's wider range is the price. (No fused kernel: the codecs run it.)
    """

    folds_grad_division = True  # into the load's pass over the gradient (the C loops') where it can

    def __init__(
        self,
        shape: Sequence[int],
        *,
        rank_divisor: int,
        factor_codec: Codec,
        residual_codec: Codec,
        factor_error_share: float = 0.0,
        seed: int = 0,
        generator: torch.Generator | None = None,
        kernels: KernelMode = "auto",
        scratch: Scratch | None = None,
    ) -> None:
        super().__init__(shape, generator, scratch)
        if len(self.shape) != 2:
            raise ValueError(f"the decomposition needs a matrix, got shape {tuple(self.shape)}")
        if rank_divisor < 1:
            raise ValueError(f"rank_divisor must be >= 1, got {rank_divisor}")
        rows, cols = self.shape
        self.rank = min(rows, cols) // rank_divisor
        if self.rank < 1:
            raise ValueError(f"rank divisor {rank_divisor} leaves no rank for a {rows} x {cols} matrix")
        if not 0.0 <= factor_error_share <= 1.0:
            raise ValueError(f"factor_error_share must be in [0, 1], got {factor_error_share}")
        self.factor_codec = factor_codec
        self.residual_codec = residual_codec
        self.factor_error_share = factor_error_share
        self.seed = shape_seed(self.shape, self.rank, seed)
        share = f", factor_error_share={factor_error_share}" if factor_error_share else ""
        self.name = f"decomposed[k={self.rank}, factors={factor_codec!r}, residual={residual_codec!r}{share}]"
        self.kernels = choose_kernels(kernels, [factor_codec, residual_codec],
                                      "factor_error_share > 0" if factor_error_share else None)

    @property
    def factor_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        rows, cols = self.shape
        return (rows, self.rank), (cols, self.rank)

    @property
    def _native_loops(self) -> bool:
        """Whether the low-rank products may take the C loops (off with ``kernels=reference``)."""
        return self.kernels.mode != "reference"

    def init(self, state: StateDict, param: torch.Tensor) -> None:
        self._check_param(param)
        p_shape, _ = self.factor_shapes
        # Encoded on the CPU with its own generator: identical on every rank and device, even with
        # stochastic rounding, and the global RNG is left alone.
        basis = initial_basis(self.shape[1], self.rank, seed=self.seed)
        encoded = self.factor_codec.encode(basis, generator=torch.Generator().manual_seed(self.seed))
        _write(state, "P", self.factor_codec.zeros(p_shape, param.device))
        _write(state, "R", {field: tensor.to(param.device) for field, tensor in encoded.items()})
        _write(state, "E", self.residual_codec.zeros(self.shape, param.device))

    def _factor(self, state: StateDict, part: str) -> torch.Tensor:
        p_shape, r_shape = self.factor_shapes
        return self.factor_codec.decode(_read(state, part, self.factor_codec), p_shape if part == "P" else r_shape)

    def _load(self, state: StateDict, out: torch.Tensor | None = None,
              matmul_dtype: torch.dtype | None = None, update: tuple[float, torch.Tensor] | None = None,
              grad_divisor: torch.Tensor | None = None) -> tuple[torch.Tensor, object]:
        r = self._factor(state, "R")
        residual = self.residual_codec.decode(_read(state, "E", self.residual_codec), self.shape, out=out)
        dtype = matmul_dtype or fast_matmul_dtype(residual.device)
        return add_low_rank(residual, self._factor(state, "P"), r, alpha=1.0, dtype=dtype, out=residual,
                            native_loops=self._native_loops, update=update, grad_divisor=grad_divisor), r

    def _load_accumulated(self, state, grad, *, beta, ema, out, matmul_dtype, grad_divisor=None):
        if ema:
            return super()._load_accumulated(state, grad, beta=beta, ema=ema, out=out, matmul_dtype=matmul_dtype,
                                             grad_divisor=grad_divisor)
        return self._load(state, out=out, matmul_dtype=matmul_dtype, update=(beta, grad), grad_divisor=grad_divisor)

    def _save(self, state, momentum, *, matmul_dtype=None, loaded=None, cast=None) -> None:
        momentum = momentum.float()
        basis = loaded if loaded is not None else self._factor(state, "R")
        p, r = power_iteration_step(momentum, basis, matmul_dtype=matmul_dtype, cast=cast)
        encoded_p = self.factor_codec.encode(p, generator=self.generator)
        encoded_r = self.factor_codec.encode(r, generator=self.generator)
        low_p, low_r = p, r
        if self.factor_error_share:  # P R^T + s (P' R'^T - P R^T) = [P, P'] [(1 - s) R, s R']^T
            p_shape, r_shape = self.factor_shapes
            share = self.factor_error_share
            low_p = torch.cat([p, self.factor_codec.decode(encoded_p, p_shape)], dim=1)
            low_r = torch.cat([r * (1.0 - share), self.factor_codec.decode(encoded_r, r_shape).mul_(share)], dim=1)
        # B - P R^T, into a scratch buffer
        residual = add_low_rank(momentum, low_p, low_r, alpha=-1.0,
                                dtype=matmul_dtype or fast_matmul_dtype(momentum.device),
                                out=self.scratch.get("residual", momentum), native_loops=self._native_loops)
        _write(state, "P", encoded_p)
        _write(state, "R", encoded_r)
        _write(state, "E", self.residual_codec.encode(residual, generator=self.generator))

    def _fused(self, state: StateDict, grad: torch.Tensor, **kwargs) -> torch.Tensor:
        from muonq.optim.kernels.fused import decomposed_update

        codecs = {"P": self.factor_codec, "R": self.factor_codec, "E": self.residual_codec}
        parts = {part: _read(state, part, codec) for part, codec in codecs.items()}
        return decomposed_update(self.factor_codec, self.residual_codec, parts, grad, self.rank, **kwargs)


def preserve_state_dtypes(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` keep every state tensor's saved dtype.

    torch casts each loaded state tensor (except ``step``) to its parameter's dtype. The hooks put
    back a copy of the saved tensor itself, so codes, fp16 scales and anything else come back
    bit-exact (also for bf16 parameters, where the cast would lose precision).
    """
    saved: dict[str, object] = {}

    def remember(opt: torch.optim.Optimizer, state_dict: dict) -> None:
        saved["state"], saved["groups"] = state_dict["state"], state_dict["param_groups"]

    def restore(opt: torch.optim.Optimizer) -> None:
        params = {
            pid: p
            for saved_group, group in zip(saved["groups"], opt.param_groups)
            for pid, p in zip(saved_group["params"], group["params"])
        }
        for pid, values in saved["state"].items():
            param = params.get(pid)
            if param is None or param not in opt.state:
                continue
            state = opt.state[param]
            for key, value in values.items():
                current = state.get(key)
                if isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor) and current.dtype != value.dtype:
                    state[key] = value.to(device=current.device, copy=True)
        saved.clear()

    optimizer.register_load_state_dict_pre_hook(remember)
    optimizer.register_load_state_dict_post_hook(restore)
