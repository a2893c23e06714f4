"""Device prefetch (jaxclip.data.prefetch): order, the memory bound, errors at their step, close."""

import threading
import time

import jax
import numpy as np
import pytest

from jaxclip import sharding
from jaxclip.data import prefetch


def _host(n=None, fail_at=None, block=None):
    """Host batches numbered 0, 1, ...: batch k holds k in every entry and skipped = k % 3."""
    k = 0
    while n is None or k < n:
        if k == fail_at:
            raise OSError(f"shard unreadable at batch {k}")
        if block is not None and k == block[0]:
            block[1].wait()
        yield {"image": np.full((8, 2, 2, 3), k, np.uint8), "text": np.full((8, 4), k, np.int32),
               "skipped": np.int32(k % 3)}
        k += 1


def _place(mesh, placed=None):
    def place(host):
        if placed is not None:
            placed.append(int(host["text"][0, 0]))
        return sharding.global_batch(host, mesh)
    return place


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))


def _threads():
    return [t for t in threading.enumerate() if t.name == "jaxclip-prefetch" and t.is_alive()]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_arrive_in_step_order_placed_and_exactly_count_of_them(mesh, depth):
    batches = prefetch.DeviceBatches(_host(), _place(mesh), depth=depth, count=7)
    got = list(batches)
    assert [int(b["text"][0, 0]) for b, _ in got] == list(range(7))
    assert [s for _, s in got] == [k % 3 for k in range(7)]
    image = got[0][0]["image"]
    assert isinstance(image, jax.Array) and image.sharding == sharding.batch_sharding(mesh)
    assert "skipped" not in got[0][0]
    assert batches.close() and not _threads()


def test_queued_batches_are_bounded_by_the_depth(mesh):
    placed = []
    batches = prefetch.DeviceBatches(_host(), _place(mesh, placed), depth=2)
    try:
        time.sleep(0.5)  # the consumer takes nothing: the thread must stop at `depth` placements
        assert placed == [0, 1]
        next(batches)
        time.sleep(0.5)
        assert placed == [0, 1, 2]
    finally:
        assert batches.close()
    assert not _threads()


@pytest.mark.parametrize("depth", [0, 2])
def test_an_input_error_is_raised_at_the_step_of_its_batch(mesh, depth):
    batches = prefetch.DeviceBatches(_host(fail_at=3), _place(mesh), depth=depth, first_step=11)
    assert [int(next(batches)[0]["text"][0, 0]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="batch 3") as err:
        next(batches)
    if depth:  # the note says which step's batch failed (steps 11, 12, 13 came through)
        assert "preparing the batch of step 14" in "".join(err.value.__notes__)
    with pytest.raises(StopIteration):
        next(batches)
    assert batches.close() and not _threads()


def test_close_joins_a_thread_waiting_for_a_slot_and_reports_a_stuck_one(mesh):
    batches = prefetch.DeviceBatches(_host(), _place(mesh), depth=1)
    next(batches)
    t0 = time.perf_counter()
    assert batches.close()  # the thread was blocked waiting for the consumer; it stops at once
    assert time.perf_counter() - t0 < 2 and not _threads()

    release = threading.Event()  # a hung reader: next() on the host iterator never returns
    stuck = prefetch.DeviceBatches(_host(block=(1, release)), _place(mesh), depth=2,
                                   join_timeout_s=0.3)
    next(stuck)
    assert stuck.close() is False and len(_threads()) == 1  # said so, did not wait forever
    release.set()  # the reader comes back: the stopped thread then ends by itself
    deadline = time.perf_counter() + 5
    while _threads() and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert not _threads()
