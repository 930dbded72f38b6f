"""Several torch optimizers stepped, scheduled and checkpointed as one."""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist


class OptimizerSet:
    """Muon for the hidden matrices and AdamW for the rest, behind one step / state_dict.

    Every param group carries ``base_lr`` (its peak learning rate) so a schedule can scale all groups
    by one multiplier with :meth:`set_lr_multiplier`.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("OptimizerSet needs at least one optimizer")
        self.optimizers = optimizers
        for opt in optimizers.values():
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])

    def __iter__(self) -> Iterator[tuple[str, torch.optim.Optimizer]]:
        return iter(self.optimizers.items())

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def set_lr_multiplier(self, multiplier: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * multiplier

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(
                f"optimizer state holds {sorted(state)} but this run builds {sorted(self.optimizers)}: "
                "the checkpoint comes from a different optimizer"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


class WrapsOptimizerSet:
    """What a distributed optimizer (ZeRO-1, FSDP's owners) shows of the :class:`OptimizerSet` it
    steps, ``self.inner``: the trainer schedules and logs it like a plain one."""

    inner: OptimizerSet
    world_size: int
    _device: torch.device

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.inner.optimizers

    def __iter__(self) -> Iterator[tuple[str, torch.optim.Optimizer]]:
        return iter(self.inner)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def set_lr_multiplier(self, multiplier: float) -> None:
        self.inner.set_lr_multiplier(multiplier)

    def state_report(self) -> dict[str, Any]:
        """Optimizer-state bytes of every rank (one all-gather of a few numbers over ``world_size``
        ranks, on ``_device``).

        ``per_rank``: total bytes per rank; ``total``: their sum; ``per_optimizer`` and ``numel``
        (elements of the parameters with state) per inner optimizer, summed over ranks.
        """
        from muonq.optim.state_bytes import state_bytes

        names = [name for name, _ in self.inner]
        local = {name: state_bytes(opt) for name, opt in self.inner}
        row = [float(sum(c["total"] for c in local.values()))]
        row += [float(local[n]["total"]) for n in names] + [float(local[n]["numel"]) for n in names]
        rows = [row]
        if self.world_size > 1:
            mine = torch.tensor(row, dtype=torch.float64, device=self._device)
            gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(gathered, mine)
            rows = [t.tolist() for t in gathered]
        k = len(names)
        return {
            "per_rank": [int(r[0]) for r in rows],
            "total": int(sum(r[0] for r in rows)),
            "per_optimizer": {n: int(sum(r[1 + i] for r in rows)) for i, n in enumerate(names)},
            "numel": {n: int(sum(r[1 + k + i] for r in rows)) for i, n in enumerate(names)},
        }
