"""Past one machine: the engine on Ray Serve, its item catalogue sharded over several processes or machines.

::

    rec-engine cluster --shards 4 --replicas 2 bundles/pipeline --events redis://10.0.0.5:6379/0 --port 8000

    client -> HTTP proxy -> ingress replica (R of them)                 shard deployments (M of them)
                            Engine over the bundle: user vector,  --->  shard i: rows [lo_i, hi_i) of the
                            seen set, fold-in, ranking, re-rank   <---  item table, memory-mapped; exact
                            merge of the M local top-n lists            top-n of its rows, global ids

- **Ingress** (:class:`Ingress`, ``R`` replicas): each holds a :class:`ShardedEngine`, an
  :class:`~rec_engine.engine.Engine` over the bundle whose retrieval scan is sent to the shards instead of
  run in the process; everything else (user vectors and LightGCN fold-in, seen sets and exclusions, the
  cold-start fallback, the content hybrid, ranking by the CTR model, re-ranking, impressions) is the
  Engine's own code path, so an answer is the single-process Engine's answer. The tables are memory-mapped
  (``scan_memory="mmap"``): an ingress touches only the rows of the candidates it ranks.
- **Shards** (:class:`ShardScanner` in a :class:`Shard` deployment, ``M`` of them): shard ``i`` of ``M``
  maps rows ``[i * N // M, (i + 1) * N // M)`` of the retrieval item table (N items) and answers a scan
  with the exact top-n of its rows (the core's top-k, the query's exclusions within its range), ids global.
  The ingress merges the M lists by score, ties to the lower id: that is exactly the global top-n, the
  same ids and the same float32 scores as one scan of the whole table (the core scores an item the same
  way whatever block it sits in; tested). Scans that reach a busy shard replica are coalesced
  (``shard_batch``): those that arrived during a scan are scanned together next, single queries 3 to a
  core call, each answer still the lone scan's bit for bit (:meth:`ShardScanner.scan_many`).
- **Versions**: a scan names the bundle path and version id the ingress serves; a shard answers from that
  version, loading it on demand if its own ``reconfigure`` has not yet (it keeps the last ``keep``
  versions), so during a swap every answer comes wholly from one version and none fails.
- **Hot swap**: the bundle path is the deployments' ``user_config`` (``{"bundle": path}``); a new one
  reaches ``reconfigure`` of every replica, which loads it beside the old version and switches
  (:meth:`Engine.swap`); requests in flight finish on the old version.
- **Tokens**: the ingress checks HTTP requests against ``REC_ENGINE_TOKEN`` / ``REC_ENGINE_READ_TOKEN`` of its
  environment (``rec-engine serve``'s policy; :func:`main` passes them in the Serve config's ``runtime_env``).
- **Events**: the ingress replicas share a Redis stream (``events="redis://..."``), and each follows it
  (``follow_events_s``), so an ``observe`` answered by one replica reaches the others within milliseconds.

The scan is float32 and exact; a bundle's reduced-precision index is not used (``index="float32"``).
Retrieval families that do not scan item vectors (GF-CF / BSPM, EASE^R: they score a user from its items)
have nothing to shard and are refused. Items added online (:meth:`Engine.add_items`) are scanned by the
ingress itself (they are few) and merged with the shards' lists.

Ray is imported only by :func:`build_app`, :func:`main` and the deployments (``pip install
'rec_engine[cluster]'``); :class:`ShardScanner`, :class:`ShardedEngine` and :func:`merge_topk` work without it.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import kinds
from ._core import RecEngineError
from .bundle import BundleError, open_bundle
from .engine import Engine, bundle_version_id
from .topk import IdLists, TopK, topk
from .versions import resolve as resolve_bundle

APP_NAME = "rec_engine"
DEFAULT_STREAM = "rec_engine:events"
_NO_IDS = np.zeros(0, np.int64)
#: Single queries scanned together in one core call by :meth:`ShardScanner.scan_many`: the core scores 1-3
#: queries on its streaming path, each score summed exactly as for a lone query (4+ take the packed path).
EXACT_BLOCK = 3
DEFAULT_SHARD_BATCH = 16          # scan requests a shard replica coalesces at most (1: no batching)


# --------------------------------------------------------------------------- shard arithmetic and merging
def shard_bounds(n_items: int, n_shards: int) -> np.ndarray:
    """The ``n_shards + 1`` row boundaries of ``n_items`` items cut into contiguous shards of near-equal
    size: shard ``i`` holds rows ``[b[i], b[i + 1])``."""
    if isinstance(n_shards, bool) or not isinstance(n_shards, (int, np.integer)) or n_shards < 1:
        raise ValueError(f"the number of shards must be an integer >= 1, got {n_shards!r}")
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 0:
        raise ValueError(f"the number of items must be an integer >= 0, got {n_items!r}")
    return np.array([(i * int(n_items)) // int(n_shards) for i in range(int(n_shards) + 1)], np.int64)


def _cut(e, lo: int, hi: int) -> np.ndarray:
    """The ids of ``e`` within ``[lo, hi)`` (global ids kept)."""
    if e is None or not len(e):
        return _NO_IDS
    e = np.asarray(e, np.int64)
    return e[(e >= lo) & (e < hi)]


def split_exclude(exclude, batch: bool, lo: int, hi: int):
    """The part of ``exclude`` (one id array, or for a batch one per query / an IdLists) that falls in a
    shard's rows ``[lo, hi)``, as global ids: what the ingress sends to that shard."""
    if exclude is None:
        return None
    if not batch:
        return _cut(exclude, lo, hi)
    lists = [exclude[q] for q in range(len(exclude))] if isinstance(exclude, IdLists) else list(exclude)
    return [_cut(e, lo, hi) for e in lists]


def merge_topk(parts: Sequence[TopK], n: int) -> TopK:
    """The best ``n`` of several top-n lists over disjoint item sets (ids global), best first, ties to the
    lower id (the core's rule), so merging the shards' lists gives exactly the top-n of one scan.

    Each part is 1-D (one query) or 2-D (a batch, same rows in every part); slots with id -1 (padding) sort
    last and the result is as wide as ``min(n, eligible slots)``, padded with id -1 / score -inf like
    :func:`~rec_engine.topk.topk`."""
    if not parts:
        raise ValueError("merge_topk needs at least one list")
    batch = parts[0].ids.ndim == 2
    ids = np.concatenate([np.asarray(p.ids, np.int64) for p in parts], axis=-1)
    scores = np.concatenate([np.asarray(p.scores, np.float32) for p in parts], axis=-1)
    width = min(int(n), ids.shape[-1])
    if not batch:
        ids, scores = ids[None, :], scores[None, :]
    out_ids = np.full((ids.shape[0], width), -1, np.int64)
    out_scores = np.full((ids.shape[0], width), -np.inf, np.float32)
    for r in range(ids.shape[0]):
        ok = ids[r] >= 0
        i, s = ids[r][ok], scores[r][ok]
        order = np.lexsort((i, -s))[:width]
        out_ids[r, :len(order)], out_scores[r, :len(order)] = i[order], s[order]
    return TopK(out_ids[0], out_scores[0]) if not batch else TopK(out_ids, out_scores)


def version_id(path) -> str:
    """The id :class:`~rec_engine.engine.Engine` gives the bundle at ``path`` (a model home: its CURRENT)."""
    p = resolve_bundle(Path(path))
    try:
        return bundle_version_id(p)
    except OSError as e:
        raise BundleError(f"{p} is not a readable bundle: {e}") from None


# --------------------------------------------------------------------------- shards
class ShardSlice:
    """Rows ``[lo, hi)`` of one bundle version's retrieval item table (float32, C-contiguous)."""

    __slots__ = ("path", "version", "lo", "hi", "n_items", "items")

    def __init__(self, path: Path, version: str, lo: int, hi: int, n_items: int, items: np.ndarray):
        self.path, self.version, self.lo, self.hi, self.n_items, self.items = path, version, lo, hi, n_items, items

    def info(self) -> dict:
        return {"version": self.version, "lo": self.lo, "hi": self.hi, "n_items": self.n_items,
                "dim": int(self.items.shape[1]) if self.items.ndim == 2 else 0}


def _retrieval_bundle(path: Path, verify: bool):
    top = open_bundle(path, verify=verify)
    if top.kind != "pipeline":
        return top
    stage = (top.meta.get("stages") or {}).get("retrieval")
    if not stage:
        raise RecEngineError(f"bundle {path} has no retrieval stage: there is no item scan to shard")
    return open_bundle(path / stage, verify=verify)


def load_slice(path, shard: int, n_shards: int, *, verify: bool = True, scan_memory: str = "mmap") -> ShardSlice:
    """Shard ``shard`` of ``n_shards`` of the retrieval item table of the bundle (or model home) at ``path``.

    A float32 table is sliced from the memory-mapped file (``scan_memory="mmap"``: only this shard's rows are
    ever read, and shards on one machine share the page cache) or copied into the process (``"copy"``:
    huge pages, faster scans); a float16 / int8 table has its rows converted to float32 (what the Engine
    scans). Raises :class:`RecEngineError` for a bundle whose retrieval does not scan item vectors."""
    if scan_memory not in ("mmap", "copy"):
        raise ValueError(f"scan_memory must be 'mmap' or 'copy', got {scan_memory!r}")
    bounds_check = shard_bounds(1, n_shards)         # validates n_shards
    if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or not 0 <= shard < len(bounds_check) - 1:
        raise ValueError(f"shard must be an integer in [0, {n_shards}), got {shard!r}")
    p = resolve_bundle(Path(path))
    vid = version_id(p)
    rb = _retrieval_bundle(p, verify)
    try:
        kind = kinds.get_kind(rb.kind)
    except ValueError:
        kind = None
    if kind is None or kind.stage != "retrieval":
        raise RecEngineError(f"bundle {p}: {rb.kind!r} is not a retrieval model")
    if kind.family not in ("graph", "sequential"):
        raise RecEngineError(f"bundle {p}: a {rb.kind} model scores a user from its items, it does not scan item "
                             "vectors: there is nothing to shard (serve it with `rec-engine serve`)")
    if kind.family == "graph" and "items" in rb.manifest["tables"]:
        table = rb.table("items")
        n = table.rows
        b = shard_bounds(n, n_shards)
        lo, hi = int(b[shard]), int(b[shard + 1])
        if table.dtype == "float32":
            rows = np.ascontiguousarray(table.weights)[lo:hi]
            items = np.array(rows, order="C") if scan_memory == "copy" else rows
        else:
            items = table.gather(np.arange(lo, hi, dtype=np.int64))
    else:                                            # SASRec and others: the items the retrieval class scans
        from .retrieval import load_retrieval

        r = load_retrieval(rb)
        n = len(r.items)
        b = shard_bounds(n, n_shards)
        lo, hi = int(b[shard]), int(b[shard + 1])
        items = np.array(r.items[lo:hi], np.float32, order="C")
    return ShardSlice(p, vid, lo, hi, int(n), items)


class ShardScanner:
    """One shard's rows of every bundle version it is asked about, and the exact top-n over them.

    Parameters
    ----------
    shard, n_shards : int
        This shard's index and the number of shards.
    verify : bool
        Check the bundle files' sha256 when a version is loaded.
    keep : int
        Versions kept loaded (the most recently used); an older one asked for again is loaded again.
    scan_memory : {"mmap", "copy"}
        See :func:`load_slice`.
    num_threads : int
        OpenMP threads of one scan (1: a request on one core, requests in parallel).
    """

    def __init__(self, shard: int, n_shards: int, *, verify: bool = True, keep: int = 2,
                 scan_memory: str = "mmap", num_threads: int = 1):
        shard_bounds(1, n_shards)
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < n_shards:
            raise ValueError(f"shard must be an integer in [0, {n_shards}), got {shard!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        if scan_memory not in ("mmap", "copy"):
            raise ValueError(f"scan_memory must be 'mmap' or 'copy', got {scan_memory!r}")
        self.shard, self.n_shards, self.verify, self.keep = shard, n_shards, verify, keep
        self.scan_memory, self.num_threads = scan_memory, num_threads
        self._versions: OrderedDict[str, ShardSlice] = OrderedDict()    # version id -> slice, least recent first
        self._lock = threading.Lock()
        self.loads = 0                 # versions loaded so far (on demand ones included)

    def load(self, path, version: str | None = None) -> dict:
        """Load (or find) the version of the bundle at ``path``; ``version``: the id the caller expects (a
        :class:`RecEngineError` when the bundle at ``path`` is another one). Returns the slice's
        ``{"version", "lo", "hi", "n_items", "dim"}``."""
        return self._get(path, version).info()

    def _get(self, path, version: str | None) -> ShardSlice:
        if version is not None:
            with self._lock:
                got = self._versions.get(version)
                if got is not None:
                    self._versions.move_to_end(version)
                    return got
        with self._lock:                 # one load at a time; a second caller finds it loaded
            if version is not None and version in self._versions:
                self._versions.move_to_end(version)
                return self._versions[version]
            vid = version_id(path)
            if version is not None and vid != version:
                raise RecEngineError(f"shard {self.shard}: the bundle at {path} is version {vid}, the request "
                                     f"asks for {version} (the path must hold the same bundle on every node)")
            got = self._versions.get(vid)
            if got is None:
                got = load_slice(path, self.shard, self.n_shards, verify=self.verify, scan_memory=self.scan_memory)
                self._versions[vid] = got
                self.loads += 1
            self._versions.move_to_end(vid)
            while len(self._versions) > self.keep:
                self._versions.popitem(last=False)
            return got

    @property
    def versions(self) -> list[str]:
        with self._lock:
            return list(self._versions)

    def scan_many(self, requests: Sequence[tuple]) -> list:
        """Several scans ``(path, version, queries, n, exclude)`` (:meth:`scan`'s arguments) in as few core calls
        as exactness allows: each answer (a :class:`TopK`, or the exception that scan alone raises, returned
        in its place) is what :meth:`scan` gives for that request alone, the same ids and float32 scores bit
        for bit.

        Requests are grouped by ``(path, version, n)``; within a group the single queries (``[d]``) are scanned
        together, :data:`EXACT_BLOCK` at a time (a ``[<=3, d]`` block with per-query exclusion lists: the core
        scores 1, 2 or 3 queries on its streaming path, reading the rows once for all of them, and sums each
        score exactly as for a lone query; 4 or more would take its packed path, whose last bit can differ).
        A request that is already a batch (``[B, d]``, from ``recommend_batch``) is scanned as it came."""
        out: list = [None] * len(requests)
        groups: dict = {}
        for j, req in enumerate(requests):
            path, version, queries, n, exclude = req
            try:
                key = (str(path), version, int(n))
            except (TypeError, ValueError) as e:
                out[j] = e
                continue
            groups.setdefault(key, []).append(j)
        for (path, version, n), members in groups.items():
            try:
                s = self._get(path, version)
            except Exception as e:          # noqa: BLE001 - every member gets the error its own scan gets
                for j in members:
                    out[j] = e
                continue
            singles = []
            for j in members:
                q = requests[j][2]
                if isinstance(q, np.ndarray) and q.ndim == 1 and q.dtype == np.float32:
                    singles.append(j)
                else:
                    out[j] = self._scan_one(requests[j])
            for c in range(0, len(singles), EXACT_BLOCK):
                block = singles[c:c + EXACT_BLOCK]
                if len(block) == 1:
                    out[block[0]] = self._scan_one(requests[block[0]])
                    continue
                try:
                    q = np.stack([requests[j][2] for j in block])
                    ex = IdLists.from_lists([_cut(requests[j][4], s.lo, s.hi) - s.lo for j in block])
                    res = topk(q, s.items, n, exclude=ex, num_threads=self.num_threads)
                except Exception:           # noqa: BLE001 - a bad request: each alone, so only it fails
                    for j in block:
                        out[j] = self._scan_one(requests[j])
                    continue
                ids = np.where(res.ids >= 0, res.ids + s.lo, -1)
                for r, j in enumerate(block):
                    out[j] = TopK(ids[r], res.scores[r])
        return out

    def _scan_one(self, req):
        try:
            return self.scan(*req)
        except Exception as e:              # noqa: BLE001 - handed back in the request's place
            return e

    def scan(self, path, version: str | None, queries, n: int, exclude=None) -> TopK:
        """The exact top-``n`` of this shard's rows for ``queries`` (``[d]`` or ``[B, d]`` float32), excluding
        ``exclude`` (global ids: one array, or one per query; ids outside the shard are ignored); ids global."""
        s = self._get(path, version)
        q = np.asarray(queries)
        batch = q.ndim == 2
        if exclude is not None:
            parts = split_exclude(exclude, batch, s.lo, s.hi)
            exclude = (parts - s.lo) if not batch else IdLists.from_lists([p - s.lo for p in parts])
        res = topk(q, s.items, n, exclude=exclude, num_threads=self.num_threads)
        ids = np.where(res.ids >= 0, res.ids + s.lo, -1)
        return TopK(ids, res.scores)


# --------------------------------------------------------------------------- the ingress's engine
class ShardedEngine(Engine):
    """An :class:`~rec_engine.engine.Engine` whose retrieval scan runs on shards.

    Every version it loads gets its retrieval's item scan replaced by a fan-out: the query (and its
    exclusions, cut per shard) goes to each shard through ``submit(shard, path, version, queries, n,
    exclude) -> handle``, ``wait(handle) -> TopK`` collects the answers, and :func:`merge_topk` merges them;
    the items added online since the bundle (beyond the shards' rows) are scanned here and merged too.
    Everything else is the Engine's own code. Scans over given ``candidates`` (a few rows) stay local.

    Parameters
    ----------
    path : bundle path or model home
    n_shards : int
    submit, wait : callables
        The transport (Ray Serve handles in :class:`Ingress`; direct calls of :class:`ShardScanner` objects
        in tests and in one process).
    **options
        :class:`~rec_engine.engine.Engine` options; ``scan_memory`` defaults to ``"mmap"`` (the ingress only
        gathers candidate rows) and ``index`` must be float32 (the shards scan exactly).
    """

    def __init__(self, path, *, n_shards: int, submit: Callable, wait: Callable, **options):
        shard_bounds(1, n_shards)
        if not callable(submit) or not callable(wait):
            raise TypeError("submit and wait must be callables")
        idx = options.get("index")
        if idx not in (None, "float32"):
            raise ValueError(f"the shards scan float32 exactly: index={idx!r} is not supported by the cluster")
        options["index"] = "float32"
        options.setdefault("scan_memory", "mmap")
        self._n_shards, self._submit, self._wait = int(n_shards), submit, wait
        self.shard_info: dict[str, list[dict]] = {}     # version id -> what each shard reported at load
        super().__init__(path, **options)

    @classmethod
    def check_options(cls, **options) -> None:
        """:meth:`Engine.check_options` (the options are the Engine's)."""
        Engine.check_options(**options)

    def _load_version(self, path):
        v = super()._load_version(path)
        r = v.retrieval
        if r is None:
            raise RecEngineError(f"bundle {v.path} has no retrieval stage: there is no item scan to shard "
                                 "(serve a ranking-only bundle with `rec-engine serve`)")
        if not r.scans_vectors:
            raise RecEngineError(f"bundle {v.path}: a {r.kind} model does not scan item vectors, there is nothing "
                                 "to shard (serve it with `rec-engine serve`)")
        handles = [self._submit(i, v.path, v.id, None, None, None) for i in range(self._n_shards)]
        infos = [self._wait(h) for h in handles]          # every shard loads the version now (or has it)
        n_base = infos[0]["n_items"]
        b = shard_bounds(n_base, self._n_shards)
        for i, info in enumerate(infos):
            if info["version"] != v.id or info["n_items"] != n_base or (info["lo"], info["hi"]) != (b[i], b[i + 1]):
                raise RecEngineError(f"shard {i} holds rows [{info['lo']}, {info['hi']}) of version {info['version']} "
                                     f"({info['n_items']} items); the ingress loaded version {v.id} whose shard {i} "
                                     f"is rows [{b[i]}, {b[i + 1]}) of {n_base}: is the same bundle at {v.path} on "
                                     "every node, and the same --shards everywhere?")
        if n_base > len(r.items) or (infos[0]["dim"] and infos[0]["dim"] != r.items.shape[1]):
            raise RecEngineError(f"the shards hold {n_base} items of dimension {infos[0]['dim']}, the ingress's "
                                 f"table is {r.items.shape}")
        self.shard_info[v.id] = infos
        local = r._topk

        def sharded_topk(q, n, exclude, candidates, num_threads, _v=v, _r=r, _local=local, _bounds=b):
            if candidates is not None:
                return _local(q, n, exclude, candidates, num_threads)
            return self._scan_shards(_v, _r, _bounds, q, n, exclude, num_threads)

        r._topk = sharded_topk           # this version's scans go to the shards from now on
        return v

    def _scan_shards(self, v, r, bounds, q, n, exclude, num_threads) -> TopK:
        batch = q.ndim == 2
        q = np.ascontiguousarray(q, np.float32)
        handles = [self._submit(i, v.path, v.id, q, n, split_exclude(exclude, batch, int(bounds[i]), int(bounds[i + 1])))
                   for i in range(self._n_shards)]
        items = r.items                  # read once: items added online grow the table
        n_base, m = int(bounds[-1]), len(items)
        parts = []
        if m > n_base:                   # items added online: scanned here, beside the shards' work
            ex = split_exclude(exclude, batch, n_base, m)
            ex = None if ex is None else ((ex - n_base) if not batch else IdLists.from_lists([e - n_base for e in ex]))
            tail = topk(q, items[n_base:m], n, exclude=ex, num_threads=num_threads)
            parts.append(TopK(np.where(tail.ids >= 0, tail.ids + n_base, -1), tail.scores))
        parts = [self._wait(h) for h in handles] + parts
        return merge_topk(parts, min(n, m))


# --------------------------------------------------------------------------- Ray Serve deployments
def _check_config(config) -> str:
    if not isinstance(config, Mapping) or not isinstance(config.get("bundle"), str) or not config["bundle"]:
        raise ValueError(f"user_config must be a mapping with a 'bundle' path (a string), got {config!r}")
    extra = set(config) - {"bundle"}
    if extra:
        raise ValueError(f"user_config has unknown fields {sorted(extra)} (only 'bundle')")
    return config["bundle"]


def _replica_id() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:            # outside a replica (tests of the classes)
        return f"pid-{os.getpid()}"


def _rss_mib() -> float:
    """This process's resident set size in MiB (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


class Shard:
    """The shard deployment's class: a :class:`ShardScanner` behind Ray Serve (``user_config``: the bundle).

    ``batch`` > 1: concurrent :meth:`scan` requests are coalesced. A request that finds the replica idle is
    scanned at once (no added wait); requests that arrive while a scan runs wait for it and are then scanned
    together, at most ``batch`` of them, in one :meth:`ShardScanner.scan_many` call (one at a time per
    replica; ``num_threads`` spreads it over cores). Every answer is the one its scan alone gives, bit for
    bit. ``batch`` = 1: each request is scanned on its own, ``threads`` at a time.

    (Ray Serve's ``@serve.batch`` was tried first: it closes a batch ``batch_wait_timeout_s`` after its first
    request whether or not the previous batch is still scanning, so under load it made batches of ~2 and
    added its wait to every lone request; the queue here fills while the previous scan runs.)"""

    def __init__(self, shard: int, n_shards: int, verify: bool = True, scan_memory: str = "mmap",
                 num_threads: int = 1, threads: int = 4, keep: int = 2, batch: int = 1):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        self.scanner = ShardScanner(shard, n_shards, verify=verify, keep=keep, scan_memory=scan_memory,
                                    num_threads=num_threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"shard{shard}")
        self.batch = batch
        self._pending: list = []          # (scan arguments, future) waiting for the next scan_many
        self._draining = False
        self.batches, self.batched_requests = 0, 0

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                take, self._pending = self._pending[:self.batch], self._pending[self.batch:]
                self.batches += 1
                self.batched_requests += len(take)
                try:
                    got = await loop.run_in_executor(self._pool, self.scanner.scan_many, [r for r, _ in take])
                except Exception as e:                  # noqa: BLE001 - scan_many hands errors back; a stray one
                    got = [e] * len(take)
                for (_, fut), res in zip(take, got):
                    if not fut.done():                   # its caller may have gone
                        fut.set_result(res)
        finally:
            self._draining = False

    async def reconfigure(self, config) -> None:
        path = _check_config(config)
        await asyncio.get_running_loop().run_in_executor(self._pool, self.scanner.load, path)

    async def load(self, path: str, version: str | None = None) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.scanner.load, path, version)

    async def scan(self, path: str, version: str, queries, n: int, exclude=None) -> TopK:
        loop = asyncio.get_running_loop()
        if self.batch == 1:
            return await loop.run_in_executor(self._pool, self.scanner.scan, path, version, queries, n, exclude)
        fut = loop.create_future()
        self._pending.append(((path, version, queries, n, exclude), fut))
        if not self._draining:                           # idle: this request starts a scan now
            self._draining = True
            loop.create_task(self._drain())
        got = await fut
        if isinstance(got, BaseException):
            raise got
        return got

    async def stats(self) -> dict:
        return {"replica": _replica_id(), "pid": os.getpid(), "rss_mib": _rss_mib(), "versions": self.scanner.versions,
                "loads": self.scanner.loads, "batches": self.batches, "batched_requests": self.batched_requests}


def _jsonable_rec(rec, replica: str) -> dict:
    return {"user": rec.user, "items": [k.item() if isinstance(k, np.generic) else k for k in rec.items],
            "ids": rec.ids.tolist(), "scores": [float(s) for s in rec.scores], "version": rec.version,
            "fallback": bool(rec.fallback), "request_id": rec.request_id, "timings": rec.timings, "replica": replica}


TOKEN_ENV = ("REC_ENGINE_TOKEN", "REC_ENGINE_READ_TOKEN")      # write token, read token


def _guard_from_env():
    """A :class:`~rec_engine.http_guard.Guard` (only its token policy is used) with the tokens of this process's
    environment (an empty variable: no token). Refuses a placeholder ``<...>`` left from ``--print-config``."""
    from .http_guard import Guard

    tokens = {}
    for name in TOKEN_ENV:
        value = os.environ.get(name) or None
        if value is not None and value.startswith("<") and value.endswith(">"):
            raise ValueError(f"{name} is the placeholder {value!r} from `rec-engine cluster --print-config`: put the "
                             "token itself in the Serve config's runtime_env")
        tokens[name] = value
    return Guard(None, token=tokens["REC_ENGINE_TOKEN"], read_token=tokens["REC_ENGINE_READ_TOKEN"])


class Ingress:
    """The ingress deployment's class: a :class:`ShardedEngine` per replica (``user_config``: the bundle).

    Python callers use the handle's methods :meth:`recommend`, :meth:`recommend_batch`, :meth:`observe`,
    :meth:`stats` (answers are dicts of plain values); HTTP clients POST JSON to ``/recommend``
    (``{"user", "k", "context", "exclude", "candidates", "exclude_seen", "n_candidates"}``) and ``/observe``
    (``{"user", "items", "kind"}``), and GET ``/healthz``.

    HTTP requests follow ``rec-engine serve``'s token policy (:class:`~rec_engine.http_guard.Guard`) with the
    tokens in this replica's environment: ``REC_ENGINE_TOKEN`` (the write token: ``/observe`` needs it when
    set) and ``REC_ENGINE_READ_TOKEN`` (when set, ``/recommend`` needs it or the write token); a refusal is a
    401 ``{"detail": ...}``. ``/healthz`` is open. Calls through a handle are Ray's, not HTTP: no token."""

    _REC_FIELDS = ("k", "exclude_seen", "exclude", "candidates", "context", "n_candidates")

    def __init__(self, shards: list, events: str | None = None, stream: str = DEFAULT_STREAM,
                 follow_events_s: float = 0.05, engine_options: Mapping[str, Any] | None = None, threads: int = 8):
        self._shards = list(shards)
        self._events_url, self._stream, self._follow = events, stream, follow_events_s
        self._options = dict(engine_options or {})
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="ingress")
        self.engine: ShardedEngine | None = None
        self._store = None
        self._replica = _replica_id()
        self._guard = _guard_from_env()

    def _submit(self, i, path, version, queries, n, exclude):
        h = self._shards[i]
        if queries is None:
            return h.load.remote(str(path), version)
        return h.scan.remote(str(path), version, queries, n, exclude)

    @staticmethod
    def _wait(response):
        return response.result()

    def _configure(self, path: str) -> str:
        if self.engine is not None:
            return self.engine.swap(path)
        store = None
        if self._events_url is not None:
            from .events import open_store
            from .events_redis import RedisEventStore

            store = (RedisEventStore(self._events_url, stream=self._stream)
                     if self._events_url.startswith(("redis://", "rediss://", "unix://")) else open_store(self._events_url))
        try:
            self.engine = ShardedEngine(path, n_shards=len(self._shards), submit=self._submit, wait=self._wait,
                                        events=store, follow_events_s=self._follow if store is not None else None,
                                        **self._options)
        except BaseException:
            if store is not None:
                store.close()
            raise
        self._store = store
        return self.engine.version

    async def reconfigure(self, config) -> None:
        path = _check_config(config)
        await asyncio.get_running_loop().run_in_executor(self._pool, self._configure, path)

    async def _run(self, fn, *args, **kwargs):
        if self.engine is None:
            raise RecEngineError("the ingress has no bundle yet (user_config {'bundle': path})")
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def recommend(self, user, k: int = 10, **options) -> dict:
        bad = set(options) - set(self._REC_FIELDS)
        if bad:
            raise TypeError(f"recommend got unknown options {sorted(bad)}")
        rec = await self._run(lambda: self.engine.recommend(user, k, **options))
        return _jsonable_rec(rec, self._replica)

    async def recommend_batch(self, users: list, k: int = 10, **options) -> list[dict]:
        recs = await self._run(lambda: self.engine.recommend_batch(users, k, **options))
        return [_jsonable_rec(r, self._replica) for r in recs]

    async def observe(self, user, items: list, kind: str = "click") -> dict:
        await self._run(lambda: self.engine.observe(user, items, kind=kind))
        return {"replica": self._replica, "user": user, "items": list(items)}

    async def stats(self) -> dict:
        return {"replica": self._replica, "pid": os.getpid(), "rss_mib": _rss_mib(),
                "version": None if self.engine is None else self.engine.version}

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/")
        route = "/" + path.rsplit("/", 1)[-1]           # the route under any route prefix
        refused = self._guard.refusal({"path": route, "headers": request.scope.get("headers", [])})
        if refused is not None:
            return JSONResponse({"detail": refused[1]}, status_code=refused[0], headers={"WWW-Authenticate": "Bearer"})
        try:
            if request.method == "GET" and path.endswith("/healthz"):
                return JSONResponse(await self.stats())
            if request.method != "POST" or not path.endswith(("/recommend", "/observe")):
                return JSONResponse({"detail": f"no route {request.method} {path}"}, status_code=404)
            try:
                body = await request.json()
            except ValueError:
                return JSONResponse({"detail": "the body must be JSON"}, status_code=400)
            if not isinstance(body, dict) or "user" not in body:
                return JSONResponse({"detail": "the body must be a JSON object with a 'user'"}, status_code=422)
            if path.endswith("/observe"):
                items = body.get("items")
                if not isinstance(items, list):
                    return JSONResponse({"detail": "'items' must be a list of item keys"}, status_code=422)
                return JSONResponse(await self.observe(body["user"], items, body.get("kind", "click")))
            bad = set(body) - {"user", *self._REC_FIELDS}
            if bad:
                return JSONResponse({"detail": f"unknown fields {sorted(bad)}"}, status_code=422)
            opts = {f: body[f] for f in self._REC_FIELDS if f in body and body[f] is not None}
            return JSONResponse(await self.recommend(body["user"], **opts))
        except (TypeError, ValueError, KeyError, RecEngineError) as e:     # UnknownKeyError is a KeyError
            return JSONResponse({"detail": f"{type(e).__name__}: {e}"}, status_code=400)


_APP_ARGS = ("shards", "replicas", "events", "stream", "shard_replicas", "ingress_cpus", "shard_cpus",
             "follow_events_s", "verify", "scan_memory", "scan_threads", "engine_options", "max_ongoing_requests",
             "shard_batch")


def build_app(bundle=None, *, shards: int, replicas: int, events: str | None = None, stream: str = DEFAULT_STREAM,
              shard_replicas: int = 1, ingress_cpus: float = 1.0, shard_cpus: float = 1.0,
              follow_events_s: float = 0.05, verify: bool = True, scan_memory: str = "mmap",
              scan_threads: int = 1, engine_options: Mapping[str, Any] | None = None,
              max_ongoing_requests: int = 16, shard_batch: int = DEFAULT_SHARD_BATCH):
    """The Ray Serve application: ``shards`` shard deployments (``shard0`` ...), each with ``shard_replicas``
    replicas, and the deployment ``ingress`` with ``replicas`` replicas; every deployment's ``user_config``
    is ``{"bundle": str(bundle)}`` (None: left to the Serve config, see :func:`serve_config`).
    ``events``: the Redis URL (or a SQLite path, for one machine) of the event store the ingress replicas
    share, on stream ``stream``. ``ingress_cpus`` / ``shard_cpus``: Ray logical CPUs per replica.
    ``engine_options``: further :class:`~rec_engine.engine.Engine` options (``ort_threads``, ``num_threads``,
    ``diversity`` ...). ``shard_batch``: the most scan requests a shard replica coalesces into one
    :meth:`ShardScanner.scan_many` (those that arrived while its previous scan ran; answers unchanged bit for
    bit, see :class:`Shard`); 1: no batching. Checks its arguments here (ValueError / TypeError)."""
    from ray import serve

    for name, val in (("shards", shards), ("replicas", replicas), ("shard_replicas", shard_replicas),
                      ("scan_threads", scan_threads), ("max_ongoing_requests", max_ongoing_requests),
                      ("shard_batch", shard_batch)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
    for name, val in (("ingress_cpus", ingress_cpus), ("shard_cpus", shard_cpus), ("follow_events_s", follow_events_s)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {val!r}")
    if events is not None and not isinstance(events, str):
        raise TypeError(f"events must be a redis:// URL (or a SQLite path) as a string, got {type(events).__name__}")
    if scan_memory not in ("mmap", "copy"):
        raise ValueError(f"scan_memory must be 'mmap' or 'copy', got {scan_memory!r}")
    opts = dict(engine_options or {})
    opts.setdefault("ort_threads", 1)
    opts.setdefault("num_threads", 1)
    ShardedEngine.check_options(**{k: v for k, v in opts.items() if k not in ("ort_threads", "num_threads")})
    config = None
    if bundle is not None:
        version_id(bundle)            # a readable bundle here (the nodes must hold it at the same path)
        config = {"bundle": str(bundle)}
    shard_dep = serve.deployment(Shard)
    handles = [shard_dep.options(name=f"shard{i}", num_replicas=shard_replicas, user_config=config,
                                 max_ongoing_requests=max(max_ongoing_requests * replicas, shard_batch),
                                 ray_actor_options={"num_cpus": shard_cpus})
               .bind(i, shards, verify, scan_memory, scan_threads, max_ongoing_requests, batch=shard_batch)
               for i in range(shards)]
    ingress = serve.deployment(Ingress).options(name="ingress", num_replicas=replicas, user_config=config,
                                                max_ongoing_requests=max_ongoing_requests,
                                                ray_actor_options={"num_cpus": ingress_cpus})
    return ingress.bind(handles, events, stream, follow_events_s, opts, max_ongoing_requests)


def app(args: dict):
    """The application builder for a Serve config (``import_path: rec_engine.cluster:app``): ``args`` are
    :func:`build_app`'s keyword arguments except the bundle, which the config gives each deployment as
    ``user_config`` (so that changing it reconfigures the replicas in place)."""
    if not isinstance(args, Mapping):
        raise TypeError(f"args must be a mapping of build_app's options, got {type(args).__name__}")
    bad = set(args) - set(_APP_ARGS)
    if bad:
        raise ValueError(f"unknown cluster options {sorted(bad)} (known: {', '.join(_APP_ARGS)}; the bundle goes "
                         "in each deployment's user_config)")
    return build_app(None, **dict(args))


def serve_config(bundle, *, name: str = APP_NAME, route_prefix: str | None = "/",
                 runtime_env: Mapping[str, Any] | None = None, **options) -> dict:
    """The Serve config (``ServeApplicationSchema`` as a dict; ``serve deploy`` takes it as YAML under
    ``applications:``) of the application serving ``bundle`` with :func:`build_app`'s ``options``. Two configs
    that differ only in the bundle differ only in the deployments' ``user_config``: Serve then calls
    ``reconfigure`` on the running replicas (a swap in place) instead of replacing them."""
    shards = options.get("shards")
    app(options)                       # checks the options (needs ray.serve importable)
    version_id(bundle)
    user = {"bundle": str(bundle)}
    cfg = {"name": name, "route_prefix": route_prefix, "import_path": "rec_engine.cluster:app",
           "args": {k: v for k, v in options.items()},
           "deployments": [{"name": "ingress", "user_config": user}] +
                          [{"name": f"shard{i}", "user_config": user} for i in range(int(shards))]}
    if runtime_env:
        cfg["runtime_env"] = dict(runtime_env)
    return cfg


def deploy(bundle, *, name: str = APP_NAME, timeout_s: float = 300.0, route_prefix: str | None = "/",
           runtime_env: Mapping[str, Any] | None = None, **options):
    """Deploy (or swap: the same ``options`` and another ``bundle``) the application on the Ray cluster this
    process is connected to, through its Serve config (:func:`serve_config`), and wait until it runs with the
    bundle; returns its handle (``DeploymentHandle`` of the ingress). A swap keeps the replicas and reloads
    their bundle in ``reconfigure``; requests keep being answered by the old version until each replica
    switches. Raises :class:`RecEngineError` when the application fails to deploy (the deploy error)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    cfg = serve_config(bundle, name=name, route_prefix=route_prefix, runtime_env=runtime_env, **options)
    serve.start()
    client = _get_global_client()
    # a deploy config names every declarative application (those it leaves out are deleted): keep the others
    others = [a["deployed_app_config"] for n, a in (client.get_serve_details().get("applications") or {}).items()
              if n != name and a.get("deployed_app_config")]
    client.deploy_apps(ServeDeploySchema(applications=others + [cfg]))
    want = version_id(bundle)
    deadline = time.monotonic() + timeout_s
    while True:
        st = serve.status().applications.get(name)
        if st is not None and st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RecEngineError(f"application {name} failed to deploy: {st.message}")
        if st is not None and st.status == "RUNNING":
            handle = serve.get_app_handle(name)
            if all(handle.stats.remote().result()["version"] == want for _ in range(4 * int(options.get("replicas", 1)))):
                return handle
        if time.monotonic() > deadline:
            raise RecEngineError(f"application {name} did not run version {want} within {timeout_s} s "
                                 f"(status {None if st is None else st.status})")
        time.sleep(0.2)


# --------------------------------------------------------------------------- the command
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rec-engine cluster", description=(
        "Serve BUNDLE on Ray Serve: the item catalogue sharded over --shards deployments, --replicas ingress "
        "replicas ranking and holding the online state. Starts a local Ray cluster, or joins one with "
        "--address (the bundle must be at the same path on every node). Run it again with --swap to switch a "
        "running application to another bundle without a failed request."))
    p.add_argument("bundle", help="bundle directory or model home (the same path on every node)")
    p.add_argument("--shards", type=int, required=True, help="shard deployments (M)")
    p.add_argument("--replicas", type=int, default=1, help="ingress replicas (R, default 1)")
    p.add_argument("--shard-replicas", type=int, default=1, help="replicas of each shard (default 1)")
    p.add_argument("--events", default=None, help="event store the replicas share: redis://host:port/db")
    p.add_argument("--stream", default=DEFAULT_STREAM, help=f"Redis stream key (default {DEFAULT_STREAM})")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 for others)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", default=None, help="join this Ray cluster ('auto': the local node's) "
                                                    "instead of starting one")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of a local Ray cluster (default: the cores, or what the replicas need if more)")
    p.add_argument("--ingress-cpus", type=float, default=1.0, help="Ray CPUs per ingress replica (default 1)")
    p.add_argument("--shard-cpus", type=float, default=1.0, help="Ray CPUs per shard replica (default 1)")
    p.add_argument("--scan-threads", type=int, default=1, help="OpenMP threads of one shard scan (default 1)")
    p.add_argument("--shard-batch", type=int, default=DEFAULT_SHARD_BATCH,
                   help=f"scan requests a shard replica coalesces into one exact batched scan (those that came "
                        f"while its previous scan ran; default {DEFAULT_SHARD_BATCH}; 1: off)")
    p.add_argument("--scan-memory", choices=("mmap", "copy"), default="mmap",
                   help="shard rows memory-mapped (shared page cache) or copied (huge pages); default mmap")
    p.add_argument("--follow-events-s", type=float, default=0.05, help="event store poll period (default 0.05)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of bundle files at load")
    p.add_argument("--name", default=APP_NAME, help=f"Serve application name (default {APP_NAME})")
    p.add_argument("--print-config", action="store_true",
                   help="print the Serve config (JSON; `serve deploy` takes it as YAML) and exit")
    p.add_argument("--swap", action="store_true",
                   help="switch the running application (same --shards/--replicas) to BUNDLE and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``rec-engine cluster``: start the application and serve until interrupted (or ``--swap`` and exit)."""
    args = _parser().parse_args(argv)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit("rec-engine cluster needs Ray Serve: pip install 'rec_engine[cluster]'") from None
    for name in ("shards", "replicas", "shard_replicas", "scan_threads", "shard_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.events is not None and not args.events.startswith(("redis://", "rediss://", "unix://")) and (
            args.replicas > 1 or args.address):
        raise SystemExit("--events must be a redis:// URL when several replicas (or machines) share it")
    options = dict(shards=args.shards, replicas=args.replicas, events=args.events, stream=args.stream,
                   shard_replicas=args.shard_replicas, ingress_cpus=args.ingress_cpus, shard_cpus=args.shard_cpus,
                   follow_events_s=args.follow_events_s, verify=not args.no_verify, scan_memory=args.scan_memory,
                   scan_threads=args.scan_threads, shard_batch=args.shard_batch)
    tokens = {k: os.environ[k] for k in TOKEN_ENV if os.environ.get(k)}
    runtime_env = {"env_vars": tokens} if tokens else None     # the ingress replicas check HTTP requests with them
    try:
        # printed: placeholders, never the tokens (the ingress refuses to start with a placeholder left in)
        cfg = serve_config(args.bundle, name=args.name, **options,
                           runtime_env={"env_vars": {k: f"<{k}>" for k in tokens}} if tokens else None)
    except (ValueError, TypeError, RecEngineError) as e:
        raise SystemExit(f"rec-engine cluster: {e}") from None
    if args.print_config:
        import json

        print(json.dumps({"applications": [cfg]}, indent=2))
        return 0
    if args.swap:
        ray.init(address=args.address or "auto", log_to_driver=False)
        try:
            deploy(args.bundle, name=args.name, runtime_env=runtime_env, **options)
        except RecEngineError as e:
            raise SystemExit(f"rec-engine cluster --swap: {e}") from None
        print(f"{args.name}: swapped to {args.bundle} (version {version_id(args.bundle)})", flush=True)
        return 0
    num_cpus = None
    if args.address is None:          # a local cluster: enough logical CPUs for every replica to be placed
        need = math.ceil(args.shards * args.shard_replicas * args.shard_cpus + args.replicas * args.ingress_cpus)
        num_cpus = args.num_cpus if args.num_cpus is not None else max(os.cpu_count() or 1, need)
        if num_cpus < need:
            raise SystemExit(f"rec-engine cluster: --num-cpus {num_cpus} cannot place {args.shards} x "
                             f"{args.shard_replicas} shards and {args.replicas} ingress replicas ({need} Ray CPUs "
                             f"with --shard-cpus {args.shard_cpus:g} and --ingress-cpus {args.ingress_cpus:g})")
        if num_cpus > (os.cpu_count() or 1):
            print(f"rec-engine cluster: a local Ray cluster of {num_cpus} logical CPUs on {os.cpu_count()} cores "
                  f"(the replicas share them)", flush=True)
    ray.init(address=args.address, num_cpus=num_cpus)
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        deploy(args.bundle, name=args.name, runtime_env=runtime_env, **options)
    except RecEngineError as e:
        raise SystemExit(f"rec-engine cluster: {e}") from None
    print(f"rec-engine cluster: {args.shards} shards x {args.shard_replicas}, {args.replicas} ingress replicas, "
          f"version {version_id(args.bundle)}, http://{args.host}:{args.port}/recommend", flush=True)
    import signal

    def stop(signum, frame):           # SIGTERM: shut Serve and the local Ray cluster down like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":           # python -m rec_engine.cluster ...
    raise SystemExit(main())
