"""``rec-engine train`` and ``rec-engine evaluate`` (registered by ``rec_engine.cli`` when this package is installed)."""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time

from . import pipeline
from .loop import TrainConfig


def _param(text: str):
    """``key=value`` with value parsed as JSON when it can be (numbers, lists, booleans), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_commands(sub) -> None:
    d = sub.add_parser("demo", help="train, export and serve on synthetic data: recommendations, feedback, latency",
                       description="The end-to-end demonstration on the built-in synthetic data (about a minute).")
    d.add_argument("--out", default=None, help="where to write the bundles (default: a temporary directory)")
    d.add_argument("--users", type=int, default=2000)
    d.add_argument("--items", type=int, default=1000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--requests", type=int, default=500, help="recommend calls timed for the latency table")
    d.set_defaults(handler=_demo)

    t = sub.add_parser("train", help="train a model and export it as a bundle",
                       description="Train MODEL on --data, print validation metrics each epoch (early stopping on "
                                   "them), evaluate on the test split and write a bundle to --out.")
    t.add_argument("model", help=f"one of: {', '.join(pipeline.MODEL_NAMES)}")
    t.add_argument("--data", default="synthetic", help="'synthetic' (default) or a path to real data")
    t.add_argument("--out", required=True, help="bundle directory to write")
    t.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    t.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    t.add_argument("--lr", type=float, default=TrainConfig.lr)
    t.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    t.add_argument("--dim", type=int, default=TrainConfig.dim)
    t.add_argument("--seed", type=int, default=TrainConfig.seed)
    t.add_argument("--patience", type=int, default=TrainConfig.patience,
                   help="stop after this many validations without a better metric (0: never)")
    t.add_argument("--eval-every", type=int, default=TrainConfig.eval_every,
                   help="validate after every N-th epoch (and the last); the best validated epoch is kept")
    t.add_argument("--threads", type=int, default=None, help="torch / core threads (default: all cores)")
    t.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="model-specific setting, e.g. --param mlp=[400,400,400] --param n_layers=3 (repeatable)")
    t.add_argument("--table-dtype", choices=("float32", "float16", "int8"), default="float32",
                   help="storage of the exported embedding tables")
    t.add_argument("--metrics-json", default=None, help="also write the metrics and history here")
    t.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(handler=_train)

    e = sub.add_parser("evaluate", help="evaluate a bundle on the test split of a data set")
    e.add_argument("bundle")
    e.add_argument("--data", default="synthetic", help="'synthetic' (default) or a path to real data")
    e.add_argument("--seed", type=int, default=0, help="seed of the synthetic data / sampled negatives")
    e.add_argument("--metrics-json", default=None)
    e.set_defaults(handler=_evaluate)


def _demo(args) -> int:
    from .demo import run

    run(args.out, n_users=args.users, n_items=args.items, seed=args.seed, requests=args.requests)
    return 0


@contextlib.contextmanager
def _stop_signals():
    """SIGINT and SIGTERM stop training the way Ctrl-C does (the loop keeps the best epoch, which is then
    evaluated and exported), also in a job started in the background, which begins with SIGINT ignored;
    the previous handlers are put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in saved:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _train(args) -> int:
    with _stop_signals():
        return _run_train(args)


def _run_train(args) -> int:
    import torch

    fam = pipeline.family_of(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         dim=args.dim, seed=args.seed, patience=args.patience, eval_every=args.eval_every,
                         num_threads=args.threads,
                         progress=not args.no_progress and sys.stderr.isatty(), params=dict(args.param))
    t0 = time.perf_counter()
    data = pipeline.load_data(args.data, fam, seed=args.seed)
    print(f"data: {args.data} ({type(data).__name__}) loaded in {time.perf_counter() - t0:.1f}s")
    result = pipeline.train(args.model, data, config)
    print("test: " + "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float)))
    out = pipeline.export(result, data, args.out, table_dtype=args.table_dtype, overwrite=args.overwrite)
    wall = time.perf_counter() - t0
    print(f"bundle: {out}  (train {result.train_seconds:.1f}s, total {wall:.1f}s)")
    if args.metrics_json:
        pipeline.write_metrics(args.metrics_json, result, data=args.data, config=config.__dict__, wall_seconds=wall,
                               bundle=str(out))
    return 0


def _evaluate(args) -> int:
    from rec_engine.bundle import open_bundle

    bundle = open_bundle(args.bundle)
    fam = pipeline.family_of(bundle.kind)
    data = pipeline.load_data(args.data, fam, seed=args.seed)
    metrics = pipeline.evaluate_bundle(bundle, data, seed=args.seed)
    print(f"{bundle.kind} {args.bundle}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                        if isinstance(v, float)))
    if args.metrics_json:
        with open(args.metrics_json, "w") as f:
            json.dump({"bundle": args.bundle, "kind": bundle.kind, "data": args.data, "metrics": metrics}, f, indent=1)
    return 0
