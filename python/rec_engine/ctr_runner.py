"""Running a CTR model on encoded examples: the C++ core sum-pools the shared ``embedding`` and ``linear``
tables over each example's bags, and ONNX Runtime runs the dense part (inputs ``emb`` [B, F, d] and ``lin``
[B, F], output ``logit`` [B] or [B, 1]); click probabilities are the sigmoid of the logits.

Calls of up to ``_BIND_MAX_ROWS`` examples (and ``_BIND_MAX_FLOATS`` embedding values: 1024 examples of 26
fields x 16, so the default 500 candidates of a request always qualify) pool straight into input buffers bound
to an ONNX Runtime IOBinding: no input or output array is allocated per call and ``session.run``'s feed / fetch
conversions are skipped (~7 us at batch 1, ~30 us at batch 64). Each thread keeps one buffer set of the largest
size (at most 4 MB of embeddings) and one IOBinding per batch size over its leading rows, so requests whose
candidate count varies reuse the same memory (the threads of a ranker's batches too, which score users with
many candidates one at a time this way). Larger calls (batches of users in chunks) pool into new arrays and go
through ``session.run``.

Which features an example holds (feature stores, the request's context) is the ranker's business:
:mod:`rec_engine.ranking`.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial

import numpy as np

from ._convert import at_least_one, threads_arg
from .bundle import onnx_session
from .dense_split import split_first_layer
from .embedding import EmbeddingTable
from .native_dense import agrees, allowed, fast_here, native_dense, screen_allowed

_BIND_MAX_ROWS = 1024
_BIND_MAX_FLOATS = 1 << 20
# a request's dense part runs as row chunks on several threads at once (``request_threads``) when each chunk
# gets at least this many rows of a DeepFM 400-400-400 (~400k multiply-adds a row, ~3.6 us on one core): an
# ONNX Runtime call and a thread hand-off cost ~30-60 us. A model with fewer multiply-adds a row needs
# proportionally more rows a chunk (CtrRunner.chunk_min_rows); one without a matrix product is never cut.
CHUNK_MIN_ROWS = 64
_CHUNK_MIN_MACS = 64 * 400_000
# A request of fewer rows runs the whole dense part, not the split one: the constant fields' share of the first
# layer (a NumPy product of its own) is then no saving (DeepFM 400-400-400, score_candidates: 1 row 60 -> 54 us,
# 4 rows 67 -> 60 us; 16 rows even; 64 rows 312-328 against 343-353 us split).
_SPLIT_MIN_ROWS = 16


class CtrRunner:
    """A CTR model's lookups and dense part, run on bags laid out as in an
    :class:`~rec_engine.features.EncodedBatch` (``n * F`` bags for ``n`` examples of ``F`` fields).

    Parameters
    ----------
    embedding, linear : EmbeddingTable  the shared tables (``[rows, dim]`` and ``[rows, 1]``)
    onnx_path : path of the dense part, or the serialized model (bytes)
    n_fields : int  F
    inputs : (emb input, lin input) names of the dense part
    output : name of its logit output
    session_options : onnxruntime.SessionOptions, optional  default: one intra-op and one inter-op thread
        (right for a server running requests in parallel)
    num_threads : int, optional  core threads of the pooling (None: the core's default)
    batch_threads : int, optional  intra-op threads of a second session, created at the first call for a batch
        of users (``batch=True``), with spinning off; None: the first session runs them. Calls made with
        ``batch="chunk"`` (one of several chunks of a batch scored at once, each on its own thread) run on a
        third session with one intra-op thread
    request_threads : int  threads of one call's dense part (default 1): a bound call of ``n`` examples runs as
        ``min(request_threads, n // chunk_min_rows)`` row chunks at once, each an ONNX Runtime call on the
        calling thread or a pool's (:attr:`chunk_min_rows`: 64 for a DeepFM 400-400-400, more for a cheaper
        model); 500 candidates of that DeepFM on two threads: 1.0 ms instead of 1.8 ms. Unlike ONNX Runtime's
        own intra-op threads, these never spin (idle threads would take the cores from the next request's
        top-k). Only with a one-thread session (``session_options.intra_op_num_threads == 1``, the default):
        a session with its own intra-op threads runs each call whole
    constant_fields : sequence of int, optional  fields that hold the same values on every example of one request
        (the user's and the context's): calls that say where their requests begin (``groups=``) run the dense
        part with its first layer split (:mod:`rec_engine.dense_split`), computing those fields' share of it once
        per request (a lone request of fewer than 16 rows runs the whole model, which is then faster). None: no
        split. :attr:`split` is None when the model does not match the split's pattern.

    Notes
    -----
    Safe to call from several threads at once (the tables and the ONNX session are; bound buffers are
    per thread).
    """

    def __init__(self, embedding: EmbeddingTable, linear: EmbeddingTable, onnx_path: str | os.PathLike | bytes, *,
                 n_fields: int, inputs=("emb", "lin"), output: str = "logit", session_options=None,
                 num_threads: int | None = 1, batch_threads: int | None = None,
                 constant_fields=None, request_threads: int = 1, matmul_precision: str = "float32"):
        import onnxruntime as ort

        request_threads = at_least_one(request_threads, "request_threads")
        self._row_pool, self._row_workers = None, 0     # the pool that runs all chunks but the caller's

        self.embedding, self.linear = embedding, linear
        self.n_fields, self.dim = int(n_fields), embedding.dim
        self.num_threads = num_threads
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.intra_op_num_threads = 1
            session_options.inter_op_num_threads = 1
        model = onnx_path if isinstance(onnx_path, (bytes, bytearray)) else str(onnx_path)
        self.session = onnx_session(model, session_options, what="the ranking model's dense part")
        self.inputs = tuple(inputs)
        self.output = output
        self._onnx_path, self._batch_threads, self._batch_runs = model, batch_threads, {}
        self._batch_lock = threading.Lock()
        # the request path calls the core directly (the facade's argument checks and conversions cost more
        # than the lookups at small batches; arrays of the wrong kind fall back to it)
        self._nt = 0 if num_threads is None else threads_arg(num_threads)
        self._emb_pool = embedding._table.pool
        self._lin_pool = linear._table.pool
        self._run = self.session.run
        self._feed = tuple(self.inputs[:2])
        self._tls = threading.local()   # .buffers (emb, lin, out of the largest size, split bias), .bound: {n:
        #   (emb [n F, d], lin [n F, 1], IOBinding, out [n], split IOBinding, split bias, {(threads, split): the
        #    chunks' IOBindings}, (emb, lin, out) [n, ...]) over their leading rows}
        meta = next((o for o in self.session.get_outputs() if o.name == self.output), None)
        out_shape = list(meta.shape) if meta is not None else []
        bindable = (meta is not None and meta.type == "tensor(float)"     # logits [n] or [n, 1]
                    and (len(out_shape) == 1 or (len(out_shape) == 2 and out_shape[1] == 1)))
        self._out_rank = len(out_shape)
        self._bind_rows = min(_BIND_MAX_ROWS, _BIND_MAX_FLOATS // max(1, self.n_fields * self.dim)) if bindable else 0
        self._run_io = self._io_runner(self.session)
        self.split, self.split_session, self._run_io_split = None, None, None
        self.native = None      # the split dense part in the core (rec_engine.native_dense), or None
        # the screen (float32 ranking of a request's best rows through the tiles, see _settle): on while it pays,
        # on the bf16 tiles first, then bf16x3 (see _screen_pays); its calls, their rows and the rows computed
        # again in float32, all and since the tiles last changed
        self._screen_on, self.screen_calls, self.screen_rows, self.screen_again = True, 0, 0, 0
        self.screen_tiles, self._screen_mark = "bf16", (0, 0, 0)
        self.matmul_precision = matmul_precision    # the native part's products: float32, bf16x3, bf16
        if constant_fields is not None:
            self._set_split(model, constant_fields, session_options)
        # row chunks at once: with a one-thread session, for a model whose rows cost enough
        macs = _dense_macs(model)
        self.chunk_min_rows = (CHUNK_MIN_ROWS if macs is None else
                               max(CHUNK_MIN_ROWS, -(-_CHUNK_MIN_MACS // macs)) if macs > 0 else 0)
        one_thread = getattr(session_options, "intra_op_num_threads", 1) == 1
        self.one_thread_session = one_thread
        self.request_threads = request_threads if one_thread and self.chunk_min_rows else 1

    def _set_split(self, model, constant_fields, session_options) -> None:
        """Builds the split dense part and keeps it when it gives the whole model's logits on random rows; the
        split is an optimization, so anything that goes wrong building or checking it leaves the model whole."""
        try:
            split = split_first_layer(model, emb=self.inputs[0], n_fields=self.n_fields, dim=self.dim,
                                      constant_fields=constant_fields)
            if split is None:
                return
            session = onnx_session(split.model, session_options, what="the ranking model's split dense part")
            rng = np.random.default_rng(0)
            n, F, d = 7, self.n_fields, self.dim
            emb = rng.normal(0.0, 0.5, (n, F, d)).astype(np.float32)
            emb[:, split.const] = emb[:1, split.const]
            lin = rng.normal(0.0, 0.5, (n, F)).astype(np.float32)
            e, li = self._feed
            (whole,) = self.session.run([self.output], {e: emb, li: lin})
            (part,) = session.run([self.output], {e: emb, li: lin, split.input: split.first_bias(emb[:1])})
        except Exception:      # noqa: BLE001 - whatever fails here, the whole model still serves
            return
        if np.allclose(np.asarray(whole, np.float64).reshape(-1), np.asarray(part, np.float64).reshape(-1),
                       rtol=1e-3, atol=1e-4):
            self.split, self.split_session, self._run_io_split = split, session, self._io_runner(session)
            self._set_native(split, session)

    def _set_native(self, split, session) -> None:
        """The split dense part in the core when its graph allows and it agrees with ``session`` (the split
        model's ONNX Runtime session) on random rows; its bound calls then run it at the avx512 level."""
        if not allowed():
            return
        e, li = self._feed
        names = dict(emb=e, lin=li, output=self.output, first_bias=split.input, n_fields=self.n_fields, dim=self.dim)
        try:
            net = native_dense(split.model, precision=self.matmul_precision, **names,
                               screen=self.matmul_precision == "float32" and screen_allowed())
            ok = net is not None and agrees(net, session, hidden=split.hidden, **names)
        except Exception:      # noqa: BLE001 - an optimization: ONNX Runtime still runs the model
            return
        if ok:
            self.native = net
            ort_run = self._run_io_split

            def run_split(job):     # (IOBinding, the core's call over the same buffers, the screen's call)
                return job[1]() if fast_here() else ort_run(job[0])

            self._run_io_split = run_split
            self._run_io_screen = lambda job: job[2](self.screen_tiles)

    @staticmethod
    def _io_runner(session):
        """``run(io)`` of an IOBinding of ``session``. InferenceSession.run_with_iobinding is a Python wrapper
        around the binding's method of the same name; call that directly when this ONNX Runtime has it (~1 us
        of a 40 us batch-1 call)."""
        native = getattr(session, "_sess", None)
        if hasattr(native, "run_with_iobinding") and hasattr(session.io_binding(), "_iobinding"):
            return lambda io, _run=native.run_with_iobinding: _run(io._iobinding, None)
        return session.run_with_iobinding

    def pool_arrays(self, indices, offsets, weights, *, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sum-pooled ``emb [bags, dim]`` and ``lin [bags, 1]`` of bags given as in an EncodedBatch (on
        ``threads`` core threads; None: the runner's ``num_threads``)."""
        nt = self._nt if threads is None else threads
        try:   # C-contiguous int32/int64 indices, int64 offsets, float32 weights: straight to the core
            return (self._emb_pool(indices, offsets, weights, "sum", nt, True),
                    self._lin_pool(indices, offsets, weights, "sum", nt, True))
        except (TypeError, ValueError):   # other dtypes / layouts: the facade converts them (or says why not)
            args = dict(mode="sum", include_last_offset=True,
                        num_threads=self.num_threads if threads is None else threads)
            return (self.embedding.pool(indices, offsets, weights, **args),
                    self.linear.pool(indices, offsets, weights, **args))

    def _bound(self, n: int):
        """This thread's input / output buffers for ``n`` examples (the leading rows of its buffer set),
        bound to an IOBinding of the session."""
        tls = self._tls
        cache = getattr(tls, "bound", None)
        if cache is None:
            rows, F, d = self._bind_rows, self.n_fields, self.dim
            tls.buffers = (np.zeros((rows, F, d), np.float32), np.zeros((rows, F), np.float32),
                           np.zeros((rows,) if self._out_rank == 1 else (rows, 1), np.float32),
                           np.zeros((1, self.split.hidden if self.split is not None else 1), np.float32),
                           np.zeros(rows, np.float32))
            cache = tls.bound = {}
        b = cache.get(n)
        if b is None:
            emb, lin, out = (a[:n] for a in tls.buffers[:3])     # C-contiguous leading rows
            fb, bnd = tls.buffers[3], tls.buffers[4][:n]
            ios = [self._binding(s, emb, lin, out, fb, bnd) for s in (self.session, self.split_session)]
            b = cache[n] = (emb.reshape(n * self.n_fields, self.dim), lin.reshape(n * self.n_fields, 1), ios[0],
                            out.reshape(-1), ios[1], fb, {}, (emb, lin, out, bnd))
        return b

    def _binding(self, session, emb, lin, out, fb, bnd):
        """An IOBinding of ``session`` (None: none) over these buffers (``fb``: the split's first-layer bias,
        ``bnd``: the screen's bounds)."""
        if session is None:
            return None
        e, li = self._feed
        io = session.io_binding()
        io.bind_cpu_input(e, emb)
        io.bind_cpu_input(li, lin)
        if session is self.split_session:
            io.bind_cpu_input(self.split.input, fb)
        io.bind_output(self.output, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        if session is self.split_session and self.native is not None:
            # the native dense part writes the same output buffer (_run_io_split picks one of the two)
            return (io, partial(self.native.forward, emb, lin, fb, out.reshape(-1)),
                    partial(self.native.screen, emb, lin, fb, out.reshape(-1), bnd))
        return io

    def _chunks(self, b, n: int, threads: int, split: bool):
        """The IOBindings of ``b``'s ``n`` rows cut into ``threads`` consecutive chunks (made once per thread
        count and session, kept with ``b``)."""
        key = (threads, split)
        ios = b[6].get(key)
        if ios is None:
            emb, lin, out, bnd = b[7]
            cuts = [n * i // threads for i in range(threads + 1)]
            session = self.split_session if split else self.session
            ios = b[6][key] = [self._binding(session, emb[a:z], lin[a:z], out[a:z], b[5], bnd[a:z])
                               for a, z in zip(cuts[:-1], cuts[1:])]
        return ios

    def _pool_for(self, threads: int):
        """A pool with at least ``threads - 1`` workers, which run all but the caller's chunk (made at the first
        call that needs it; a call asking for more workers replaces it, the old one's threads end with it)."""
        if self._row_workers < threads - 1:
            with self._batch_lock:
                if self._row_workers < threads - 1:
                    self._row_pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="rec_engine-dense")
                    self._row_workers = threads - 1
        return self._row_pool

    def _run_bound(self, b, n: int, groups, threads: int | None = None, fill=None, prep=None,
                   top: int | None = None) -> np.ndarray:
        """Runs the dense part on the bound buffers ``b`` of ``n`` examples (split when ``groups`` is one
        request of ``_SPLIT_MIN_ROWS`` rows or more and there is a split), as row chunks on ``threads`` threads (None: ``request_threads``) when
        the rows allow it. ``fill(a, z, chunked)``, when given, writes rows ``a..z`` of the inputs just before
        the dense part of those rows runs, on the thread that runs them (``chunked``: one of several chunks
        at once). ``prep()``, when given, writes what ``fill`` does not (a request's constant fields, on
        every row) on the calling thread while the other chunks' ``fill`` runs, and before any dense part;
        without it those must be in place before the call. ``top``: only the ``top`` best rows are wanted (see
        :meth:`_settle`): where the screen applies, the other rows' probabilities come back as -1."""
        split = (n >= _SPLIT_MIN_ROWS and groups is not None and b[4] is not None and len(groups) == 1
                 and int(groups[0]) == n)
        screen = (top is not None and split and 0 < top < n and self.native is not None and self._screen_on
                  and self.native.screen_active and fast_here())
        threads = self.request_threads if threads is None else threads
        if threads > 1:     # (a model too cheap a row to cut, chunk_min_rows 0: one call)
            threads = min(threads, n // self.chunk_min_rows) if self.chunk_min_rows else 1
        run = self._run_io_screen if screen else self._run_io_split if split else self._run_io

        def constants() -> None:
            if prep is not None:
                prep()
            if split:   # the split's constant fields' share of the first layer, from row 0
                self.split.first_bias(b[0].reshape(n, self.n_fields, self.dim)[:1], out=b[5])

        if threads > 1:
            # prep overlaps the other chunks' pooling (exact int8 engine, 500 candidates on two threads: ~0.05 ms
            # less a request; a caller's chunk shorter by prep's 16-32 rows measured slower, not faster)
            ios = self._chunks(b, n, threads, split)
            ready, failed = threading.Event(), []

            def first() -> None:
                try:
                    constants()
                except BaseException:
                    failed.append(True)
                    raise
                finally:
                    ready.set()
                if fill is not None:
                    fill(0, n // threads, True)
                run(ios[0])

            def chunk(i: int) -> None:
                if fill is not None:
                    fill(n * i // threads, n * (i + 1) // threads, True)
                ready.wait()
                if not failed:
                    run(ios[i])

            def release() -> None:    # the caller's chunk never set ready (it never started): stop the others
                if not ready.is_set():
                    failed.append(True)
                    ready.set()

            # every chunk has ended before this returns or raises: the buffers are this thread's next call's
            run_at_once(self._pool_for(threads), [first] + [lambda i=i: chunk(i) for i in range(1, threads)],
                        release)
        else:
            constants()
            if fill is not None:
                fill(0, n, False)
            run(b[4] if split else b[2])
        if screen:
            return self._settle(b, n, top)
        return self.sigmoid(b[3])

    def _settle(self, b, n: int, top: int) -> np.ndarray:
        """The probabilities of a screened call (the logits from the tiles and bounds on their distance to the
        float32 ones, see rec_engine._core.DenseNet.screen): the rows that may be among the ``top`` best by their
        float32 probability are computed again in float32; the others, whose float32 probability is certainly
        below the ``top``-th best's, come back as -1. So the best ``top`` (equal scores by any rule) and their
        probabilities are those of float32 ranking, bit for bit."""
        emb, lin, out, e = b[7]
        z = b[3].astype(np.float64)
        # [lo, hi] holds the float32 logit (rounded outwards to float32); the sigmoid is monotone, so [L, U]
        # holds its probability
        lo64, hi64 = z - e, z + e
        lo, hi = lo64.astype(np.float32), hi64.astype(np.float32)
        lo = np.where(lo > lo64, np.nextafter(lo, np.float32(-np.inf)), lo)
        hi = np.where(hi < hi64, np.nextafter(hi, np.float32(np.inf)), hi)
        low, up = self.sigmoid(lo), self.sigmoid(hi)
        low = np.where(np.isnan(low), -np.inf, low)
        tau = -np.partition(-low, top - 1)[top - 1]         # top rows are certainly at or above it
        again = np.flatnonzero(~(up < tau)) if tau > -np.inf else np.arange(n)   # (NaN: again)
        self.screen_calls += 1
        self.screen_rows += n
        self.screen_again += len(again)
        if len(again) * 8 > n:
            self._screen_pays()
        p = np.full(n, -1.0, np.float32)
        if len(again) == n:
            self.native.forward(emb, lin, b[5], out.reshape(-1))
            return self.sigmoid(out.reshape(-1))
        f = np.empty(len(again), np.float32)
        self.native.forward(emb[again], lin[again], b[5], f)
        p[again] = self.sigmoid(f)
        return p

    def _screen_pays(self) -> None:
        """After a call that computed more than 1/8 of its rows again: over the 32 calls or more since the tiles
        last changed, more than 1/8 of the rows again on the bf16 tiles (whose bounds are ~70x wider than
        bf16x3's, at ~0.6 of the time) moves the screen to bf16x3; more than 1/4 on bf16x3 turns it off
        (float32 alone from then on). Counters read without a lock: a lost update only delays the change."""
        c0, r0, a0 = self._screen_mark
        calls, rows, again = self.screen_calls - c0, self.screen_rows - r0, self.screen_again - a0
        if calls < 32:
            return
        if self.screen_tiles == "bf16" and again * 8 > rows:
            self.screen_tiles, self._screen_mark = "bf16x3", (self.screen_calls, self.screen_rows, self.screen_again)
        elif self.screen_tiles == "bf16x3" and again * 4 > rows:
            self._screen_on = False

    @property
    def bind_rows(self) -> int:
        """The most examples a call scores through the bound buffers (0: this model's output cannot be bound)."""
        return self._bind_rows

    def bound_inputs(self, n: int, groups=None, threads: int | None = None):
        """``(emb [n, F, dim], lin [n, F], run)`` for ``1 <= n <= bind_rows``: this thread's bound input
        buffers, to be filled in place, and ``run(fill=None, prep=None)``, which runs the dense part
        on them and returns the click probabilities (a new array). None when ``n`` is too large. ``groups``: as
        in :meth:`logits`; ``threads``: of the dense part (None: ``request_threads``); ``fill(a, z, chunked)``:
        writes rows ``a..z`` of the buffers on the thread that runs their dense part, just before it;
        ``prep()``: writes the rest (a request's constant fields) on the calling thread, while the other
        chunks' ``fill`` runs (without it, the rest is filled before ``run``)."""
        if not 0 < n <= self._bind_rows:
            return None
        b = self._bound(n)

        def run(fill=None, prep=None, top=None, b=b):
            return self._run_bound(b, n, groups, threads, fill, prep, top)

        return b[0].reshape(n, self.n_fields, self.dim), b[1].reshape(n, self.n_fields), run

    def score_bags(self, indices, offsets, weights, n: int, *, batch: bool | str = False, groups=None,
                   threads: int | None = None, top: int | None = None) -> np.ndarray:
        """Click probabilities ``[n]`` of ``n`` examples given as ``n * F`` bags (EncodedBatch layout);
        ``batch``: part of a batch of users (run by the batch session, see ``batch_threads``); ``groups``: as in
        :meth:`logits`; ``threads``: of the pooling and the dense part of a call that is not ``batch`` (None:
        ``num_threads`` and ``request_threads``); ``top``: as in :meth:`_run_bound`."""
        if n <= self._bind_rows and not batch:
            b = self._bound(n)
            nt = self._nt if threads is None else threads
            try:
                self._emb_pool(indices, offsets, weights, "sum", nt, True, b[0])
                self._lin_pool(indices, offsets, weights, "sum", nt, True, b[1])
            except (TypeError, ValueError):   # arrays of other kinds: the general path converts or explains
                pass
            else:
                return self._run_bound(b, n, groups, threads, top=top)
        emb, lin = self.pool_arrays(indices, offsets, weights, threads=1 if batch == "chunk" else None)
        return self.sigmoid(self.logits(emb.reshape(n, self.n_fields, self.dim), lin.reshape(n, self.n_fields),
                                        batch=batch, groups=groups))

    def logits(self, emb: np.ndarray, lin: np.ndarray, *, batch: bool | str = False, groups=None) -> np.ndarray:
        """Logits, float32 ``[n]``, of pooled inputs ``emb [n, F, dim]`` and ``lin [n, F]`` (``session.run``;
        ``batch``: by the batch session when there is one; ``"chunk"``: by the one-thread session of chunks run
        at once). ``groups``: the lengths of the requests the rows
        belong to, in order (each request's constant fields equal on all its rows): the split dense part runs
        when there is one."""
        e, li = self._feed
        split = self.split is not None and groups is not None
        feed = {e: emb, li: lin}
        if split:
            lengths = np.asarray(groups, np.int64).reshape(-1)
            if (lengths < 0).any():
                raise ValueError(f"groups must be lengths >= 0, got {lengths.tolist()}")
            if lengths.sum() != len(emb):
                raise ValueError(f"groups add up to {int(lengths.sum())} rows, there are {len(emb)}")
            starts = (np.cumsum(lengths) - lengths)[lengths > 0]
            fb = self.split.first_bias(emb[starts])
            if self.native is not None and self.matmul_precision != "float32" and fast_here():
                # a reduced precision: the same arithmetic as the bound path's, whichever path a row takes
                return self._native_logits(emb, lin, starts, lengths[lengths > 0], fb)
            feed[self.split.input] = fb if len(starts) == 1 else np.repeat(fb, lengths[lengths > 0], axis=0)
        if batch and self._batch_threads is not None:
            run = self._batch_session(split, 1 if batch == "chunk" else max(0, int(self._batch_threads)))
        else:
            run = self.split_session.run if split else self._run
        (out,) = run([self.output], feed, None)
        return out.reshape(-1) if out.dtype == np.float32 else np.asarray(out, np.float32).reshape(-1)

    def _native_logits(self, emb, lin, starts, lengths, fb) -> np.ndarray:
        """Logits of the native dense part, each request's rows (``starts``, ``lengths``) with its own
        first-layer share (``fb`` rows), on the calling thread."""
        emb = np.ascontiguousarray(emb, np.float32)
        lin = np.ascontiguousarray(lin, np.float32)
        fb = np.ascontiguousarray(fb, np.float32).reshape(len(starts), -1)
        out = np.empty(len(emb), np.float32)
        for j, (a, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            self.native.forward(emb[a:a + n], lin[a:a + n], fb[j], out[a:a + n])
        return out

    def _batch_session(self, split: bool, threads: int):
        """``run`` of the session (``split``: of the split model) for large calls (``threads`` intra-op
        threads, no spinning)."""
        run = self._batch_runs.get((split, threads))
        if run is None:
            import onnxruntime as ort

            with self._batch_lock:
                run = self._batch_runs.get((split, threads))
                if run is None:
                    opts = ort.SessionOptions()
                    opts.intra_op_num_threads = threads
                    opts.inter_op_num_threads = 1
                    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                    run = self._batch_runs[(split, threads)] = ort.InferenceSession(
                        self.split.model if split else self._onnx_path, sess_options=opts,
                        providers=["CPUExecutionProvider"]).run
        return run

    @staticmethod
    def sigmoid(z: np.ndarray) -> np.ndarray:
        """``0.5 * (1 + tanh(z / 2))`` in float64 (no overflow), rounded to float32."""
        if len(z) == 1:   # the same float64 operations on a scalar, without five array allocations
            out = np.empty(1, np.float32)
            out[0] = (1.0 + math.tanh(0.5 * z.item())) * 0.5
            return out
        return (0.5 * (1.0 + np.tanh(0.5 * z.astype(np.float64)))).astype(np.float32)


def run_at_once(pool: ThreadPoolExecutor, jobs, release=None) -> None:
    """Runs the callables ``jobs`` at once, the first on the calling thread and the others on ``pool``, and
    returns once every one has ended; then raises the first error, the caller's job first, then in order.
    ``release()``, when given, runs before the wait for the pool's jobs, however the caller's ended (or if it
    never started: a submit that raised): it must free any of them that waits on the caller's job."""
    waits = []
    try:
        for job in jobs[1:]:
            waits.append(pool.submit(job))
        jobs[0]()
    finally:
        if release is not None:
            release()
        wait(waits)
    for w in waits:
        w.result()


def _dense_macs(model) -> int | None:
    """Multiply-adds a row of the dense part's matrix products (the weights of its MatMul / Gemm nodes), or None
    when the onnx package cannot tell (then CHUNK_MIN_ROWS rows a chunk)."""
    try:
        import onnx

        graph = (onnx.load_from_string(model) if isinstance(model, (bytes, bytearray)) else onnx.load(model)).graph
        sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer if len(t.dims) == 2}
        return sum(sizes.get(i, 0) for node in graph.node if node.op_type in ("MatMul", "Gemm", "MatMulInteger",
                                                                                 "DynamicQuantizeMatMul")
                   for i in node.input[1:2])
    except Exception:      # noqa: BLE001 - no onnx package, or a model it cannot read: the default
        return None
