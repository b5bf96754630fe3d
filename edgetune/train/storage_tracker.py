"""Count the tensor bytes a code region allocates on CPU: a dispatch mode that tracks new storages.

This is the CPU counterpart of ``torch.cuda.max_memory_allocated``: every op's output storages that are
new (not an input's, not seen before) are added when created and subtracted when freed, so the peak is
exact in bytes. RSS cannot give this figure because it also holds the Python heap, libraries and the
allocator's caches.
"""

import itertools
import weakref
from collections import deque
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ROW_PARTS, _COL_PARTS = ("crow_indices", "col_indices", "values"), ("ccol_indices", "row_indices", "values")
_SPARSE_PARTS = {
    torch.sparse_coo: ("_indices", "_values"),
    torch.sparse_csr: _ROW_PARTS,
    torch.sparse_bsr: _ROW_PARTS,
    torch.sparse_csc: _COL_PARTS,
    torch.sparse_bsc: _COL_PARTS,
}


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of storages that ops create while this mode is active on this thread.

    Storages that an op's outputs share with its inputs (in-place ops, views, ``out=``) and storages
    that existed before the mode was entered are not counted, even when an op grows them (resize_).
    A storage's bytes are subtracted when its last tensor dies (``weakref.finalize`` on the storage).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked: dict[int, tuple[int, int, weakref.finalize]] = {}  # key -> (token, nbytes, fin)
        # Finalizers may fire on any thread or in the middle of bookkeeping (GC), so they only
        # queue; the queue is drained before each count, which keeps the peak exact.
        self._freed: deque[tuple[int, int]] = deque()
        self._tokens = itertools.count()

    def __torch_dispatch__(
        self, func: Any, types: tuple[type, ...], args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in _tensors(out) if t.is_cpu]
        if outputs:
            self._count(outputs, args, kwargs)
        return out

    def _count(self, outputs: list[torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> None:
        self.drain()
        inputs: set[int] | None = None
        for tensor in outputs:
            for storage in _storages(tensor):
                key = storage._cdata
                entry = self._tracked.get(key)
                if entry is not None:
                    self._regrow(key, entry, storage.nbytes())
                    continue
                if inputs is None:
                    inputs = {s._cdata for t in _tensors((args, kwargs)) for s in _storages(t)}
                if key not in inputs:
                    self._track(key, storage)

    def _track(self, key: int, storage: torch.UntypedStorage) -> None:
        token, nbytes = next(self._tokens), storage.nbytes()
        fin = weakref.finalize(storage, self._freed.append, (key, token))
        fin.atexit = False
        self._tracked[key] = (token, nbytes, fin)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _regrow(self, key: int, entry: tuple[int, int, weakref.finalize], nbytes: int) -> None:
        # resize_ and out= ops can grow a storage the region created.
        if nbytes != entry[1]:
            self._tracked[key] = (entry[0], nbytes, entry[2])
            self.live_bytes += nbytes - entry[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def drain(self) -> None:
        """Subtracts the storages freed since the last call."""
        while self._freed:
            key, token = self._freed.popleft()
            entry = self._tracked.get(key)
            if entry is not None and entry[0] == token:
                del self._tracked[key]
                self.live_bytes -= entry[1]

    def detach(self) -> None:
        """Drops the finalizers so the storages that outlive the region cost nothing later."""
        for _, _, fin in self._tracked.values():
            fin.detach()
        self._tracked.clear()


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors in an op's arguments or results.

    Aten schemas nest tensors only in lists, tuples (torch.return_types included) and dicts. This walk
    finds the same leaves as torch.utils._pytree.tree_flatten at a tenth of its cost, which runs per op.
    """
    if isinstance(tree, torch.Tensor):
        return [tree]
    found, pending = [], [tree]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
    return found


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    if tensor.is_meta:
        return []
    parts = _SPARSE_PARTS.get(tensor.layout)
    if parts is not None:
        return [getattr(tensor, name)().untyped_storage() for name in parts]
    try:
        return [tensor.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # wrapper subclasses and nested tensors have none
        return []
