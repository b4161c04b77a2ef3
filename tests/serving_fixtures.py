"""Small trained models and their bundles, shared by the engine and HTTP tests (built once per session).

Imported by tests/conftest.py as a plugin, so that tests that do not use these fixtures need neither
torch nor the training package."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass
class Trained:
    graph_data: object       # ImplicitSplit
    ctr_data: object         # CtrData
    lightgcn: object         # pipeline.Result
    lightgcn_b: object       # another LightGCN (other seed): a second version for swaps
    deepfm: object
    root: Path

    def bundle(self, name: str) -> Path:
        return self.root / name


@contextmanager
def torch_one_thread(torch):
    """Small models train on one torch thread (deterministic and quick on a shared machine); the count is
    restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    torch = pytest.importorskip("torch", reason="serving tests train small models with torch (test extra)")
    from rec_engine.bundle import write_pipeline
    from rec_engine_train import pipeline
    from rec_engine_train.loop import TrainConfig

    with torch_one_thread(torch):
        root = tmp_path_factory.mktemp("bundles")
        quiet = dict(log=lambda _msg: None)
        graph = pipeline.load_data("synthetic", "graph", synthetic={"n_users": 400, "n_items": 300})
        ctr = pipeline.load_data("synthetic", "ctr", synthetic={"n_users": 400, "n_items": 300})
        cfg = dict(dim=16, batch_size=4096, progress=False)
        lg = pipeline.train("lightgcn", graph, TrainConfig(epochs=6, lr=0.05, seed=0, **cfg), **quiet)
        lg_b = pipeline.train("lightgcn", graph, TrainConfig(epochs=3, lr=0.05, seed=1, **cfg), **quiet)
        dfm = pipeline.train("deepfm", ctr, TrainConfig(epochs=3, lr=1e-2, batch_size=256, dim=8, progress=False,
                                                        params={"mlp": [32, 16]}), **quiet)
        for name, res, data in (("lightgcn", lg, graph), ("lightgcn_b", lg_b, graph), ("deepfm", dfm, ctr)):
            pipeline.export(res, data, root / name)
        write_pipeline(root / "pipe_a", retrieval=root / "lightgcn", ranking=root / "deepfm", n_candidates=50)
        write_pipeline(root / "pipe_b", retrieval=root / "lightgcn_b", ranking=root / "deepfm", n_candidates=50)
        return Trained(graph, ctr, lg, lg_b, dfm, root)


def torch_two_stage(trained: Trained, user: int, k: int, n_candidates: int, context: dict,
                    seen_extra=()) -> tuple[np.ndarray, np.ndarray]:
    """The slow reference: the PyTorch models and full sorts, no rec_engine kernel involved."""
    import torch
    from rec_engine_train.models.graph import final_embeddings

    U, I = final_embeddings(trained.lightgcn.model)
    scores = (U[user].astype(np.float64) @ I.T.astype(np.float64))
    seen = np.concatenate([trained.graph_data.train.by_user()[user], np.asarray(seen_extra, np.int64)])
    scores[seen] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -scores))
    cands = order[:n_candidates]
    cands = cands[np.isfinite(scores[cands])]
    model = trained.deepfm.model
    feats = trained.ctr_data.extra["entity_features"]
    cols = {}
    for name in model.schema.names:
        if name in feats["user"]:
            v = feats["user"][name]
            cols[name] = [v[user]] * len(cands)
        elif name in feats["item"]:
            v = feats["item"][name]
            cols[name] = [v[i] for i in cands]
        else:
            cols[name] = [context.get(name)] * len(cands)
    enc = model.schema.encode(cols)
    with torch.no_grad():
        logit = model(torch.from_numpy(enc.indices), torch.from_numpy(enc.offsets),
                      torch.from_numpy(enc.weights)).numpy().astype(np.float64)
    probs = 1 / (1 + np.exp(-logit))
    top = np.lexsort((cands, -probs))[:k]
    return cands[top], probs[top]


@pytest.fixture(scope="session")
def trained_sasrec(tmp_path_factory):
    """A small SASRec, its data and its bundle."""
    torch = pytest.importorskip("torch", reason="serving tests train small models with torch (test extra)")
    from rec_engine_train import pipeline
    from rec_engine_train.loop import TrainConfig

    with torch_one_thread(torch):
        seq = pipeline.load_data("synthetic", "sequential", synthetic={"n_users": 300, "n_items": 200})
        res = pipeline.train("sasrec", seq, TrainConfig(epochs=2, lr=3e-3, batch_size=128, dim=16, progress=False,
                                                        params={"max_len": 20, "dropout": 0.0}),
                             log=lambda _msg: None)
        path = pipeline.export(res, seq, tmp_path_factory.mktemp("sasrec") / "sasrec")
        return res, seq, path
