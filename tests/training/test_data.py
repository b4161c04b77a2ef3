"""The synthetic world (determinism, learnable signal) and the loaders of real formats (round trips,
counts of the real data sets, line-numbered errors on malformed input)."""
from __future__ import annotations

import numpy as np
import pytest

from rec_engine_train.data.containers import Interactions
from rec_engine_train.data.loaders import (DataFormatError, data_dir, load_csv, load_frappe, load_libfm,
                                           load_lightgcn, load_movielens, load_sasrec, split_leave_last_out,
                                           split_ratio, write_libfm, write_lightgcn, write_sasrec)
from rec_engine_train.data.synthetic import make_synthetic


# ------------------------------------------------------------------------------------------ helpers
def numpy_auc(labels, scores) -> float:
    """Mann-Whitney AUC (scores are continuous here, so no ties to average)."""
    labels = np.asarray(labels) > 0.5
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    n_pos = labels.sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(labels) - n_pos)))


def dense(inter: Interactions) -> np.ndarray:
    m = np.zeros((inter.n_users, inter.n_items), bool)
    m[inter.users, inter.items] = True
    return m


def recall_at(scores: np.ndarray, exclude: np.ndarray, truth: np.ndarray, k: int = 20) -> float:
    scores = np.where(exclude, -np.inf, scores)
    top = np.argsort(-scores, axis=1)[:, :k]
    hits = np.take_along_axis(truth, top, axis=1).sum(1)
    has = truth.sum(1) > 0
    return float(np.mean(hits[has] / truth.sum(1)[has]))


@pytest.fixture(scope="module")
def world():
    return make_synthetic(n_users=600, n_items=400, seed=3)


def real(name: str):
    root = data_dir()
    if root is None or not (root / name).exists():
        pytest.skip(f"real data: ../shared/data/{name} not found")
    return root / name


# ------------------------------------------------------------------------------------------ synthetic
def test_same_seed_gives_same_data_and_another_seed_differs():
    a, b, c = (make_synthetic(n_users=200, n_items=150, seed=s) for s in (1, 1, 2))
    ia, ib, ic = a.implicit(), b.implicit(), c.implicit()
    for part in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(ia, part).items, getattr(ib, part).items)
        np.testing.assert_array_equal(getattr(ia, part).users, getattr(ib, part).users)
    assert not np.array_equal(ia.train.items[:50], ic.train.items[:50])
    sa, sb = a.sequences(), b.sequences()
    np.testing.assert_array_equal(np.concatenate(sa.train), np.concatenate(sb.train))
    np.testing.assert_array_equal(sa.test, sb.test)
    ca, cb, cc = a.ctr(n_examples=500), b.ctr(n_examples=500), c.ctr(n_examples=500)
    np.testing.assert_array_equal(ca.train.labels, cb.train.labels)
    np.testing.assert_array_equal(ca.test.indices, cb.test.indices)
    assert not np.array_equal(ca.extra["true_prob_test"], cc.extra["true_prob_test"])


def test_popularity_is_heavy_tailed(world):
    p = np.sort(world.popularity)[::-1]
    assert p.sum() == pytest.approx(1.0)
    assert p[: len(p) // 10].sum() > 0.4          # top 10% of items hold > 40% of the mass (uniform: 10%)
    counts = np.sort(world.implicit().train.item_counts())[::-1]
    assert counts[: len(counts) // 10].sum() > 0.25 * counts.sum()
    assert counts[0] > 10 * max(np.median(counts), 1)


def test_implicit_split_is_disjoint_per_user_and_every_user_has_test_and_valid(world):
    split = world.implicit()
    tr, va, te = dense(split.train), dense(split.valid), dense(split.test)
    assert not (tr & te).any() and not (tr & va).any() and not (va & te).any()
    # no duplicate events: the dense matrices hold every event once
    assert tr.sum() == len(split.train) and te.sum() == len(split.test) and va.sum() == len(split.valid)
    assert (te.sum(1) >= 1).all() and (va.sum(1) >= 1).all()
    frac = len(split.test) / (len(split.train) + len(split.valid) + len(split.test))
    assert 0.15 < frac < 0.25


def test_true_scores_beat_popularity_by_half_again_on_recall_at_20(world):
    split = world.implicit()
    seen = dense(split.train) | dense(split.valid)
    truth = dense(split.test)
    pop = np.broadcast_to(split.train.item_counts().astype(float), seen.shape).copy()
    r_pop = recall_at(pop, seen, truth)
    r_true = recall_at(world.choice_logits(), seen, truth)
    assert r_true >= 1.5 * r_pop, (r_true, r_pop)


def test_sequences_next_item_follows_previous_cluster_so_a_cluster_oracle_beats_popularity(world):
    seq = world.sequences()
    U, I = seq.n_users, seq.n_items
    assert (seq.valid >= 0).all() and (seq.test >= 0).all()
    full = [np.concatenate([s, [v, t]]) for s, v, t in zip(seq.train, seq.valid, seq.test)]
    assert all(len(np.unique(f)) == len(f) for f in full)       # no repeated item within a user
    same = np.concatenate([world.item_cluster[f[1:]] == world.item_cluster[f[:-1]] for f in full])
    assert same.mean() > 0.8
    # HR@10 of the test item against 100 uniformly sampled unseen items
    rng = np.random.default_rng(0)
    seen = np.zeros((U, I), bool)
    for u, f in enumerate(full):
        seen[u, f] = True
    keys = np.where(seen, np.inf, rng.random((U, I)))
    neg = np.argpartition(keys, 100, axis=1)[:, :100]
    cand = np.column_stack([seq.test, neg])
    counts = np.bincount(np.concatenate(seq.train), minlength=I).astype(float)

    def hr10(scores):
        return float(np.mean((scores[:, 1:] >= scores[:, :1]).sum(1) < 10))

    pop_scores = counts[cand] + rng.random(cand.shape) * 1e-6
    oracle = (world.item_cluster[cand] == world.item_cluster[seq.valid][:, None]) * 1e6 + pop_scores
    assert hr10(oracle) >= 1.5 * hr10(pop_scores), (hr10(oracle), hr10(pop_scores))


def test_ctr_rate_in_range_truth_auc_high_and_probs_match_the_logit(world):
    data = world.ctr(n_examples=6000)
    assert data.schema.names == ["user_id", "age", "gender", "country", "item_id", "category", "brand", "tags",
                                 "price", "hour", "device"]
    assert [f.kind for f in data.schema.fields][7:10] == ["multi", "numeric", "numeric"]
    assert len(data.train) + len(data.valid) + len(data.test) == 6000
    labels = np.concatenate([data.train.labels, data.valid.labels, data.test.labels])
    assert 0.2 <= labels.mean() <= 0.5
    for part in ("valid", "test"):
        prob = data.extra[f"true_prob_{part}"]
        rows = data.extra[f"rows_{part}"]
        logit = world.ctr_logit(rows["users"], rows["items"], rows["hours"], rows["devices"])
        np.testing.assert_allclose(prob, 1 / (1 + np.exp(-logit)))
        assert numpy_auc(getattr(data, part).labels, prob) > 0.75
        assert abs(prob.mean() - getattr(data, part).labels.mean()) < 0.04    # labels drawn from the probs


def test_ctr_interaction_term_carries_signal_beyond_first_order_effects(world):
    data = world.ctr(n_examples=6000)
    rows, y = data.extra["rows_test"], data.test.labels
    full = world.ctr_logit(rows["users"], rows["items"], rows["hours"], rows["devices"])
    inter = world.ctr_interaction * np.einsum("nf,nf->n", world.tastes[rows["users"]],
                                              world.item_factors[rows["items"]])
    assert numpy_auc(y, full) > numpy_auc(y, full - inter) + 0.1


# ------------------------------------------------------------------------------------------ round trips
def test_lightgcn_write_then_load_gives_the_same_split(world, tmp_path):
    split = world.implicit()
    write_lightgcn(split, tmp_path)
    back = load_lightgcn(tmp_path)
    for part in ("train", "valid", "test"):
        a, b = getattr(split, part), getattr(back, part)
        np.testing.assert_array_equal(a.users, b.users)
        np.testing.assert_array_equal(a.items, b.items)
        assert (b.n_users, b.n_items) == (world.n_users, world.n_items)


def test_sasrec_write_then_load_gives_the_same_sequences(world, tmp_path):
    seq = world.sequences()
    write_sasrec(seq, tmp_path / "seq.txt")
    back = load_sasrec(tmp_path / "seq.txt")
    assert back.n_users == seq.n_users and back.n_items == seq.n_items
    np.testing.assert_array_equal(back.valid, seq.valid)
    np.testing.assert_array_equal(back.test, seq.test)
    for a, b in zip(seq.train, back.train):
        np.testing.assert_array_equal(a, b)


def test_libfm_write_then_load_gives_the_same_rows(tmp_path):
    rng = np.random.default_rng(0)
    idx, labels = rng.integers(0, 10**6, (300, 7)), (rng.random(300) < 0.3).astype(np.float32)
    write_libfm(tmp_path / "x.libfm", idx, labels)
    back_idx, back_labels = load_libfm(tmp_path / "x.libfm")
    np.testing.assert_array_equal(back_idx, idx)
    np.testing.assert_array_equal(back_labels, labels)


def test_sasrec_short_users_keep_everything_in_train_like_data_partition(tmp_path):
    (tmp_path / "s.txt").write_text("1 5\n1 6\n2 1\n2 2\n2 3\n2 4\n4 7\n")
    seq = load_sasrec(tmp_path / "s.txt")
    assert seq.n_users == 4 and seq.n_items == 7
    np.testing.assert_array_equal(seq.train[0], [4, 5])
    np.testing.assert_array_equal(seq.train[1], [0, 1])
    assert len(seq.train[2]) == 0
    np.testing.assert_array_equal(seq.valid, [-1, 2, -1, -1])
    np.testing.assert_array_equal(seq.test, [-1, 3, -1, -1])


def test_movielens_formats_parse_to_the_same_interactions(tmp_path):
    rows = [(10, 300, 4, 100), (7, 300, 5, 90), (10, 20, 3, 95), (7, 5, 1, 80)]
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    (tmp_path / "r.csv").write_text("userId,movieId,rating,timestamp\n"
                                    + "".join(f"{u},{i},{r}.0,{t}\n" for u, i, r, t in rows))
    for name in ("u.data", "ratings.dat", "r.csv"):
        m = load_movielens(tmp_path / name)
        np.testing.assert_array_equal(m.raw_users[m.users], [r[0] for r in rows])
        np.testing.assert_array_equal(m.raw_items[m.items], [r[1] for r in rows])
        np.testing.assert_array_equal(m.ratings, [r[2] for r in rows])
        np.testing.assert_array_equal(m.timestamps, [r[3] for r in rows])
        assert (m.n_users, m.n_items) == (2, 3)


def test_leave_last_out_matches_a_per_user_reference():
    rng = np.random.default_rng(1)
    n = 400
    inter = Interactions(rng.integers(0, 30, n), rng.integers(0, 50, n), 30, 50, timestamps=rng.integers(0, 60, n))
    split = split_leave_last_out(inter)
    for u in range(30):
        ev = sorted((inter.timestamps[j], j) for j in np.flatnonzero(inter.users == u))
        items = [int(inter.items[j]) for _, j in ev]
        exp_train, exp_valid, exp_test = (items, [], []) if len(items) < 3 else (items[:-2], items[-2:-1],
                                                                                 items[-1:])
        assert split.train.items[split.train.users == u].tolist() == exp_train
        assert split.valid.items[split.valid.users == u].tolist() == exp_valid
        assert split.test.items[split.test.users == u].tolist() == exp_test


def test_split_ratio_partitions_events_and_puts_the_latest_in_test():
    rng = np.random.default_rng(2)
    n = 2000
    inter = Interactions(rng.integers(0, 40, n), rng.integers(0, 300, n), 40, 300, timestamps=rng.permutation(n))
    split = split_ratio(inter, test=0.2, valid=0.1)
    assert len(split.train) + len(split.valid) + len(split.test) == n
    assert len(split.test) == pytest.approx(0.2 * n, rel=0.1)
    for u in range(40):
        t_train = split.train.timestamps[split.train.users == u]
        t_valid = split.valid.timestamps[split.valid.users == u]
        t_test = split.test.timestamps[split.test.users == u]
        assert len(t_test) >= 1 and len(t_valid) >= 1
        assert t_train.max() < t_valid.min() <= t_valid.max() < t_test.min()
    shuffled = split_ratio(inter, by_time=False, seed=0)
    assert len(shuffled.test) == len(split.test)
    assert not np.array_equal(np.sort(shuffled.test.timestamps), np.sort(split.test.timestamps))


def test_csv_reads_declared_columns_with_missing_numbers_and_multi_values(tmp_path):
    (tmp_path / "x.tsv").write_text("y\tage\tcity\tgenres\tignored\n1\t3.5\tparis\ta|b\tz\n0\t\t\t\tz\n")
    cols, labels = load_csv(tmp_path / "x.tsv", label="y", numeric=["age"], categorical=["city"],
                            multi={"genres": "|"}, sep="\t")
    assert set(cols) == {"age", "city", "genres"}
    np.testing.assert_array_equal(labels, [1, 0])
    assert cols["age"][0] == 3.5 and np.isnan(cols["age"][1])
    assert cols["city"].tolist() == ["paris", None]
    assert cols["genres"] == [["a", "b"], []]


# ------------------------------------------------------------------------------------------ real data
def test_gowalla_counts_match_its_readme():
    split = load_lightgcn(real("gowalla"))
    assert (split.train.n_users, split.train.n_items) == (29_858, 40_981)
    assert (len(split.train), len(split.test)) == (810_128, 217_242)
    assert not (np.unique(split.train.users * 40_981 + split.train.items).size < len(split.train))


def test_video_counts_match_its_readme():
    seq = load_sasrec(real("sasrec-video") / "Video.txt")
    assert (seq.n_users, seq.n_items) == (31_013, 23_715)
    total = sum(len(s) for s in seq.train) + (seq.valid >= 0).sum() + (seq.test >= 0).sum()
    assert total == 287_107
    assert (seq.test < 0).sum() == 112                 # README: 112 users have < 3 items


def test_frappe_rows_and_positives_match_its_readme():
    root = real("frappe")
    x, y = load_libfm(root / "frappe.validation.libfm")
    assert x.shape == (57_722, 10) and y.sum() == 19_063
    data = load_frappe(root, seed=0)
    assert len(data.train) + len(data.valid) == 57_722 and len(data.valid) == 5_772
    assert data.train.labels.sum() + data.valid.labels.sum() == 19_063
    assert len(data.test) == 28_860 and data.test.labels.sum() == 9_536
    assert data.schema.names[:2] == ["user", "item"] and data.schema.n_fields == 10


def test_ctr_samples_parse_with_their_declared_columns():
    root = real("ctr-samples")
    cols, labels = load_csv(root / "criteo_sample.txt", label="label",
                            numeric=[f"I{i}" for i in range(1, 14)], categorical=[f"C{i}" for i in range(1, 27)])
    assert len(labels) == 200 and len(cols) == 39
    assert set(np.unique(labels)) <= {0.0, 1.0}
    assert np.isnan(cols["I1"]).any() and np.isfinite(cols["I2"]).all()
    cols, labels = load_csv(root / "avazu_sample.txt", label="click", categorical=["site_id", "device_type"])
    assert len(labels) == 100 and set(np.unique(labels)) <= {0.0, 1.0}
    ml = load_movielens(root / "movielens_sample.txt")
    assert len(ml) == 200 and ml.ratings.min() >= 1 and ml.ratings.max() <= 5


# ------------------------------------------------------------------------------------------ bad input
def _write(path, text):
    path.write_text(text)
    return path


def test_lightgcn_non_integer_token_makes_string_keys_and_bad_utf8_names_file_and_line(tmp_path):
    _write(tmp_path / "train.txt", "0 1 2\n1 3\n\n2 4 x5 6\n")
    _write(tmp_path / "test.txt", "0 3\n")
    split = load_lightgcn(tmp_path)                   # 'x5' is a key: the item keys are strings as written
    assert split.keys["item"].tolist() == ["1", "2", "3", "4", "6", "x5"] and split.keys["user"].tolist() == [0, 1, 2]
    (tmp_path / "train.txt").write_bytes(b"0 1 2\n1 3\n\n2 4 x\xff 6\n")
    with pytest.raises(DataFormatError, match=r"train\.txt:4: item key is not UTF-8"):
        load_lightgcn(tmp_path)


def test_lightgcn_duplicate_user_line_is_an_error(tmp_path):
    _write(tmp_path / "train.txt", "0 1\n1 2\n0 3\n")
    _write(tmp_path / "test.txt", "")
    with pytest.raises(DataFormatError, match=r"train\.txt:3: user 0"):
        load_lightgcn(tmp_path)


def test_sasrec_bad_lines_name_file_and_line(tmp_path):
    with pytest.raises(DataFormatError, match=r"a\.txt:2: expected 2 fields"):
        load_sasrec(_write(tmp_path / "a.txt", "1 2\n1 2 3\n"))
    with pytest.raises(DataFormatError, match=r"b\.txt:3: NUL byte"):
        load_sasrec(_write(tmp_path / "b.txt", "1 2\n1 3\n0\x00 4\n"))
    with pytest.raises(DataFormatError, match=r"c\.txt:2: user key is not UTF-8"):
        (tmp_path / "c.txt").write_bytes(b"1 2\n\xe9 2\n")
        load_sasrec(tmp_path / "c.txt")
    seq = load_sasrec(_write(tmp_path / "d.txt", "1 2.5\n0 4\n"))        # keys as written, not errors
    assert seq.keys["user"].tolist() == [0, 1] and seq.keys["item"].tolist() == ["2.5", "4"]


def test_libfm_field_count_and_label_errors_name_the_line(tmp_path):
    with pytest.raises(DataFormatError, match=r"f\.libfm:3: row has 2 fields, expected 3"):
        load_libfm(_write(tmp_path / "f.libfm", "1 1:1 2:1 3:1\r\n-1 4:1 5:1 6:1\r\n1 7:1 8:1\r\n"))
    with pytest.raises(DataFormatError, match=r"g\.libfm:2: bad label 2"):
        load_libfm(_write(tmp_path / "g.libfm", "1 1:1 2:1\n2 4:1 5:1\n"))
    with pytest.raises(DataFormatError, match=r"h\.libfm:2: .*'yes'"):
        load_libfm(_write(tmp_path / "h.libfm", "1 1:1 2:1\nyes 4:1 5:1\n"))
    with pytest.raises(DataFormatError, match=r"i\.libfm:2: expected 'label fid:1"):
        load_libfm(_write(tmp_path / "i.libfm", "1 1:1 2:1\n0 4:1:1 5\n"))
    with pytest.raises(DataFormatError, match=r"j\.libfm:1: only one-hot"):
        load_libfm(_write(tmp_path / "j.libfm", "1 1:3 2:1\n"))


def test_csv_missing_column_and_non_numbers_name_file_and_line(tmp_path):
    path = _write(tmp_path / "c.csv", "label,a,b\n1,2.0,x\nzero,3,y\n0,oops,z\n")
    with pytest.raises(DataFormatError, match=r"c\.csv: .*\['missing'\]"):
        load_csv(path, label="label", categorical=["missing"])
    with pytest.raises(DataFormatError, match=r"c\.csv:3: label 'label' is not a number: 'zero'"):
        load_csv(path, label="label", numeric=["a"])
    path = _write(tmp_path / "d.csv", "label,a,b\n1,2.0,x\n0,3,y\n0,oops,z\n")
    with pytest.raises(DataFormatError, match=r"d\.csv:4: numeric column 'a' is not a number: 'oops'"):
        load_csv(path, label="label", numeric=["a"])
    with pytest.raises(DataFormatError, match=r"e\.csv:3: expected 3 fields, got 2"):
        load_csv(_write(tmp_path / "e.csv", "label,a,b\n1,2,x\n0,3\n"), label="label")


def test_movielens_bad_line_names_file_and_line(tmp_path):
    with pytest.raises(DataFormatError, match=r"ratings\.dat:2: expected 4 fields"):
        load_movielens(_write(tmp_path / "ratings.dat", "1::2::3::4\n1::2::3\n"))
