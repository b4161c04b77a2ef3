"""Every model kind of the registry (rec_engine.kinds) trains from the command line and `rec-engine evaluate`
repeats its test metrics from the bundle; pipelines evaluate stage by stage; the registry is what training,
export and the CLI read."""
from __future__ import annotations

import json

import pytest

from rec_engine import kinds
from rec_engine.bundle import open_bundle, write_pipeline
from rec_engine.cli import main

# small, fast settings per kind (one epoch is given to all); a kind not listed trains with its defaults
FAST = {
    "lr": ["--batch-size", "2048"],
    "fm": ["--batch-size", "2048", "--dim", "4"],
    "widedeep": ["--batch-size", "2048", "--dim", "4", "--param", "mlp=[8]"],
    "deepfm": ["--batch-size", "2048", "--dim", "4", "--param", "mlp=[8]"],
    "xdeepfm": ["--batch-size", "2048", "--dim", "4", "--param", "mlp=[8]", "--param", "cin=[4]"],
    "sasrec": ["--batch-size", "512", "--dim", "8", "--param", "max_len=10", "--param", "n_blocks=1"],
    "mf": ["--batch-size", "8192", "--dim", "8"],
    "lightgcn": ["--batch-size", "8192", "--dim", "8", "--param", "n_layers=1"],
    "ngcf": ["--batch-size", "8192", "--dim", "8", "--param", "n_layers=1"],
    "popularity": [],
    "gfcf": ["--param", "k_ideal=16"],
    "bspm": ["--param", "k_ideal=16", "--param", "sharpen=1.5"],
    "ease": ["--param", "l2=50"],
}


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _train(capsys, tmp_path, kind, name=None):
    out, mj = tmp_path / (name or kind), tmp_path / f"{name or kind}.json"
    rc, stdout, err = _run(capsys, "train", kind, "--out", out, "--epochs", 1, "--threads", 1, "--no-progress",
                           "--metrics-json", mj, *FAST.get(kind, []))
    assert rc == 0, stdout + err
    return out, json.loads(mj.read_text())


def _floats(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


@pytest.mark.parametrize("kind", list(kinds.names()))
def test_every_kind_trains_and_its_bundle_evaluates_to_the_reported_metrics(tmp_path, capsys, kind):
    spec = kinds.get_kind(kind)
    out, doc = _train(capsys, tmp_path, kind)
    assert doc["model"] == kind and doc["train_seconds"] >= 0
    b = open_bundle(out)
    assert b.kind == kind
    reported = _floats(doc["metrics"])
    headline = {"ctr": "auc", "sequential": "hr@10", "graph": "recall@20"}[spec.data]
    assert headline in reported and 0 <= reported[headline] <= 1
    assert b.meta["metrics"][headline] == pytest.approx(reported[headline])
    if not spec.epochs:
        assert doc["history"] == [] and doc["best_epoch"] is None
    if spec.stage == "retrieval":                           # the engine serves it, by the class of its family
        from rec_engine.retrieval import load_retrieval

        assert load_retrieval(b).kind == kind
    else:
        from rec_engine.ranking import load_ranking

        assert load_ranking(b).schema is not None
    ej = tmp_path / "eval.json"
    rc, stdout, err = _run(capsys, "evaluate", out, "--metrics-json", ej)
    assert rc == 0 and stdout.startswith(f"{kind} "), stdout + err
    again = _floats(json.loads(ej.read_text())["metrics"])
    assert again.keys() == reported.keys()
    for key, value in reported.items():
        assert again[key] == pytest.approx(value, abs=1e-5), key


def test_a_pipeline_evaluates_each_stage_on_data_of_its_family(tmp_path, capsys):
    from rec_engine_train.data.loaders import write_lightgcn
    from rec_engine_train.data.synthetic import make_synthetic

    ret, ret_doc = _train(capsys, tmp_path, "popularity")
    rank, rank_doc = _train(capsys, tmp_path, "lr")
    pipe = write_pipeline(tmp_path / "pipe", retrieval=ret, ranking=rank, n_candidates=50)
    ej = tmp_path / "e.json"
    rc, stdout, err = _run(capsys, "evaluate", pipe, "--metrics-json", ej)
    assert rc == 0, err
    assert "retrieval (popularity)" in stdout and "ranking (lr)" in stdout
    doc = json.loads(ej.read_text())
    assert doc["kinds"] == {"retrieval": "popularity", "ranking": "lr"}
    assert doc["stages"]["retrieval"]["recall@20"] == pytest.approx(ret_doc["metrics"]["recall@20"], abs=1e-6)
    assert doc["stages"]["ranking"]["auc"] == pytest.approx(rank_doc["metrics"]["auc"], abs=1e-6)

    rc, stdout, _ = _run(capsys, "evaluate", pipe, "--stage", "ranking")
    assert rc == 0 and "ranking (lr)" in stdout and "retrieval" not in stdout

    d = tmp_path / "lgcn"                                 # a path holds one family: the ranking stage is skipped
    write_lightgcn(make_synthetic(n_users=50, n_items=40).implicit(), d)
    rc, _, err = _run(capsys, "evaluate", pipe, "--data", d, "--stage", "ranking")
    assert rc == 2 and "ranking stage (lr) needs ctr data" in err and "holds graph data" in err


def test_the_registry_is_what_training_export_and_the_cli_read(monkeypatch, capsys):
    from rec_engine_train import export_graph, pipeline
    from rec_engine_train.models import ctr, graph

    assert tuple(pipeline.MODEL_NAMES) == tuple(kinds.names()) == tuple(k.name for k in kinds.kinds())
    assert set(FAST) == set(kinds.names()), "a new kind needs fast test settings here"
    assert export_graph.GRAPH_KINDS == ("mf", "lightgcn", "ngcf", "popularity")
    assert graph.KINDS == ("mf", "lightgcn", "ngcf") and ctr.KINDS == kinds.names(stage="ranking")
    assert {pipeline.family_of(k.name) for k in kinds.kinds()} == {"ctr", "sequential", "graph"}
    assert kinds.names(stage="ranking", family="ctr") == ("lr", "fm", "widedeep", "deepfm", "xdeepfm")
    assert set(kinds.names(stage="retrieval")) == {"sasrec", "mf", "lightgcn", "ngcf", "popularity", "gfcf", "bspm",
                                                   "ease"}

    toy = kinds.Kind("toy", "graph", "retrieval", "graph", False, False, "a kind added in a test")
    monkeypatch.setitem(kinds._REGISTRY, "toy", toy)
    assert "toy" in pipeline.MODEL_NAMES and pipeline.FAMILIES["toy"] == "graph"
    assert pipeline.family_of("toy") == "graph" and "toy" in export_graph.GRAPH_KINDS
    assert "toy" not in graph.KINDS                        # it does not train by epochs
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "toy" in capsys.readouterr().out


def test_registry_lookups_and_registration_check_their_arguments():
    with pytest.raises(ValueError, match="unknown model 'transformer'; known models: lr, fm"):
        kinds.get_kind("transformer")
    with pytest.raises(ValueError, match="already registered"):
        kinds.register(kinds.get_kind("ease"))
    with pytest.raises(ValueError, match="stage must be one of"):
        kinds.Kind("x", "graph", "serving", "graph", False, False, "")
    with pytest.raises(ValueError, match="data must be one of"):
        kinds.Kind("x", "graph", "retrieval", "images", False, False, "")
    with pytest.raises(ValueError, match="stage must be one of"):
        kinds.kinds(stage="both")
    assert kinds.get_kind("bspm").family == kinds.get_kind("gfcf").family == "filter"
    assert not any(k.epochs for k in kinds.kinds(family="filter")) and not kinds.get_kind("ease").epochs


def test_closed_form_kinds_refuse_unknown_params(tmp_path, capsys):
    rc, _, err = _run(capsys, "train", "gfcf", "--out", tmp_path / "b", "--param", "sharpen=2")
    assert rc == 2 and "gfcf takes the params alpha, k_ideal" in err and "unknown sharpen" in err
    rc, _, err = _run(capsys, "train", "ease", "--out", tmp_path / "b", "--param", "l2=-1")
    assert rc == 2 and "l2 must be a finite number > 0" in err
