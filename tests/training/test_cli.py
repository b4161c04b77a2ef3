"""rec-engine train / evaluate: bundles and metrics from the command line, and clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rec_engine.bundle import open_bundle
from rec_engine.cli import main


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("model, metric, extra", [
    ("lightgcn", "recall@20", ["--lr", "0.05", "--batch-size", "4096"]),
    ("deepfm", "auc", ["--lr", "0.01", "--batch-size", "512", "--param", "mlp=[32,16]"]),
    ("popularity", "recall@20", []),
    ("sasrec", "hr@10", ["--lr", "0.005", "--batch-size", "256", "--param", "max_len=20"]),
])
def test_train_writes_a_bundle_whose_evaluation_repeats_the_test_metrics(tmp_path, capsys, model, metric, extra):
    out, mj, ej = tmp_path / "b", tmp_path / "m.json", tmp_path / "e.json"
    rc, stdout, _ = _run(capsys, "train", model, "--out", str(out), "--epochs", "2", "--no-progress",
                         "--metrics-json", str(mj), *extra)
    assert rc == 0, stdout
    doc = json.loads(mj.read_text())
    assert doc["model"] == model and metric in doc["metrics"] and doc["train_seconds"] >= 0
    b = open_bundle(out)
    assert b.kind == model and b.meta["metrics"][metric] == pytest.approx(doc["metrics"][metric])
    if model != "popularity":
        assert len(doc["history"]) >= 1 and doc["best_epoch"] >= 1
    rc, stdout, _ = _run(capsys, "evaluate", str(out), "--metrics-json", str(ej))
    assert rc == 0 and metric in stdout
    again = json.loads(ej.read_text())["metrics"]
    assert again[metric] == pytest.approx(doc["metrics"][metric], abs=1e-5)


def test_param_values_are_parsed_as_json(tmp_path, capsys):
    rc, _, _ = _run(capsys, "train", "deepfm", "--out", str(tmp_path / "b"), "--epochs", "1", "--no-progress",
                    "--param", "mlp=[8]", "--param", "dropout=0.1", "--dim", "4")
    assert rc == 0
    meta = open_bundle(tmp_path / "b").meta
    assert meta["params"]["mlp"] == [8] and meta["params"]["dropout"] == 0.1 and meta["dim"] == 4


@pytest.mark.parametrize("argv, message", [
    (["train", "transformer", "--out", "X"], "unknown model 'transformer'; known models: lr, fm"),
    (["train", "mf", "--out", "X", "--data", "/no/such/path"], "does not exist"),
    (["train", "mf", "--out", "X", "--epochs", "0"], "epochs must be >= 1"),
    (["evaluate", "/no/such/bundle"], "not a bundle directory"),
])
def test_user_errors_exit_2_with_a_message(tmp_path, capsys, argv, message):
    argv = [a.replace("X", str(tmp_path / "b")) for a in argv]
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and message in err
    assert "Traceback" not in err


def test_wrong_family_of_data_and_malformed_file_name_the_file_and_line(tmp_path, capsys):
    from rec_engine_train.data.loaders import write_lightgcn
    from rec_engine_train.data.synthetic import make_synthetic

    d = tmp_path / "lgcn"
    write_lightgcn(make_synthetic(n_users=50, n_items=40).implicit(), d)
    rc, _, err = _run(capsys, "train", "deepfm", "--out", str(tmp_path / "b"), "--data", str(d))
    assert rc == 2 and "holds graph data, but the model needs ctr data" in err
    lines = (d / "train.txt").read_bytes().splitlines()
    lines[3] = lines[3] + b" x\xff7"       # (a token that is not an integer is a string key; bad UTF-8 is an error)
    (d / "train.txt").write_bytes(b"\n".join(lines) + b"\n")
    rc, _, err = _run(capsys, "train", "mf", "--out", str(tmp_path / "b"), "--data", str(d), "--epochs", "1")
    assert rc == 2 and "train.txt:4" in err


def test_evaluating_a_bundle_on_data_with_another_schema_is_refused(tmp_path, capsys):
    out = tmp_path / "b"
    assert _run(capsys, "train", "lr", "--out", str(out), "--epochs", "1", "--no-progress")[0] == 0
    rc, _, err = _run(capsys, "evaluate", str(out), "--seed", "3")
    assert rc == 2 and "does not match" in err
    assert np.isfinite(open_bundle(out).meta["metrics"]["auc"])


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_ends_training_with_the_best_epoch_even_in_a_background_job(tmp_path, sig):
    """A job started in the background from a script begins with SIGINT ignored; SIGINT or SIGTERM (what
    `timeout` sends) must still stop training, keep the best epoch, and write the bundle and metrics."""
    import signal
    import subprocess
    import sys
    import time

    out, metrics = tmp_path / "b", tmp_path / "m.json"
    code = "import sys; from rec_engine.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "train", "mf", "--data", "synthetic", "--epochs", "100000", "--patience", "0",
         "--batch-size", "256", "--threads", "1", "--no-progress", "--out", str(out), "--metrics-json", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        lines, deadline = [], time.monotonic() + 240
        for line in proc.stdout:                       # wait for a few validated epochs
            lines.append(line)
            if line.startswith("epoch 3/"):
                break
            assert time.monotonic() < deadline, "".join(lines)
        proc.send_signal(getattr(signal, sig))
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 0, text
    assert "interrupted in epoch" in text and "keeping best epoch" in text
    data = json.loads(metrics.read_text())
    assert 1 <= data["best_epoch"] <= 100 and data["metrics"]["recall@20"] > 0
    assert open_bundle(out).kind == "mf"
