"""Device batches prepared ahead of the train step by a background thread (data.prefetch_to_device).

    batches = prefetch.DeviceBatches(host_iterator, place, depth=2, count=end - start)
    for device_batch, skipped in batches: ...
    batches.close()

With depth > 0 a daemon thread takes host batches from `host_iterator` (the step-indexed grain
pipeline), pops their `skipped` count, places them on the devices with `place`
(`sharding.global_batch`: `jax.make_array_from_process_local_data` on every process), waits for
the transfer, and queues them. The trainer's `next()` then returns a batch that is already on the
devices, so the time it waits (`data_wait`) is real starvation: the input could not keep up.

Order and resume. One thread per process reads the host iterator in order and hands batches over
through a FIFO, so batch k of this iterator is the k-th one returned, exactly as without prefetch:
the stream stays step-indexed and a resumed run consumes the same batches. Batches read ahead and
never used (a stop, a preemption) are dropped; the checkpoint records the trainer's step, not the
iterator's position. `count` stops the thread after the batches the run will use. Every process
issues its placements in the same (step) order; placing a process's own shards needs no
communication between processes, so the thread cannot deadlock against the main thread's
collectives.

Failures. An exception raised while preparing batch k (an unreadable shard, a tokenizer error) is
queued after batches 0..k-1 and raised by the k-th `next()`, so it surfaces at the step it belongs
to, with a note naming that step. A producer that hangs inside the host iterator leaves `next()`
waiting: the trainer's watchdog, which watches the `step` phase around `next()`, ends the run as
a stalled step, and its stack dump shows the producer thread where it hangs.

Memory. At most `depth` placed batches wait for the trainer (a semaphore is taken before each
placement and given back when the trainer takes the batch): each occupies device memory on top of
the step's own (batch x image size² x 3 bytes of uint8 pixels plus the tokens, per device its
share of the global batch), and the host holds at most one more batch prepared but not placed.

Shutdown. `close()` stops the thread, drops the queued batches (freeing their device memory) and
joins the thread with a timeout; a thread stuck in the host iterator (a hung reader) is a daemon
and is left to die with the process, and `close()` says so by returning False.

Profiling: placements run on the thread named "jaxclip-prefetch" in a trace, overlapping the
steps; the batches of the first traced steps were placed before the trace started.

With depth 0 nothing runs in the background: `next()` reads and places the batch in the caller's
thread, as the trainer did before this module existed.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

_POLL_S = 0.1  # how often a blocked producer or consumer checks whether it should give up


class _End:
    """Queued after the last batch (`count` reached, or the host iterator ran out)."""


class _Failure:
    def __init__(self, error: BaseException, index: int):
        self.error, self.index = error, index


class DeviceBatches:
    """Iterator of (device batch, skipped count) for successive steps; see the module docstring."""

    def __init__(self, host_batches: Iterator[dict], place: Callable[[Mapping], dict], *,
                 depth: int = 2, count: int | None = None, first_step: int = 1,
                 join_timeout_s: float = 10.0):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._host, self._place, self._depth = host_batches, place, depth
        self._count, self._first_step, self._join_timeout_s = count, first_step, join_timeout_s
        self._taken = 0  # batches returned by next()
        self._done = False
        self._stop = threading.Event()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._slots = threading.Semaphore(max(depth, 1))
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._produce, name="jaxclip-prefetch",
                                            daemon=True)
            self._thread.start()

    def __iter__(self):
        return self

    def _prepare(self) -> tuple[dict, int]:
        host = dict(next(self._host))
        skipped = int(host.pop("skipped", 0))
        return self._place(host), skipped

    def _produce(self) -> None:
        produced = 0
        try:
            while not self._stop.is_set():
                if self._count is not None and produced >= self._count:
                    break
                host = dict(next(self._host))  # host work first: it needs no device memory
                skipped = int(host.pop("skipped", 0))
                if self._stop.is_set():  # closed while the host iterator was busy
                    return
                while not self._slots.acquire(timeout=_POLL_S):
                    if self._stop.is_set():
                        return
                # Waiting for the transfer here keeps it off the trainer's critical path.
                batch = jax.block_until_ready(self._place(host))
                self._queue.put((batch, skipped))
                produced += 1
        except StopIteration:
            pass
        except BaseException as e:  # handed to the consumer, which raises it at its step
            self._queue.put(_Failure(e, produced))
            return
        self._queue.put(_End())

    def __next__(self) -> tuple[dict, int]:
        if self._done or (self._count is not None and self._taken >= self._count):
            raise StopIteration
        if self._thread is None:
            item = self._prepare()
        else:
            item = self._get()
        self._taken += 1
        return item

    def _get(self) -> tuple[dict, int]:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True  # cannot happen unless the thread was killed outright
                    raise RuntimeError("the input prefetch thread ended without a batch or an "
                                       "error") from None
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            item.error.add_note(f"raised by the input prefetch thread while preparing the batch "
                                f"of step {self._first_step + item.index}")
            raise item.error
        self._slots.release()
        return item

    def close(self) -> bool:
        """Stops and joins the thread, dropping queued batches. True if no thread is left."""
        self._done = True
        if self._thread is None:
            return True
        self._stop.set()
        self._drain()  # frees the queued device batches now rather than at garbage collection
        self._thread.join(self._join_timeout_s)
        self._drain()  # what the thread queued while it was stopping
        if self._thread.is_alive():
            logging.warning("the input prefetch thread did not stop within %.0f s (stuck in the "
                            "input pipeline?); it is a daemon and ends with the process",
                            self._join_timeout_s)
            return False
        return True

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def __enter__(self) -> DeviceBatches:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
