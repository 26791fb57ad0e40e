"""What lets conversion read and write at the same time in bounded memory: reusable buffers, a byte budget, workers.

- `BufferPool`: memory that is touched once and reused. On the VMs we measured, first-touching fresh pages costs
  ~1 s/GiB while a memcpy into touched pages costs ~0.1 s/GiB, so allocating every converted tensor anew (glibc
  returns large blocks to the kernel on free) dominated conversion time. Sizes are rounded up to a size class
  so the thousands of same-shaped expert tensors share buffers; idle buffers beyond a cap are freed.
- `ByteBudget`: the bytes read but not yet written are bounded; the reader waits. A single item larger than the
  budget is let through alone, so the bound is max(budget, largest tensor) plus the pool's idle cap.
- `Workers`: threads that write while the calling thread reads (file I/O and torch copies release the GIL).
  The first error of any thread stops the others and is raised in the calling thread.
- `read_ahead`: the next reads already running on threads while earlier results are handed on, in order. One
  O_DIRECT read stream leaves the disk idle between requests; two keep it busy (measured 0.65 -> 0.7-0.9 GB/s).
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

_SIZE_CLASS_STEPS = 8  # size classes: 8 per power of two (at most 12.5% slack)


def size_class(nbytes: int) -> int:
    if nbytes <= 4096:
        return 4096
    step = 2 ** (math.ceil(math.log2(nbytes)) - 1) // _SIZE_CLASS_STEPS
    return -(-nbytes // step) * step


class BufferPool:
    """Reusable uint8 buffers; `tensor()` hands out typed views, `release()` takes them back."""

    def __init__(self, max_idle_bytes: int = 512 * 2**20) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[int, list[torch.Tensor]] = {}
        self._idle_bytes = 0
        self._lent: dict[int, torch.Tensor] = {}  # storage data pointer -> buffer
        self._lock = threading.Lock()

    def tensor(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor backed by a pooled buffer."""
        nbytes = math.prod(shape) * dtype.itemsize
        size = size_class(nbytes)
        with self._lock:
            free = self._idle.get(size)
            buffer = free.pop() if free else None
            if buffer is not None:
                self._idle_bytes -= size
        if buffer is None:
            if size >= self.max_idle_bytes // 2:
                self.trim()  # a large tensor is coming: hand idle memory back first, so peaks do not stack
            buffer = torch.empty(size, dtype=torch.uint8)
        with self._lock:
            self._lent[buffer.data_ptr()] = buffer
        return buffer[:nbytes].view(dtype).view(tuple(shape))

    def trim(self) -> None:
        """Free every idle buffer."""
        with self._lock:
            self._idle.clear()
            self._idle_bytes = 0

    def owns(self, tensor: torch.Tensor) -> bool:
        with self._lock:
            return tensor.untyped_storage().data_ptr() in self._lent

    def release(self, tensor: torch.Tensor) -> None:
        """Give back a tensor from `tensor()` (any view of it); tensors not from this pool are ignored."""
        with self._lock:
            buffer = self._lent.pop(tensor.untyped_storage().data_ptr(), None)
            if buffer is None:
                return
            size = buffer.numel()
            if self._idle_bytes + size > self.max_idle_bytes:
                return  # dropped: freed when the last reference goes
            self._idle.setdefault(size, []).append(buffer)
            self._idle_bytes += size


class Aborted(RuntimeError):
    """Raised in a waiting thread when another thread failed."""


class ByteBudget:
    """At most `limit` bytes in flight (or one item of any size when nothing else is)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._aborted = False
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            while not self._aborted and self.used and self.used + nbytes > self.limit:
                self._cond.wait()
            if self._aborted:
                raise Aborted("stopped: another thread failed")
            self.used += nbytes

    def fits(self, nbytes: int) -> bool:
        """Whether `acquire(nbytes)` would return at once."""
        with self._cond:
            return not self.used or self.used + nbytes <= self.limit

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()


def read_ahead(
    names: Iterable[str], fetch: Callable[[str], Any], nbytes: Callable[[str], int], budget: ByteBudget, depth: int = 2
) -> Iterator[tuple[str, Any, int]]:
    """(name, fetch(name), nbytes(name)) in order, with up to `depth` fetches running ahead on threads.

    Each fetch holds its bytes of `budget` from before it starts; the consumer releases them once it is done with
    the result. A fetch that does not fit yet first hands on the results before it, so the consumer can release.
    """
    pending: deque[tuple[str, Future, int]] = deque()
    with ThreadPoolExecutor(depth, thread_name_prefix="read-ahead") as threads:
        try:
            for name in names:
                size = nbytes(name)
                while pending and (len(pending) >= depth or not budget.fits(size)):
                    done, future, done_size = pending.popleft()
                    yield done, future.result(), done_size
                budget.acquire(size)
                pending.append((name, threads.submit(fetch, name), size))
            while pending:
                done, future, done_size = pending.popleft()
                yield done, future.result(), done_size
        finally:
            for _, future, _ in pending:
                future.cancel()


class Workers:
    """`count` threads applying `handle` to submitted jobs; use as a context manager around the producing code.

    Leaving the block normally waits for every job and raises the first worker error; leaving it with an error
    abandons the queued jobs and re-raises (a worker's error in preference to the `Aborted` it caused).
    """

    def __init__(self, count: int, handle: Callable[[Any], None], budget: ByteBudget | None = None) -> None:
        self.handle, self.budget = handle, budget
        self.error: BaseException | None = None
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]

    def __enter__(self) -> Workers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            first = self.error
            self._fail(error)
            self._join()
            if first is not None and isinstance(error, Aborted):
                raise first
            return  # the original error propagates
        self._join()
        if self.error is not None:
            raise self.error

    def submit(self, job: Any) -> None:
        if self.error is not None:
            raise Aborted("stopped: a worker failed")
        self._jobs.put(job)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if self.budget is not None:
            self.budget.abort()

    def _join(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self.error is not None:
                continue  # drain without working
            try:
                self.handle(job)
            except BaseException as err:  # raised again in the producing thread
                self._fail(err)
