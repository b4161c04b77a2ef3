"""Ranking (CTR) models: hand-checked dense parts, ONNX/bundle parity against PyTorch, learning on
synthetic data with known click probabilities, and bad input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from rec_engine.bundle import open_bundle
from rec_engine.features import Schema
from rec_engine_train.data.synthetic import make_synthetic
from rec_engine_train.export_ctr import export_ctr, load_ctr_scorer
from rec_engine_train.loop import TrainConfig
from rec_engine_train.metrics import auc
from rec_engine_train.models.ctr import KINDS, CtrDense, CtrModel, fm_interaction, predict_ctr, train_ctr

SMALL = {"mlp": (32, 16), "cin": (8, 8)}


# ---------------------------------------------------------------------------------------------- fixtures
def _columns(rng: np.random.Generator, n: int) -> dict:
    """Mixed columns: a categorical with missing values, a multi-valued one with empty and missing lists,
    a numeric one with missing values, and a categorical of strings."""
    user = rng.integers(0, 40, n).astype(object)
    user[rng.random(n) < 0.1] = None
    tags = [list(rng.integers(0, 12, rng.integers(0, 4))) for _ in range(n)]
    for i in np.flatnonzero(rng.random(n) < 0.05):
        tags[i] = None
    price = rng.lognormal(2.0, 0.5, n)
    price[rng.random(n) < 0.15] = np.nan
    device = rng.choice(np.array(["ios", "android", "web", ""], object), n)
    return {"user": user, "tags": tags, "price": price, "device": device}


@pytest.fixture(scope="module")
def mixed():
    """A schema fitted on 300 examples and 1,000 other examples encoded with it (unseen values included)."""
    rng = np.random.default_rng(7)
    kinds = {"tags": "multi", "price": "numeric"}
    schema = Schema.fit(_columns(rng, 300), kinds, hash_buckets=3, min_count=2)
    cols = _columns(rng, 1000)
    cols["user"][:20] = np.arange(1000, 1020)          # never seen in fitting: hashed buckets
    batch = schema.encode(cols)
    lengths = np.diff(batch.offsets)
    assert (lengths == 0).any() and (lengths > 1).any() and (batch.weights != 1).any()   # the cases are there
    return schema, batch


def _random_model(kind: str, schema: Schema, seed: int = 0) -> CtrModel:
    """A model with weights large enough that every part moves the logit."""
    torch.manual_seed(seed)
    model = CtrModel(kind, schema, dim=6, params={**SMALL, "init_std": 0.3}).eval()
    with torch.no_grad():
        model.linear.normal_(0.0, 0.3)
        model.dense.bias.fill_(-0.25)
    return model


def _torch_logits(model: CtrModel, batch) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(batch.indices), torch.from_numpy(batch.offsets),
                     torch.from_numpy(batch.weights)).numpy()


# ---------------------------------------------------------------------------------------------- dense parts
def test_lr_dense_is_bias_plus_sum_of_linear_terms_and_ignores_embeddings():
    dense = CtrDense("lr", n_fields=3, dim=2)
    with torch.no_grad():
        dense.bias.fill_(0.7)
    lin = torch.tensor([[0.1, -0.2, 0.3], [1.0, 2.0, -4.0]])
    emb = torch.randn(2, 3, 2)
    expected = [0.7 + 0.1 - 0.2 + 0.3, 0.7 + 1.0 + 2.0 - 4.0]
    np.testing.assert_allclose(dense(emb, lin).detach().numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(dense(10 * emb, lin).detach().numpy(), expected, rtol=1e-6)


def test_fm_term_equals_explicit_sum_over_field_pairs():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 4, 5)).astype(np.float32)
    lin = rng.normal(size=(3, 4)).astype(np.float32)
    pairs = np.zeros(3)
    for b in range(3):
        for f in range(4):
            for g in range(f + 1, 4):
                pairs[b] += sum(float(emb[b, f, k]) * float(emb[b, g, k]) for k in range(5))
    got = fm_interaction(torch.from_numpy(emb)).numpy()
    np.testing.assert_allclose(got, pairs, rtol=1e-5, atol=1e-5)
    dense = CtrDense("fm", n_fields=4, dim=5)
    with torch.no_grad():
        dense.bias.fill_(-0.3)
    full = dense(torch.from_numpy(emb), torch.from_numpy(lin)).detach().numpy()
    np.testing.assert_allclose(full, -0.3 + lin.sum(axis=1) + pairs, rtol=1e-5, atol=1e-5)


def test_model_pools_fields_like_a_weighted_sum_of_rows():
    schema = Schema.fit({"a": [0, 1, 2], "m": [[0, 1], [1], []], "x": [1.0, 2.0, 3.0]},
                        {"m": "multi", "x": "numeric"})
    batch = schema.encode({"a": [2, 0], "m": [[0, 1], []], "x": [3.0, np.nan]})
    model = CtrModel("lr", schema, dim=3)
    emb, lin = model.pool(torch.from_numpy(batch.indices), torch.from_numpy(batch.offsets),
                          torch.from_numpy(batch.weights))
    table = model.embedding.detach().numpy()
    expected = np.zeros((2, 3, 3), np.float32)
    for bag in range(6):
        for p in range(batch.offsets[bag], batch.offsets[bag + 1]):
            expected[bag // 3, bag % 3] += batch.weights[p] * table[batch.indices[p]]
    np.testing.assert_allclose(emb.detach().numpy(), expected, rtol=1e-6, atol=1e-7)
    assert lin.shape == (2, 3)
    assert np.all(expected[1, 1:] == 0)      # missing multi and numeric values: empty bags


# ---------------------------------------------------------------------------------------------- export parity
@pytest.mark.parametrize("kind", KINDS)
def test_exported_bundle_scores_like_pytorch_and_quantized_tables_stay_within_their_error_bound(kind, mixed,
                                                                                                   tmp_path):
    schema, batch = mixed
    model = _random_model(kind, schema)
    ref = _torch_logits(model, batch)
    assert ref.std() > 0.1

    path = export_ctr(model, tmp_path / "f32", metrics={"auc": 0.5})
    bundle = open_bundle(path)
    assert bundle.kind == kind
    assert Schema.from_dict(bundle.meta["schema"]) == schema
    assert (bundle.meta["dim"], bundle.meta["n_fields"], bundle.meta["inputs"], bundle.meta["output"]) == \
        (6, schema.n_fields, ["emb", "lin"], "logit")
    proto = onnx.load(str(bundle.onnx_path("dense")))
    assert [i.name for i in proto.graph.input] == ["emb", "lin"]
    assert [o.name for o in proto.graph.output] == ["logit"]
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 18
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value          # a symbolic, dynamic batch axis

    scorer = load_ctr_scorer(path)
    emb, lin = scorer.pool(batch)                                    # the core's lookup ...
    with torch.no_grad():
        t_emb, t_lin = model.pool(torch.from_numpy(batch.indices), torch.from_numpy(batch.offsets),
                                  torch.from_numpy(batch.weights))
    np.testing.assert_allclose(emb, t_emb.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(lin, t_lin.numpy(), rtol=0, atol=1e-6)
    got = scorer.logits(batch)                                       # ... then onnxruntime
    assert got.shape == (1000,)
    assert np.abs(got - ref).max() <= 1e-4
    one = scorer.logits(batch.take([17]))
    assert one.shape == (1,) and abs(one[0] - ref[17]) <= 1e-4
    np.testing.assert_allclose(scorer(batch), 1 / (1 + np.exp(-ref.astype(np.float64))), rtol=0, atol=1e-5)
    np.testing.assert_allclose(scorer(batch), predict_ctr(model, batch), rtol=0, atol=1e-5)

    # Quantized tables. First-order bound: |d logit| <= sum |dlogit/d emb| * |d emb| (+ the same for lin),
    # where a pooled value moves by at most sum_j |w_j| * (the largest error of row j's stored values):
    # float16 rounds to nearest, relative error <= 2^-11 (plus 2^-25 absolute below the normal range);
    # row-wise int8 is within scale/2 = (max - min) / 510 of each value. Second-order terms (FM products,
    # CIN products, ReLU kinks) are far smaller at these errors; 2x the bound plus 1e-4 leaves room for them
    # and for float32 rounding.
    t_emb.requires_grad_(True)
    t_lin.requires_grad_(True)
    grads = torch.autograd.grad(model.dense(t_emb, t_lin).sum(), [t_emb, t_lin], allow_unused=True,
                                materialize_grads=True)             # examples are independent: per-row grads
    g_emb, g_lin = (g.abs().numpy() for g in grads)
    w = {"embedding": model.embedding.detach().numpy(), "linear": model.linear.detach().numpy()}
    for dtype in ("float16", "int8"):
        qpath = export_ctr(model, tmp_path / dtype, table_dtype=dtype)
        qbundle = open_bundle(qpath)
        row_err = {}
        for name, table in w.items():
            stored = qbundle.table(name)
            assert stored.dtype == dtype
            actual = np.abs(stored.to_numpy() - table).max(axis=1)
            if dtype == "float16":
                bound = np.abs(table).max(axis=1) * 2.0**-11 + 2.0**-25
            else:
                bound = stored.scale_bias[:, 0] / 2
            assert np.all(actual <= bound * (1 + 1e-3) + 1e-7)
            if name == "embedding":
                assert actual.max() > 0                              # the table really was quantized
            row_err[name] = bound
        abs_w = np.abs(batch.weights)

        def pooled(err):
            per_bag = np.zeros(len(batch.offsets) - 1)
            np.add.at(per_bag, np.repeat(np.arange(len(per_bag)), np.diff(batch.offsets)), abs_w * err[batch.indices])
            return per_bag.reshape(len(batch), schema.n_fields)

        bound = (g_emb.sum(axis=2) * pooled(row_err["embedding"])).sum(axis=1) + \
            (g_lin * pooled(row_err["linear"])).sum(axis=1)
        diff = np.abs(load_ctr_scorer(qpath).logits(batch) - ref)
        assert np.all(diff <= 2 * bound + 1e-4), f"{dtype}: worst excess {np.max(diff - 2 * bound)}"
        assert np.median(bound) < 0.05                               # and the bound says something


@pytest.mark.parametrize("kind", ["widedeep", "deepfm", "xdeepfm"])
def test_batch_norm_exports_with_its_running_statistics(kind, mixed, tmp_path):
    """With ``batch_norm`` the MLP normalizes by statistics gathered in training: eval-mode PyTorch, the
    exported ONNX dense part and training-mode batches must not be confused."""
    schema, batch = mixed
    torch.manual_seed(3)
    model = CtrModel(kind, schema, dim=6, params={**SMALL, "init_std": 0.3, "batch_norm": True, "dropout": 0.2})
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bns, "batch_norm=True built no BatchNorm layer"
    model.train()
    with torch.no_grad():                    # move the running statistics far from mean 0 / variance 1
        for _ in range(30):
            model(torch.from_numpy(batch.indices), torch.from_numpy(batch.offsets), torch.from_numpy(batch.weights))
    model.eval()
    assert all(float(bn.running_var.sub(1).abs().max()) > 0.05 for bn in bns)
    ref = _torch_logits(model, batch)
    assert ref.std() > 0.05
    scorer = load_ctr_scorer(export_ctr(model, tmp_path / kind))
    assert np.abs(scorer.logits(batch) - ref).max() <= 1e-4
    one = scorer.logits(batch.take([5]))     # batch 1 must not normalize by its own statistics
    assert abs(one[0] - ref[5]) <= 1e-4
    assert model.training is False


def test_scorer_needs_neither_torch_nor_the_training_models(mixed, tmp_path):
    schema, batch = mixed
    model = _random_model("deepfm", schema)
    path = export_ctr(model, tmp_path / "b")
    np.savez(tmp_path / "batch.npz", indices=batch.indices, offsets=batch.offsets, weights=batch.weights,
             expected=_torch_logits(model, batch))
    code = f"""
import sys, numpy as np
from rec_engine.features import EncodedBatch
from rec_engine_train.export_ctr import load_ctr_scorer
d = np.load({str(tmp_path / "batch.npz")!r})
s = load_ctr_scorer({str(path)!r}, intra_op_threads=2)
got = s.logits(EncodedBatch(d["indices"], d["offsets"], d["weights"], {schema.n_fields}))
print(float(np.abs(got - d["expected"]).max()), "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    diff, torch_loaded = out.stdout.split()
    assert float(diff) <= 1e-4 and torch_loaded == "False"


# ---------------------------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def synthetic_ctr():
    return make_synthetic(n_users=100, n_items=50, seed=0).ctr(n_examples=40000)


def _train(kind: str, data, epochs: int = 12):
    config = TrainConfig(epochs=epochs, batch_size=256, lr=1e-2, dim=8, patience=2, progress=False,
                         params={"mlp": (64, 32), "cin": (16, 16), "emb_l2": 1e-5})
    return train_ctr(kind, data, config, log=lambda line: None)


@pytest.mark.parametrize("kind", ["deepfm", "xdeepfm", "widedeep"])
def test_deep_models_approach_the_auc_of_the_true_click_probabilities(kind, synthetic_ctr):
    data = synthetic_ctr
    model, history = _train(kind, data)
    assert history.best_epoch >= 1 and history.monitor == "auc"
    test_auc = auc(data.test.labels, predict_ctr(model, data.test))
    valid_auc = auc(data.valid.labels, predict_ctr(model, data.valid))
    assert valid_auc == pytest.approx(history.best["auc"], abs=1e-6)   # the best epoch's weights are kept
    for got, split in ((valid_auc, "valid"), (test_auc, "test")):
        oracle = auc(getattr(data, split).labels, data.extra[f"true_prob_{split}"])
        assert got >= 0.7
        assert got >= oracle - 0.03, f"{kind} {split}: AUC {got:.4f}, ground truth {oracle:.4f}"


def test_fm_captures_the_pairwise_signal_logistic_regression_cannot(synthetic_ctr):
    data = synthetic_ctr
    lr_model, _ = _train("lr", data, epochs=6)
    fm_model, _ = _train("fm", data)
    lr_auc = auc(data.test.labels, predict_ctr(lr_model, data.test))
    fm_auc = auc(data.test.labels, predict_ctr(fm_model, data.test))
    assert lr_auc >= 0.6
    assert fm_auc >= lr_auc - 0.01
    assert fm_auc >= auc(data.test.labels, data.extra["true_prob_test"]) - 0.03


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_kind_is_rejected_with_the_known_kinds(mixed):
    schema, _ = mixed
    for make in (lambda: CtrModel("gbdt", schema), lambda: CtrDense("gbdt", 2, 2),
                 lambda: train_ctr("gbdt", None, TrainConfig(progress=False))):
        with pytest.raises(ValueError, match="gbdt.*deepfm"):
            make()


def test_data_of_another_schema_is_rejected(mixed, synthetic_ctr, tmp_path):
    schema, batch = mixed
    model = _random_model("fm", schema)
    other = synthetic_ctr
    with pytest.raises(ValueError, match="schema"):
        train_ctr("fm", other, TrainConfig(epochs=1, progress=False), model=model)
    with pytest.raises(ValueError, match="fields"):
        predict_ctr(model, other.test)
    # same number of fields, rows beyond the table: encoded with another schema
    shifted = batch.take(np.arange(5))
    shifted.indices = shifted.indices + schema.n_rows
    with pytest.raises(ValueError, match="another schema"):
        predict_ctr(model, shifted)
    scorer = load_ctr_scorer(export_ctr(model, tmp_path / "b"))
    with pytest.raises(ValueError, match="fields"):
        scorer(other.test)
    with pytest.raises(FileExistsError):
        export_ctr(model, tmp_path / "b")
    with pytest.raises(TypeError, match="CtrModel"):
        export_ctr(torch.nn.Linear(2, 1), tmp_path / "c")
