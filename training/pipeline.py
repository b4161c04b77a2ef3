"""From a model name and a data source to a trained, evaluated and exported bundle: what the CLI runs.

Model families and the data each one takes:

- ranking (CTR): ``lr``, ``fm``, ``widedeep``, ``deepfm``, ``xdeepfm`` -> :class:`CtrData`
- sequential: ``sasrec`` -> :class:`SequenceData`
- graph / CF: ``mf``, ``lightgcn``, ``ngcf`` -> :class:`ImplicitSplit`; ``popularity`` needs no training

Data sources (``--data``): ``synthetic`` (the built-in generator), or a path: a LightGCN split directory
(train.txt + test.txt), a SASRec text file, a directory holding frappe's libfm files, or a MovieLens
``u.data`` / ``ratings.dat`` file (split leave-last-out).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .loop import TrainConfig

FAMILIES = {
    "lr": "ctr", "fm": "ctr", "widedeep": "ctr", "deepfm": "ctr", "xdeepfm": "ctr",
    "sasrec": "sequential",
    "mf": "graph", "lightgcn": "graph", "ngcf": "graph", "popularity": "graph",
}
MODEL_NAMES = tuple(FAMILIES)


def family_of(name: str) -> str:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}") from None


# ------------------------------------------------------------------------------------------ data
def load_data(source: str, family: str, *, seed: int = 0, synthetic: dict | None = None):
    """The data a model family trains on, from ``source`` ("synthetic" or a path; see the module doc)."""
    if source == "synthetic":
        from .data.synthetic import make_synthetic

        world = make_synthetic(seed=seed, **(synthetic or {}))
        return {"ctr": world.ctr, "sequential": world.sequences, "graph": world.implicit}[family]()
    from .data import loaders

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r} does not exist (use 'synthetic' or a path)")
    if path.is_dir():
        if (path / "train.txt").exists() and (path / "test.txt").exists():
            kind, load = "graph", lambda: loaders.load_lightgcn(path)
        elif any(path.glob("*.libfm")):
            kind, load = "ctr", lambda: loaders.load_frappe(path, seed=seed)
        else:
            raise ValueError(f"{path}: a data directory must hold train.txt + test.txt (LightGCN split) "
                             "or frappe's *.libfm files")
    elif path.name in ("u.data", "ratings.dat") or path.suffix in (".data", ".dat"):
        kind, load = "graph", lambda: loaders.split_leave_last_out(loaders.load_movielens(path))
    else:
        kind, load = "sequential", lambda: loaders.load_sasrec(path)
    if kind != family:
        raise ValueError(f"{path} holds {kind} data, but the model needs {family} data")
    return load()


# ------------------------------------------------------------------------------------------ train / evaluate / export
@dataclass
class Result:
    name: str
    model: object
    history: object | None
    metrics: dict
    train_seconds: float
    extra: dict = field(default_factory=dict)


def train(name: str, data, config: TrainConfig, log: Callable[[str], None] = print) -> Result:
    """Train model ``name`` on ``data`` and evaluate it on the test split."""
    fam = family_of(name)
    t0 = time.perf_counter()
    if fam == "ctr":
        from .models.ctr import train_ctr

        model, hist = train_ctr(name, data, config, log=log)
    elif fam == "sequential":
        from .models.sasrec import train_sasrec

        model, hist = train_sasrec(data, config, log=log)
    elif name == "popularity":
        model, hist = data.train.item_counts(), None
    else:
        from .models.graph import train_graph

        model, hist = train_graph(name, data, config, log=log)
    seconds = time.perf_counter() - t0
    return Result(name, model, hist, evaluate_model(name, model, data), seconds)


def evaluate_model(name: str, model, data, *, ks=(10, 20), seed: int = 0) -> dict:
    """Test metrics of a trained model: AUC/logloss (CTR), sampled HR/NDCG@10 (SASRec), all-item
    recall/NDCG@K over items not in train (graph / CF)."""
    from . import evaluate as ev

    fam = family_of(name)
    if fam == "ctr":
        from .models.ctr import predict_ctr

        return ev.evaluate_ctr(data.test.labels, predict_ctr(model, data.test))
    if fam == "sequential":
        from .models.sasrec import EVAL_USERS, score

        hist = [s if v < 0 else s.tolist() + [int(v)] for s, v in zip(data.train, data.valid)]
        return ev.evaluate_sampled(lambda users, cands: score(model, [hist[u] for u in users], cands), data,
                                   split="test", seed=seed, ks=(10,), batch_size=EVAL_USERS)
    train_lists, test_lists = data.train.by_user(), data.test.by_user()
    if name == "popularity":
        users, items = ev.popularity_vectors(model, data.train.n_users)
    else:
        from .models.graph import final_embeddings

        users, items = final_embeddings(model)
    return ev.evaluate_retrieval(users, items, train_lists, test_lists, ks=ks, item_counts=data.train.item_counts())


def export(result: Result, data, out: str | Path, *, table_dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write ``result``'s model as a bundle at ``out`` (its test metrics go into the manifest)."""
    fam = family_of(result.name)
    metrics = {**result.metrics, "train_seconds": result.train_seconds}
    if fam == "ctr":
        from .export_ctr import export_ctr

        return export_ctr(result.model, out, table_dtype=table_dtype, metrics=metrics, overwrite=overwrite,
                          entity_features=getattr(data, "extra", {}).get("entity_features"))
    if fam == "sequential":
        from .export_sasrec import export_sasrec

        histories = [np.concatenate([t, [v] if v >= 0 else [], [x] if x >= 0 else []]).astype(np.int64)
                     for t, v, x in zip(data.train, data.valid, data.test)]
        return export_sasrec(result.model, out, histories=histories, table_dtype=table_dtype, metrics=metrics,
                             overwrite=overwrite)
    from .export_graph import export_graph, export_popularity

    if result.name == "popularity":
        return export_popularity(result.model, data.train, out, metrics=metrics, overwrite=overwrite)
    return export_graph(result.model, data.train, out, table_dtype=table_dtype, metrics=metrics, overwrite=overwrite)


def write_metrics(path: str | Path, result: Result, **info) -> None:
    """The metrics JSON of a run: test metrics, wall time, per-epoch history and the run's settings."""
    hist = result.history
    doc = {"model": result.name, "metrics": result.metrics, "train_seconds": result.train_seconds,
           "history": getattr(hist, "epochs", []), "best_epoch": getattr(hist, "best_epoch", None), **info}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=str))


def evaluate_bundle(bundle, data, *, ks=(10, 20), seed: int = 0) -> dict:
    """Test metrics of an exported bundle (:class:`rec_engine.bundle.Bundle`), computed with the serving
    code's own readers (core lookups, ONNX Runtime), on ``data`` of the bundle's family."""
    from rec_engine.bundle import BundleError

    from . import evaluate as ev

    kind = bundle.kind
    fam = family_of(kind)
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
    if kind == "popularity":
        users, items = ev.popularity_vectors(bundle.array("item_counts"), data.train.n_users)
    else:
        if "users" not in bundle.table_names or "items" not in bundle.table_names:
            raise BundleError(f"bundle {bundle.path} of kind {kind!r} has no users/items tables")
        users, items = bundle.table("users").to_numpy(), bundle.table("items").to_numpy()
    return ev.evaluate_retrieval(users, items, data.train.by_user(), data.test.by_user(), ks=ks, item_counts=counts)
