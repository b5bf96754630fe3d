"""FZOO: batched one-sided zeroth-order estimates with a step normalised by the spread of the losses.

Paper: Dang, Guo, Zhao, Ye, Zheng, Dai, Tsang, "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language
Models towards Adam-Scale Speed", arXiv 2506.09034 (2025), from the HiZOO group. Its code was not read here; the update
is the paper's formula as restated in its public summaries. One step, u_i Rademacher (+-1) directions drawn from the
step seed, N = ``directions``, wd = ``weight_decay``::

    l0 = L(theta),  l_i = L(theta + eps u_i)                         i = 1..N   (N + 1 forward passes)
    g = 1 / (eps N) sum_i (l_i - l0) u_i                                       (one-sided estimates, batched)
    sigma^2 = 1 / (N - 1) sum_i (l_i - mean_j l_j)^2                           (spread of the perturbed losses)
    theta <- theta - lr (g / sigma + wd theta)

sigma is about eps |grad| (l_i - l0 is about eps u_i . grad), so g / sigma is about a unit-scale direction: the paper
calls it a zeroth-order normalised SGD, whose step size adapts like Adam's without any state. Deviations, all ours:
weight decay is decoupled (as HiZOO and AdamW); a step whose losses are not finite, or whose N losses are all equal
(sigma = 0, no direction to normalise) restores theta and skips the update; N >= 2 (sigma needs two losses); the
default N = 8 is our choice (the paper studies several).

Perturbation and restoration share HiZOO's in-place machinery (zo_sweep.py): no copy of theta, each u_i regenerated
from (step seed, direction, tensor, chunk) whenever it is needed, restored within one ulp (hizoo.py's docstring). A
step makes N + 1 sweeps: perturb u_1; for i > 1 restore u_(i-1) and perturb u_i in one pass; restore u_N and apply
the update, which regenerates every u_i per chunk and sums them in an fp32 slot. Each sweep is deterministic, so the
step log replays a run bit for bit and a resumed run continues it bit-identically.
"""

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from edgetune.errors import EdgetuneError
from edgetune.optim import zo_sweep
from edgetune.optim.perturbation import PERTURBATIONS, Perturbation, default_kind
from edgetune.optim.zo_sweep import Chunk, Slot, Sweeper, evaluate, mix

__all__ = ["FZOO", "FZOOStepRecord", "buffer_bytes"]


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    zo_sweep.check(ok, "FZOO", name, value, rule)


@dataclass(frozen=True)
class FZOOStepRecord:
    """What one step did; with the state before it, enough to replay the step without a forward pass.

    Args:
        step: the step index (0-based).
        seed: the step seed the directions were drawn from.
        losses: (l0, l_1, ..., l_N), or fewer when a non-finite loss stopped the step.
        coefficients: (l_i - l0) / (eps N sigma) per direction; empty when skipped.
        lrs: the learning rate of each parameter group.
        perturbed: how many directions were applied (0 when l0 was not finite).
        skipped: the update was not applied.
    """

    step: int
    seed: int
    losses: tuple[float, ...]
    coefficients: tuple[float, ...]
    lrs: tuple[float, ...]
    perturbed: int
    skipped: bool

    def __post_init__(self) -> None:
        if self.step < 0 or self.seed < 0 or not all(math.isfinite(c) for c in self.coefficients):
            raise ValueError(f"invalid {self}; step and seed must be >= 0 and coefficients finite")


def buffer_bytes(largest_numel: int, chunk_numel: int, workers: int = 1) -> int:
    """Work buffers per device: z, the summed update, a rounding slot and a mask, 13 bytes per chunk element.

    Args:
        largest_numel: elements of the largest trainable tensor on the device.
        chunk_numel: the optimizer's ``chunk_numel``.
        workers: the optimizer's ``workers``.

    Returns:
        Bytes of the buffers.
    """
    return zo_sweep.buffer_bytes(largest_numel, True, chunk_numel, workers)


class FZOO(torch.optim.Optimizer):
    """FZOO: N + 1 forwards a step, no persistent state besides the step counter and seed.

    Args:
        params: parameters or groups; only those with ``requires_grad`` are perturbed and updated.
        lr: learning rate (per group).
        eps: perturbation scale.
        directions: N, the perturbed losses per step (>= 2).
        weight_decay: decoupled weight decay (per group).
        seed: base seed; step t draws its directions from seeds hashed from (seed, t, i).
        perturbation: distribution of u ("rademacher" as the paper; "gaussian" or "sparse" also work). None picks
            the cheapest for the parameters' device (``perturbation.default_kind``): Rademacher on CPU, Gaussian off.
        chunk_numel: elements per chunk (``zo_sweep``); keep it to resume.
        log_size: how many recent ``FZOOStepRecord`` ``self.log`` keeps.
        workers: threads that draw and apply chunks; results do not depend on it.

    Raises:
        ValueError: a hyperparameter is out of range, or a trainable parameter is not fp32/bf16/fp16 or not contiguous.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        directions: int = 8,
        weight_decay: float = 0.0,
        seed: int = 0,
        perturbation: Perturbation | None = None,
        chunk_numel: int | None = None,
        log_size: int = 1000,
        workers: int | None = None,
    ) -> None:
        zo_sweep.check_common("FZOO", eps, seed, chunk_numel, log_size, workers)
        _check(isinstance(directions, int) and directions >= 2, "directions", directions, "use an int >= 2, e.g. 8")
        _check(perturbation in (None, *PERTURBATIONS), "perturbation", perturbation, f"use one of {PERTURBATIONS}")
        self.log: deque[FZOOStepRecord] = deque(maxlen=log_size)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        perturbation = perturbation or default_kind(zo_sweep.on_cpu(self.param_groups), needs_curvature=False)
        self.eps, self.directions, self.perturbation = eps, directions, perturbation
        self.chunk_numel, self.workers = zo_sweep.defaults(self.param_groups, chunk_numel, workers)
        self._sweeper = Sweeper(perturbation, True, self.chunk_numel, self.workers)
        self.state.update(step=0, skipped_steps=0, base_seed=seed, chunk_numel=self.chunk_numel)
        self.state.update(directions=directions, perturbation=perturbation)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group's hyperparameters and trainable parameters, then add it as torch does."""
        params = zo_sweep.checked_group("FZOO", {**self.defaults, **param_group})
        super().add_param_group({**param_group, "params": params})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step: l0, then N perturbed losses (each perturbation restored), then the update.

        Args:
            closure: runs the forward pass and returns the scalar loss; called under ``torch.no_grad``, and must be
                deterministic (eval mode).

        Returns:
            The closure's value at theta (l0).

        Raises:
            EdgetuneError: no closure, or it returned something other than a scalar loss without autograd history.
        """
        if closure is None:
            raise EdgetuneError("FZOO.step() got no closure", "call opt.step(lambda: model(**batch).loss)")
        step, lrs = self.state["step"], tuple(g["lr"] for g in self.param_groups)
        seed = mix(self.state["base_seed"], step)
        value, loss0 = evaluate(closure, "FZOO")
        losses, applied = [loss0], 0
        if not math.isfinite(loss0):
            return self._finish(FZOOStepRecord(step, seed, (loss0,), (), lrs, 0, True), value)
        try:
            for i in range(self.directions):
                self._sweep(seed, recover=i - 1 if i else None, perturb=i)
                applied = i + 1
                losses.append(evaluate(closure, "FZOO")[1])
                if not math.isfinite(losses[-1]):
                    break
        except BaseException:
            if applied:
                self._sweep(seed, recover=applied - 1, perturb=None)
            raise
        record = self._record(step, seed, tuple(losses), lrs, applied)
        self._sweep(seed, recover=applied - 1, perturb=None, update=record)
        return self._finish(record, value)

    @torch.no_grad()
    def replay(self, records: Iterable[FZOOStepRecord]) -> None:
        """Re-apply logged steps without forward passes; from the same starting state the result is bit-identical.

        Raises:
            EdgetuneError: a record's step is not the optimizer's current step.
        """
        for record in records:
            if record.step != self.state["step"]:
                problem = f"record for step {record.step} but the optimizer is at step {self.state['step']}"
                raise EdgetuneError(problem, "replay consecutive records onto the state saved before the first")
            for i in range(record.perturbed):
                self._sweep(record.seed, recover=i - 1 if i else None, perturb=i)
            if record.perturbed:
                self._sweep(record.seed, recover=record.perturbed - 1, perturb=None, update=record)
            self._finish(record, None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``, refusing one whose directions would be drawn differently.

        Raises:
            EdgetuneError: saved with another ``chunk_numel``, ``directions`` or ``perturbation``.
        """
        saved = state_dict["state"]
        zo_sweep.check_resumable(self, saved, ("chunk_numel", "directions", "perturbation"))
        super().load_state_dict(state_dict)

    def work_buffers(self) -> list[torch.Tensor]:
        """The reusable perturbation buffers (scratch, never saved)."""
        return self._sweeper.work_buffers()

    def close(self) -> None:
        """End the worker threads; a later step starts them again."""
        self._sweeper.close()

    def _record(
        self, step: int, seed: int, losses: tuple[float, ...], lrs: tuple[float, ...], applied: int
    ) -> FZOOStepRecord:
        perturbed = losses[1:]
        finite = applied == self.directions and all(math.isfinite(x) for x in perturbed)
        sigma = _sample_std(perturbed) if finite else math.nan
        if not (math.isfinite(sigma) and sigma > 0):
            return FZOOStepRecord(step, seed, losses, (), lrs, applied, True)
        scale = self.eps * self.directions * sigma
        coefficients = tuple((loss - losses[0]) / scale for loss in perturbed)
        if not all(math.isfinite(c) for c in coefficients):
            return FZOOStepRecord(step, seed, losses, (), lrs, applied, True)
        return FZOOStepRecord(step, seed, losses, coefficients, lrs, applied, False)

    def _finish(self, record: FZOOStepRecord, value: Any) -> Any:
        zo_sweep.finish_step(self, record, "non-finite or identical losses")
        return value

    def _sweep(self, seed: int, recover: int | None, perturb: int | None, update: FZOOStepRecord | None = None) -> None:
        tensors, index = [], -1
        for group_index, group in enumerate(self.param_groups):
            payload = None if update is None or update.skipped else (update, update.lrs[group_index], group)
            for p in group["params"]:
                index += 1
                if p.requires_grad and p.numel():
                    tensors.append((index, p, None, payload))
        if recover is None:
            self._sweeper.zero_chunks.clear()  # refilled from theta itself by the step's first sweep
        jobs = self._sweeper.chunks(tensors)
        self._sweeper.run(jobs, lambda job, slot: self._chunk(job, slot, seed, recover, perturb))

    def _chunk(self, job: Chunk, slot: Slot, seed: int, recover: int | None, perturb: int | None) -> None:
        p, n, sweeper = job.flat, job.flat.numel(), self._sweeper
        if recover is not None:
            u = sweeper.draw(slot, mix(seed, recover, *job.key), n)
            sweeper.round_trip(job, slot, u, self.eps, 0.0)
        if perturb is not None:
            sweeper.round_trip(job, slot, sweeper.draw(slot, mix(seed, perturb, *job.key), n), 0.0, self.eps)
        if job.payload is None:
            return
        record, lr, group = job.payload
        total = slot.scaled[:n].zero_()
        for i, coefficient in enumerate(record.coefficients):
            total.add_(sweeper.draw(slot, mix(seed, i, *job.key), n), alpha=coefficient)
        if lr * group["weight_decay"] != 0:
            p.mul_(1.0 - lr * group["weight_decay"])
        if lr != 0:
            p.add_(total, alpha=-lr)


def _sample_std(values: tuple[float, ...]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
