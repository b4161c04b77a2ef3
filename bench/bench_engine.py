"""``Engine.recommend`` end to end, beside the same path written plainly with NumPy + ONNX Runtime.

One request: retrieval of 500 candidates by exact top-k over N items x 64 (an ``mf`` bundle; the user's
50 seen items excluded), ranking of the 500 by an untrained DeepFM over 26 fields (``dim=16``, MLP
400-400-400: user and item fields from the bundle's feature stores, context fields from the request),
top 10 by click probability. Latency does not depend on the trained weights, so the bundles are built
from random tables in seconds rather than trained, and cached under ``bench/results/engine_bundles/``
keyed by size.

Implementations (group ``recommend k=10 (...)``):

- ``rec_engine``: ``Engine.recommend(user, k=10, context=...)`` on the pipeline bundle.
- ``rec_engine int8``: the same engine with ``index="int8"`` (retrieval scans int8 item codes with VNNI and
  re-scores a shortlist exactly; the stage table prints the recall of the exact 500 candidates).
- ``rec_engine int8+int8``: also ``ranking_precision="int8"`` (the dense part with int8 weights, ONNX
  Runtime's dynamic quantization; probabilities move by ~1.5e-4 here, so its top 10 may differ from the others').
- ``numpy+ort``: :class:`PlainPipeline`, what a service developer would write without rec_engine: the
  same ``.npy`` tables loaded with ``np.load``, ``items @ user_vec``, seen items set to -inf,
  ``argpartition`` + sort of the top 500, the candidates' features gathered with fancy indexing and
  summed per bag with ``np.add.reduceat``, the same ``dense.onnx`` in an ONNX Runtime session with the
  same thread settings, sigmoid, top 10.
- ``numpy+ort mt``: the same with as many ONNX Runtime intra-op threads as the engine's top-k has
  (``--bench-threads``, 2), spinning off (the engine runs a request's candidates through the dense part on its
  ``num_threads``; with spinning on, ORT's idle threads take the cores from NumPy's BLAS threads and the whole
  path gets slower, 19 ms instead of 11 ms).

Before timing, both must return the same 10 items (same order) for a few users. The rounds of both
implementations cycle through the same random requests (user + context). Besides the ratio table
(median and p99 from the raw rounds, conftest.py), each implementation's per-stage p50 / p99 and share
of the wall time are stored in ``benchmark.extra_info["stages"]`` and printed as a stage table at the end.

The ``recommend_batch`` group (256 users, each with its own context, against the same engine's single calls)
also prints where a batch's time goes: its retrieval and ranking stages, and, untimed, one user's 500
candidates scored on one thread (a batch scores its users one at a time on each of its threads) and the
dense part alone, in multiply-adds a second. The batch's retrieval over 256 plus one user's scoring over the
threads is the floor of a batch's time a user; the single calls' time a user over it is the most the batch
could be faster in that run. A single call is mostly one read of the item table, paced by memory, and a
batch mostly the DeepFM's matrix products, paced by arithmetic, so the ratio moves with the machine's memory.
The group runs at each ranking precision of ``BATCH_PRECISIONS``: float32, and, where the CPU has AMX-BF16
tiles, ``ranking_precision="bf16x3"`` and ``"bf16"`` (the dense part's products as three or one bf16 products
a term; single calls on an engine of the same precision), each with how its top 10 agree with float32's.

Run it with ``OPENBLAS_THREAD_TIMEOUT=4`` (as bench/latest/ENGINE.md's runs since 2026-12-05 are): OpenBLAS's
threads otherwise busy-wait about 0.1 s after the plain path's matvec (2^28 cycles) and take a core from its
own ONNX Runtime call (``numpy+ort mt``'s dense part then took 2.3-2.4 ms on two threads instead of 1.4) and
from the next pass. The variable must be set before NumPy loads OpenBLAS, so in the environment.

Settings: top-k threads of the engine = ``--bench-threads`` (default 2); the rest through the
environment (conftest.py owns the command-line options): ``REC_BENCH_ENGINE_ITEMS`` (default 1000000),
``REC_BENCH_ENGINE_USERS`` (100000), ``REC_BENCH_ENGINE_ROUNDS`` (rounds per implementation, 400), ``REC_BENCH_ENGINE_BATCH_ROUNDS`` (batches of 256 users per
implementation in the ``recommend_batch`` group, 3),
``REC_BENCH_ORT_THREADS`` (ONNX Runtime intra-op threads of both, 1), ``REC_BENCH_ENGINE_CACHE`` (bundle
cache folder).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import rec_engine
from rec_engine.bundle import write_bundle, write_pipeline
from rec_engine.engine import Engine

HERE = Path(__file__).resolve().parent
BUILD_VERSION = 1            # bump when the generated bundles change, so stale caches are not reused
SEED = 0
DIM_RETRIEVAL = 64
DIM_CTR = 16
MLP = (400, 400, 400)
N_CANDIDATES = 500
K = 10
SEEN_PER_USER = 50
PASSES = 4                   # rec_engine, numpy+ort, rec_engine, ... (see bench_kernels.py)
N_AGREE = 5                  # users whose answers both implementations must agree on before timing
IMPLS = ("rec_engine", "rec_engine int8", "rec_engine int8+int8", "numpy+ort", "numpy+ort mt")
BATCH = 256                  # users of the recommend_batch group

# The 26 fields: (name, kind, vocabulary size; None = the number of users / items). Vocabularies are the
# text of 0..size-1, as Schema.fit would build them; each categorical field has one hash bucket.
USER_FIELDS = [("user_id", "categorical", None), ("user_age", "categorical", 7), ("user_gender", "categorical", 3),
               ("user_city", "categorical", 500), ("user_segment", "categorical", 20),
               ("user_language", "categorical", 30), ("user_tenure", "categorical", 10),
               ("user_device_pref", "categorical", 5)]
ITEM_FIELDS = [("item_id", "categorical", None), ("item_category", "categorical", 50),
               ("item_subcategory", "categorical", 1000), ("item_brand", "categorical", 20_000),
               ("item_seller", "categorical", 50_000), ("item_color", "categorical", 30),
               ("item_size", "categorical", 12), ("item_shipping", "categorical", 4),
               ("item_tags", "multi", 2000), ("item_price", "numeric", None), ("item_rating", "numeric", None),
               ("item_age_days", "numeric", None)]
CONTEXT_FIELDS = [("hour", "categorical", 24), ("weekday", "categorical", 7), ("device", "categorical", 5),
                  ("platform", "categorical", 3), ("page", "categorical", 20), ("country", "categorical", 60)]
TAGS_PER_ITEM = (1, 4)       # inclusive range of tags per item


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise pytest.UsageError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise pytest.UsageError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    n_items: int
    n_users: int
    rounds: int
    topk_threads: int
    ort_threads: int
    cache: Path

    @classmethod
    def from_env(cls, topk_threads: int) -> "Settings":
        n_items = _env_int("REC_BENCH_ENGINE_ITEMS", 1_000_000, minimum=N_CANDIDATES + SEEN_PER_USER)
        return cls(n_items=n_items, n_users=_env_int("REC_BENCH_ENGINE_USERS", 100_000),
                   rounds=_env_int("REC_BENCH_ENGINE_ROUNDS", 400, minimum=PASSES),
                   topk_threads=topk_threads, ort_threads=_env_int("REC_BENCH_ORT_THREADS", 1),
                   cache=Path(os.environ.get("REC_BENCH_ENGINE_CACHE") or HERE / "results" / "engine_bundles"))


# ===================================================================================== bundles
def _schema_and_columns(n_users: int, n_items: int, rng: np.random.Generator):
    """The 26-field schema and the user / item feature columns (one value per user / item id)."""
    from rec_engine.features import Field, Schema

    sizes = {"user_id": n_users, "item_id": n_items}
    user_cols = {name: (np.arange(n_users) if name == "user_id" else rng.integers(0, size, n_users))
                 for name, _, size in USER_FIELDS}
    item_cols = {}
    numeric = {"item_price": np.round(rng.lognormal(3.0, 1.0, n_items), 2),
               "item_rating": np.round(rng.uniform(1.0, 5.0, n_items), 1),
               "item_age_days": rng.integers(0, 3650, n_items).astype(np.float64)}
    transforms = {"item_price": "log1p", "item_rating": "none", "item_age_days": "log1p"}
    for name, kind, size in ITEM_FIELDS:
        if name == "item_id":
            item_cols[name] = np.arange(n_items)
        elif kind == "categorical":
            item_cols[name] = rng.integers(0, size, n_items)
        elif kind == "multi":
            lengths = rng.integers(TAGS_PER_ITEM[0], TAGS_PER_ITEM[1] + 1, n_items)
            flat = rng.integers(0, size, int(lengths.sum())).tolist()
            ends = np.cumsum(lengths).tolist()
            item_cols[name] = [flat[e - n:e] for e, n in zip(ends, lengths.tolist())]
        else:
            item_cols[name] = numeric[name]
    fields = []
    for name, kind, size in USER_FIELDS + ITEM_FIELDS + CONTEXT_FIELDS:
        if kind == "numeric":
            x = numeric[name]
            x = np.log1p(x) if transforms[name] == "log1p" else x
            fields.append(Field(name, "numeric", transform=transforms[name], mean=float(x.mean()),
                                std=float(x.std())))
        else:
            vocab = tuple(str(i) for i in range(sizes.get(name, size)))
            fields.append(Field(name, kind, vocab=vocab, hash_buckets=1))
    return Schema(fields), user_cols, item_cols


def build_pipeline(path: Path, n_users: int, n_items: int) -> Path:
    """Write the pipeline bundle (random ``mf`` retrieval + untrained DeepFM ranking) at ``path``."""
    import torch
    from rec_engine_train.export_ctr import export_ctr
    from rec_engine_train.models.ctr import CtrModel

    rng = np.random.default_rng(SEED)
    work = path.parent / f".{path.name}.stages"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        seen = np.sort(rng.integers(0, n_items, (n_users, SEEN_PER_USER)), axis=1)
        write_bundle(work / "retrieval", kind="mf", meta={"n_users": n_users, "n_items": n_items,
                                                          "dim": DIM_RETRIEVAL, "note": "random vectors (benchmark)"},
                     tables={"users": rng.standard_normal((n_users, DIM_RETRIEVAL), dtype=np.float32),
                             "items": rng.standard_normal((n_items, DIM_RETRIEVAL), dtype=np.float32)},
                     arrays={"train_indptr": np.arange(0, (n_users + 1) * SEEN_PER_USER, SEEN_PER_USER, dtype=np.int64),
                             "train_items": seen.reshape(-1).astype(np.int64),
                             "item_counts": np.bincount(seen.reshape(-1), minlength=n_items).astype(np.int64)})
        schema, user_cols, item_cols = _schema_and_columns(n_users, n_items, rng)
        torch.manual_seed(SEED)
        model = CtrModel("deepfm", schema, dim=DIM_CTR, params={"mlp": list(MLP), "init_std": 0.05})
        with torch.no_grad():   # untrained, but first-order weights spread the scores (no near-ties)
            model.linear.normal_(0.0, 0.3)
        export_ctr(model, work / "ranking", entity_features={"user": user_cols, "item": item_cols})
        write_pipeline(path, retrieval=work / "retrieval", ranking=work / "ranking", n_candidates=N_CANDIDATES)
    finally:
        shutil.rmtree(work, ignore_errors=True)   # the pipeline holds copies of both stages
    return path


def cached_pipeline(settings: Settings) -> Path:
    path = settings.cache / f"deepfm-mf-{settings.n_items}items-{settings.n_users}users-v{BUILD_VERSION}"
    if (path / "manifest.json").is_file():   # write_pipeline renames a finished bundle into place
        return path
    return build_pipeline(path, settings.n_users, settings.n_items)


# ============================================================================ the plain baseline
class PlainPipeline:
    """The recommend path written with NumPy and ONNX Runtime only, from the same bundle files.

    ``recommend(user, context, k)`` returns ``(items [k] int64, probabilities [k] float32, timings in
    ms)`` with stages ``retrieval``, ``features``, ``dense``, ``finish`` (sigmoid and top k)."""

    def __init__(self, path: Path, ort_threads: int, spinning: bool = True):
        import onnxruntime as ort

        top = json.loads((path / "manifest.json").read_text())["meta"]
        r, k = path / top["stages"]["retrieval"], path / top["stages"]["ranking"]
        self.n_candidates = int(top["n_candidates"])

        def load(p):
            return np.load(p, allow_pickle=False)

        self.items = load(r / "tables/items.npy")
        self.users = load(r / "tables/users.npy")
        self.seen_indptr, self.seen_items = load(r / "arrays/train_indptr.npy"), load(r / "arrays/train_items.npy")
        meta = json.loads((k / "manifest.json").read_text())["meta"]
        self.emb, self.lin = load(k / "tables/embedding.npy"), load(k / "tables/linear.npy")[:, 0]
        fields = meta["schema"]["fields"]
        names = [f["name"] for f in fields]
        item_names, user_names = set(meta["entity_fields"]["item"]), set(meta["entity_fields"]["user"])
        # (indices, offsets, weights, fields per entity) of the encoded feature stores
        self.item_store = (*(load(k / f"arrays/item_features_{a}.npy") for a in ("indices", "offsets", "weights")),
                           len(item_names))
        self.user_store = (*(load(k / f"arrays/user_features_{a}.npy") for a in ("indices", "offsets", "weights")),
                           len(user_names))
        self.item_pos = [i for i, n in enumerate(names) if n in item_names]
        self.user_pos = [i for i, n in enumerate(names) if n in user_names]
        self.ctx_pos = [i for i, n in enumerate(names) if n not in item_names | user_names]
        self.n_fields, self.dim = len(names), int(meta["dim"])
        # each field owns a block of rows: its vocabulary then its hash buckets (1 row for a numeric field)
        sizes = [1 if f["kind"] == "numeric" else len(f["vocab"]) + f["hash_buckets"] for f in fields]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        self.ctx = [(names[i], int(starts[i]), {v: j for j, v in enumerate(fields[i]["vocab"])},
                     fields[i]["hash_buckets"]) for i in self.ctx_pos]
        if any(fields[i]["kind"] != "categorical" for i in self.ctx_pos):
            raise ValueError("PlainPipeline encodes categorical context fields only")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = ort_threads
        opts.inter_op_num_threads = 1
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(k / "dense.onnx"), sess_options=opts,
                                            providers=["CPUExecutionProvider"])

    def _bag_sums(self, store, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-field embedding and linear sums of entities ``ids``: ``[len(ids), F_e, d]``, ``[len(ids), F_e]``."""
        indices, offsets, weights, n_f = store
        bags = (ids[:, None] * n_f + np.arange(n_f)).ravel()
        starts, lengths = offsets[bags], offsets[bags + 1] - offsets[bags]
        ends = np.cumsum(lengths)
        pos = np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1])
        rows, w = indices[pos], weights[pos]
        at = np.minimum(ends - lengths, len(rows) - 1)            # reduceat start of each bag
        emb = np.add.reduceat(self.emb[rows] * w[:, None], at, axis=0)
        lin = np.add.reduceat(self.lin[rows] * w, at)
        empty = lengths == 0
        emb[empty], lin[empty] = 0.0, 0.0
        return emb.reshape(len(ids), n_f, self.dim), lin.reshape(len(ids), n_f)

    def _context_rows(self, context) -> list[int | None]:
        out = []
        for name, start, vocab, buckets in self.ctx:
            value = context.get(name)
            if value is None:
                out.append(None)
                continue
            key = str(value)
            j = vocab.get(key)
            out.append(start + (j if j is not None else len(vocab) + zlib.crc32(key.encode()) % buckets))
        return out

    def features(self, user: int, cand: np.ndarray, context) -> tuple[np.ndarray, np.ndarray]:
        """The dense part's inputs ``emb [N, F, d]`` and ``lin [N, F]`` for ``user``'s candidates ``cand``."""
        emb = np.empty((len(cand), self.n_fields, self.dim), np.float32)
        lin = np.empty((len(cand), self.n_fields), np.float32)
        emb[:, self.item_pos], lin[:, self.item_pos] = self._bag_sums(self.item_store, cand)
        emb[:, self.user_pos], lin[:, self.user_pos] = self._bag_sums(self.user_store, np.array([user]))
        for pos, row in zip(self.ctx_pos, self._context_rows(context)):
            emb[:, pos], lin[:, pos] = (0.0, 0.0) if row is None else (self.emb[row], self.lin[row])
        return emb, lin

    def recommend(self, user: int, context, k: int = K):
        t0 = time.perf_counter()
        scores = self.items @ self.users[user]
        scores[self.seen_items[self.seen_indptr[user]:self.seen_indptr[user + 1]]] = -np.inf
        n = min(self.n_candidates, len(scores))
        part = np.argpartition(scores, len(scores) - n)[-n:]
        cand = part[np.argsort(-scores[part], kind="stable")]
        cand = cand[np.isfinite(scores[cand])]
        t1 = time.perf_counter()
        emb, lin = self.features(user, cand, context)
        t2 = time.perf_counter()
        (logit,) = self.session.run(["logit"], {"emb": emb, "lin": lin})
        t3 = time.perf_counter()
        probs = (1.0 / (1.0 + np.exp(-logit.astype(np.float64)))).astype(np.float32)
        order = np.lexsort((cand, -probs))[:k]
        t4 = time.perf_counter()
        timings = {"retrieval": t1 - t0, "features": t2 - t1, "dense": t3 - t2, "finish": t4 - t3}
        return cand[order], probs[order], {s: v * 1e3 for s, v in timings.items()}


# =========================================================================== setup and records
def _blas_threads() -> dict:
    """Threads of each OpenBLAS loaded in this process (NumPy's does the baseline's matvec)."""
    out = {}
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ln.split()[-1].startswith("/")})
    except OSError:
        return out
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads", "openblas_get_num_threads",
                    "openblas_get_num_threads64_"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                out[Path(path).parent.name] = fn()
                break
    return out


def _requests(settings: Settings) -> list[tuple[int, dict]]:
    rng = np.random.default_rng(SEED + 1)
    users = rng.integers(0, settings.n_users, settings.rounds).tolist()
    ctx = {name: rng.integers(0, size, settings.rounds).tolist() for name, _, size in CONTEXT_FIELDS}
    return [(u, {name: ctx[name][j] for name in ctx}) for j, u in enumerate(users)]


class Case:
    """The bundle, the engine, the plain pipeline, the requests, and the per-stage records."""

    def __init__(self, settings: Settings):
        self.settings = settings
        t = time.perf_counter()
        self.path = cached_pipeline(settings)
        self.build_s = time.perf_counter() - t
        t = time.perf_counter()
        self.engine = Engine.load(self.path, ort_threads=settings.ort_threads, num_threads=settings.topk_threads)
        t_index = time.perf_counter()
        self.engine_int8 = Engine.load(self.path, ort_threads=settings.ort_threads, num_threads=settings.topk_threads,
                                       index="int8")
        self.index_build_s = time.perf_counter() - t_index
        self.engine_int8x2 = Engine.load(self.path, ort_threads=settings.ort_threads,
                                         num_threads=settings.topk_threads, index="int8", ranking_precision="int8")
        self.recall: dict | None = None                  # the int8 index's recall (index_recall), measured once
        self.plain = PlainPipeline(self.path, settings.ort_threads)
        self.plain2 = PlainPipeline(self.path, settings.topk_threads, spinning=False)
        self.load_s = time.perf_counter() - t
        self.requests = _requests(settings)
        self.stages = {impl: {} for impl in IMPLS}      # impl -> stage -> [ms per round], all passes
        self.engine_profile = {"dense": [], "rest": []}  # ms, from the profile pass (profile_engine_dense)
        self.batch_profile: dict = {}     # precision -> the recommend_batch group's parts (profile_batch)
        self.batch_per_user: dict = {}    # precision -> impl -> median ms a user of the recommend_batch group
        self.batch_engines = {"float32": self.engine}   # ranking precision -> engine (batch_engine)
        n_items = settings.n_items
        self.group = (f"recommend k={K} ({n_items} items x {DIM_RETRIEVAL}, {N_CANDIDATES} candidates ranked by "
                      f"DeepFM, {len(USER_FIELDS) + len(ITEM_FIELDS) + len(CONTEXT_FIELDS)} fields)")

    def check_agreement(self) -> None:
        """The implementations return the same items, in the same order, with the same probabilities (the
        int8 ranking aside)."""
        for user, ctx in self.requests[:N_AGREE]:
            rec = self.engine.recommend(user, k=K, context=ctx)
            ids, probs, _ = self.plain.recommend(user, ctx, K)
            assert not rec.fallback, f"user {user} got the cold-start fallback"
            np.testing.assert_array_equal(rec.items, ids, err_msg=f"user {user}: the two paths disagree")
            np.testing.assert_allclose(rec.scores, probs, rtol=0, atol=1e-5)
            assert len(np.unique(probs)) == K, "tied probabilities: the comparison of orders is not meaningful"
            np.testing.assert_array_equal(self.plain2.recommend(user, ctx, K)[0], ids)
            # the exact int8 index: the float32 scan's candidates, so the same recommendations
            np.testing.assert_array_equal(self.engine_int8.recommend(user, k=K, context=ctx).items, ids,
                                          err_msg=f"user {user}: the exact int8 index disagrees")

    def profile_engine_dense(self, requests) -> None:
        """Untimed: the time of the engine's dense part inside ``recommend`` (its runner's bound-buffer run, all
        of a request's row chunks, each of which pools its own candidates' item features first, the caller's
        writing the request's context and user features meanwhile, and its ranker's ``_logits``, wrapped for
        this pass only) beside the ranking stage of the same call, to split the engine's ranking into the dense
        part with the features and the rest (the context's encoding, the candidates' checks, sort)."""
        ranker = self.engine._version.ranking
        runner = ranker.runner
        inner_logits, inner_bound = ranker._logits, runner._run_bound
        dense = []

        def timing(fn):
            def timed(*a, **kw):
                t = time.perf_counter()
                out = fn(*a, **kw)
                dense.append((time.perf_counter() - t) * 1e3)
                return out
            return timed

        ranker._logits, runner._run_bound = timing(inner_logits), timing(inner_bound)
        try:
            for user, ctx in requests:
                dense.clear()
                ranking = self.engine.recommend(user, k=K, context=ctx).timings["ranking_ms"]
                self.engine_profile["dense"].append(sum(dense))
                self.engine_profile["rest"].append(ranking - sum(dense))
        finally:
            ranker._logits = inner_logits
            del runner._run_bound      # the class's method again

    def batch_engine(self, precision: str):
        """The engine of the recommend_batch group at ranking precision ``precision`` (loaded once)."""
        if precision not in self.batch_engines:
            s = self.settings
            self.batch_engines[precision] = Engine.load(self.path, ort_threads=s.ort_threads,
                                                        num_threads=s.topk_threads, ranking_precision=precision)
        return self.batch_engines[precision]

    def profile_batch(self, users, precision: str = "float32", n_users: int = 32, reps: int = 20) -> None:
        """Untimed: what one user of a batch costs on one thread (the batch scores its users one at a time on
        each of its threads): ``score_candidates`` of 500 random items on one thread (the item features, the
        user's and context's, the dense part), and the dense part alone on the bound buffers; with the batch's
        own retrieval stage (its timings) this gives the floor of a batch's time a user, and so the most the
        batch could be faster than single calls in this run."""
        ranker = self.batch_engine(precision)._version.ranking
        rng = np.random.default_rng(SEED + 3)
        score, dense = [], []
        for j, u in enumerate(users[:n_users + 2]):
            # new candidates each time, as a batch's users have: their item features come from memory, not
            # from the cache a repeated call would find them in (the first two calls are not counted)
            cands = rng.choice(self.settings.n_items, N_CANDIDATES, replace=False)
            ctx = {name: int(rng.integers(0, size)) for name, _, size in CONTEXT_FIELDS}
            t = time.perf_counter()
            ranker.score_candidates(u, cands, ctx, threads=1, top=K)   # (as recommend: the screen where it runs)
            if j >= 2:
                score.append((time.perf_counter() - t) * 1e3)
        _, _, run = ranker.runner.bound_inputs(N_CANDIDATES, (N_CANDIDATES,), 1)   # the last user's rows
        for _ in range(reps):
            t = time.perf_counter()
            run()
            dense.append((time.perf_counter() - t) * 1e3)
        macs = _dense_macs_split(ranker.runner)
        self.batch_profile.setdefault(precision, {}).update(score_1t_ms=_pct(score, 50), dense_1t_ms=_pct(dense, 50),
                                  dense_gmacs=macs * N_CANDIDATES / (_pct(dense, 50) * 1e-3) / 1e9 if macs else None)

    def index_recall(self, n_users: int = 256) -> dict:
        """Recall of the int8 engine's retrieval candidates against the exact scan's (top 500, seen items
        excluded) over ``n_users`` users: ``rec_engine.retrieval.build_index``'s measure."""
        from rec_engine.bundle import open_bundle
        from rec_engine.retrieval import build_index

        stage = self.path / json.loads((self.path / "manifest.json").read_text())["meta"]["stages"]["retrieval"]
        return build_index(open_bundle(stage, verify=False), "int8", N_CANDIDATES, users=n_users,
                           num_threads=self.settings.topk_threads)[1]


def _dense_macs_split(runner) -> int | None:
    """Multiply-adds a row of the dense part the engine runs for a request (the split one when there is one)."""
    from rec_engine.ctr_runner import _dense_macs

    return _dense_macs(runner.split.model if runner.split is not None else runner._onnx_path)


def _pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q))


def stage_rows(case: Case, impl: str) -> list[tuple[str, list[float]]]:
    """(stage label, ms per round) of ``impl``, the wall time last; ``other`` is wall minus the stages."""
    rec = case.stages[impl]
    if not rec:
        return []
    wall = np.asarray(rec["wall"])
    named = [s for s in rec if s != "wall"]
    rows = []
    if impl.startswith("rec_engine"):
        rows.append(("retrieval (seen, user vector, top-500)", rec["retrieval"]))
        rows.append(("ranking (features + ORT + sort)", rec["ranking"]))
    else:
        rows.append(("retrieval (matvec, mask, argpartition)", rec["retrieval"]))
        rows.append(("ranking: features (gather + reduceat)", rec["features"]))
        rows.append(("ranking: dense (ORT)", rec["dense"]))
        rows.append(("ranking: sigmoid + top-k", rec["finish"]))
    rows.append(("other (call, checks, result)", (wall - np.sum([rec[s] for s in named], axis=0)).tolist()))
    rows.append(("wall", rec["wall"]))
    return rows


class StageReport:
    """A plugin registered by the fixture: prints the stage table at the end of the session."""

    def __init__(self, case: Case):
        self.case = case

    def pytest_terminal_summary(self, terminalreporter):
        self.batch_summary(terminalreporter)
        case = self.case
        if not any(case.stages[i] for i in IMPLS):
            return
        tr, s = terminalreporter, case.settings
        tr.write_sep("=", "recommend: stages")
        tr.write_line(f"{case.group}; top-k threads {s.topk_threads}, ORT intra-op threads {s.ort_threads} "
                      f"(numpy+ort mt: {s.topk_threads}, no spinning; rec_engine: request rows in {s.topk_threads} "
                      f"chunks at once on one-thread sessions), "
                      f"NumPy BLAS threads {_blas_threads() or 'unknown'}; bundle {case.path}")
        tr.write_line("share = stage mean / wall mean over the timed rounds; times in ms")
        tr.write_line(f"  {'impl':<12}{'stage':<42}{'p50':>9}{'p99':>9}{'share':>8}")
        for impl in IMPLS:
            rows = stage_rows(case, impl)
            if not rows:
                continue
            wall_mean = float(np.mean(rows[-1][1]))
            for j, (label, ms) in enumerate(rows):
                tr.write_line(f"  {impl if j == 0 else '':<12}{label:<42}{_pct(ms, 50):>9.3f}{_pct(ms, 99):>9.3f}"
                              f"{100 * float(np.mean(ms)) / wall_mean:>7.1f}%")
        if case.recall is not None:
            r = case.recall
            tr.write_line(f"  rec_engine int8: index built at load in {case.index_build_s:.2f} s; recall of the exact "
                          f"top {r['recall_at']} candidates over {r.get('recall_users', 0)} users: mean "
                          f"{r.get('recall', float('nan')):.4f}, min {r.get('recall_min', float('nan')):.4f}")
        d, r = case.engine_profile["dense"], case.engine_profile["rest"]
        if d:
            tr.write_line(f"  rec_engine ranking split ({len(d)} untimed rounds, dense part wrapped): row chunks (each "
                          f"its item features, then ORT; the caller's first the user and context features; "
                          f"sigmoid) p50 {_pct(d, 50):.3f} p99 {_pct(d, 99):.3f}; the rest "
                          f"(context encoding, checks, sort) p50 "
                          f"{_pct(r, 50):.3f} p99 {_pct(r, 99):.3f}")

    def batch_summary(self, tr) -> None:
        """The recommend_batch group's parts and the floor they put under a batch's time a user, per ranking
        precision."""
        case, s = self.case, self.case.settings
        for precision in BATCH_PRECISIONS:
            bp, per_user = case.batch_profile.get(precision, {}), case.batch_per_user.get(precision, {})
            if not (bp.get("retrieval_ms") and bp.get("score_1t_ms")):
                continue
            tr.write_sep("=", f"recommend_batch, ranking {precision}: where the time goes")
            if bp.get("agreement"):
                a = bp["agreement"]
                tr.write_line(f"  against float32 ranking over {a['users']} users: top {K} identical for {a['same']} "
                              f"of them, largest score difference {a['max_abs_diff']:.2e}")
            threads = s.topk_threads
            floor = np.median(bp["retrieval_ms"]) / BATCH + bp["score_1t_ms"] / threads
            tr.write_line(
                f"  ({BATCH} users, {len(bp['retrieval_ms'])} timed batches, p50): retrieval "
                f"{np.median(bp['retrieval_ms']):.1f} ms, ranking {np.median(bp['ranking_ms']):.1f} ms a batch; "
                f"one user's {N_CANDIDATES} new candidates on one thread (untimed) {bp['score_1t_ms']:.3f} ms, its dense "
                f"part alone {bp['dense_1t_ms']:.3f} ms"
                + (f" ({bp['dense_gmacs']:.0f} G multiply-adds a second)" if bp.get("dense_gmacs") else ""))
            line = (f"  floor a user (retrieval / {BATCH} + one user's scoring / {threads} threads): "
                    f"{floor:.3f} ms")
            if per_user.get("single calls") and per_user.get("rec_engine"):
                line += (f"; measured {per_user['rec_engine']:.3f} ms against single calls' "
                         f"{per_user['single calls']:.3f} ms: {per_user['single calls'] / per_user['rec_engine']:.2f}x, "
                         f"at most {per_user['single calls'] / floor:.2f}x at the floor")
            tr.write_line(line)


@pytest.fixture(scope="module")
def case(request, threads) -> Case:
    c = Case(Settings.from_env(threads))
    c.check_agreement()      # also warms both paths (pages of the tables, ONNX sessions)
    c.recall = c.index_recall()
    pm = request.config.pluginmanager
    if not pm.has_plugin("rec_engine_stage_report"):
        pm.register(StageReport(c), "rec_engine_stage_report")
    return c


# ==================================================================================== benchmark
@pytest.mark.parametrize("pass_no,impl", [(p, impl) for p in range(PASSES) for impl in IMPLS])
def bench_recommend(benchmark, case, pass_no, impl):
    s = case.settings
    per_pass = -(-s.rounds // PASSES)
    requests = case.requests[pass_no * per_pass:(pass_no + 1) * per_pass]
    log = case.stages[impl]
    if impl.startswith("rec_engine"):
        if pass_no == 0 and impl == "rec_engine":
            case.profile_engine_dense(requests)
        engine = {"rec_engine": case.engine, "rec_engine int8": case.engine_int8,
                  "rec_engine int8+int8": case.engine_int8x2}[impl]

        def fn(user, ctx):
            t = time.perf_counter()
            rec = engine.recommend(user, k=K, context=ctx)
            wall = (time.perf_counter() - t) * 1e3
            for stage, ms in (("retrieval", rec.timings["retrieval_ms"]), ("ranking", rec.timings["ranking_ms"]),
                              ("wall", wall)):
                log.setdefault(stage, []).append(ms)
    else:
        plain = case.plain2 if impl == "numpy+ort mt" else case.plain

        def fn(user, ctx):
            t = time.perf_counter()
            _, _, timings = plain.recommend(user, ctx, K)
            timings["wall"] = (time.perf_counter() - t) * 1e3
            for stage, ms in timings.items():
                log.setdefault(stage, []).append(ms)

    start = len(log.get("wall", ()))
    it = iter(requests)
    benchmark.group = case.group
    benchmark.pedantic(fn, setup=lambda: (next(it), {}), rounds=len(requests), iterations=1)
    stages = {label: {"p50_ms": _pct(ms[start:], 50), "p99_ms": _pct(ms[start:], 99)}
              for label, ms in stage_rows(case, impl)}
    benchmark.extra_info.update(
        impl=impl, pass_no=pass_no, passes=PASSES, items=s.n_items, users=s.n_users, candidates=N_CANDIDATES, k=K,
        model=f"deepfm dim={DIM_CTR} mlp={list(MLP)}", topk_threads=s.topk_threads,
        ort_threads=s.topk_threads if impl == "numpy+ort mt" else s.ort_threads,
        ort_spinning=impl != "numpy+ort mt",
        blas_threads=_blas_threads(), simd=rec_engine.simd_level(), stages=stages)
    if impl == "rec_engine int8":
        benchmark.extra_info["index_recall"] = case.recall
    if impl == "rec_engine" and pass_no == 0:
        benchmark.extra_info["ranking_split_untimed"] = {
            part: {"p50_ms": _pct(ms, 50), "p99_ms": _pct(ms, 99)} for part, ms in case.engine_profile.items()}


# ============================================================================ recommend_batch
# the ranking precisions of the recommend_batch group: float32 (as trained), and the dense part's products on
# AMX-BF16 tiles (bf16x3: ~16 significant bits a product; bf16: ~8), run only where the tiles are
BATCH_PRECISIONS = ("float32", "bf16x3", "bf16")


@pytest.mark.parametrize("precision", BATCH_PRECISIONS)
@pytest.mark.parametrize("impl", ["rec_engine", "single calls"])
def bench_recommend_batch(benchmark, case, impl, precision):
    """``recommend_batch`` of 256 users (each with its own context) against the same 256 users asked one
    ``recommend`` call at a time, on the same engine (ranking at ``precision``); the ratio is per user as well
    as per batch."""
    s = case.settings
    engine = case.batch_engine(precision)
    if precision != "float32" and not engine.ranking_info.get("tiles"):
        pytest.skip(f"ranking_precision={precision!r} runs float32 here (no AMX-BF16 tiles): the float32 rows")
    rounds = _env_int("REC_BENCH_ENGINE_BATCH_ROUNDS", 3)
    rng = np.random.default_rng(SEED + 2)
    batches = []
    for _ in range(rounds):
        users = rng.integers(0, s.n_users, BATCH).tolist()
        ctxs = [{name: int(rng.integers(0, size)) for name, _, size in CONTEXT_FIELDS} for _ in users]
        batches.append((users, ctxs))
    if impl == "rec_engine":
        users, ctxs = batches[0]
        got = engine.recommend_batch(users[:16], K, contexts=ctxs[:16])
        bp = case.batch_profile.setdefault(precision, {})
        same, diff = 0, 0.0
        for rec, u, c in zip(got, users, ctxs):     # the batch answers what single calls answer
            one = engine.recommend(u, K, context=c)
            np.testing.assert_array_equal(rec.ids, one.ids)
            np.testing.assert_allclose(rec.scores, one.scores, rtol=0, atol=1e-5)
            if precision != "float32":              # and how it agrees with float32 ranking
                ref = case.engine.recommend(u, K, context=c)
                same += int(np.array_equal(ref.ids, one.ids))
                theirs = dict(zip(ref.ids.tolist(), ref.scores.tolist()))
                diff = max([diff] + [abs(theirs[i] - v) for i, v in zip(one.ids.tolist(), one.scores.tolist())
                                     if i in theirs])
        if precision != "float32":
            bp["agreement"] = {"users": len(got), "same": same, "max_abs_diff": diff}

        def fn(users, ctxs):
            recs = engine.recommend_batch(users, K, contexts=ctxs)
            for stage in ("retrieval_ms", "ranking_ms"):
                bp.setdefault(stage, []).append(recs[0].timings[stage])
    else:
        def fn(users, ctxs):
            for u, c in zip(users, ctxs):
                engine.recommend(u, K, context=c)

    it = iter(batches)
    benchmark.group = (f"recommend_batch {BATCH} users ({s.n_items} items, {N_CANDIDATES} candidates each ranked "
                       f"by DeepFM" + ("" if precision == "float32" else f", ranking {precision}") + ")")
    benchmark.pedantic(fn, setup=lambda: (next(it), {}), rounds=rounds, iterations=1)
    benchmark.extra_info.update(impl=impl, batch=BATCH, items=s.n_items, candidates=N_CANDIDATES, k=K,
                                ranking_precision=precision)
    if benchmark.stats is not None:       # (None under --benchmark-disable)
        per_user = benchmark.stats.stats.median / BATCH * 1e3
        benchmark.extra_info["per_user_ms"] = case.batch_per_user.setdefault(precision, {})[impl] = per_user
    if impl == "rec_engine":
        case.profile_batch(batches[0][0], precision)
        benchmark.extra_info["batch_profile"] = dict(case.batch_profile[precision])
