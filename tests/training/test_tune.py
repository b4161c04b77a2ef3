"""--tune: the validation split (cut from train only, time-ordered), the search's N and time budget, the refit
of the best setting, and the search recorded in the bundle."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from rec_engine_train import defaults, pipeline, tune
from rec_engine_train.data.containers import ImplicitSplit, Interactions
from rec_engine_train.data.synthetic import make_synthetic
from rec_engine_train.loop import TrainConfig

QUIET = dict(log=lambda _s: None)


def _events(inter: Interactions) -> list[tuple]:
    ts = inter.timestamps if inter.timestamps is not None else np.full(len(inter), -1)
    return sorted(zip(inter.users.tolist(), inter.items.tolist(), np.asarray(ts).tolist()))


def _split_with_ties(seed=0, timestamps=True) -> ImplicitSplit:
    """Random events with tied timestamps and repeated (user, item) pairs; the test part shares users."""
    rng = np.random.default_rng(seed)
    n_users, n_items, n = 40, 30, 900
    users = rng.integers(0, n_users, n)
    items = rng.integers(0, n_items, n)
    ts = rng.integers(0, 50, n) if timestamps else None
    train = Interactions(users, items, n_users, n_items, timestamps=ts)
    test = Interactions(rng.integers(0, n_users, 200), rng.integers(0, n_items, 200), n_users, n_items,
                        timestamps=rng.integers(50, 60, 200) if timestamps else None)
    return ImplicitSplit(train=train, test=test, name="ties")


def _brute_force(train: Interactions, fraction: float):
    """The held-out events, recomputed user by user: latest by (timestamp, file position)."""
    kept, held = [], []
    for u in range(train.n_users):
        rows = [i for i in range(len(train)) if train.users[i] == u]
        rows.sort(key=lambda i: (int(train.timestamps[i]), i))
        n = len(rows)
        h = min(n - 1, max(1 if n >= 3 else 0, int(np.round(fraction * n)))) if n else 0
        kept += rows[:n - h]
        held += rows[n - h:]
    kept_pairs = {(int(train.users[i]), int(train.items[i])) for i in kept}
    held = [i for i in held if (int(train.users[i]), int(train.items[i])) not in kept_pairs]
    ev = lambda rows: sorted((int(train.users[i]), int(train.items[i]), int(train.timestamps[i])) for i in rows)
    return ev(kept), ev(held)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_validation_split_holds_out_each_users_latest_train_events(fraction):
    split = _split_with_ties()
    v = tune.validation_split(split, fraction)
    kept, held = _brute_force(split.train, fraction)
    assert _events(v.train) == kept and _events(v.valid) == held
    assert v.test is v.valid and (v.train.n_users, v.train.n_items) == (split.train.n_users, split.train.n_items)
    # nothing of the test split: every event comes from train (as a multiset), none of test's timestamps
    assert Counter(_events(v.train) + _events(v.valid)) <= Counter(_events(split.train))
    assert v.train.timestamps.max() < 50 and v.valid.timestamps.max() < 50
    # time order: per user, every held-out event is no earlier than every kept one
    for u in range(split.train.n_users):
        k, h = v.train.timestamps[v.train.users == u], v.valid.timestamps[v.valid.users == u]
        if k.size and h.size:
            assert h.min() >= k.max()


def test_validation_split_without_timestamps_is_a_seeded_random_partition_of_train():
    split = _split_with_ties(timestamps=False)
    a, b, c = (tune.validation_split(split, 0.2, seed=s) for s in (0, 0, 1))
    assert _events(a.train) == _events(b.train) and _events(a.valid) == _events(b.valid)
    assert _events(a.valid) != _events(c.valid)
    pairs = {(u, i) for u, i, _ in _events(split.train)}
    assert {(u, i) for u, i, _ in _events(a.train) + _events(a.valid)} <= pairs
    assert not {(u, i) for u, i, _ in _events(a.valid)} & {(u, i) for u, i, _ in _events(a.train)}
    assert 0.1 * len(split.train) < len(a.valid) < 0.3 * len(split.train)


@pytest.fixture(scope="module")
def graph():
    return make_synthetic(n_users=150, n_items=80, seed=1).implicit()


def _base(kind, data, **over):
    over = {"epochs": 6, "eval_every": 2, "patience": 2, **over}
    return defaults.resolve_config(kind, data, over, None, progress=False, num_threads=1)


def test_the_search_runs_n_settings_the_first_the_base_and_refits_the_best(graph):
    base = _base("mf", graph)
    tr = tune.tune("mf", graph, base, 4, fixed={"dim"}, **QUIET)
    assert [t.index for t in tr.trials] == [1, 2, 3, 4] and all(t.status == "ok" for t in tr.trials)
    first = tr.trials[0].setting
    assert first == {"lr": base.lr, "reg": base.params["reg"], "dns_candidates": base.params["dns_candidates"]}
    assert len({json.dumps(t.setting, sort_keys=True) for t in tr.trials}) == 4
    assert tr.record["fixed"] == ["dim"]                     # given explicitly: not searched, not in the settings
    best = max(tr.trials, key=lambda t: t.metric)
    assert tr.best is best and tr.record["best"] == best.index and tr.record["chosen"] == best.setting
    # the refit used the best setting, on all of train, early-stopped on the data's own valid split
    model = tr.result.model
    assert model.params["reg"] == best.setting["reg"] and model.user_emb.shape[1] == base.dim
    assert tr.record["config"]["lr"] == best.setting["lr"] and tr.record["config"]["dim"] == base.dim
    assert tr.result.metrics == pipeline.evaluate_model("mf", model, graph)   # test metrics of the refit model
    assert tr.result.extra["tune"] is tr.record and "valid split" in tr.record["refit"]
    # seeded: the same search again draws the same settings
    again = tune.sample_settings(defaults.search_space("mf"), 4, base.seed, {"dim"})
    assert [{k: s[k] for k in s} for s in again[1:]] == [{k: t.setting[k] for k in again[1]} for t in tr.trials[1:]]


def test_without_a_valid_split_the_refit_runs_the_best_trials_epochs_and_selects_nothing_on_test(graph):
    no_valid = ImplicitSplit(train=graph.train, test=graph.test, name="no-valid")
    tr = tune.tune("mf", no_valid, _base("mf", no_valid), 2, **QUIET)
    best = tr.best
    hist = tr.result.history
    assert len(hist.epochs) == best.best_epoch and hist.best_epoch == best.best_epoch   # validated once, at the end
    assert sum("recall@20" in row for row in hist.epochs) == 1
    assert tr.record["config"]["epochs"] == best.best_epoch and "selects nothing" in tr.record["refit"]


def test_the_time_budget_stops_starting_trials_and_shares_what_is_left(graph, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(tune, "_clock", lambda: clock[0])
    seen = []

    def fake_trial(name, data, config, log):
        seen.append(config.time_limit)
        clock[0] += 10.0
        assert len(data.train) < len(graph.train)          # trials see the cut-down train only
        return pipeline.Result(name, None, None, {}, 10.0), {"recall@20": config.lr, "ndcg@20": 0.0}

    monkeypatch.setattr(tune, "_fit_trial", fake_trial)
    tr = tune.tune("mf", graph, _base("mf", graph, epochs=2), 5, time_budget=25.0, **QUIET)
    assert [t.status for t in tr.trials] == ["ok", "ok", "ok", "skipped", "skipped"]
    assert tr.record["skipped"] == [4, 5] and len(tr.record["trials"]) == 5
    assert seen == pytest.approx([25 / 5, 15 / 4, 5 / 3])             # remaining budget / trials left
    best = max(tr.trials[:3], key=lambda t: t.metric)
    assert tr.best is best and tr.result.model is not None            # refitted for real with the best lr
    table = tune.format_table(tr)
    assert table.count("skipped (time budget spent)") == 2 and "ok (best)" in table


def test_gains_within_min_delta_of_the_best_are_ties_resolved_toward_the_defaults(graph, monkeypatch):
    values = iter([])

    def scripted(name, data, config, log):
        return pipeline.Result(name, None, None, {}, 0.0), {"recall@20": next(values)}

    monkeypatch.setattr(tune, "_fit_trial", scripted)
    for min_delta, curve, chosen in [(1e-3, [0.5000, 0.5004, 0.49], 1), (0.0, [0.5000, 0.5004, 0.49], 2),
                                     (1e-3, [0.5000, 0.5100, 0.5102], 2)]:
        values = iter(curve)
        tr = tune.tune("mf", graph, _base("mf", graph, epochs=2, min_delta=min_delta), 3, **QUIET)
        assert tr.best.index == chosen, (min_delta, curve)


def test_a_failing_setting_is_recorded_and_the_search_goes_on(graph, monkeypatch):
    calls = []

    def flaky(name, data, config, log):
        calls.append(config.lr)
        if len(calls) == 2:
            raise FloatingPointError("epoch 1: the training loss is nan; lower the learning rate")
        return pipeline.Result(name, None, None, {}, 0.0), {"recall@20": 0.1 * len(calls)}

    monkeypatch.setattr(tune, "_fit_trial", flaky)
    tr = tune.tune("mf", graph, _base("mf", graph, epochs=2), 3, **QUIET)
    assert [t.status for t in tr.trials] == ["ok", "failed", "ok"] and "nan" in tr.trials[1].error
    assert tr.best.index == 3 and "failed: FloatingPointError" in tune.format_table(tr)

    monkeypatch.setattr(tune, "_fit_trial", lambda *a: (_ for _ in ()).throw(ValueError("bad setting")))
    with pytest.raises(RuntimeError, match="no setting trained successfully"):
        tune.tune("mf", graph, _base("mf", graph, epochs=2), 2, **QUIET)


def test_ctr_trials_use_the_valid_batch_and_the_best_trials_model_is_kept():
    data = make_synthetic(n_users=150, n_items=80, seed=1).ctr(n_examples=4000)
    base = defaults.resolve_config("fm", data, {"epochs": 2, "batch_size": 256}, None, progress=False, num_threads=1)
    tr = tune.tune("fm", data, base, 3, **QUIET)
    best = tr.best
    assert best.metric == max(t.metric for t in tr.trials)
    assert best.metric == pytest.approx(tr.result.history.best["auc"])       # validation AUC, not test
    assert tr.result.model.dim == best.setting["dim"] and "kept the best trial" in tr.record["refit"]
    assert "auc" in tr.result.metrics and tr.result.metrics == pipeline.evaluate_model("fm", tr.result.model, data)


def test_cli_prints_the_table_and_records_the_search_in_the_bundle(tmp_path, capsys):
    from rec_engine.bundle import open_bundle
    from rec_engine.cli import main
    from rec_engine_train.data.loaders import write_lightgcn

    d = tmp_path / "lgcn"
    write_lightgcn(make_synthetic(n_users=120, n_items=60, seed=2).implicit(), d)
    out, mj = tmp_path / "b", tmp_path / "m.json"
    rc = main(["train", "mf", "--data", str(d), "--out", str(out), "--epochs", "4", "--eval-every", "2",
               "--tune", "3", "--time-budget", "600", "--no-progress", "--threads", "1", "--metrics-json", str(mj),
               "--param", "dns_candidates=1"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "| trial | lr | reg | dim | recall@20 | ndcg@20 |" in stdout and "ok (best)" in stdout
    record = open_bundle(out).meta["metrics"]["tune"]
    assert [t["index"] for t in record["trials"]] == [1, 2, 3] and record["fixed"] == ["dns_candidates"]
    assert record["n"] == 3 and record["time_budget"] == 600 and record["monitor"] == "recall@20"
    assert all(t["setting"].keys() == {"lr", "reg", "dim"} and t["seconds"] > 0 for t in record["trials"])
    assert "random 20%" in record["validation"]                 # a LightGCN split has no timestamps
    doc = json.loads(mj.read_text())
    assert doc["tune"]["chosen"] == record["chosen"] and doc["config"]["lr"] == record["chosen"]["lr"]
    assert "recall@20" in doc["metrics"] and "tune" not in doc["metrics"]


def test_settings_resolve_explicit_then_the_models_defaults_then_trainconfigs(graph):
    cfg = defaults.resolve_config("lightgcn", graph, {"lr": 0.02, "epochs": None}, {"reg": 1e-4}, seed=3)
    assert cfg.lr == 0.02 and cfg.params["reg"] == 1e-4                          # explicit
    assert cfg.epochs == 400 and cfg.dim == 64 and cfg.params["dns_candidates"] == 8   # the model's defaults
    assert cfg.weight_decay == TrainConfig.weight_decay and cfg.min_delta == TrainConfig.min_delta  # TrainConfig's
    assert cfg.seed == 3 and cfg.warmup_epochs == 40
    ctr = defaults.resolve_config("deepfm", None)
    assert ctr.params["mlp"] == [400, 400, 400] and ctr.dim == 10
    # k_ideal is capped by the data (a quarter of its smaller side), unless given explicitly
    assert defaults.resolve_params("gfcf", graph)["k_ideal"] == 80 // 4
    assert defaults.resolve_params("gfcf", graph, {"k_ideal": 40})["k_ideal"] == 40
    assert set(defaults.search_space("bspm", graph)["k_ideal"].values) == {20}
    for kind in pipeline.MODEL_NAMES:              # every kind has a description, and its defaults build a config
        assert defaults.describe(kind).startswith(f"defaults of {kind}:")
        if pipeline.family_of(kind) == "graph":
            defaults.resolve_config(kind, graph)


def test_train_help_after_the_model_lists_its_defaults(capsys):
    from rec_engine.cli import main

    with pytest.raises(SystemExit):
        main(["train", "lightgcn", "--help"])
    out = capsys.readouterr().out
    assert "defaults of lightgcn:" in out and "dns_candidates=8" in out and "--tune searches: lr" in out
    assert "defaults of mf:" not in out and "--time-budget" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "defaults of mf:" in out and "defaults of sasrec:" in out
