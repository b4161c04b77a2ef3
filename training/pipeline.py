"""From a model name and a data source to a trained, evaluated and exported bundle: what the CLI runs.

The model kinds, their families and the data each one takes come from the one registry,
:mod:`rec_engine.kinds` (``rec-engine train --help`` lists them):

- ranking (CTR): ``lr``, ``fm``, ``widedeep``, ``deepfm``, ``xdeepfm`` -> :class:`CtrData`
- sequential: ``sasrec`` -> :class:`SequenceData`
- graph / CF: ``mf``, ``lightgcn``, ``ngcf``, ``popularity`` (no training), and the training-free ``gfcf``,
  ``bspm`` (graph filters) and ``ease`` (closed-form item-item) -> :class:`ImplicitSplit`

Data sources (``--data``): ``synthetic`` (the built-in generator), or a path: a LightGCN split directory
(train.txt + test.txt), a SASRec text file, a directory holding frappe's libfm files, or a MovieLens
``u.data`` / ``ratings.dat`` / ``ratings.csv`` file or a directory holding one (split leave-last-out: per
user by time, the last event is test, the one before valid, the rest train).
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from rec_engine.kinds import get_kind, names

from .loop import TrainConfig


class _DataOf(Mapping):
    """Model name -> the data family it trains on, read from the registry at every use."""

    def __getitem__(self, name):
        try:
            return get_kind(name).data
        except ValueError:
            raise KeyError(name) from None

    def __iter__(self):
        return iter(names())

    def __len__(self):
        return len(names())

    def __repr__(self):
        return repr(dict(self))


FAMILIES = _DataOf()          # model name -> "ctr" | "sequential" | "graph" (the data it trains on)
MODEL_NAMES = names()         # every registered kind, in registry order
CONTENT_KINDS = ("mf", "lightgcn", "ngcf")   # the kinds whose bundles store item content (--items)

# The settings (``--param``) of the kinds without a training loop. Their defaults are the per-model
# defaults of :mod:`rec_engine_train.defaults` (the papers' settings for the filters: GF-CF alpha 0.3 and 256
# singular vectors, BSPM-EM alpha 0.2, 448 vectors, sharpening time 2.5 in one RK4 step; EASE's L2), then
# the model classes' own.
CLOSED_FORM_SETTINGS = {
    "gfcf": ("alpha", "k_ideal", "svd", "n_iter", "oversample"),
    "bspm": ("alpha", "k_ideal", "sharpen", "sharpen_solver", "sharpen_steps", "svd", "n_iter", "oversample"),
    "ease": ("l2", "dtype", "max_items"),
}


def family_of(name: str) -> str:
    """The data family model ``name`` trains on ("ctr", "sequential" or "graph"; what :func:`load_data`
    takes); ValueError naming the known models for an unknown name."""
    return get_kind(name).data


def closed_form_params(name: str, params: Mapping) -> dict:
    """``params`` over the defaults of kind ``name`` (see ``CLOSED_FORM_SETTINGS``); ValueError for a setting
    the kind does not take."""
    from .defaults import model_defaults

    allowed = CLOSED_FORM_SETTINGS[name]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{name} takes the params {', '.join(allowed)}; got unknown {', '.join(unknown)}")
    return {**model_defaults(name)["params"], **params}


# ------------------------------------------------------------------------------------------ data
_MOVIELENS = ("ratings.dat", "u.data")        # ratings.csv goes through the CSV / TSV interactions reader


class _WrongData(ValueError):
    """The data source holds another family's data than the one asked for."""


def load_data(source: str, family: str, *, seed: int = 0, synthetic: dict | None = None,
              data_options: dict | None = None, item_content=None):
    """The data a model family trains on, from ``source`` ("synthetic" or a path; see the module doc).

    A ``.csv`` / ``.tsv`` file (or a directory's ``ratings.csv``) is a table of
    user-item events read by :func:`~rec_engine_train.data.loaders.load_interaction_data` with
    ``data_options`` (its :data:`~rec_engine_train.data.loaders.INTERACTION_OPTIONS`: column names,
    ``min_weight``, ``split``, ...; string values, as ``--data-option KEY=VALUE`` gives them); columns named
    like ``user_id``/``userId``, ``item_id``/``movieId``, ``timestamp``, ``rating`` are found without
    options. The user's own ids are kept as the data's ``keys``.

    For the ``ctr`` family such a table with ratings gives ranking examples
    (:func:`~rec_engine_train.data.ratings_ctr.ratings_ctr`: label = rating at least ``like``, 4 by default;
    items held out as well as time); ``item_content``: a callable ``(item_keys, n_items) -> ItemContent``
    whose labels and vectors become item fields."""
    if source == "synthetic":
        from .data.synthetic import make_synthetic

        world = make_synthetic(seed=seed, **(synthetic or {}))
        return {"ctr": world.ctr, "sequential": world.sequences, "graph": world.implicit}[family]()
    from .data import loaders

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r} does not exist (use 'synthetic' or a path)")
    # a directory holding a ratings.csv (MovieLens ml-latest*) and no LightGCN split reads that table
    table = path / "ratings.csv" if path.is_dir() and (path / "ratings.csv").is_file() and not (
        path / "train.txt").exists() else path
    if table.is_file() and table.suffix.lower() in (".csv", ".tsv"):
        if family == "ctr":
            return _ratings_ctr(table, seed, data_options, item_content)
        if family not in ("graph", "sequential"):
            raise _WrongData(f"{table} holds user-item interactions (graph or sequential data), but the model "
                             f"needs {family} data")
        return loaders.load_interaction_data(table, family, seed=seed, options=data_options)
    if data_options:
        raise ValueError(f"data options apply to CSV/TSV interaction files, not to {path}")
    if path.is_dir():
        if (path / "train.txt").exists() and (path / "test.txt").exists():
            kind, load = "graph", lambda: loaders.load_lightgcn(path)
        elif any(path.glob("*.libfm")):
            kind, load = "ctr", lambda: loaders.load_frappe(path, seed=seed)
        elif any((path / n).is_file() for n in _MOVIELENS):
            ratings = next(path / n for n in _MOVIELENS if (path / n).is_file())
            kind, load = "graph", lambda: loaders.split_leave_last_out(loaders.load_movielens(ratings))
        else:
            raise ValueError(f"{path}: a data directory must hold train.txt + test.txt (LightGCN split), "
                             f"frappe's *.libfm files or MovieLens ratings ({', '.join(_MOVIELENS)})")
    elif path.name in _MOVIELENS or path.suffix in (".data", ".dat"):
        kind, load = "graph", lambda: loaders.split_leave_last_out(loaders.load_movielens(path))
    else:
        kind, load = "sequential", lambda: loaders.load_sasrec(path)
    if kind != family:
        raise _WrongData(f"{path} holds {kind} data, but the model needs {family} data")
    return load()


_CTR_OPTIONS = ("like", "cold", "test", "valid", "content_dim", "profiles")


def _ratings_ctr(table: Path, seed: int, options: dict | None, item_content):
    """Ranking examples from a ratings table (see :func:`load_data`); options ``like``, ``cold``, ``test``,
    ``valid``, ``content_dim`` besides the reader's column names."""
    from .data import loaders
    from .data.ratings_ctr import ratings_ctr

    opts = dict(options or {})
    ctr_opts = {k: opts.pop(k) for k in list(opts) if k in _CTR_OPTIONS}
    cols = {k: opts.pop(k) for k in ("user", "item", "time", "weight", "sep") if k in opts}
    if opts:
        raise ValueError(f"unknown data options for CTR examples from {table}: {sorted(opts)} "
                         f"(known: user, item, time, weight, sep, {', '.join(_CTR_OPTIONS)})")
    inter = loaders.load_interactions(table, **cols)
    try:
        kw = {k: (int(v) if k == "content_dim" else str(v).lower() in ("1", "true", "yes") if k == "profiles"
                  else float(v)) for k, v in ctr_opts.items()}
    except ValueError as e:
        raise ValueError(f"data option: {e}") from None
    content = item_content((inter.keys or {}).get("item"), inter.n_items) if item_content is not None else None
    return ratings_ctr(inter, content=content, seed=seed, name=table.parent.name or table.stem, **kw)


# ------------------------------------------------------------------------------------------ train / evaluate / export
@dataclass
class Result:
    name: str
    model: object
    history: object | None
    metrics: dict
    train_seconds: float
    extra: dict = field(default_factory=dict)


def train(name: str, data, config: TrainConfig, log: Callable[[str], None] = print, *,
          init: Callable | None = None) -> Result:
    """Train model ``name`` on ``data`` and evaluate it on the test split. Kinds without a training loop
    (``popularity``, ``gfcf``, ``bspm``, ``ease``) are fitted in one pass from ``config.params`` (and
    ``config.seed``, ``config.num_threads``); the epoch settings do not apply to them. ``init`` (graph kinds
    with a training loop): called with the built model before training, to warm-start it."""
    kind = get_kind(name)
    fam = kind.family
    t0 = time.perf_counter()
    hist = None
    if fam == "ctr":
        from .models.ctr import train_ctr

        model, hist = train_ctr(name, data, config, log=log)
    elif fam == "sequential":
        from .models.sasrec import train_sasrec

        model, hist = train_sasrec(data, config, log=log)
    elif name == "popularity":
        model = data.train.item_counts()
    elif fam == "graph":
        from .models.graph import train_graph

        model, hist = train_graph(name, data, config, log=log, init=init)
    elif fam == "filter":
        from .models.gfcf import GFCF

        p = closed_form_params(name, config.params)
        log(f"{name}: training-free graph filter, fitted in one pass ({', '.join(f'{k}={v}' for k, v in p.items())})")
        model = GFCF(**p, seed=config.seed, num_threads=config.num_threads).fit(data.train)
    elif fam == "item_item":
        from .models.ease import EASE

        p = closed_form_params(name, config.params)
        log(f"{name}: closed-form item-item model ({', '.join(f'{k}={v}' for k, v in p.items())})")
        model = EASE(**p, num_threads=config.num_threads).fit(data.train)
    else:
        raise ValueError(f"model kind {name!r} (family {fam!r}) has no trainer in rec_engine_train")
    seconds = time.perf_counter() - t0
    return Result(name, model, hist, evaluate_model(name, model, data), seconds)


def evaluate_model(name: str, model, data, *, ks=(10, 20), seed: int = 0) -> dict:
    """Test metrics of a trained model: AUC/logloss (CTR), sampled HR/NDCG@10 (SASRec), all-item
    recall/NDCG@K over items not in train (every retrieval kind trained on interactions)."""
    from . import evaluate as ev

    fam = get_kind(name).family
    if fam == "ctr":
        from .models.ctr import predict_ctr

        return ev.evaluate_ctr(data.test.labels, predict_ctr(model, data.test))
    if fam == "sequential":
        from .models.sasrec import EVAL_USERS, score

        hist = [s if v < 0 else s.tolist() + [int(v)] for s, v in zip(data.train, data.valid)]
        return ev.evaluate_sampled(lambda users, cands: score(model, [hist[u] for u in users], cands), data,
                                   split="test", seed=seed, ks=(10,), batch_size=EVAL_USERS)
    counts = data.train.item_counts()
    if fam in ("filter", "item_item"):
        return _evaluate_ranker(model, data, ks, counts)
    train_lists, test_lists = data.train.by_user(), data.test.by_user()
    if name == "popularity":
        users, items = ev.popularity_vectors(model, data.train.n_users)
    else:
        from .models.graph import final_embeddings

        users, items = final_embeddings(model)
    return ev.evaluate_retrieval(users, items, train_lists, test_lists, ks=ks, item_counts=counts)


def _evaluate_ranker(model, data, ks, counts) -> dict:
    """All-item metrics of a model with ``recommend(users, k)`` that leaves out each user's train items
    (GF-CF / BSPM, EASE), in batches of 1,024 users."""
    from . import evaluate as ev

    return ev.evaluate_recommender(lambda users, k: model.recommend(users, k).ids, data.test.by_user(),
                                   data.train.n_items, ks, batch_size=1024, item_counts=counts)


def export(result: Result, data, out: str | Path, *, table_dtype: str = "float32", overwrite: bool = False,
           training: dict | None = None, content=None) -> Path:
    """Write ``result``'s model as a bundle at ``out`` (its test metrics go into the manifest, and the data's
    own user / item keys, ``data.keys``, when it has them). ``training``: what trained it (the data source and
    its settings, the TrainConfig fields), stored as ``meta["training"]`` for ``rec-engine update``.
    ``content``: the items' content (:func:`rec_engine_train.content_map.item_content`; kinds in
    :data:`CONTENT_KINDS`), stored with its map into the item vectors."""
    fam = get_kind(result.name).family
    if content is not None and result.name not in CONTENT_KINDS:
        raise ValueError(f"item content (--items) is stored by the kinds {', '.join(CONTENT_KINDS)}, "
                         f"not {result.name!r}")
    metrics = {**result.metrics, "train_seconds": result.train_seconds}
    keys = getattr(data, "keys", None)
    if fam == "ctr":
        from .export_ctr import export_ctr

        extra = getattr(data, "extra", {})
        return export_ctr(result.model, out, table_dtype=table_dtype, metrics=metrics, overwrite=overwrite,
                          training=training, entity_features=extra.get("entity_features"), keys=keys,
                          content=extra.get("content_projection"), content_info=extra.get("content_info"),
                          pair_fields=extra.get("pair_fields"), profile_config=extra.get("profile_config"),
                          content_vectors=extra.get("content_vectors"), item_labels=extra.get("item_labels"))
    if fam == "sequential":
        from .export_sasrec import export_sasrec

        histories = [np.concatenate([t, [v] if v >= 0 else [], [x] if x >= 0 else []]).astype(np.int64)
                     for t, v, x in zip(data.train, data.valid, data.test)]
        return export_sasrec(result.model, out, histories=histories, table_dtype=table_dtype, metrics=metrics,
                             overwrite=overwrite, training=training, keys=keys)
    if fam == "filter":
        from .export_gfcf import export_gfcf

        return export_gfcf(result.model, out, metrics=metrics, table_dtype=table_dtype, overwrite=overwrite,
                           training=training, kind=result.name, keys=keys)
    if fam == "item_item":
        from .export_ease import export_ease

        return export_ease(result.model, out, metrics=metrics, table_dtype=table_dtype, overwrite=overwrite,
                           training=training, keys=keys)
    if fam != "graph":
        raise ValueError(f"model kind {result.name!r} (family {fam!r}) has no exporter in rec_engine_train")
    from .export_graph import export_graph, export_popularity

    if result.name == "popularity":
        return export_popularity(result.model, data.train, out, metrics=metrics, overwrite=overwrite,
                                 training=training, keys=keys)
    return export_graph(result.model, data.train, out, table_dtype=table_dtype, metrics=metrics, overwrite=overwrite,
                        training=training, keys=keys, content=content)


def write_metrics(path: str | Path, result: Result, **info) -> None:
    """The metrics JSON of a run: test metrics, wall time, per-epoch history and the run's settings."""
    hist = result.history
    doc = {"model": result.name, "metrics": result.metrics, "train_seconds": result.train_seconds,
           "history": getattr(hist, "epochs", []), "best_epoch": getattr(hist, "best_epoch", None), **info}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=str))


def evaluate_bundle(bundle, data, *, ks=(10, 20), seed: int = 0) -> dict:
    """Test metrics of an exported bundle (:class:`rec_engine.bundle.Bundle`), computed with the serving
    code's own readers (core lookups, ONNX Runtime), on ``data`` of the bundle's family
    (:func:`family_of` its kind). A pipeline bundle: see :func:`evaluate_pipeline`."""
    from rec_engine.bundle import BundleError

    from . import evaluate as ev

    kind = bundle.kind
    if kind == "pipeline":
        raise ValueError(f"{bundle.path} is a pipeline: evaluate its stages (evaluate_pipeline), each on data of "
                         "its own family")
    fam = get_kind(kind).family
    if fam == "ctr":
        from .export_ctr import load_ctr_scorer

        scorer = load_ctr_scorer(bundle.path)
        if scorer.schema != data.schema:
            raise ValueError(f"the data's feature schema ({data.schema}) does not match the bundle's ({scorer.schema})")
        return ev.evaluate_ctr(data.test.labels, scorer(data.test))
    if fam == "sequential":
        from .export_sasrec import load_sasrec_scorer

        scorer = load_sasrec_scorer(bundle.path)
        hist = [s if v < 0 else np.concatenate([s, [v]]) for s, v in zip(data.train, data.valid)]
        return ev.evaluate_sampled(lambda users, cands: scorer.score([hist[u] for u in users], cands), data,
                                   split="test", seed=seed, ks=(10,))
    meta = bundle.meta
    if (int(meta["n_users"]), int(meta["n_items"])) != (data.train.n_users, data.train.n_items):
        raise ValueError(f"the bundle has {meta['n_users']} users x {meta['n_items']} items, the data "
                         f"{data.train.n_users} x {data.train.n_items}")
    counts = data.train.item_counts()
    if fam == "filter":
        from .export_gfcf import load_gfcf

        return _evaluate_ranker(load_gfcf(bundle), data, ks, counts)
    if fam == "item_item":
        from rec_engine.item_item import ItemItemScorer

        scorer = ItemItemScorer.from_bundle(bundle)
        return ev.evaluate_recommender(lambda users, k: scorer.recommend_users(users, k).ids, data.test.by_user(),
                                       data.train.n_items, ks, batch_size=1024, item_counts=counts)
    if fam != "graph":
        raise ValueError(f"bundle kind {kind!r} (family {fam!r}) has no evaluation in rec_engine_train")
    if kind == "popularity":
        users, items = ev.popularity_vectors(bundle.array("item_counts"), data.train.n_users)
    else:
        if "users" not in bundle.table_names or "items" not in bundle.table_names:
            raise BundleError(f"bundle {bundle.path} of kind {kind!r} has no users/items tables")
        users, items = bundle.table("users").to_numpy(), bundle.table("items").to_numpy()
    return ev.evaluate_retrieval(users, items, data.train.by_user(), data.test.by_user(), ks=ks, item_counts=counts)


def pipeline_stages(bundle) -> dict:
    """The stages of a pipeline bundle: ``{"retrieval": Bundle, "ranking": Bundle}`` (those it has)."""
    from rec_engine.bundle import open_bundle

    stages = bundle.meta.get("stages", {})
    return {name: open_bundle(bundle.path / sub) for name, sub in stages.items() if sub}


def evaluate_pipeline(bundle, source: str, *, seed: int = 0, stages=None,
                      log: Callable[[str], None] = print) -> dict:
    """Each stage of a pipeline bundle evaluated on its own kind of data from ``source``:
    ``{stage: metrics}``.

    A pipeline's stages train on different data (e.g. LightGCN on interactions, DeepFM on CTR examples):
    ``synthetic`` gives both (from one seeded world), a path holds one kind, so a stage whose family does not
    match the path is skipped with a note (``stages`` picks stages by name). ValueError when no stage is left.
    """
    found = pipeline_stages(bundle)
    wanted = list(found) if stages is None else list(stages)
    unknown = [s for s in wanted if s not in found]
    if unknown:
        raise ValueError(f"pipeline {bundle.path} has no stage {unknown[0]!r} (it has {', '.join(found)})")
    out, notes = {}, []
    for name in wanted:
        b = found[name]
        need = family_of(b.kind)
        try:
            data = load_data(source, need, seed=seed)
        except _WrongData as e:
            notes.append(f"{name} stage ({b.kind}) needs {need} data: {e}")
            continue
        out[name] = evaluate_bundle(b, data, seed=seed)
    for n in notes:
        log(f"skipped: {n}")
    if not out:
        raise ValueError(f"no stage of pipeline {bundle.path} could be evaluated on {source!r}: " + "; ".join(notes))
    return out
