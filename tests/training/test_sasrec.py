"""SASRec: the exported encoder against the PyTorch model, causality, padding, learning, bad input."""
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from rec_engine import IdLists  # noqa: E402
from rec_engine.bundle import open_bundle  # noqa: E402
from rec_engine.retrieval import UserState, load_retrieval  # noqa: E402

from rec_engine_train.data.synthetic import make_synthetic  # noqa: E402
from rec_engine_train.evaluate import evaluate_sampled, popularity_score_fn  # noqa: E402
from rec_engine_train.export_sasrec import export_sasrec, load_sasrec_scorer, pad_histories  # noqa: E402
from rec_engine_train.loop import TrainConfig  # noqa: E402
from rec_engine_train.models.sasrec import (SASRec, _batch_logits, length_groups, score, train_sasrec,  # noqa: E402
                                           user_vectors)

N_ITEMS, DIM, MAX_LEN = 300, 16, 20


def random_model(seed=0, pre_ln=True):
    """A SASRec whose every parameter (biases and layer norms included) is random, in eval mode."""
    torch.manual_seed(seed)
    model = SASRec(N_ITEMS, DIM, max_len=MAX_LEN, n_blocks=2, n_heads=2, dropout=0.1, pre_ln=pre_ln)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.item_emb.weight[0].zero_()
    return model.eval()


def random_histories(rng, n, max_length=MAX_LEN + 10):
    return [rng.integers(0, N_ITEMS, rng.integers(1, max_length + 1)) for _ in range(n)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = random_model()
    hist = random_histories(np.random.default_rng(5), 50)
    path = export_sasrec(model, tmp_path_factory.mktemp("sasrec") / "b", histories=hist, metrics={"hr@10": 0.5})
    return model, path, hist


# ------------------------------------------------------------------------------------------ ONNX parity
def test_exported_encoder_fed_by_core_gather_matches_torch_at_batch_1000_and_1(exported):
    model, path, _ = exported
    scorer = load_sasrec_scorer(path)
    hist = random_histories(np.random.default_rng(1), 1000)
    lengths = np.array([len(h) for h in hist])
    assert lengths.min() == 1 and (lengths > MAX_LEN).any() and (lengths < MAX_LEN).any()
    ref = user_vectors(model, hist)
    batch = scorer.user_vectors(hist, batch_size=1000)
    single = scorer.user_vectors(hist, batch_size=1)
    assert np.abs(batch - ref).max() <= 1e-4
    assert np.abs(single - ref).max() <= 1e-4
    assert np.isfinite(ref).all() and ref.std() > 0.1


def test_candidate_scores_from_bundle_match_torch_scores(exported):
    model, path, _ = exported
    scorer = load_sasrec_scorer(path)
    rng = np.random.default_rng(2)
    hist = random_histories(rng, 200)
    cands = rng.integers(0, N_ITEMS, (200, 101))
    ref = score(model, hist, cands)
    by_hand = np.einsum("ucd,ud->uc", model.item_emb.weight.detach().numpy()[cands + 1], user_vectors(model, hist))
    got = scorer.score(hist, cands)
    assert ref.shape == got.shape == (200, 101)
    np.testing.assert_allclose(ref, by_hand, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_recommend_is_the_top_k_of_all_scores_without_the_history(exported):
    model, path, _ = exported
    scorer = load_sasrec_scorer(path)
    hist = random_histories(np.random.default_rng(3), 30)
    k = 7
    rec = scorer.recommend(hist, k)
    full = user_vectors(model, hist) @ model.item_emb.weight.detach().numpy()[1:].T
    for u, h in enumerate(hist):
        full[u, h] = -np.inf
        np.testing.assert_array_equal(rec.ids[u], np.argsort(-full[u], kind="stable")[:k])
    kept = scorer.recommend(hist, N_ITEMS, exclude_seen=False)
    assert (kept.ids >= 0).all()     # nothing excluded: every item ranked


def test_padded_positions_may_hold_any_embedding(exported):
    _, path, _ = exported
    scorer = load_sasrec_scorer(path)
    hist = random_histories(np.random.default_rng(4), 64, max_length=MAX_LEN - 1)
    ids, mask = pad_histories(hist, MAX_LEN, N_ITEMS)
    emb = scorer.table.gather(ids)
    garbage = np.where(mask[..., None] > 0, emb, np.random.default_rng(0).normal(size=emb.shape) * 10)
    run = lambda e: scorer.session.run(["user"], {"seq_emb": e.astype(np.float32), "mask": mask})[0]  # noqa: E731
    np.testing.assert_allclose(run(garbage), run(emb), atol=1e-5)


def test_bundle_holds_the_items_table_meta_and_what_serving_reads(exported):
    model, path, hist = exported
    b = open_bundle(path)
    assert b.kind == "sasrec"
    assert b.meta["n_items"] == N_ITEMS and b.meta["dim"] == DIM and b.meta["max_len"] == MAX_LEN
    assert b.meta["metrics"] == {"hr@10": 0.5} and b.meta["params"]["n_heads"] == 2
    np.testing.assert_array_equal(b.table("items").to_numpy(), model.item_emb.weight.detach().numpy()[1:])
    import onnx
    graph = onnx.load(str(b.onnx_path("encoder"))).graph
    assert [i.name for i in graph.input] == ["seq_emb", "mask"] and [o.name for o in graph.output] == ["user"]
    seq_shape = graph.input[0].type.tensor_type.shape.dim
    assert seq_shape[0].dim_param and seq_shape[1].dim_value == MAX_LEN and seq_shape[2].dim_value == DIM
    # the serving side (rec_engine.retrieval) reads the same bundle to the same vectors
    retrieval = load_retrieval(b)
    assert len(retrieval.seen_lists) == len(hist)
    np.testing.assert_array_equal(retrieval.seen_lists[3], hist[3])
    users = [UserState(u, u) for u in range(len(hist))]
    np.testing.assert_allclose(retrieval.user_vectors(users)[0], user_vectors(model, hist),
                               atol=1e-4)
    counts = np.bincount(np.concatenate(hist), minlength=N_ITEMS)
    np.testing.assert_array_equal(b.array("item_counts"), counts)


def test_float16_table_bundle_scores_close_to_float32(exported, tmp_path):
    model, _, _ = exported
    path = export_sasrec(model, tmp_path / "half", table_dtype="float16")
    scorer = load_sasrec_scorer(path)
    assert scorer.table.dtype == "float16"
    hist = random_histories(np.random.default_rng(6), 100)
    np.testing.assert_allclose(scorer.user_vectors(hist), user_vectors(model, hist), atol=2e-2)
    with pytest.raises(FileExistsError):
        export_sasrec(model, path)


# ------------------------------------------------------------------------------------------ causality, padding
@pytest.mark.parametrize("pre_ln", [True, False])
def test_output_t_depends_on_earlier_items_and_not_on_later_ones(pre_ln):
    model = random_model(seed=1, pre_ln=pre_ln)
    rng = np.random.default_rng(7)
    seq = torch.from_numpy(rng.integers(1, N_ITEMS + 1, (1, MAX_LEN)))
    with torch.no_grad():
        base = model(seq)[0]
        for t in (3, 10, MAX_LEN - 2):
            earlier, later = seq.clone(), seq.clone()
            earlier[0, t - 2] = seq[0, t - 2] % N_ITEMS + 1
            later[0, t + 1] = seq[0, t + 1] % N_ITEMS + 1
            assert (model(earlier)[0, t] - base[t]).abs().max() > 1e-3
            assert (model(later)[0, t] - base[t]).abs().max() <= 1e-6
            assert (model(later)[0, t + 1] - base[t + 1]).abs().max() > 1e-3


@pytest.mark.parametrize("pre_ln", [True, False])
def test_more_left_padding_does_not_change_the_user_vector(pre_ln):
    model = random_model(seed=2, pre_ln=pre_ln)
    items = torch.from_numpy(np.random.default_rng(8).integers(1, N_ITEMS + 1, 6))
    outs = []
    with torch.no_grad():
        for pad in (0, 1, 5, MAX_LEN - 6):
            seq = torch.cat([torch.zeros(pad, dtype=torch.int64), items]).unsqueeze(0)
            outs.append(model(seq)[0, -1])
            # the encoder ignores what padded positions hold
            emb = model.item_emb(seq) + (seq == 0).unsqueeze(-1) * torch.randn(1, seq.shape[1], DIM) * 5
            outs.append(model.encoder(emb, (seq != 0).float())[0])
    for o in outs[1:]:
        assert (o - outs[0]).abs().max() <= 1e-5
    vec = user_vectors(model, [items.numpy() - 1])[0]
    assert np.abs(vec - outs[0].numpy()).max() <= 1e-5


def test_histories_longer_than_max_len_keep_their_latest_items():
    model = random_model(seed=3)
    rng = np.random.default_rng(9)
    long = rng.integers(0, N_ITEMS, MAX_LEN + 15)
    other_start = np.concatenate([rng.integers(0, N_ITEMS, 15), long[15:]])
    np.testing.assert_array_equal(user_vectors(model, [long]), user_vectors(model, [other_start]))
    ids, mask = pad_histories([long, long[:3]], MAX_LEN, N_ITEMS)
    np.testing.assert_array_equal(ids[0], long[-MAX_LEN:])
    np.testing.assert_array_equal(ids[1, -3:], long[:3])
    np.testing.assert_array_equal(mask.sum(1), [MAX_LEN, 3])


def _brute_force_cost(widths, max_groups, group_cost):
    """Cheapest split of the sorted distinct widths into at most max_groups contiguous groups."""
    values = np.unique(widths)
    best = None
    for g in range(1, max_groups + 1):
        for cut in itertools.combinations(range(1, values.size), g - 1):
            edges = [0, *cut, values.size]
            cost = sum(((widths >= values[a]) & (widths <= values[b - 1])).sum() * values[b - 1] + group_cost
                       for a, b in zip(edges[:-1], edges[1:]))
            best = cost if best is None else min(best, cost)
    return best


def test_length_groups_partition_the_rows_at_the_brute_force_optimum():
    rng = np.random.default_rng(11)
    for _ in range(200):
        widths = rng.integers(1, rng.integers(2, 16), rng.integers(1, 25))
        max_groups, group_cost = int(rng.integers(1, 5)), int(rng.integers(0, 40))
        groups = length_groups(widths, max_groups, group_cost)
        assert 1 <= len(groups) <= max_groups
        np.testing.assert_array_equal(np.sort(np.concatenate(groups)), np.arange(widths.size))
        cost = sum(g.size * widths[g].max() + group_cost for g in groups)
        assert cost == _brute_force_cost(widths, max_groups, group_cost)
    assert length_groups(np.array([], np.int64)) == []
    # free groups: one per distinct width; expensive groups: a single group
    w = np.array([3, 1, 3, 2, 1])
    assert sorted(tuple(sorted(g)) for g in length_groups(w, 5, 0)) == [(0, 2), (1, 4), (3,)]
    assert len(length_groups(w, 5, 10 ** 6)) == 1


def test_length_grouped_training_logits_and_gradients_match_the_full_width_batch():
    """The training step trims rows by length; with dropout off its logits and gradients are the
    full-width batch's."""
    model = random_model(seed=4).train()
    for m in model.modules():
        if hasattr(m, "p"):
            m.p = 0.0
    rng = np.random.default_rng(12)
    lengths = np.concatenate([[2, 2, MAX_LEN + 1, MAX_LEN + 5], rng.integers(2, MAX_LEN + 3, 60)])
    hist = [rng.integers(0, N_ITEMS, n) for n in lengths]
    ids, mask = pad_histories(hist, MAX_LEN + 1, N_ITEMS)
    seq = np.where(mask > 0, ids + 1, 0)
    neg = rng.integers(1, N_ITEMS + 1, (seq.shape[0], MAX_LEN))

    def grads(pos_logit, neg_logit):
        model.zero_grad()
        (torch.sigmoid(pos_logit).square().sum() + torch.sigmoid(neg_logit).sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    pos_t = torch.from_numpy(seq[:, 1:])
    real = pos_t != 0
    h = model(torch.from_numpy(seq[:, :-1]))
    ref_pos = (h * model.item_emb(pos_t)).sum(-1)[real]
    ref_neg = (h * model.item_emb(torch.from_numpy(neg))).sum(-1)[real]
    got_pos, got_neg = _batch_logits(model, seq, neg)
    # same multiset of (row, position) targets: compare after sorting by value
    assert got_pos.shape == ref_pos.shape == (int(real.sum()),)
    np.testing.assert_allclose(np.sort(got_pos.detach().numpy()), np.sort(ref_pos.detach().numpy()), atol=1e-5)
    np.testing.assert_allclose(np.sort(got_neg.detach().numpy()), np.sort(ref_neg.detach().numpy()), atol=1e-5)
    for a, b in zip(grads(ref_pos, ref_neg), grads(got_pos, got_neg)):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-4, rtol=1e-4)


def test_user_vectors_of_mixed_lengths_in_small_chunks_match_one_by_one():
    model = random_model(seed=5)
    hist = random_histories(np.random.default_rng(13), 40)
    together = user_vectors(model, hist, batch_size=7)
    alone = np.concatenate([user_vectors(model, [h]) for h in hist])
    np.testing.assert_allclose(together, alone, atol=1e-5)


# ------------------------------------------------------------------------------------------ learning
def test_sasrec_beats_popularity_hr10_by_half_again_on_synthetic_sequences():
    seq = make_synthetic(n_users=500, n_items=200, seed=0).sequences()
    cfg = TrainConfig(epochs=8, batch_size=128, lr=3e-3, dim=32, patience=0, progress=False, num_threads=1,
                      params={"max_len": 20, "dropout": 0.1})
    log = []
    model, hist = train_sasrec(seq, cfg, log=log.append)
    assert len(hist.epochs) == 8 and len(log) == 8 and not model.training
    assert hist.epochs[-1]["loss"] < hist.epochs[0]["loss"]
    test_hist = [np.append(s, v) for s, v in zip(seq.train, seq.valid)]
    ours = evaluate_sampled(lambda u, c: score(model, [test_hist[i] for i in u], c), seq, split="test", seed=1)
    counts = np.bincount(np.concatenate(seq.train), minlength=seq.n_items)
    pop = evaluate_sampled(popularity_score_fn(counts), seq, split="test", seed=1)
    assert ours["users"] == pop["users"] == 500
    assert ours["hr@10"] >= 1.5 * pop["hr@10"], (ours, pop)


def test_train_sasrec_rejects_unknown_params():
    seq = make_synthetic(n_users=20, n_items=30, seed=0).sequences()
    with pytest.raises(ValueError, match="max_lenn"):
        train_sasrec(seq, TrainConfig(epochs=1, progress=False, params={"max_lenn": 5}))


# ------------------------------------------------------------------------------------------ bad input
def test_empty_history_is_a_value_error_naming_it_on_both_sides(exported):
    model, path, _ = exported
    scorer = load_sasrec_scorer(path)
    hist = [np.array([1, 2]), np.array([3]), np.array([], np.int64)]
    for f in (lambda h: user_vectors(model, h), scorer.user_vectors, lambda h: scorer.recommend(h, 5)):
        with pytest.raises(ValueError, match=r"histories\[2\] is empty"):
            f(hist)


def test_out_of_range_item_is_an_index_error_naming_it(exported):
    model, path, _ = exported
    scorer = load_sasrec_scorer(path)
    for bad in (N_ITEMS, -1):
        hist = [np.array([1, 2]), np.array([3, 4, bad, 5])]
        for f in (lambda h: user_vectors(model, h), scorer.user_vectors):
            with pytest.raises(IndexError, match=rf"histories\[1\]\[2\] = {bad} "):
                f(hist)
    for f in (lambda h, c: score(model, h, c), scorer.score):
        with pytest.raises(IndexError, match=rf"candidates\[1, 0\] = {N_ITEMS}"):
            f([np.array([1]), np.array([2])], np.array([[0, 1], [N_ITEMS, 2]]))
        with pytest.raises(ValueError, match="2 rows for 3 histories"):
            f([np.array([1]), np.array([2]), np.array([3])], np.array([[0, 1], [1, 2]]))


def test_wrong_types_and_shapes_are_rejected(exported):
    model, _, _ = exported
    with pytest.raises(TypeError, match=r"histories\[0\] must hold integer"):
        user_vectors(model, [np.array([1.5, 2.0])])
    with pytest.raises(TypeError, match="1-D array"):
        user_vectors(model, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"histories\[1\] must be 1-D"):
        user_vectors(model, [np.array([1]), np.array([[1, 2]])])
    with pytest.raises(ValueError, match="max_len"):
        model.encoder(torch.zeros(1, MAX_LEN + 1, DIM), torch.ones(1, MAX_LEN + 1))
    with pytest.raises(ValueError, match="divisible"):
        SASRec(10, 15, n_heads=2)
    assert user_vectors(model, IdLists.from_lists([[1, 2], [3]])).shape == (2, DIM)


def test_loading_and_scoring_a_bundle_does_not_import_torch(exported):
    import subprocess
    import sys

    _, path, hist = exported
    code = ("import sys, numpy as np\n"
            "from rec_engine_train.export_sasrec import load_sasrec_scorer\n"
            f"s = load_sasrec_scorer({str(path)!r})\n"
            f"print(s.recommend([np.array({hist[0].tolist()})], 3).ids.shape, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False" and "(1, 3)" in out.stdout


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_fast_dropout_drops_a_fraction_p_scales_the_rest_and_is_the_identity_in_eval(p):
    from rec_engine_train.models.layers import FastDropout

    torch.manual_seed(0)
    drop = FastDropout(p)
    x = torch.randn(200, 500).abs() + 0.5
    x.requires_grad_(True)
    y = drop(x)
    kept = y != 0
    assert abs(1.0 - kept.float().mean().item() - p) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    y.sum().backward()                                      # the gradient flows through the kept entries only
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))
    drop.eval()
    assert drop(x) is x
    assert FastDropout(0.0).train()(x) is x
