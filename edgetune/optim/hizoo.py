"""HiZOO: Hessian-informed zeroth-order (forward-only) fine-tuning; MeZO is its Hessian-off mode.

Paper: Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order Optimizer",
arXiv 2402.15173 (ICLR 2025); MeZO: Malladi et al., arXiv 2305.17333. Reference code: Yanjun-Zhao/HiZOO @ 4f99055
``trainer.py::zo_Hessian_step_update`` and princeton-nlp/MeZO @ 552cb1b ``large_models/trainer.py::zo_step``.

One step, with H the fp32 diagonal Hessian estimate (Sigma^-1, starts at 1), z drawn from the step seed with
independent coordinates, E z = 0, E z^2 = 1 and kappa = E z^4 (perturbation.py), alpha = ``hessian_smooth`` and
wd = ``weight_decay``::

    l0 = L(theta), l+ = L(theta + eps z / sqrt(H)), l- = L(theta - eps z / sqrt(H)),  c = (l+ + l- - 2 l0) / (2 eps^2)
    H <- (1 - alpha) H + alpha |c| H z^2                                   "released", the published code
    H <- (1 - alpha) H + alpha c H (z^2 - 1) 2 / (kappa - 1)               "unbiased", the paper's form, generalised
    theta <- theta - lr ((l+ - l-) / (2 eps) z / sqrt(H_new) + wd theta)

Why 2 / (kappa - 1). With u = z / sqrt(H) and A the true Hessian, l+ + l- - 2 l0 = eps^2 u^T A u + O(eps^4), so
c H_i (z_i^2 - 1) = (H_i / 2) sum_jk A_jk z_j z_k (z_i^2 - 1) / sqrt(H_j H_k). For independent symmetric z the
expectation keeps only j = k: j = k = i gives E[z^2 (z^2 - 1)] = kappa - 1, j = k != i gives E[z_j^2] E[z_i^2 - 1] = 0,
and j != k is odd in z. So E[c H_i (z_i^2 - 1)] = A_ii (kappa - 1) / 2: the Gaussian's kappa = 3 makes the paper's
increment unbiased as written, and any other distribution needs the factor 2 / (kappa - 1). Rademacher z has
kappa = 1: z^2 = 1 and the diagonal enters l+ + l- - 2 l0 only through the trace, the same for every coordinate, so
no estimator built from these losses can see it; HiZOO refuses it. The default "sparse" z in {-sqrt2, 0, 0, +sqrt2}
has kappa = 2, the factor is 2, and the increment's variance factor 1 / (kappa - 1) is 1 (Gaussian 1/2); it costs two
random bits per value instead of a Gaussian draw (tests/optim/test_hizoo.py checks the mean on a quadratic with
off-diagonal curvature). The released estimator is biased for any z (E|X| != |E X|); it is kept as published.

The paper also takes abs() per coordinate in the unbiased form; we leave it out because E|X| != E[X] (with d
coordinates it inflates H about d/2 times) and floor H at ``hessian_min`` instead. MeZO drops l0 and H: two forwards,
theta <- theta - lr ((l+ - l-)/(2 eps) z + wd theta), and draws Rademacher z by default (only E z^2 = 1 matters for
its gradient estimate, whose second moment (d - 1 + kappa) |g|^2 is smallest at kappa = 1).

Restoring theta. Without a copy of theta no in-place scheme can undo round(theta + d) for every float: it maps the
many floats near 0 onto the few near d (pigeonhole), and at a tie (theta + d halfway between two floats, rounded to
the even one) two neighbours map to one s. We keep no copy and restore with round(s - d): the same fp32 add (bf16 and
fp16 round its result twice, to fp32 then to the dtype) with the same d = eps z / sqrt(H). With ulp(x) the spacing of
the dtype's floats at |x| (the wider one at a power of two), exactly this holds:

- a round trip theta -> s = round(theta + d) -> r = round(s - d) ends within one ulp of the perturbed value:
  |r - theta| <= ulp(s). With one rounding this is a proof: theta is a candidate when s - d = theta + (s - theta - d)
  is rounded, so |r - theta| <= 2 |s - theta - d| <= ulp(s). The double rounding of bf16/fp16 is not covered by it;
  tests/optim/test_hizoo.py measures the bound reached (ties, binade crossings) and never exceeded there either;
- r = theta when theta + d stays in theta's binade and is no tie (in bf16/fp16: not rounded onto one in fp32);
  at a tie an odd theta comes back as its even neighbour, one ulp off;
- 0 comes back as +0 (-0 too), so zero-initialised weights (LoRA B, biases) stay bit-exact: 0 wins when it maps to s.
  That check costs two passes, so it runs only on chunks that held a zero at theta (read in the step's first sweep);
  elsewhere the rare tiny theta that also maps to s comes back as round(s - d), within the first bound;
- a step makes two round trips (to theta + d and back, then to theta - d and back from where the first ended), so a
  step that leaves theta alone (lr = 0, or skipped) returns within ulp(s+) + ulp(s-) of theta, s+- = round(theta +- d):
  up to two ulps, not one (bf16 and fp16 measure 1.23 ulp of max(|s+|, |s-|), about |theta| + |d|).

About 8% of N(0, 0.02) weights come back off per step at eps = 1e-3 (by the bounds above), against 46% for the
reference's +d, -2d, +d. Every sweep is deterministic, so the step log replays a run bit for bit.

Speed. Drawing Gaussian z dominated a full-parameter step on CPU (torch's normal_ runs on one thread per generator
and costs more than a forward for 135M values); the bit-built distributions cost about a sixteenth of it. The chunks
of a sweep are shared by ``workers`` threads, each with its own generator and work buffer (zo_sweep.py); z depends only
on (step seed, tensor index, chunk), so the result is bit-identical for any number of workers.
"""

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from edgetune.errors import EdgetuneError
from edgetune.optim import zo_sweep
from edgetune.optim.perturbation import FOURTH_MOMENT, PERTURBATIONS, Perturbation, default_kind
from edgetune.optim.zo_sweep import CPU_CHUNK_NUMEL, GPU_CHUNK_NUMEL, Chunk, Slot, Sweeper, evaluate, mix

__all__ = ["CPU_CHUNK_NUMEL", "GPU_CHUNK_NUMEL", "HiZOO", "MeZO", "ZOStepRecord", "buffer_bytes", "state_bytes"]


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    zo_sweep.check(ok, "HiZOO", name, value, rule)


@dataclass(frozen=True)
class ZOStepRecord:
    """What one step did; with the state before it, enough to replay the step without a forward pass.

    Args:
        step: the step index (0-based).
        seed: the step seed z was drawn from.
        projected_grad: (l+ - l-) / (2 eps); 0.0 when skipped.
        curvature: (l+ + l- - 2 l0) / (2 eps^2), signed; 0.0 for MeZO or when skipped.
        losses: (l0, l+, l-) with the Hessian, (l+, l-) without, (l0,) when l0 was non-finite.
        lrs: the learning rate of each parameter group.
        perturbed: False only when a non-finite l0 stopped the step before any perturbation.
        skipped: a loss was non-finite, so the parameters were only restored.
    """

    step: int
    seed: int
    projected_grad: float
    curvature: float
    losses: tuple[float, ...]
    lrs: tuple[float, ...]
    perturbed: bool
    skipped: bool

    def __post_init__(self) -> None:
        if self.step < 0 or self.seed < 0 or not math.isfinite(self.projected_grad + self.curvature):
            raise ValueError(f"invalid {self}; step and seed must be >= 0 and grad/curvature finite")


def state_bytes(num_params: int, hessian: bool) -> int:
    """Persistent state kept between steps: the fp32 Hessian diagonal, nothing for MeZO.

    Args:
        num_params: trainable parameter count.
        hessian: True for HiZOO, False for MeZO.

    Returns:
        Bytes of optimizer state.
    """
    return 4 * num_params if hessian else 0


def buffer_bytes(largest_numel: int, hessian: bool, chunk_numel: int, workers: int = 1) -> int:
    """The reusable work buffers per device, one per worker: z, z/sqrt(H) (HiZOO only), a rounding slot and a mask.

    Args:
        largest_numel: elements of the largest trainable tensor on the device.
        hessian: True for HiZOO, False for MeZO.
        chunk_numel: the optimizer's ``chunk_numel`` (``CPU_CHUNK_NUMEL`` or ``GPU_CHUNK_NUMEL`` by default).
        workers: the optimizer's ``workers``.

    Returns:
        Bytes of the buffers: per worker, 13 per chunk element with the Hessian, 9 without (``zo_sweep``).
    """
    return zo_sweep.buffer_bytes(largest_numel, hessian, chunk_numel, workers)


class HiZOO(torch.optim.Optimizer):
    """HiZOO (``hessian=True``, three forwards a step) or MeZO (``hessian=False``, two forwards a step).

    Args:
        params: parameters or groups; only those with ``requires_grad`` are perturbed and updated.
        lr: learning rate (per group).
        eps: perturbation scale.
        weight_decay: decoupled weight decay (per group), on every parameter of the group.
        hessian: keep the diagonal Hessian (HiZOO); False gives MeZO.
        hessian_smooth: EMA weight alpha of the Hessian update (per group).
        hessian_estimator: "released" (the published code) or "unbiased" (the paper's z^2 - 1 form, no abs).
        hessian_min: floor on H, so that 1 / sqrt(H) stays finite.
        perturbation: the distribution of z (perturbation.py): "gaussian" as released, "rademacher" (+-1, MeZO's
            default on CPU, about 16x cheaper to draw there) or "sparse" ({-sqrt2, 0, 0, sqrt2}, HiZOO's default on
            CPU: the cheapest draw whose fourth moment lets the diagonal Hessian be estimated). None picks the
            cheapest for the parameters' device (``perturbation.default_kind``: "gaussian" off the CPU). z depends on
            it, so keep it to resume.
        seed: base seed; step t draws z from a seed hashed from (seed, t).
        chunk_numel: elements per chunk; each work buffer holds one (``buffer_bytes``). Default: ``GPU_CHUNK_NUMEL``
            if any parameter is off the CPU, else ``CPU_CHUNK_NUMEL``. z depends on it, so keep it to resume.
        log_size: how many recent ``ZOStepRecord`` ``self.log`` keeps.
        workers: threads that draw and apply chunks concurrently, each with its own generator and work buffer.
            Default: ``min(torch.get_num_threads(), MAX_DEFAULT_WORKERS)`` on CPU, 1 otherwise. Results do not
            depend on it (every chunk has its own seed), so it may change between runs. With more than one, torch's
            intra-op thread count is 1 during each sweep (restored after it); ``close()`` ends the threads.

    Raises:
        ValueError: a hyperparameter is out of range, or a trainable parameter is not fp32/bf16/fp16 or not contiguous.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        hessian: bool = True,
        hessian_smooth: float = 1e-8,
        hessian_estimator: Literal["released", "unbiased"] = "released",
        hessian_min: float = 1e-4,
        seed: int = 0,
        chunk_numel: int | None = None,
        log_size: int = 1000,
        workers: int | None = None,
        perturbation: Perturbation | None = None,
    ) -> None:
        self.hessian, self._sweeper = hessian, None
        zo_sweep.check_common("HiZOO", eps, seed, chunk_numel, log_size, workers)
        estimators = ("released", "unbiased")
        _check(hessian_estimator in estimators, "hessian_estimator", hessian_estimator, f"use one of {estimators}")
        _check(math.isfinite(hessian_min) and hessian_min > 0, "hessian_min", hessian_min, "use a positive floor")
        self.eps, self.hessian_estimator = eps, hessian_estimator
        self.hessian_min = hessian_min
        self.log: deque[ZOStepRecord] = deque(maxlen=log_size)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, hessian_smooth=hessian_smooth))
        self.chunk_numel, self.workers = zo_sweep.defaults(self.param_groups, chunk_numel, workers)
        self.state.update(step=0, skipped_steps=0, base_seed=seed, chunk_numel=self.chunk_numel, hessian=hessian)
        self._use_perturbation(
            perturbation or default_kind(zo_sweep.on_cpu(self.param_groups), needs_curvature=hessian)
        )

    def _use_perturbation(self, perturbation: Perturbation) -> None:
        _check(perturbation in PERTURBATIONS, "perturbation", perturbation, f"use one of {PERTURBATIONS}")
        blind = self.hessian and FOURTH_MOMENT[perturbation] == 1.0
        _check(not blind, "perturbation", perturbation, "HiZOO needs E z^4 > 1 to see the diagonal: use sparse")
        self.perturbation = self.state["perturbation"] = perturbation
        # 2 / (kappa - 1) makes E[c H (z^2 - 1)] the Hessian diagonal for any z with E z^2 = 1 (module docstring).
        self._unbiased_scale = 2.0 / (FOURTH_MOMENT[perturbation] - 1.0) if self.hessian else 0.0
        if self._sweeper is not None:
            self._sweeper.close()
        self._sweeper = Sweeper(perturbation, self.hessian, self.chunk_numel, self.workers)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group's hyperparameters and trainable parameters, then add it as torch does.

        Args:
            param_group: the group, as for any torch optimizer.

        Raises:
            ValueError: as for the constructor; frozen parameters (e.g. quantized base weights) are not checked.
        """
        group = {**self.defaults, **param_group}
        params = zo_sweep.checked_group("HiZOO", group)
        alpha = group["hessian_smooth"]
        _check(0 <= alpha <= 1, "hessian_smooth", alpha, "use an EMA weight in [0, 1] such as 1e-8")
        super().add_param_group({**param_group, "params": params})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step: evaluate, perturb in place, evaluate, restore and update in place.

        Args:
            closure: runs the forward pass and returns the scalar loss; it is called under ``torch.no_grad`` and must
                be deterministic (eval mode: l+ and l- need the same dropout mask).

        Returns:
            The closure's value at theta (l0) with the Hessian, at theta + eps z (l+) for MeZO.

        Raises:
            EdgetuneError: no closure, or it returned something other than a scalar loss without autograd history.
        """
        if closure is None:
            raise EdgetuneError("HiZOO.step() got no closure", "call opt.step(lambda: model(**batch).loss)")
        step, lrs = self.state["step"], tuple(g["lr"] for g in self.param_groups)
        seed, losses, value = mix(self.state["base_seed"], step), [], None
        if self.hessian:
            value, loss0 = evaluate(closure, "HiZOO")
            losses.append(loss0)
            if not math.isfinite(loss0):
                return self._finish(ZOStepRecord(step, seed, 0.0, 0.0, (loss0,), lrs, False, True), value)
        self._sweep(seed, recover=0, perturb=1)
        try:
            plus, loss_plus = evaluate(closure, "HiZOO")
            self._sweep(seed, recover=1, perturb=-1)
        except BaseException:
            self._sweep(seed, recover=1, perturb=0)
            raise
        try:
            loss_minus = evaluate(closure, "HiZOO")[1]
        except BaseException:
            self._sweep(seed, recover=-1, perturb=0)
            raise
        record = self._record(step, seed, (*losses, loss_plus, loss_minus), lrs)
        self._sweep(seed, recover=-1, perturb=0, update=record)
        return self._finish(record, value if self.hessian else plus)

    @torch.no_grad()
    def replay(self, records: Iterable[ZOStepRecord]) -> None:
        """Re-apply logged steps without forward passes; from the same starting state the result is bit-identical.

        Args:
            records: consecutive records, the first for the optimizer's current step.

        Raises:
            EdgetuneError: a record's step is not the optimizer's current step.
        """
        for record in records:
            if record.step != self.state["step"]:
                problem = f"record for step {record.step} but the optimizer is at step {self.state['step']}"
                raise EdgetuneError(problem, "replay consecutive records onto the state saved before the first")
            if record.perturbed:
                self._sweep(record.seed, recover=0, perturb=1)
                self._sweep(record.seed, recover=1, perturb=-1)
                self._sweep(record.seed, recover=-1, perturb=0, update=record)
            self._finish(record, None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; unlike the torch default, H stays fp32 whatever the parameter dtype.

        Args:
            state_dict: from ``state_dict()``.

        A fresh optimizer (no step taken) adopts the saved ``perturbation``, so a run saved with another distribution
        (before 2026-12 every run drew Gaussians) resumes drawing the same z, bit for bit.

        Raises:
            EdgetuneError: the state was saved with another ``hessian`` or ``chunk_numel``, or another
                ``perturbation`` after this optimizer took steps.
        """
        saved = {"perturbation": "gaussian", **state_dict["state"]}  # states saved before the option drew Gaussians
        zo_sweep.check_resumable(self, saved, ("hessian", "chunk_numel"))
        if self.state["step"] == 0 and saved["perturbation"] != self.perturbation:
            self._use_perturbation(saved["perturbation"])
        zo_sweep.check_resumable(self, saved, ("perturbation",))
        # Torch would cast H to the parameter dtype, so H goes around it; copies keep the caller's dict intact.
        copy = {**state_dict, "state": {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}}
        hessians = {k: v.pop("hessian") for k, v in copy["state"].items() if isinstance(v, dict) and "hessian" in v}
        super().load_state_dict(copy)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for index, p in zip(ids, [p for g in self.param_groups for p in g["params"]], strict=True):
            if index in hessians:
                self.state[p]["hessian"] = hessians[index].to(device=p.device, dtype=torch.float32, copy=True)

    def _record(self, step: int, seed: int, losses: tuple[float, ...], lrs: tuple[float, ...]) -> ZOStepRecord:
        grad = (losses[-2] - losses[-1]) / (2 * self.eps)
        curvature = (losses[1] + losses[2] - 2 * losses[0]) / (2 * self.eps**2) if self.hessian else 0.0
        if not math.isfinite(grad + curvature):  # also catches finite losses whose difference overflows
            return ZOStepRecord(step, seed, 0.0, 0.0, losses, lrs, True, True)
        return ZOStepRecord(step, seed, grad, curvature, losses, lrs, True, False)

    def _finish(self, record: ZOStepRecord, value: Any) -> Any:
        zo_sweep.finish_step(self, record, "non-finite loss in")
        return value

    def work_buffers(self) -> list[torch.Tensor]:
        """The reusable perturbation buffers, which live across steps but are scratch, not state (never saved)."""
        return self._sweeper.work_buffers()

    def close(self) -> None:
        """End the worker threads; a later step starts them again (they also end with the optimizer)."""
        self._sweeper.close()

    def _sweep(self, seed: int, recover: int, perturb: int, update: ZOStepRecord | None = None) -> None:
        """One pass over the trainable tensors, chunk by chunk, regenerating z from (seed, tensor index, chunk)."""
        tensors, index = [], -1
        for group_index, group in enumerate(self.param_groups):
            step = None if update is None or update.skipped else (update, update.lrs[group_index], group)
            for p in group["params"]:
                index += 1
                if not p.requires_grad or p.numel() == 0:
                    continue
                if self.hessian and "hessian" not in self.state[p]:
                    self.state[p]["hessian"] = torch.ones(p.shape, dtype=torch.float32, device=p.device)
                tensors.append((index, p, self.state[p]["hessian"] if self.hessian else None, step))
        if recover == 0:
            self._sweeper.zero_chunks.clear()  # refilled from theta itself by this, the step's first, sweep
        signs = (recover * self.eps, perturb * self.eps)
        self._sweeper.run(self._sweeper.chunks(tensors), lambda job, slot: self._chunk(job, slot, seed, signs))

    def _chunk(self, job: Chunk, slot: Slot, seed: int, signs: tuple[float, float]) -> None:
        p, h = job.flat, job.hess
        z = self._sweeper.draw(slot, mix(seed, *job.key), p.numel())
        t = z if h is None else torch.rsqrt(h, out=slot.scaled[: p.numel()]).mul_(z)
        self._sweeper.round_trip(job, slot, t, *signs)
        if job.payload is None:
            return
        record, lr, group = job.payload
        alpha, unbiased = group["hessian_smooth"], self.hessian_estimator == "unbiased"
        if h is not None and alpha > 0:
            curvature = record.curvature * self._unbiased_scale if unbiased else abs(record.curvature)
            # (1 - alpha) + alpha c (z^2 - [1]) in one pass: addcmul(1 - alpha - [alpha c], z, z, value=alpha c).
            scale = alpha * curvature
            base = torch.tensor(1.0 - alpha - (scale if unbiased else 0.0), dtype=torch.float32, device=z.device)
            torch.addcmul(base, z, z, value=scale, out=t)
            h.mul_(t).clamp_(min=self.hessian_min)
            torch.rsqrt(h, out=t).mul_(z)
        if lr * group["weight_decay"] != 0:
            p.mul_(1.0 - lr * group["weight_decay"])
        if lr * record.projected_grad != 0:
            p.add_(t, alpha=-lr * record.projected_grad)


def MeZO(params: Iterable[Any], **kwargs: Any) -> HiZOO:
    """MeZO (Malladi et al. 2023): HiZOO with the Hessian off; two forwards a step and no persistent state.

    Args:
        params: parameters or parameter groups.
        **kwargs: any ``HiZOO`` argument except ``hessian``.

    Returns:
        A ``HiZOO`` with ``hessian=False``; its ``step`` returns l+, the loss at theta + eps z.
    """
    return HiZOO(params, hessian=False, **kwargs)
