"""Chunked, threaded, seeded sweeps over trainable tensors: the machinery HiZOO, MeZO and FZOO share.

A zeroth-order step perturbs every trainable value in place, evaluates, and restores, several times per step, and
regenerates its random direction z each time instead of storing it. ``Sweeper`` cuts the tensors into chunks, gives
each chunk a seed hashed from (step seed, tensor index, chunk index), and lets ``workers`` threads draw and apply
chunks concurrently, each with its own generator and work buffer. z depends only on those indices, never on the
thread or the order, so results are bit-identical for any number of workers.

Restoring in place (no copy of theta) is ``round_trip``: see hizoo.py's docstring for the bounds it keeps.
"""

import itertools
import logging
import math
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from edgetune.errors import EdgetuneError
from edgetune.optim.perturbation import Perturbation, fill_, padded

CPU_CHUNK_NUMEL = 1 << 18  # 1 MiB of fp32 per buffer slot: a chunk's element-wise ops stay in cache
GPU_CHUNK_NUMEL = 1 << 22  # larger chunks amortise the ~12 kernel launches per chunk and sweep
# torch's CPU normal_ is single-threaded per generator, so chunks are filled on several threads; the cap keeps the
# per-worker buffers small and the Python between the ops (one GIL) off the critical path.
MAX_DEFAULT_WORKERS = 8
_MASK64 = (1 << 64) - 1
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def mix(*values: int) -> int:
    """Hash ints into a 63-bit seed (splitmix64 rounds), so every (step, tensor, chunk) has its own z stream."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


def buffer_bytes(largest_numel: int, scaled: bool, chunk_numel: int, workers: int = 1) -> int:
    """The reusable work buffers per device, one per worker: z, a scaled z (``scaled`` only), a rounding slot, a mask.

    Args:
        largest_numel: elements of the largest trainable tensor on the device.
        scaled: the optimizer keeps a second fp32 slot (HiZOO's z / sqrt(H), FZOO's summed update).
        chunk_numel: elements per chunk.
        workers: threads, each with its own buffer.

    Returns:
        Bytes: per worker, 13 per chunk element with the second slot, 9 without (elements rounded up to 32).
    """
    return workers * padded(min(largest_numel, chunk_numel)) * (13 if scaled else 9)


class Chunk(NamedTuple):
    """One chunk of one trainable tensor: flat view, Hessian view (HiZOO), (tensor, chunk) key, a payload."""

    flat: torch.Tensor
    hess: torch.Tensor | None
    key: tuple[int, int]
    payload: Any


class Slot(NamedTuple):
    """One worker's generator and views into its byte buffer, each ``padded(chunk_numel)`` long."""

    generator: torch.Generator
    z: torch.Tensor  # fp32
    scaled: torch.Tensor  # fp32; z itself when the optimizer keeps no second slot
    rounded: torch.Tensor  # 4 bytes per element, viewed in the parameter dtype by ``round_trip``
    mask: torch.Tensor  # bool; its bytes also hold the random words of a fill
    buffer: torch.Tensor


class Sweeper:
    """Chunks, per-worker buffers and threads for one optimizer.

    Args:
        perturbation: the distribution of z.
        scaled: keep a second fp32 slot per worker.
        chunk_numel: elements per chunk (z depends on it, so it must stay fixed to resume).
        workers: threads that apply chunks concurrently.
    """

    def __init__(self, perturbation: Perturbation, scaled: bool, chunk_numel: int, workers: int) -> None:
        self.perturbation, self.scaled, self.chunk_numel, self.workers = perturbation, scaled, chunk_numel, workers
        self.zero_chunks: set[tuple[int, int]] = set()
        self._work: dict[torch.device, list[Slot]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def chunks(self, tensors: list[tuple[int, torch.Tensor, torch.Tensor | None, Any]]) -> list[Chunk]:
        """Cut (index, parameter, Hessian or None, payload) entries into chunks."""
        jobs = []
        for index, p, hess, payload in tensors:
            flat, h = p.view(-1), None if hess is None else hess.view(-1)
            for chunk, start in enumerate(range(0, flat.numel(), self.chunk_numel)):
                part = slice(start, start + self.chunk_numel)
                jobs.append(Chunk(flat[part], None if h is None else h[part], (index, chunk), payload))
        return jobs

    def run(self, jobs: list[Chunk], apply: Callable[[Chunk, Slot], None]) -> None:
        """Apply every job; up to ``workers`` threads (this one included) each take the next job in turn."""
        slots = self._slots_for(jobs)
        workers, order, failed = min(self.workers, len(jobs)), itertools.count(), threading.Event()

        @torch.no_grad()  # grad mode is per thread
        def drain(worker: int) -> None:
            for i in order:  # next() on a count is atomic under the GIL
                if i >= len(jobs) or failed.is_set():
                    return
                try:
                    apply(jobs[i], slots[jobs[i].flat.device][worker])
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

    def draw(self, slot: Slot, seed: int, numel: int) -> torch.Tensor:
        """z for one chunk of ``numel`` values, drawn from ``seed`` into the slot (fp32).

        A 16-bit z would halve the bytes a 16-bit parameter's add reads, but torch's same-dtype add rounds alpha = eps
        to the parameter dtype (0.1% of the 1e-3 default in bf16), so the perturbation would not be eps z.
        """
        slot.generator.manual_seed(seed)
        n = numel if self.perturbation == "gaussian" else padded(numel)
        words, scratch = slot.mask.view(torch.int32), slot.rounded.view(torch.int32)
        fill_(slot.z[:n], self.perturbation, slot.generator, words, scratch)
        return slot.z[:numel]

    def round_trip(self, job: Chunk, slot: Slot, d: torch.Tensor, recover: float, perturb: float) -> None:
        """p <- round(p - recover d), then p <- round(p + perturb d); 0 comes back as 0 (hizoo.py's docstring).

        ``recover`` undoes an earlier ``perturb`` of the same d. The step's first perturbing sweep (``recover`` 0)
        notes the chunks that hold a zero, so only those pay for the exact-zero check when they are restored.
        """
        p = job.flat
        rounded, mask = slot.rounded.view(p.dtype)[: p.numel()], slot.mask[: p.numel()]
        if recover == 0 and perturb and _has_zero(p, rounded):
            self.zero_chunks.add(job.key)
        if recover and job.key in self.zero_chunks:
            # round(s - d) is the only preimage of s unless s crossed into a larger binade; 0 wins whenever it maps to
            # s too. d comes from the same alpha-form add as the perturbation, so both see the same rounding.
            torch.eq(p, torch.mul(d, recover, out=rounded), out=mask)
            p.add_(d, alpha=-recover).masked_fill_(mask, 0.0)
        elif recover:
            p.add_(d, alpha=-recover)
        if perturb:
            p.add_(d, alpha=perturb)

    def work_buffers(self) -> list[torch.Tensor]:
        """The reusable buffers, which live across steps but are scratch, not state (never saved)."""
        return [slot.buffer for slots in self._work.values() for slot in slots]

    def close(self) -> None:
        """End the worker threads; a later sweep starts them again."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _slots_for(self, jobs: list[Chunk]) -> dict[torch.device, list[Slot]]:
        """One generator and byte buffer per worker and device, sized by ``buffer_bytes``: never model-sized."""
        largest: dict[torch.device, int] = {}
        for job in jobs:
            largest[job.flat.device] = max(largest.get(job.flat.device, 0), job.flat.numel())
        for device, numel in largest.items():
            nbytes, slots = buffer_bytes(numel, self.scaled, self.chunk_numel), self._work.get(device, [])
            if len(slots) != self.workers or slots[0].buffer.numel() < nbytes:
                self._work[device] = [self._new_slot(device, nbytes) for _ in range(self.workers)]
        return self._work

    def _new_slot(self, device: torch.device, nbytes: int) -> Slot:
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        size = nbytes // (13 if self.scaled else 9)
        z = buffer[: 4 * size].view(torch.float32)
        scaled = buffer[4 * size : 8 * size].view(torch.float32) if self.scaled else z
        r_at = 8 * size if self.scaled else 4 * size
        rounded = buffer[r_at : r_at + 4 * size]
        mask = buffer[r_at + 4 * size : r_at + 5 * size].view(torch.bool)
        return Slot(torch.Generator(device=device), z, scaled, rounded, mask, buffer)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_size != self.workers - 1:
            self.close()
            self._pool, self._pool_size = ThreadPoolExecutor(self.workers - 1, "edgetune-zo"), self.workers - 1
            weakref.finalize(self, self._pool.shutdown, wait=False)  # holds the pool, not the optimizer
        return self._pool


def _has_zero(x: torch.Tensor, scratch: torch.Tensor) -> bool:
    """Whether x holds a +0 or -0, read as integers without the sign bit: on CPU a third of the cost of abs or == 0."""
    ints, magnitude = (torch.int16, 0x7FFF) if x.element_size() == 2 else (torch.int32, 0x7FFFFFFF)
    return bool(torch.bitwise_and(x.view(ints), magnitude, out=scratch.view(ints)).amin() == 0)


def defaults(param_groups: list[dict[str, Any]], chunk_numel: int | None, workers: int | None) -> tuple[int, int]:
    """(chunk_numel, workers) with the device defaults filled in: CPU chunks and threads, larger chunks on GPU."""
    cpu = on_cpu(param_groups)
    chunk = chunk_numel or (CPU_CHUNK_NUMEL if cpu else GPU_CHUNK_NUMEL)
    return chunk, workers or (min(torch.get_num_threads(), MAX_DEFAULT_WORKERS) if cpu else 1)


def on_cpu(param_groups: list[dict[str, Any]]) -> bool:
    """Whether every parameter lives on the CPU: it decides the chunk, worker and direction defaults."""
    return all(p.device.type == "cpu" for group in param_groups for p in group["params"])


def evaluate(closure: Callable[[], Any], optimizer: str) -> tuple[Any, float]:
    """Run a zeroth-order closure without autograd and check that it gave a scalar loss: (value, float)."""
    with torch.no_grad():
        loss = closure()
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        raise EdgetuneError(f"the {optimizer} closure returned a loss that requires grad", "don't enable grad in it")
    if not (isinstance(loss, (int, float)) or (isinstance(loss, torch.Tensor) and loss.numel() == 1)):
        raise EdgetuneError(f"the {optimizer} closure returned {type(loss).__name__}", "return the scalar loss")
    return loss, float(loss)


def check(ok: bool, optimizer: str, name: str, value: object, rule: str) -> None:
    """Raise the one-line ValueError of an invalid zeroth-order hyperparameter."""
    if not ok:
        raise ValueError(f"{optimizer} {name}={value!r} is invalid; {rule}")


def check_common(
    optimizer: str, eps: float, seed: int, chunk_numel: int | None, log_size: int, workers: int | None
) -> None:
    """Validate the constructor arguments every zeroth-order optimizer shares."""
    check(math.isfinite(eps) and eps > 0, optimizer, "eps", eps, "use a positive perturbation scale such as 1e-3")
    check(isinstance(seed, int) and seed >= 0, optimizer, "seed", seed, "use an int >= 0")
    chunk_ok = chunk_numel is None or (isinstance(chunk_numel, int) and chunk_numel > 0)
    check(chunk_ok, optimizer, "chunk_numel", chunk_numel, "use an int > 0, or None for the device default")
    check(isinstance(log_size, int) and log_size >= 0, optimizer, "log_size", log_size, "use an int >= 0")
    workers_ok = workers is None or (isinstance(workers, int) and workers > 0)
    check(workers_ok, optimizer, "workers", workers, "use an int > 0, or None for the device default")


def checked_group(optimizer: str, group: dict[str, Any]) -> list[torch.Tensor]:
    """A parameter group's parameters, after checking its lr, weight decay and trainable tensors."""
    params = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
    lr, wd = group["lr"], group["weight_decay"]
    check(math.isfinite(lr) and lr >= 0, optimizer, "lr", lr, "use a learning rate >= 0 such as 1e-6")
    check(math.isfinite(wd) and wd >= 0, optimizer, "weight_decay", wd, "use a weight decay >= 0")
    for p in (p for p in params if p.requires_grad):
        check(p.dtype in _DTYPES, optimizer, "dtype of a trainable parameter", p.dtype, "train fp32/bf16/fp16 weights")
        check(p.is_contiguous(), optimizer, "layout of a trainable parameter", "strided", "make it contiguous")
    return params


def check_resumable(optimizer: Any, saved: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse a saved state whose ``keys`` (settings that change z or the state's shape) differ from the optimizer's.

    Raises:
        EdgetuneError: naming the first setting that differs and the value to construct the optimizer with.
    """
    for key in keys:
        if saved.get(key, getattr(optimizer, key)) != getattr(optimizer, key):
            problem = f"optimizer state saved with {key}={saved[key]}, this optimizer has {getattr(optimizer, key)}"
            raise EdgetuneError(problem, f"construct it with {key}={saved[key]} to resume")


def finish_step(optimizer: Any, record: Any, why: str) -> None:
    """Count a step (and a skipped one, with a warning saying ``why``) and log its record."""
    optimizer.state["step"] += 1
    optimizer.state["skipped_steps"] += record.skipped
    if record.skipped:  # logged under the optimizer's own module, as before the helper existed
        logging.getLogger(type(optimizer).__module__).warning(
            "%s skipped step %d: %s %s", type(optimizer).__name__, record.step, why, record.losses
        )
    optimizer.log.append(record)
