"""Many Python threads at once: results equal serial calls, and kernels release the GIL."""
from __future__ import annotations

import threading
import time

import numpy as np

from rec_engine import EmbeddingTable, normalized_adjacency, propagate, topk


def run_in_threads(n_threads, fn):
    results = [None] * n_threads
    errors = []
    barrier = threading.Barrier(n_threads)

    def worker(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, errors
    return results


def test_eight_threads_calling_topk_and_pool_match_serial_results():
    rng = np.random.default_rng(7)
    items = rng.normal(size=(20000, 32)).astype(np.float32)
    queries = rng.normal(size=(8, 16, 32)).astype(np.float32)
    excl = [[rng.choice(20000, 30, replace=False) for _ in range(16)] for _ in range(8)]
    table = EmbeddingTable(rng.normal(size=(50000, 24)).astype(np.float32))
    table16 = EmbeddingTable.quantize(table.weights, "int8")
    idx = rng.integers(0, 50000, size=(8, 2000))
    offsets = np.arange(0, 2000, 20)

    def work(i):
        out = []
        for _ in range(5):
            r = topk(queries[i], items, 25, exclude=excl[i], metric="cosine" if i % 2 else "ip")
            out.append((r.ids, r.scores, table.pool(idx[i], offsets, mode="mean"),
                        table16.pool(idx[i], offsets, mode="max"), topk(queries[i][0], items, 10).ids))
        return out

    serial = [work(i)[0] for i in range(8)]
    concurrent = run_in_threads(8, work)
    for i in range(8):
        for rep in concurrent[i]:
            for got, want in zip(rep, serial[i]):
                np.testing.assert_array_equal(got, want)


def test_propagation_from_many_threads_matches_serial():
    rng = np.random.default_rng(3)
    users = rng.integers(0, 2000, 30000)
    items = rng.integers(0, 3000, 30000)
    adj = normalized_adjacency(users, items, 2000, 3000)
    e0 = rng.normal(size=(5000, 16)).astype(np.float32)
    want = propagate(adj, e0, 3)
    for got in run_in_threads(8, lambda i: propagate(adj, e0, 3)):
        np.testing.assert_array_equal(got, want)


def ticks_during(call):
    """Runs ``call()`` while a pure-Python thread ticks about once a millisecond; returns the seconds the call
    took and the ticks seen inside it (20 ms trimmed at each end). With the GIL held the ticker cannot run
    at all inside the call; with it released it ticks about once a millisecond."""
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        time.sleep(0.02)
        start = time.perf_counter()
        call()
        end = time.perf_counter()
    finally:
        stop.set()
        t.join()
    return end - start, len([x for x in ticks if start + 0.02 < x < end - 0.02])


def test_kernels_release_the_gil_while_they_run():
    """A pure-Python thread keeps running while another thread is inside a long kernel call."""
    rng = np.random.default_rng(1)
    items = rng.normal(size=(400000, 64)).astype(np.float32)
    queries = rng.normal(size=(1024, 64)).astype(np.float32)     # ~0.2 s on one Zen 5 core
    took, inside = ticks_during(lambda: topk(queries, items, 10, num_threads=1))
    assert took > 0.1, "the kernel call was too short to observe the GIL"
    # Require a clear fraction of one tick a millisecond.
    assert inside >= 0.2 * (took - 0.04) / 0.001, (inside, took)
