"""The ``rec-engine`` command line."""
from __future__ import annotations

import argparse
import sys

from ._core import RecEngineError

# Coalescing window: measured with bench/bench_http.py (1M items, 2 cores; README "Several workers, request
# coalescing"): 5 ms cut the CPU per request by a quarter to a half from 4 concurrent clients on (batched
# retrieval) and did better than 2 ms; a request that finds nothing in flight starts at once. 0: off.
DEFAULT_COALESCE_US = 5000


def _serve(args) -> int:
    import os

    try:
        from .service import serve
    except ImportError as e:
        raise ValueError(f"serving needs the serve extra: pip install 'rec_engine[serve]' ({e})") from None
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.coalesce_us < 0:
        raise ValueError(f"--coalesce-us must be >= 0, got {args.coalesce_us}")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.coalesce_linger_us is not None and args.coalesce_linger_us < 0:
        raise ValueError(f"--coalesce-linger-us must be >= 0, got {args.coalesce_linger_us}")
    if args.events is not None and args.event_log is not None:
        raise ValueError("give --events or its older name --event-log, not both")
    serve(args.bundle, host=args.host, port=args.port, token=os.environ.get(args.token_env) or None,
          read_token=os.environ.get(args.read_token_env) or None, rate_limit=args.rate_limit,
          rate_burst=args.rate_burst, body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
          bundle_root=args.bundle_root,
          max_body=args.max_body, workers=args.workers, coalesce_us=args.coalesce_us, max_batch=args.max_batch,
          coalesce_linger_us=args.coalesce_linger_us,
          log_level=args.log_level, events=args.events or args.event_log, ort_threads=args.ort_threads,
          num_threads=args.threads, batch_threads=args.batch_threads, index=args.index, ranking_precision=args.ranking_precision,
          scan_memory=args.scan_memory, durable=args.durable or None, window_days=args.window_days,
          retention_days=args.retention_days, impression_sample=args.impression_sample,
          candidate=args.candidate, candidate_fraction=args.candidate_fraction if args.candidate else None,
          follow_events_s=args.follow_events_s, content_encoder=args.content_encoder,
          hybrid_max_events=args.hybrid_max_events, diversity=args.diversity, debias=args.debias,
          explore=args.explore, profiles=True if args.profiles else None)
    return 0


def _rollback(args) -> int:
    import json
    import os
    import urllib.request

    from .versions import rollback

    name = rollback(args.home)
    print(f"{args.home}: CURRENT -> {name}")
    if args.server:
        token = os.environ.get(args.token_env)
        if not token:
            raise ValueError(f"--server needs the token in ${args.token_env}")
        path = os.path.abspath(os.path.join(args.home, name))
        req = urllib.request.Request(args.server.rstrip("/") + "/swap", data=json.dumps({"bundle": path}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            print(f"{args.server}: now serving {json.loads(resp.read())['version']}")
    return 0


def _pipeline(args) -> int:
    from .bundle import open_bundle, write_pipeline

    path = write_pipeline(args.out, retrieval=args.retrieval, ranking=args.ranking, n_candidates=args.candidates,
                          index=args.index, ranking_precision=args.ranking_precision, overwrite=args.overwrite)
    meta = open_bundle(path, verify=False).meta
    print(f"wrote {path} (stages: {', '.join(meta['stages'])}; {meta['n_candidates']} candidates)")
    idx, rk = meta.get("index", {}), meta.get("ranking", {})
    if "recall" in idx:
        print(f"index {idx['precision']}: recall of the exact top {idx['recall_at']} over {idx['recall_users']} "
              f"users: mean {idx['recall']:.4f}, min {idx['recall_min']:.4f}")
    if "max_abs_diff" in rk:
        print(f"ranking {rk['precision']}: largest probability change {rk['max_abs_diff']:.2e}, top-{rk['top_k']} "
              f"overlap {rk['top_overlap']:.4f} ({rk['users']} users x {rk['candidates']} candidates)")
    return 0


def _cluster(args) -> int:
    from .cluster import main as cluster_main

    return cluster_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rec-engine", description="rec_engine command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("kernels", help="run the kernels on generated data and print results and timings")
    demo.add_argument("--users", type=int, default=2000)
    demo.add_argument("--items", type=int, default=20000)
    demo.add_argument("--dim", type=int, default=64)
    demo.add_argument("--k", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="print the SIMD level and threads in use")
    srv = sub.add_parser("serve", help="serve a bundle over HTTP (needs the serve extra)")
    srv.add_argument("bundle")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--token-env", default="REC_ENGINE_TOKEN",
                     help="environment variable holding the write token: observe, feedback, forget, swap, A/B and "
                          "catalogue changes need 'Authorization: Bearer <it>' (unset: observe and feedback open, "
                          "the others disabled)")
    srv.add_argument("--read-token-env", default="REC_ENGINE_READ_TOKEN",
                     help="environment variable holding the read token: when set, recommend, similar items/users, "
                          "profiles and /metrics need it (or the write token)")
    srv.add_argument("--rate-limit", type=float, default=None,
                     help="requests a second per client address (429 with Retry-After past it; default: no limit)")
    srv.add_argument("--rate-burst", type=float, default=None, help="burst allowed above --rate-limit (default: "
                                                                    "one second's worth)")
    srv.add_argument("--body-timeout", type=float, default=30.0,
                     help="seconds for a request body to arrive whole (408 past it)")
    srv.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds for a request head to arrive (the connection is closed past it)")
    srv.add_argument("--bundle-root", default=None,
                     help="POST /swap and /ab load only bundles under this directory (default: the directory "
                          "holding BUNDLE)")
    srv.add_argument("--events", default=None,
                     help="the event store: a SQLite file (created if missing), a redis://host:port/db URL (a stream "
                          "shared by replicas), or an older release's .jsonl log (imported once into the .db beside "
                          "it). Observed events and impressions are stored; the online state is read from it at "
                          "start; with --workers > 1 each worker follows what the others store")
    srv.add_argument("--event-log", default=None, help=argparse.SUPPRESS)
    srv.add_argument("--durable", action="store_true",
                     help="fsync every commit of the SQLite store (no loss on power failure; slower writes)")
    srv.add_argument("--window-days", type=float, default=None,
                     help="read only this many recent days of events into the online state at start")
    srv.add_argument("--retention-days", type=float, default=None, help="erase events older than this")
    srv.add_argument("--impression-sample", type=float, default=None,
                     help="share of recommendations whose impression is logged (default 1)")
    srv.add_argument("--candidate", default=None, help="A/B serving: a candidate bundle beside the main one")
    srv.add_argument("--candidate-fraction", type=float, default=0.1,
                     help="share of users (stable by a hash of their key) served by --candidate (default 0.1)")
    srv.add_argument("--follow-events-s", type=float, default=None,
                     help="poll the store this often for events other processes stored (default: 0.2 with "
                          "--workers > 1, else off)")
    srv.add_argument("--ort-threads", type=int, default=1, help="ONNX Runtime threads per session")
    srv.add_argument("--threads", type=int, default=1, help="core threads per request")
    srv.add_argument("--batch-threads", type=int, default=None,
                     help="threads of a coalesced batch (top-k and ranking; default with --coalesce-us: the "
                          "available cores divided among the workers)")
    srv.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes")
    srv.add_argument("--workers", type=int, default=1,
                     help="server processes (uvicorn's multi-process mode: one socket, N spawned workers, each "
                          "loading the bundle; the memory-mapped tables are shared through the page cache; "
                          "POST /swap is refused with more than one, restart with the new bundle instead)")
    srv.add_argument("--coalesce-us", type=int, default=DEFAULT_COALESCE_US,
                     help="collect concurrent single /recommend requests (same k, exclude_seen, n_candidates; no "
                          "candidates or exclude lists) for at most this many microseconds into one "
                          "recommend_batch call; 0: off (default %(default)s, see the README)")
    srv.add_argument("--max-batch", type=int, default=32, help="most requests in one coalesced batch")
    srv.add_argument("--coalesce-linger-us", type=int, default=None,
                     help="after a coalesced call answers n requests, how long a batch that could start waits "
                          "for n more to come (their clients sending again; default: the window, at most 5000; "
                          "0: off)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                     help="uvicorn's log level ('warning' drops the access log)")
    srv.add_argument("--index", default=None, choices=["float32", "int8", "bf16"],
                     help="retrieval scan: float32, or int8 / bf16 codes whose shortlist is checked against its "
                          "error bound and re-scored in float32 (the same candidates; default: the bundle's "
                          "setting, else float32)")
    srv.add_argument("--ranking-precision", default=None, choices=["float32", "int8", "bf16x3", "bf16"],
                     help="the ranking model's dense part as trained, with int8 weights, or its products in bf16x3 / "
                          "bf16 on AMX-BF16 tiles (default: the bundle's setting, else float32)")
    srv.add_argument("--scan-memory", default=None, choices=["copy", "mmap"],
                     help="the table retrieval scans: read into each process's memory (huge pages, ~1.35x faster "
                          "scans) or the bundle's file mapped and shared between workers (default: copy with one "
                          "worker, mmap with several)")
    srv.add_argument("--content-encoder", default=None,
                     help="a content_encoder bundle (rec-engine content-encoder): POST /items then takes item text")
    srv.add_argument("--hybrid-max-events", type=int, default=None,
                     help="users with at most this many events are also retrieved by content, with a bundle that "
                          "stores content vectors (default 5; 0: off)")
    srv.add_argument("--diversity", type=float, default=None,
                     help="default re-ranking by maximal marginal relevance over the items' vectors, in [0, 1] "
                          "(default 0: off; a request's \"diversity\" overrides it)")
    srv.add_argument("--debias", type=float, default=None,
                     help="default popularity debiasing by exposure, in [0, 1] (default 0: off)")
    srv.add_argument("--explore", type=float, default=None,
                     help="default share of slots for exploration of rarely shown items by Thompson sampling, "
                          "in [0, 1] (default 0: off; needs --events for the counts to survive a restart)")
    srv.add_argument("--profiles", action="store_true",
                     help="keep user profiles (decayed interest tags, preference vectors), built from --events at "
                          "start: GET /users/{key}/profile and \"explain\": true in /recommend")
    srv.set_defaults(handler=_serve)
    rb = sub.add_parser("rollback", help="point a model home's CURRENT back at the version promoted before",
                        description="Model homes (folders of bundles with a CURRENT pointer, which Engine.load and "
                                    "serve follow) keep every promoted version; this points CURRENT at the one "
                                    "before the current one and, with --server, swaps it into a running server.")
    rb.add_argument("home")
    rb.add_argument("--server", default=None, help="a running server's URL: POST /swap the rolled-back version")
    rb.add_argument("--token-env", default="REC_ENGINE_TOKEN", help="environment variable holding the swap token")
    rb.set_defaults(handler=_rollback)
    pl = sub.add_parser("pipeline", help="combine a retrieval and a ranking bundle into a pipeline bundle",
                        description="Write a pipeline bundle from a retrieval bundle and/or a ranking bundle, "
                                    "optionally with an int8/bf16 retrieval index and an int8 ranking model built "
                                    "in (their recall / agreement against float32 is measured and printed).")
    pl.add_argument("--retrieval", default=None, help="retrieval bundle")
    pl.add_argument("--ranking", default=None, help="ranking bundle")
    pl.add_argument("--out", required=True, help="pipeline bundle to write")
    pl.add_argument("--candidates", type=int, default=500, help="items retrieved for the ranking stage")
    pl.add_argument("--index", default="float32", choices=["float32", "int8", "bf16"],
                    help="the retrieval scan served by default (int8/bf16: the index is stored in the bundle)")
    pl.add_argument("--ranking-precision", default="float32", choices=["float32", "int8", "bf16x3", "bf16"],
                    help="int8: store the ranking model's dense part with int8 weights, served by default; bf16x3 / "
                         "bf16: serve its products on AMX-BF16 tiles by default")
    pl.add_argument("--overwrite", action="store_true")
    pl.set_defaults(handler=_pipeline)
    cl = sub.add_parser("cluster", add_help=False, prefix_chars="\0",
                        help="serve a bundle on Ray Serve with the catalogue sharded (needs the cluster extra; "
                             "rec-engine cluster --help)")
    cl.add_argument("rest", nargs=argparse.REMAINDER)
    cl.set_defaults(handler=_cluster)
    from .report import add_report_command

    add_report_command(sub)
    import importlib.util

    if importlib.util.find_spec("rec_engine_train") and importlib.util.find_spec("torch"):
        from rec_engine_train.cli import add_commands

        add_commands(sub)
    else:                             # the train extra is not installed
        for name in ("demo", "train", "evaluate"):
            p = sub.add_parser(name, help="(needs the train extra: pip install 'rec_engine[train]')")
            p.set_defaults(handler=lambda _a: parser.error("this command trains models: it needs the train extra "
                                                           "(pip install 'rec_engine[train]')"))
    args = parser.parse_args(argv)
    if hasattr(args, "handler"):
        try:
            return args.handler(args)
        except (ValueError, TypeError, IndexError, OSError, RecEngineError) as e:   # user errors: no traceback
            print(f"rec-engine {args.command}: error: {e}", file=sys.stderr)
            return 2
    if args.command == "kernels":
        from .demo import run
        run(n_users=args.users, n_items=args.items, dim=args.dim, k=args.k, seed=args.seed)
    elif args.command == "info":
        from . import runtime
        print(f"simd_level={runtime.simd_level()} supported={','.join(runtime.supported_simd_levels())} "
              f"openmp={runtime.openmp_enabled()} threads={runtime.default_num_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
