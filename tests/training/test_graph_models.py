"""Graph / CF models (MF, LightGCN, NGCF): the core-backed SpMM autograd function, propagation against
dense references, the negative sampler, learning on synthetic data, and export to bundles."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import rec_engine
from rec_engine import CsrMatrix
from rec_engine.bundle import BundleError, open_bundle, write_bundle
from rec_engine_train.data.containers import ImplicitSplit, Interactions
from rec_engine_train.data.synthetic import make_synthetic
from rec_engine_train.evaluate import popularity_vectors
from rec_engine_train.export_graph import export_graph, export_popularity, load_graph_scorer
from rec_engine_train.loop import TrainConfig
from rec_engine_train.models.graph import (KINDS, MF, NGCF, CorePropagate, CoreSpmm, EdgeDropout, GatherRows,
                                           LightGCN, NegativeSampler, _BprModel, final_embeddings, graph_adjacency,
                                           train_graph)


# ----------------------------------------------------------------------------- references and data
def small_graph(seed: int = 0, n_users: int = 13, n_items: int = 9, n: int = 40) -> Interactions:
    """Random interactions with repeats, one user and one item left without any edge."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users - 1, n)     # user n_users - 1 has no interaction
    items = rng.integers(0, n_items - 1, n)     # item n_items - 1 neither
    return Interactions(users, items, n_users, n_items)


def dense_norm_adj(train: Interactions) -> np.ndarray:
    """D^-1/2 A D^-1/2 of the bipartite graph, built by hand in float64 (repeats count once)."""
    nu, ni = train.n_users, train.n_items
    a = np.zeros((nu + ni, nu + ni))
    a[train.users, nu + train.items] = 1.0
    a[nu + train.items, train.users] = 1.0
    deg = a.sum(1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-300)), 0.0)
    return inv[:, None] * a * inv[None, :]


def torch_sparse(adj: CsrMatrix) -> torch.Tensor:
    s = adj.to_scipy().tocoo()
    idx = torch.from_numpy(np.vstack([s.row, s.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(s.data), adj.shape, check_invariants=True).coalesce()


def brute_topk_scores(user_vecs, item_vecs, train: Interactions, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores with train items at -inf, and the k best ids per user (ties: lower id first)."""
    scores = user_vecs.astype(np.float64) @ item_vecs.astype(np.float64).T
    scores[train.users, train.items] = -np.inf
    return scores, np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall_at(user_vecs, item_vecs, train: Interactions, test: Interactions, k: int = 20) -> float:
    """Mean Recall@k over users with test items, by brute force."""
    _, top = brute_topk_scores(user_vecs, item_vecs, train, k)
    truth = np.zeros((train.n_users, train.n_items), bool)
    truth[test.users, test.items] = True
    hits = np.take_along_axis(truth, top, axis=1).sum(1)
    n_truth = truth.sum(1)
    has = n_truth > 0
    return float(np.mean(hits[has] / n_truth[has]))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared machine: torch's intra-op threads only add synchronization waits (tens of
    times slower when the cores are busy), so this file runs torch on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic() -> ImplicitSplit:
    return make_synthetic(n_users=500, n_items=300, seed=0).implicit()


def quiet(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=4096, lr=0.01, dim=8, progress=False, patience=0)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- CoreSpmm
def test_core_spmm_forward_and_backward_match_torch_sparse():
    train = small_graph()
    adj = graph_adjacency(train)
    a = torch_sparse(adj)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(adj.shape[0], 7, generator=g)
    w = torch.randn(adj.shape[0], 7, generator=g)

    x = x0.clone().requires_grad_(True)
    y = CoreSpmm.apply(CoreSpmm.apply(x, adj, None), adj, None)       # two layers, like a propagation
    (y * w).sum().backward()

    x_ref = x0.clone().requires_grad_(True)
    y_ref = torch.sparse.mm(a, torch.sparse.mm(a, x_ref))
    (y_ref * w).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [[0.25, 0.25, 0.25, 0.25], [0.1, 0.5, 0.0, 0.4], [1.0]])
def test_core_propagate_forward_and_backward_match_layer_by_layer_torch_sparse(weights):
    train = small_graph(seed=2)
    adj = graph_adjacency(train)
    a = torch_sparse(adj)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(adj.shape[0], 5, generator=g)
    w = torch.randn(adj.shape[0], 5, generator=g)

    x = x0.clone().requires_grad_(True)
    y = CorePropagate.apply(x, adj, weights, None)
    (y * w).sum().backward()

    x_ref = x0.clone().requires_grad_(True)
    layer, y_ref = x_ref, weights[0] * x_ref
    for wk in weights[1:]:
        layer = torch.sparse.mm(a, layer)
        y_ref = y_ref + wk * layer
    (y_ref * w).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="float32"):
        CorePropagate.apply(x0.double(), adj, weights, None)


def test_gather_rows_matches_indexing_with_repeated_rows():
    g = torch.Generator().manual_seed(0)
    table0 = torch.randn(11, 4, generator=g)
    index = torch.tensor([3, 0, 3, 10, 3, 7], dtype=torch.int64)       # repeats accumulate
    upstream = torch.randn(6, 4, generator=g)
    t1, t2 = table0.clone().requires_grad_(True), table0.clone().requires_grad_(True)
    (GatherRows.apply(t1, index) * upstream).sum().backward()
    (t2[index] * upstream).sum().backward()
    torch.testing.assert_close(GatherRows.apply(table0, index), table0[index])
    torch.testing.assert_close(t1.grad, t2.grad)
    assert t1.grad[3].abs().sum() > 0 and t1.grad[1].abs().sum() == 0


@pytest.mark.parametrize("k", [1, 3])
def test_bpr_loss_with_k_negatives_is_the_loss_of_the_repeated_triples(k):
    """The fused losses (LightGCN's node table, NGCF's per-layer tables), the generic one, and the plain
    loss over B * k explicit triples agree in value and gradient (the L2 term included)."""
    train = small_graph(seed=6, n_users=20, n_items=15, n=90)
    torch.manual_seed(0)
    models = [LightGCN(graph_adjacency(train), train.n_users, train.n_items, 6),
              MF(train.n_users, train.n_items, 6),
              NGCF(graph_adjacency(train), train.n_users, train.n_items, 6, dropout=0.0)]
    rng = np.random.default_rng(1)
    users = torch.from_numpy(rng.integers(0, train.n_users, 12))
    pos = torch.from_numpy(rng.integers(0, train.n_items, 12))
    neg = torch.from_numpy(rng.integers(0, train.n_items, (12, k)))
    for model in models:
        results = []
        for fn, args in ((type(model).bpr_loss, (users, pos, neg)),
                         (_BprModel.bpr_loss, (users, pos, neg)),
                         (_BprModel.bpr_loss, (users.repeat_interleave(k), pos.repeat_interleave(k), neg.reshape(-1)))):
            model.zero_grad()
            loss = fn(model, *args, 0.3)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        for loss, grads in results[1:]:
            torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-7)
            for g1, g0 in zip(grads, results[0][1]):
                torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="BPR batch"):
        models[0].bpr_loss(users, pos[:5], neg, 0.1)


def test_dynamic_negatives_are_each_groups_highest_scored_candidate_and_the_loss_is_theirs():
    train = small_graph(seed=7, n_users=20, n_items=15, n=90)
    torch.manual_seed(1)
    rng = np.random.default_rng(2)
    users = torch.from_numpy(rng.integers(0, train.n_users, 10))
    pos = torch.from_numpy(rng.integers(0, train.n_items, 10))
    cands = torch.from_numpy(rng.integers(0, train.n_items, (10, 2 * 3)))       # k = 2 groups of c = 3
    for model in (LightGCN(graph_adjacency(train), train.n_users, train.n_items, 6),
                  MF(train.n_users, train.n_items, 6),
                  NGCF(graph_adjacency(train), train.n_users, train.n_items, 6, dropout=0.0)):
        uv, iv = (t.detach().numpy().astype(np.float64) for t in model.propagate())
        scores = np.einsum("bgcd,bd->bgc", iv[cands.numpy().reshape(10, 2, 3)], uv[users.numpy()])
        chosen = np.take_along_axis(cands.numpy().reshape(10, 2, 3), scores.argmax(2)[:, :, None], 2)[:, :, 0]
        model.zero_grad()
        loss = model.bpr_loss(users, pos, cands, 0.2, candidates=3)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = model.bpr_loss(users, pos, torch.from_numpy(chosen), 0.2)
        ref.backward()
        torch.testing.assert_close(loss, ref)
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g, p.grad)
        with pytest.raises(ValueError, match="multiple of candidates"):
            model.bpr_loss(users, pos, cands[:, :5], 0.2, candidates=3)


def test_n_negatives_param_is_checked_and_training_with_it_learns(synthetic):
    with pytest.raises(ValueError, match="n_negatives must be"):
        train_graph("mf", synthetic, quiet(epochs=1, params={"n_negatives": 0}), log=lambda s: None)
    with pytest.raises(ValueError, match="dns_candidates must be"):
        train_graph("mf", synthetic, quiet(epochs=1, params={"dns_candidates": 0}), log=lambda s: None)
    pop = recall_at(*popularity_vectors(synthetic.train.item_counts(), synthetic.train.n_users),
                    synthetic.train, synthetic.test)
    for params in ({"n_negatives": 4}, {"n_negatives": 2, "dns_candidates": 4}):
        config = quiet(epochs=25, dim=16, patience=4, lr=0.05, params={"n_layers": 3, **params})
        model, _ = train_graph("lightgcn", synthetic, config, log=lambda s: None)
        assert recall_at(*final_embeddings(model), synthetic.train, synthetic.test) >= 1.5 * pop, params


def test_graph_adjacency_is_the_symmetric_normalized_adjacency():
    train = small_graph(seed=3)
    adj = graph_adjacency(train)
    np.testing.assert_allclose(adj.to_scipy().toarray(), dense_norm_adj(train), rtol=1e-6, atol=1e-7)


def test_core_spmm_rejects_float64_tensors():
    adj = graph_adjacency(small_graph())
    with pytest.raises(TypeError, match="float32"):
        CoreSpmm.apply(torch.zeros(adj.shape[0], 3, dtype=torch.float64), adj, None)


# ----------------------------------------------------------------------------- propagation
@pytest.mark.parametrize("n_layers, layer_weights", [(3, None), (2, [0.5, 0.3, 0.2]), (0, None)])
def test_lightgcn_propagation_equals_dense_reference(n_layers, layer_weights):
    train = small_graph(seed=5)
    torch.manual_seed(0)
    model = LightGCN(graph_adjacency(train), train.n_users, train.n_items, 6, n_layers, layer_weights)
    users, items = final_embeddings(model)

    a = dense_norm_adj(train)
    e = model.embedding.detach().numpy().astype(np.float64)
    w = np.full(n_layers + 1, 1 / (n_layers + 1)) if layer_weights is None else np.asarray(layer_weights)
    ref, layer = w[0] * e, e
    for k in range(1, n_layers + 1):
        layer = a @ layer
        ref = ref + w[k] * layer
    np.testing.assert_allclose(np.vstack([users, items]), ref, rtol=1e-5, atol=1e-6)


def test_ngcf_propagation_equals_dense_reference_and_concatenates_layers():
    train = small_graph(seed=6)
    torch.manual_seed(0)
    d, n_layers = 5, 2
    model = NGCF(graph_adjacency(train), train.n_users, train.n_items, d, n_layers, dropout=0.3)
    users, items = final_embeddings(model)             # eval mode: no dropout
    assert users.shape == (train.n_users, d * (n_layers + 1)) and items.shape == (train.n_items, d * (n_layers + 1))

    a = dense_norm_adj(train)
    e = model.embedding.detach().numpy().astype(np.float64)
    outs = [e]
    for w1, w2 in zip(model.w1, model.w2):
        W1, b1 = w1.weight.detach().numpy().astype(np.float64), w1.bias.detach().numpy().astype(np.float64)
        W2, b2 = w2.weight.detach().numpy().astype(np.float64), w2.bias.detach().numpy().astype(np.float64)
        side = a @ e
        z = (side + e) @ W1.T + b1 + (side * e) @ W2.T + b2
        e = np.where(z > 0, z, 0.2 * z)
        outs.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
    np.testing.assert_allclose(np.vstack([users, items]), np.hstack(outs), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- negative sampling
def dense_graph(seed: int = 0) -> Interactions:
    """40 users x 25 items, each user with 10..24 positives (some with a single negative)."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 40, 25
    n_pos = rng.integers(10, n_items, n_users)
    n_pos[:3] = n_items - 1
    users = np.repeat(np.arange(n_users), n_pos)
    items = np.concatenate([rng.permutation(n_items)[:m] for m in n_pos])
    return Interactions(np.concatenate([users, users[:50]]), np.concatenate([items, items[:50]]),  # repeats
                        n_users, n_items)


def test_negative_sampler_never_returns_a_positive_and_covers_negatives_uniformly():
    train = dense_graph()
    positive = np.zeros((train.n_users, train.n_items), bool)
    positive[train.users, train.items] = True
    users = np.repeat(np.arange(train.n_users), 2000)
    neg = NegativeSampler(train).sample(users, np.random.default_rng(0))
    assert neg.dtype == np.int64 and neg.shape == users.shape
    assert not positive[users, neg].any()
    counts = np.zeros(positive.shape)
    np.add.at(counts, (users, neg), 1)
    assert ((counts > 0) == ~positive).all()                # every negative of every user is drawn
    expected = 2000 / (~positive).sum(1, keepdims=True)
    chi2 = (((counts - expected) ** 2 / expected)[~positive]).sum()
    dof = (~positive).sum() - train.n_users
    assert chi2 < dof + 6 * np.sqrt(2 * dof)                # uniform over each user's negatives


def test_negative_sampler_is_seeded_and_keeps_the_batch_shape():
    sampler = NegativeSampler(dense_graph())
    users = np.arange(40).repeat(30).reshape(40, 30)
    a = sampler.sample(users, np.random.default_rng(7))
    b = sampler.sample(users, np.random.default_rng(7))
    c = sampler.sample(users, np.random.default_rng(8))
    assert a.shape == users.shape
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_negative_sampler_rejects_a_user_who_has_seen_every_item():
    train = Interactions(np.array([0, 0, 0, 1]), np.array([0, 1, 2, 0]), 2, 3)
    sampler = NegativeSampler(train)
    assert set(sampler.sample(np.full(50, 1), np.random.default_rng(0)).tolist()) == {1, 2}
    with pytest.raises(ValueError, match="user 0 has interacted with all 3 items"):
        sampler.sample(np.array([1, 0]), np.random.default_rng(0))


def test_user_uniform_pairs_are_positives_with_users_and_their_items_uniform():
    # users 0..2 with 1, 3 and 6 distinct positives (one repeated), user 3 with none
    users = np.array([0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2])
    items = np.array([4, 0, 2, 5, 0, 1, 2, 3, 5, 6, 6])
    sampler = NegativeSampler(Interactions(users, items, 4, 8))
    u, i = sampler.sample_pairs(60000, np.random.default_rng(0))
    assert u.dtype == np.int64 and i.dtype == np.int64 and u.shape == i.shape == (60000,)
    positive = np.zeros((4, 8), bool)
    positive[users, items] = True
    assert positive[u, i].all()
    np.testing.assert_allclose(np.bincount(u, minlength=4) / 60000, [1 / 3, 1 / 3, 1 / 3, 0], atol=0.01)
    for user in range(3):                                  # uniform over the user's distinct positives
        share = np.bincount(i[u == user], minlength=8)[positive[user]] / (u == user).sum()
        np.testing.assert_allclose(share, 1 / positive[user].sum(), atol=0.015)
    with pytest.raises(ValueError, match="no interactions"):
        NegativeSampler(Interactions(np.array([], np.int64), np.array([], np.int64), 2, 2)).sample_pairs(
            3, np.random.default_rng(0))


def test_lr_decay_sets_each_epochs_learning_rate(synthetic, monkeypatch):
    seen = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    config = quiet(epochs=3, dim=8, patience=0, lr=0.04, batch_size=1 << 20, params={"lr_decay": 0.5})
    train_graph("mf", synthetic, config, log=lambda s: None)
    np.testing.assert_allclose(seen, [0.04, 0.02, 0.01])          # one batch an epoch
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="lr_decay must be in"):
            train_graph("mf", synthetic, quiet(epochs=1, params={"lr_decay": bad}), log=lambda s: None)


def test_sampling_param_is_checked_and_user_sampling_learns(synthetic):
    with pytest.raises(ValueError, match="sampling must be"):
        train_graph("mf", synthetic, quiet(epochs=1, params={"sampling": "items"}), log=lambda s: None)
    config = quiet(epochs=25, dim=16, patience=4, lr=0.05, params={"n_layers": 3, "sampling": "user"})
    model, _ = train_graph("lightgcn", synthetic, config, log=lambda s: None)
    pop = recall_at(*popularity_vectors(synthetic.train.item_counts(), synthetic.train.n_users),
                    synthetic.train, synthetic.test)
    assert recall_at(*final_embeddings(model), synthetic.train, synthetic.test) >= 1.5 * pop


# ----------------------------------------------------------------------------- learning
LEARNING = {"mf": dict(lr=0.02), "lightgcn": dict(lr=0.05), "ngcf": dict(lr=0.02)}


@pytest.mark.parametrize("kind", KINDS)
def test_model_beats_popularity_by_half_on_synthetic_data(kind, synthetic):
    config = quiet(epochs=25, dim=16, patience=4, params={"n_layers": 3}, **LEARNING[kind])
    model, hist = train_graph(kind, synthetic, config, log=lambda s: None)
    assert hist.best_epoch >= 1 and "recall@20" in hist.best
    pop = recall_at(*popularity_vectors(synthetic.train.item_counts(), synthetic.train.n_users),
                    synthetic.train, synthetic.test)
    got = recall_at(*final_embeddings(model), synthetic.train, synthetic.test)
    assert got >= 1.5 * pop, f"{kind}: recall@20 {got:.3f} vs popularity {pop:.3f}"


def test_train_graph_rejects_an_unknown_kind_naming_the_kinds(synthetic):
    with pytest.raises(ValueError, match=r"'gcn'.*'mf', 'lightgcn', 'ngcf'"):
        train_graph("gcn", synthetic, quiet(), log=lambda s: None)


# ----------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def trained(synthetic):
    """One short-trained model of each kind."""
    return {kind: train_graph(kind, synthetic, quiet(epochs=2, params={"n_layers": 2}), log=lambda s: None)[0]
            for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_exported_tables_equal_the_models_final_embeddings(kind, trained, synthetic, tmp_path):
    model = trained[kind]
    path = export_graph(model, synthetic.train, tmp_path / kind, metrics={"recall@20": 0.5})
    b = open_bundle(path)
    users, items = final_embeddings(model)
    assert b.kind == kind
    np.testing.assert_array_equal(b.table("users").to_numpy(), users)
    np.testing.assert_array_equal(b.table("items").to_numpy(), items)
    assert b.meta["dim"] == users.shape[1] == (8 * 3 if kind == "ngcf" else 8)
    assert (b.meta["n_users"], b.meta["n_items"]) == (synthetic.train.n_users, synthetic.train.n_items)
    assert b.meta["metrics"] == {"recall@20": 0.5}
    np.testing.assert_array_equal(b.array("item_counts"), synthetic.train.item_counts())


def test_lightgcn_bundle_propagates_ego_to_the_exported_embeddings(trained, synthetic, tmp_path):
    model = trained["lightgcn"]
    b = open_bundle(export_graph(model, synthetic.train, tmp_path / "lg"))
    n = synthetic.train.n_users + synthetic.train.n_items
    adj = CsrMatrix(b.array("adj_indptr"), b.array("adj_indices"), b.array("adj_data"), (n, n))
    ego = np.vstack([b.table("users_ego").to_numpy(), b.table("items_ego").to_numpy()])
    final = rec_engine.propagate(adj, ego, b.meta["n_layers"], b.meta["layer_weights"])
    exported = np.vstack([b.table("users").to_numpy(), b.table("items").to_numpy()])
    assert np.abs(final - exported).max() <= 1e-4
    assert b.meta["n_layers"] == 2 and len(b.meta["layer_weights"]) == 3


@pytest.mark.parametrize("kind", ["lightgcn", "ngcf"])
def test_scorer_recommends_the_brute_force_top_k_without_train_items(kind, trained, synthetic, tmp_path):
    model = trained[kind]
    scorer = load_graph_scorer(export_graph(model, synthetic.train, tmp_path / kind))
    users = np.arange(0, synthetic.train.n_users, 3)
    got = scorer.recommend(users, k=10)
    scores, top = brute_topk_scores(*final_embeddings(model), synthetic.train, 11)
    scores = scores[users]
    ref_scores = np.take_along_axis(scores, top[users], axis=1)
    np.testing.assert_allclose(got.scores, ref_scores[:, :10], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(scores, got.ids, axis=1), got.scores, rtol=1e-5, atol=1e-5)
    clear = np.diff(ref_scores, axis=1) < -1e-6             # ranks whose order no rounding can flip
    sure = clear[:, :10] & np.hstack([np.ones((len(users), 1), bool), clear[:, :9]])
    np.testing.assert_array_equal(got.ids[sure], top[users][:, :10][sure])
    assert sure.mean() > 0.9


def test_scorer_single_user_and_exclude_seen_switch(trained, synthetic, tmp_path):
    scorer = load_graph_scorer(export_graph(trained["mf"], synthetic.train, tmp_path / "mf"))
    user_vecs, item_vecs = final_embeddings(trained["mf"])
    one = scorer.recommend(4, k=5)
    assert one.ids.shape == (5,)
    np.testing.assert_array_equal(one.ids, scorer.recommend([4], k=5).ids[0])
    seen = set(synthetic.train.items[synthetic.train.users == 4].tolist())
    assert not seen & set(one.ids.tolist())
    every = scorer.recommend(4, k=synthetic.train.n_items, exclude_seen=False)
    assert set(every.ids.tolist()) == set(range(synthetic.train.n_items))
    np.testing.assert_allclose(every.scores, np.sort(item_vecs @ user_vecs[4])[::-1], rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="user id 500 at position 1"):
        scorer.recommend([0, 500])


def test_float16_tables_score_like_float32_ones(trained, synthetic, tmp_path):
    model = trained["mf"]
    s32 = load_graph_scorer(export_graph(model, synthetic.train, tmp_path / "a"))
    s16 = load_graph_scorer(export_graph(model, synthetic.train, tmp_path / "b", table_dtype="float16"))
    users = np.arange(50)
    np.testing.assert_allclose(s16.recommend(users, k=5).scores, s32.recommend(users, k=5).scores, atol=2e-3)


def test_popularity_bundle_recommends_the_most_popular_unseen_items(synthetic, tmp_path):
    train = synthetic.train
    counts = train.item_counts()
    scorer = load_graph_scorer(export_popularity(counts, train, tmp_path / "pop"))
    got = scorer.recommend(np.arange(20), k=8)
    _, top = brute_topk_scores(np.ones((train.n_users, 1)), counts.reshape(-1, 1), train, 8)
    np.testing.assert_array_equal(got.ids, top[:20])            # integer scores: exact, ties by lower id
    np.testing.assert_array_equal(got.scores, counts[got.ids].astype(np.float32))
    assert open_bundle(tmp_path / "pop").kind == "popularity"


def test_export_and_load_reject_what_is_not_a_graph_model(trained, synthetic, tmp_path):
    with pytest.raises(ValueError, match="export_graph needs one of the models"):
        export_graph(torch.nn.Linear(2, 2), synthetic.train, tmp_path / "x")
    other = Interactions(synthetic.train.users, synthetic.train.items, synthetic.train.n_users, 400)
    with pytest.raises(ValueError, match="300 items but split_train has 500 x 400"):
        export_graph(trained["mf"], other, tmp_path / "y")
    with pytest.raises(ValueError, match="item_counts must hold 300 numbers"):
        export_popularity(np.ones(3), synthetic.train, tmp_path / "z")
    write_bundle(tmp_path / "ctr", kind="deepfm", meta={})
    with pytest.raises(BundleError, match="not a graph kind"):
        load_graph_scorer(tmp_path / "ctr")


def test_scoring_a_bundle_does_not_import_torch(trained, synthetic, tmp_path):
    path = export_graph(trained["lightgcn"], synthetic.train, tmp_path / "lg")
    code = ("import sys; from rec_engine_train.export_graph import load_graph_scorer; "
            f"r = load_graph_scorer({str(path)!r}).recommend([0, 1], k=3); "
            "print(r.ids.shape, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(2,", "3)", "False"]


def test_edge_dropout_drops_whole_undirected_edges_scales_the_rest_and_is_unbiased():
    train = small_graph(seed=8, n_users=30, n_items=25, n=200)
    adj = graph_adjacency(train)
    dense = adj.to_scipy().toarray()
    drop = EdgeDropout(adj, 0.3, seed=0)
    mean, kept = np.zeros_like(dense), []
    for _ in range(400):
        sample = drop.sample()
        m = sample.to_scipy().toarray()
        np.testing.assert_array_equal(m, m.T)                               # symmetric: whole edges
        nz = m != 0
        assert not (nz & (dense == 0)).any()                                # no new edges
        np.testing.assert_allclose(m[nz], dense[nz] / 0.7, rtol=1e-6)       # kept entries scaled
        kept.append(nz.sum() / (dense != 0).sum())
        mean += m / 400
    assert abs(np.mean(kept) - 0.7) < 0.01
    np.testing.assert_allclose(mean, dense, atol=0.08 * dense.max())       # E[sample] = adj
    assert EdgeDropout(adj, 0.0, seed=0).sample() is adj
    with pytest.raises(ValueError, match="edge_dropout"):
        EdgeDropout(adj, 1.0, seed=0)


def test_ngcf_edge_dropout_acts_in_training_only_and_training_with_it_learns(synthetic):
    train = synthetic.train
    torch.manual_seed(0)
    assert NGCF(graph_adjacency(train), train.n_users, train.n_items, 8).edge_dropout is None
    with pytest.raises(ValueError, match="edge_dropout"):
        NGCF(graph_adjacency(train), train.n_users, train.n_items, 8, edge_dropout=-0.1)
    model = NGCF(graph_adjacency(train), train.n_users, train.n_items, 8, dropout=0.0, edge_dropout=0.5)
    model.eval()
    a = torch.cat(model.propagate(), 0)
    torch.testing.assert_close(torch.cat(model.propagate(), 0), a)
    model.train()
    b = torch.cat(model.propagate(), 0)
    assert (b - a).abs().max() > 1e-3
    config = quiet(epochs=25, dim=16, patience=4, params={"edge_dropout": 0.2}, **LEARNING["ngcf"])
    model, hist = train_graph("ngcf", synthetic, config, log=lambda s: None)
    assert model.edge_dropout.p == 0.2
    pop = recall_at(*popularity_vectors(synthetic.train.item_counts(), synthetic.train.n_users),
                    synthetic.train, synthetic.test)
    assert recall_at(*final_embeddings(model), synthetic.train, synthetic.test) >= 1.5 * pop
