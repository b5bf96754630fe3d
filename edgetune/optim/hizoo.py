"""HiZOO: Hessian-informed zeroth-order (forward-only) fine-tuning; MeZO is its Hessian-off mode.

Paper: Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order Optimizer",
arXiv 2402.15173 (ICLR 2025); MeZO: Malladi et al., arXiv 2305.17333. Reference code: Yanjun-Zhao/HiZOO @ 4f99055
``trainer.py::zo_Hessian_step_update`` and princeton-nlp/MeZO @ 552cb1b ``large_models/trainer.py::zo_step``.

One step, with H the fp32 diagonal Hessian estimate (Sigma^-1, starts at 1), z ~ N(0, I) from the step seed,
alpha = ``hessian_smooth`` and wd = ``weight_decay``::

    l0 = L(theta), l+ = L(theta + eps z / sqrt(H)), l- = L(theta - eps z / sqrt(H))
    H <- (1 - alpha) H + alpha |l+ + l- - 2 l0| H z^2 / (2 eps^2)         "released", the published code
    H <- (1 - alpha) H + alpha (l+ + l- - 2 l0) H (z^2 - 1) / (2 eps^2)   "unbiased", the paper's form
    theta <- theta - lr ((l+ - l-) / (2 eps) z / sqrt(H_new) + wd theta)

By Stein's identity the "unbiased" increment has the true Hessian diagonal as its expectation. The paper also takes
abs() per coordinate; we leave it out because E|X| != E[X] (with d coordinates it inflates H about d/2 times) and floor
H at ``hessian_min`` instead. MeZO drops l0 and H: two forwards, theta <- theta - lr ((l+ - l-)/(2 eps) z + wd theta).

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

Speed. Drawing z dominates a full-parameter step on CPU (torch's normal_ runs on one thread per generator), so the
chunks of a sweep are shared by ``workers`` threads, each with its own generator and work buffer; z depends only on
(step seed, tensor index, chunk), so the result is bit-identical for any number of workers.
"""

import itertools
import logging
import math
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from edgetune.errors import EdgetuneError

logger = logging.getLogger(__name__)

CPU_CHUNK_NUMEL = 1 << 18  # 1 MiB of fp32 per buffer slot: a chunk's element-wise ops stay in cache
GPU_CHUNK_NUMEL = 1 << 22  # larger chunks amortise the ~12 kernel launches per chunk and sweep
# torch's CPU normal_ is single-threaded per generator and bounds a full-parameter step, so chunks are filled on
# several threads; the cap keeps the per-worker buffers small and the Python between the ops (one GIL) off the
# critical path.
MAX_DEFAULT_WORKERS = 8
_MASK64 = (1 << 64) - 1
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _mix(*values: int) -> int:
    """Hash ints into a 63-bit seed (splitmix64 rounds), so every (step, tensor, chunk) has its own z stream."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


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
        Bytes of the buffers: per worker, 13 per chunk element with the Hessian, 9 without.
    """
    return workers * min(largest_numel, chunk_numel) * (13 if hessian else 9)


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"HiZOO {name}={value!r} is invalid; {rule}")


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
    ) -> None:
        _check(math.isfinite(eps) and eps > 0, "eps", eps, "use a positive perturbation scale such as 1e-3")
        estimators = ("released", "unbiased")
        _check(hessian_estimator in estimators, "hessian_estimator", hessian_estimator, f"use one of {estimators}")
        _check(math.isfinite(hessian_min) and hessian_min > 0, "hessian_min", hessian_min, "use a positive floor")
        _check(isinstance(seed, int) and seed >= 0, "seed", seed, "use an int >= 0")
        chunk_ok = chunk_numel is None or (isinstance(chunk_numel, int) and chunk_numel > 0)
        _check(chunk_ok, "chunk_numel", chunk_numel, "use an int > 0, or None for the device default")
        _check(isinstance(log_size, int) and log_size >= 0, "log_size", log_size, "use an int >= 0")
        workers_ok = workers is None or (isinstance(workers, int) and workers > 0)
        _check(workers_ok, "workers", workers, "use an int > 0, or None for the device default")
        self.eps, self.hessian, self.hessian_estimator = eps, hessian, hessian_estimator
        self.hessian_min = hessian_min
        self.log: deque[ZOStepRecord] = deque(maxlen=log_size)
        self._work: dict[torch.device, list[tuple[torch.Generator, torch.Tensor]]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._zero_chunks: set[tuple[int, int]] = set()
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, hessian_smooth=hessian_smooth))
        on_cpu = all(p.device.type == "cpu" for g in self.param_groups for p in g["params"])
        self.chunk_numel = chunk_numel or (CPU_CHUNK_NUMEL if on_cpu else GPU_CHUNK_NUMEL)
        self.workers = workers or (min(torch.get_num_threads(), MAX_DEFAULT_WORKERS) if on_cpu else 1)
        self.state.update(step=0, skipped_steps=0, base_seed=seed, chunk_numel=self.chunk_numel, hessian=hessian)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group's hyperparameters and trainable parameters, then add it as torch does.

        Args:
            param_group: the group, as for any torch optimizer.

        Raises:
            ValueError: as for the constructor; frozen parameters (e.g. quantized base weights) are not checked.
        """
        group = {**self.defaults, **param_group}
        params = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        lr, wd, alpha = group["lr"], group["weight_decay"], group["hessian_smooth"]
        _check(math.isfinite(lr) and lr >= 0, "lr", lr, "use a learning rate >= 0 such as 1e-6")
        _check(math.isfinite(wd) and wd >= 0, "weight_decay", wd, "use a weight decay >= 0")
        _check(0 <= alpha <= 1, "hessian_smooth", alpha, "use an EMA weight in [0, 1] such as 1e-8")
        for p in (p for p in params if p.requires_grad):
            _check(p.dtype in _DTYPES, "dtype of a trainable parameter", p.dtype, "train fp32/bf16/fp16 weights")
            _check(p.is_contiguous(), "layout of a trainable parameter", "strided", "make it contiguous")
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
        seed, losses, value = _mix(self.state["base_seed"], step), [], None
        if self.hessian:
            value, loss0 = _evaluate(closure)
            losses.append(loss0)
            if not math.isfinite(loss0):
                return self._finish(ZOStepRecord(step, seed, 0.0, 0.0, (loss0,), lrs, False, True), value)
        self._sweep(seed, recover=0, perturb=1)
        try:
            plus, loss_plus = _evaluate(closure)
            self._sweep(seed, recover=1, perturb=-1)
        except BaseException:
            self._sweep(seed, recover=1, perturb=0)
            raise
        try:
            loss_minus = _evaluate(closure)[1]
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

        Raises:
            EdgetuneError: the state was saved with another ``hessian`` or ``chunk_numel`` setting.
        """
        saved = state_dict["state"]
        for key in ("hessian", "chunk_numel"):
            if saved.get(key, getattr(self, key)) != getattr(self, key):
                problem = f"optimizer state saved with {key}={saved[key]}, this optimizer has {getattr(self, key)}"
                raise EdgetuneError(problem, f"construct it with {key}={saved[key]} to resume")
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
        self.state["step"] += 1
        self.state["skipped_steps"] += record.skipped
        if record.skipped:
            logger.warning("HiZOO skipped step %d: non-finite loss in %s", record.step, record.losses)
        self.log.append(record)
        return value

    def work_buffers(self) -> list[torch.Tensor]:
        """The reusable perturbation buffers, which live across steps but are scratch, not state (never saved)."""
        return [buffer for slots in self._work.values() for _, buffer in slots]

    def close(self) -> None:
        """End the worker threads; a later step starts them again (they also end with the optimizer)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _sweep(self, seed: int, recover: int, perturb: int, update: ZOStepRecord | None = None) -> None:
        """One pass over the trainable tensors, chunk by chunk, regenerating z from (seed, tensor index, chunk)."""
        jobs = self._jobs(seed, update)
        if recover == 0:
            self._zero_chunks.clear()  # refilled from theta itself by this, the step's first, sweep
        slots = self._slots_for(jobs)
        self._run(jobs, lambda job, worker: self._chunk(job, slots[job.flat.device][worker], (recover, perturb)))

    def _jobs(self, seed: int, update: ZOStepRecord | None) -> list["_Job"]:
        jobs, index = [], -1
        for group_index, group in enumerate(self.param_groups):
            step = None if update is None or update.skipped else (update, update.lrs[group_index], group)
            for p in group["params"]:
                index += 1
                if not p.requires_grad or p.numel() == 0:
                    continue
                if self.hessian and "hessian" not in self.state[p]:
                    self.state[p]["hessian"] = torch.ones(p.shape, dtype=torch.float32, device=p.device)
                flat, hess = p.view(-1), self.state[p]["hessian"].view(-1) if self.hessian else None
                for chunk, start in enumerate(range(0, flat.numel(), self.chunk_numel)):
                    part = slice(start, start + self.chunk_numel)
                    h = None if hess is None else hess[part]
                    jobs.append(_Job(flat[part], h, _mix(seed, index, chunk), (index, chunk), step))
        return jobs

    def _slots_for(self, jobs: list["_Job"]) -> dict[torch.device, list[tuple[torch.Generator, torch.Tensor]]]:
        """One generator and byte buffer per worker and device, sized by ``buffer_bytes``: never model-sized."""
        largest: dict[torch.device, int] = {}
        for job in jobs:
            largest[job.flat.device] = max(largest.get(job.flat.device, 0), job.flat.numel())
        for device, numel in largest.items():
            nbytes, slots = buffer_bytes(numel, self.hessian, self.chunk_numel), self._work.get(device, [])
            if len(slots) != self.workers or slots[0][1].numel() < nbytes:
                self._work[device] = [_new_slot(device, nbytes) for _ in range(self.workers)]
        return self._work

    def _run(self, jobs: list["_Job"], apply: Callable[["_Job", int], None]) -> None:
        """Apply every job; up to ``workers`` threads (this one included) each take the next job in turn."""
        workers, order, failed = min(self.workers, len(jobs)), itertools.count(), threading.Event()

        @torch.no_grad()  # grad mode is per thread
        def drain(worker: int) -> None:
            for i in order:  # next() on a count is atomic under the GIL
                if i >= len(jobs) or failed.is_set():
                    return
                try:
                    apply(jobs[i], worker)
                except BaseException:
                    failed.set()
                    raise

        futures, threads = [], torch.get_num_threads()
        try:
            if workers > 1:
                # The workers are the parallelism: each one's ops also forking an OpenMP team oversubscribes the
                # cores, and a team waiting on a preempted thread (a busy machine) turns microseconds into ms.
                torch.set_num_threads(1)
                futures = [self._executor().submit(drain, worker) for worker in range(1, workers)]
            drain(0)
        finally:
            errors = [future.exception() for future in futures]  # waits: no worker may outlive the sweep
            torch.set_num_threads(threads)
        for error in errors:
            if error is not None:
                raise error

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_size != self.workers - 1:
            self.close()
            self._pool, self._pool_size = ThreadPoolExecutor(self.workers - 1, "edgetune-zo"), self.workers - 1
            weakref.finalize(self, self._pool.shutdown, wait=False)  # holds the pool, not the optimizer
        return self._pool

    def _chunk(self, job: "_Job", slot: tuple[torch.Generator, torch.Tensor], signs: tuple[int, int]) -> None:
        (generator, buffer), p, h, (recover, perturb) = slot, job.flat, job.hess, signs
        z, t, rounded, mask = _slots(buffer, p.numel(), p.dtype, self.hessian)
        if recover == 0 and perturb and _has_zero(p, rounded):
            self._zero_chunks.add(job.key)
        generator.manual_seed(job.seed)
        z.normal_(generator=generator)
        t = z if h is None else torch.rsqrt(h, out=t).mul_(z)
        if recover and job.key in self._zero_chunks:
            # round(s - d) is the only preimage of s unless s crossed into a larger binade; 0 wins whenever it maps to
            # s too. d comes from the same alpha-form add as the perturbation, so both see the same rounding.
            torch.eq(p, torch.mul(t, recover * self.eps, out=rounded), out=mask)
            p.add_(t, alpha=-recover * self.eps).masked_fill_(mask, 0.0)
        elif recover:
            p.add_(t, alpha=-recover * self.eps)
        if perturb:
            p.add_(t, alpha=perturb * self.eps)
        if job.update is None:
            return
        record, lr, group = job.update
        alpha, unbiased = group["hessian_smooth"], self.hessian_estimator == "unbiased"
        if h is not None and alpha > 0:
            scale = alpha * (record.curvature if unbiased else abs(record.curvature))
            torch.mul(z, z, out=t).sub_(1.0 if unbiased else 0.0).mul_(scale).add_(1.0 - alpha)
            h.mul_(t).clamp_(min=self.hessian_min)
            torch.rsqrt(h, out=t).mul_(z)
        if lr * group["weight_decay"] != 0:
            p.mul_(1.0 - lr * group["weight_decay"])
        if lr * record.projected_grad != 0:
            p.add_(t, alpha=-lr * record.projected_grad)


class _Job(NamedTuple):
    """One chunk of one trainable tensor: its view, its Hessian view, its z seed, its (tensor, chunk) key."""

    flat: torch.Tensor
    hess: torch.Tensor | None
    seed: int
    key: tuple[int, int]
    update: tuple[ZOStepRecord, float, dict[str, Any]] | None


def _evaluate(closure: Callable[[], Any]) -> tuple[Any, float]:
    """Run the closure without autograd and check that it gave a scalar loss."""
    with torch.no_grad():
        loss = closure()
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        raise EdgetuneError("the HiZOO closure returned a loss that requires grad", "don't enable grad in it")
    if not (isinstance(loss, (int, float)) or (isinstance(loss, torch.Tensor) and loss.numel() == 1)):
        raise EdgetuneError(f"the HiZOO closure returned {type(loss).__name__}", "return the scalar loss")
    return loss, float(loss)


def _slots(buffer: torch.Tensor, n: int, dtype: torch.dtype, hessian: bool) -> tuple[torch.Tensor, ...]:
    """Views of n elements into the byte buffer: z, z/sqrt(H) (MeZO: z again), d in the parameter dtype, a mask."""
    size = buffer.numel() // (13 if hessian else 9)
    t_at, r_at = (4 * size, 8 * size) if hessian else (0, 4 * size)
    z = buffer[: 4 * size].view(torch.float32)[:n]
    t = buffer[t_at : t_at + 4 * size].view(torch.float32)[:n]
    rounded = buffer[r_at : r_at + 4 * size].view(dtype)[:n]
    return z, t, rounded, buffer[r_at + 4 * size : r_at + 5 * size].view(torch.bool)[:n]


def _new_slot(device: torch.device, nbytes: int) -> tuple[torch.Generator, torch.Tensor]:
    return torch.Generator(device=device), torch.empty(nbytes, dtype=torch.uint8, device=device)


def _has_zero(x: torch.Tensor, scratch: torch.Tensor) -> bool:
    """Whether x holds a +0 or -0, read as integers without the sign bit: on CPU a third of the cost of abs or == 0."""
    ints, magnitude = (torch.int16, 0x7FFF) if x.element_size() == 2 else (torch.int32, 0x7FFFFFFF)
    return bool(torch.bitwise_and(x.view(ints), magnitude, out=scratch.view(ints)).amin() == 0)


def MeZO(params: Iterable[Any], **kwargs: Any) -> HiZOO:
    """MeZO (Malladi et al. 2023): HiZOO with the Hessian off; two forwards a step and no persistent state.

    Args:
        params: parameters or parameter groups.
        **kwargs: any ``HiZOO`` argument except ``hessian``.

    Returns:
        A ``HiZOO`` with ``hessian=False``; its ``step`` returns l+, the loss at theta + eps z.
    """
    return HiZOO(params, hessian=False, **kwargs)
