"""The user's own ids through the loaders: keys as written (unicode strings, integers beyond int32,
negative integers, numbers written as strings), the generic CSV/TSV interactions loader against a plain
csv-module reading of random files, line-numbered errors, ``--data`` of a CSV, and the real data sets."""
from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest

from rec_engine_train import pipeline
from rec_engine_train.data.containers import (ImplicitSplit, Interactions, SequenceData, dense_ids,
                                              normalize_keys)
from rec_engine_train.data.loaders import (DataFormatError, data_dir, load_interaction_data, load_interactions,
                                           load_lightgcn, load_movielens, load_sasrec, sequences_from_interactions,
                                           split_leave_last_out, split_ratio, write_lightgcn, write_sasrec)
from rec_engine_train.data.synthetic import make_synthetic

BIG = 2**40 + 3
CANONICAL = re.compile(r"0|-?[1-9][0-9]*")


def real(name: str):
    root = data_dir()
    if root is None or not (root / name).exists():
        pytest.skip(f"real data: ../shared/data/{name} not found")
    return root / name


# ------------------------------------------------------------------------------------------ reference
def key_rule(values: list[str]) -> list:
    """The documented rule, in plain Python: ints when every value is a canonical integer fitting int64."""
    if all(CANONICAL.fullmatch(v) and -2**63 <= int(v) < 2**63 for v in values):
        return [int(v) for v in values]
    return list(values)


def check_keys(keys_side: np.ndarray | None, dense: np.ndarray, expected: list) -> None:
    """Dense ids map back to the expected keys (same type, same value), and keys are sorted and distinct."""
    back = list(range(int(dense.max()) + 1)) if keys_side is None else keys_side.tolist()
    got = [back[d] for d in dense.tolist()]
    assert got == expected
    assert all(type(g) is type(e) for g, e in zip(got, expected))
    assert back == sorted(set(back))


# ------------------------------------------------------------------------------------------ containers
def test_normalize_keys_accepts_lists_and_rejects_mixed_repeated_or_miscounted_keys():
    k = normalize_keys({"user": ["b", "a"], "item": [BIG, -1, 7]}, 2, 3)
    assert k["user"].dtype == object and k["user"].tolist() == ["b", "a"]
    assert k["item"].dtype == np.int64 and k["item"].tolist() == [BIG, -1, 7]
    with pytest.raises(ValueError, match="all int or all str"):
        normalize_keys({"user": ["a", 1], "item": [1]})
    with pytest.raises(ValueError, match="distinct"):
        normalize_keys({"user": ["a", "a"], "item": [1]})
    with pytest.raises(ValueError, match="3 item keys for 2 items"):
        normalize_keys({"user": ["a"], "item": [1, 2, 3]}, 1, 2)
    with pytest.raises(ValueError, match="all int or all str"):
        normalize_keys({"user": [True, False], "item": [1]})
    with pytest.raises(ValueError):
        Interactions(np.array([0]), np.array([0]), 1, 1, keys={"user": ["a", "b"], "item": ["x"]})


def test_dense_ids_maps_keys_back_and_unknown_keys_to_minus_one():
    assert dense_ids(np.array([10, BIG, -3]), [BIG, -3, 4]).tolist() == [1, 2, -1]
    keys = np.array(["café-☕", "007", "7"], dtype=object)
    assert dense_ids(keys, ["7", "007", "café-☕", "x"]).tolist() == [2, 1, 0, -1]
    assert dense_ids(keys, [7]).tolist() == [-1]
    assert dense_ids(None, [3, 1]).tolist() == [3, 1]


def test_splits_and_sequences_pass_the_keys_on():
    rng = np.random.default_rng(0)
    keys = {"user": [f"u{i}" for i in range(20)], "item": [BIG + i for i in range(30)]}
    inter = Interactions(rng.integers(0, 20, 300), rng.integers(0, 30, 300), 20, 30,
                         timestamps=rng.integers(0, 50, 300), keys=keys)
    for split in (split_leave_last_out(inter), split_ratio(inter), split_ratio(inter, by_time=False)):
        assert split.keys["user"].tolist() == keys["user"] and split.keys["item"].tolist() == keys["item"]
        assert split.train.keys is split.keys and split.test.keys is split.keys
    seq = sequences_from_interactions(inter)
    assert seq.keys["user"].tolist() == keys["user"]
    with pytest.raises(ValueError):
        SequenceData([np.array([0])], np.array([-1]), np.array([-1]), 1, keys={"user": ["a", "b"], "item": ["x"]})


def test_synthetic_string_keys_change_nothing_but_the_keys():
    plain, named = make_synthetic(n_users=50, n_items=40, seed=2), make_synthetic(n_users=50, n_items=40, seed=2,
                                                                                   string_keys=True)
    a, b = plain.implicit(), named.implicit()
    assert a.keys is None and plain.sequences().keys is None and plain.ctr(n_examples=300).keys is None
    np.testing.assert_array_equal(a.train.items, b.train.items)
    assert b.keys["user"][17] == "u-17" and b.keys["item"][7] == "sku-0007"
    assert b.train.keys is b.keys
    assert named.sequences().keys["item"][39] == "sku-0039"
    assert named.ctr(n_examples=300).keys["user"][0] == "u-0"


# ------------------------------------------------------------------------------------------ formats of ids
def test_lightgcn_keeps_string_big_and_negative_keys_across_its_files(tmp_path):
    (tmp_path / "train.txt").write_text(f"café-☕ {BIG} -5 7\n007 7\n7 {BIG}\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text("7 -5\nnew-user\n", encoding="utf-8")
    split = load_lightgcn(tmp_path)
    assert split.keys["user"].tolist() == sorted(["café-☕", "007", "7", "new-user"])
    assert split.keys["item"].tolist() == [-5, 7, BIG]
    check_keys(split.keys["user"], split.train.users, ["café-☕"] * 3 + ["007", "7"])
    check_keys(split.keys["item"], split.train.items, [BIG, -5, 7, 7, BIG])
    check_keys(split.keys["user"], split.test.users, ["7"])
    assert split.train.n_users == 4 and split.train.n_items == 3


def test_lightgcn_dense_ids_stay_ids_and_sparse_ones_are_renumbered(tmp_path):
    (tmp_path / "train.txt").write_text("0 1 2\n2 5\n")          # user 1 and items 0, 3, 4 have no events
    (tmp_path / "test.txt").write_text("0 3\n")
    split = load_lightgcn(tmp_path)
    assert split.keys is None and (split.train.n_users, split.train.n_items) == (3, 6)
    (tmp_path / "train.txt").write_text(f"0 1 {BIG}\n{BIG} 5\n")
    split = load_lightgcn(tmp_path)
    assert split.keys["user"].tolist() == [0, BIG] and split.keys["item"].tolist() == [1, 3, 5, BIG]
    check_keys(split.keys["item"], split.train.items, [1, BIG, 5])


def test_lightgcn_and_sasrec_write_then_load_keep_string_keys(tmp_path):
    world = make_synthetic(n_users=60, n_items=50, seed=4, string_keys=True)
    split = world.implicit()
    write_lightgcn(split, tmp_path / "lg")
    back = load_lightgcn(tmp_path / "lg")
    for part in ("train", "valid", "test"):
        a, b = getattr(split, part), getattr(back, part)
        pairs = sorted(zip(split.keys["user"][a.users], split.keys["item"][a.items]))
        assert pairs == sorted(zip(back.keys["user"][b.users], back.keys["item"][b.items]))
    seq = world.sequences()
    write_sasrec(seq, tmp_path / "s.txt")
    back = load_sasrec(tmp_path / "s.txt")
    by_key = {back.keys["user"][u]: (back.keys["item"][s].tolist(), back.keys["item"][back.test[u]])
              for u, s in enumerate(back.train)}
    for u, s in enumerate(seq.train):
        assert by_key[seq.keys["user"][u]] == (seq.keys["item"][s].tolist(), seq.keys["item"][seq.test[u]])
    bad = ImplicitSplit(split.train, split.test, keys={"user": [f"u {i}" for i in range(60)],
                                                       "item": split.keys["item"]})
    with pytest.raises(ValueError, match="whitespace"):
        write_lightgcn(bad, tmp_path / "bad")


def test_sasrec_keys_one_based_ids_and_strings(tmp_path):
    (tmp_path / "s.txt").write_text("1 5\n1 6\n2 1\n2 2\n2 3\n2 4\n4 7\n")
    seq = load_sasrec(tmp_path / "s.txt")
    assert seq.keys["user"].tolist() == [1, 2, 3, 4] and seq.keys["item"].tolist() == list(range(1, 8))
    (tmp_path / "t.txt").write_text(f"u-é {BIG}\nu-é 007\nu-é 7\n0 -1\nu-é {BIG}\n", encoding="utf-8")
    seq = load_sasrec(tmp_path / "t.txt")
    assert seq.keys["user"].tolist() == ["0", "u-é"]           # one string key makes the column strings
    assert seq.keys["item"].tolist() == sorted(["-1", "007", "7", str(BIG)])
    u = seq.keys["user"].tolist().index("u-é")
    items = seq.keys["item"]
    assert items[seq.train[u]].tolist() == [str(BIG), "007"]
    assert (items[seq.valid[u]], items[seq.test[u]]) == ("7", str(BIG))


def test_movielens_whitespace_formats_keep_keys(tmp_path):
    rows = [("café", BIG, 4, 100), ("7", -2, 5, 90), ("café", 20, 3.5, 95)]
    (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows), encoding="utf-8")
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows), encoding="utf-8")
    for name in ("u.data", "ratings.dat"):
        m = load_movielens(tmp_path / name)
        check_keys(m.keys["user"], m.users, [r[0] for r in rows])
        check_keys(m.keys["item"], m.items, [r[1] for r in rows])
        np.testing.assert_array_equal(m.ratings, [r[2] for r in rows])
        np.testing.assert_array_equal(m.timestamps, [r[3] for r in rows])
        assert m.raw_users is m.keys["user"] or np.array_equal(m.raw_users, m.keys["user"])


@pytest.mark.parametrize("seed", range(4))
def test_integer_rule_on_random_tokens_matches_the_reference_in_every_loader(tmp_path, seed):
    rng = np.random.default_rng(seed)
    pool = ["0", "7", "-5", "42", str(BIG), str(-BIG), str(2**63 - 1), str(-2**63), str(2**63), str(-2**63 - 1),
            "9" * 19, "1" * 19, "007", "-0", "+7", "00", "1.0", "1e3", "١٢", "x", "café-☕", "-", "7a"]
    plain = ["0", "7", "-5", "42", str(BIG), str(-BIG), str(2**63 - 1), str(-2**63), "1" * 19]
    for trial in range(6):
        src = plain if trial % 2 == 0 else pool
        users = [str(src[i]) for i in rng.integers(0, len(src), 30)]
        items = [str(pool[i]) if trial % 3 == 0 else str(plain[i % len(plain)])
                 for i in rng.integers(0, len(pool), 30)]
        exp_u, exp_i = key_rule(users), key_rule(items)
        (tmp_path / "s.txt").write_text("".join(f"{u} {i}\n" for u, i in zip(users, items)), encoding="utf-8")
        seq = load_sasrec(tmp_path / "s.txt")
        ks = seq.keys or {"user": None, "item": None}
        full = [np.concatenate([s, [v] if v >= 0 else [], [t] if t >= 0 else []]).astype(np.int64)
                for s, v, t in zip(seq.train, seq.valid, seq.test)]
        got = {}
        for u, f in enumerate(full):
            ku = u + 1 if ks["user"] is None else ks["user"][u]
            got[ku] = [i + 1 if ks["item"] is None else ks["item"][i] for i in f.tolist()]
        want = {}
        for u, i in zip(exp_u, exp_i):
            want.setdefault(u, []).append(i)
        assert got == want
        for sep, suffix in ((",", "csv"), ("\t", "tsv")):
            path = tmp_path / f"x.{suffix}"
            buf = io.StringIO()
            csv.writer(buf, delimiter=sep, lineterminator="\n").writerows([["user", "item"], *zip(users, items)])
            path.write_text(buf.getvalue(), encoding="utf-8")
            inter = load_interactions(path)
            check_keys(None if inter.keys is None else inter.keys["user"], inter.users, exp_u)
            check_keys(None if inter.keys is None else inter.keys["item"], inter.items, exp_i)


# ------------------------------------------------------------------------------------------ generic CSV
KEY_POOL = ["café-☕", "007", "7", "0", "-3", str(BIG), "a,b", 'say "hi"', "two\nlines", " padded ", "ü", "1.0"]


def reference_read(text: str, sep: str, user: str, item: str, time: str | None, weight: str | None):
    """A plain reading with the csv module: the rows of the named columns, blank lines skipped."""
    records = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=sep) if r]
    header = [c.strip() for c in records[0]]
    cols = {name: [r[header.index(name)] for r in records[1:]] for name in (user, item, time, weight) if name}
    return cols


@pytest.mark.parametrize("seed", range(10))
def test_generic_loader_matches_a_csv_module_reading_of_random_files(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    quoted = seed % 2 == 1                                  # odd seeds: fields that need quotes
    sep = "\t" if seed % 3 == 0 else ","
    suffix = "tsv" if sep == "\t" else "csv"
    int_users = seed % 4 < 2
    simple = [k for k in KEY_POOL if not any(c in k for c in ',"\n\t')]
    pool = KEY_POOL if quoted else simple
    users = [str(int(rng.integers(-5, 2**45))) if int_users else pool[i] + str(int(rng.integers(0, 4)))
             for i in rng.integers(0, len(pool), n)]
    items = [pool[i] for i in rng.integers(0, len(pool), n)]
    with_time, with_weight = seed % 5 != 0, seed % 2 == 0
    header = ["userId", "extra", "movieId"] + (["timestamp"] if with_time else []) + (["rating"] if with_weight else [])
    rows = []
    for r in range(n):
        row = [users[r], rng.choice(["x", "y, z", 'q"q'] if quoted else ["x", "y"]), items[r]]
        if with_time:
            row.append(str(int(rng.integers(0, 10**10))))
        if with_weight:
            row.append(f"{rng.integers(1, 11) / 2:g}")
        rows.append(row)
    buf = io.StringIO()
    end = "\r\n" if seed % 4 == 3 else "\n"
    writer = csv.writer(buf, delimiter=sep, lineterminator=end)
    writer.writerow(header)
    for r, row in enumerate(rows):
        writer.writerow(row)
        if r % 17 == 5:
            buf.write(end)                                  # a blank line now and then
    text = buf.getvalue()
    path = tmp_path / f"events.{suffix}"
    path.write_bytes((b"\xef\xbb\xbf" if seed == 4 else b"") + text.encode("utf-8"))
    inter = load_interactions(path)
    ref = reference_read(text, sep, "userId", "movieId", "timestamp" if with_time else None,
                         "rating" if with_weight else None)
    check_keys(None if inter.keys is None else inter.keys["user"], inter.users, key_rule(ref["userId"]))
    check_keys(None if inter.keys is None else inter.keys["item"], inter.items, key_rule(ref["movieId"]))
    if with_time:
        np.testing.assert_array_equal(inter.timestamps, [int(v) for v in ref["timestamp"]])
    else:
        assert inter.timestamps is None
    if with_weight:
        np.testing.assert_array_equal(inter.ratings, np.array([float(v) for v in ref["rating"]], np.float32))
        liked = load_interactions(path, min_weight=3)
        keep = [float(v) >= 3 for v in ref["rating"]]
        if any(keep):
            check_keys(liked.keys["user"] if liked.keys else None, liked.users,
                       key_rule([u for u, k in zip(ref["userId"], keep) if k]))
    # the same file with the columns named, and the time column switched off
    named = load_interactions(path, user="userId", item="movieId", time=False, sep=sep)
    assert named.timestamps is None
    np.testing.assert_array_equal(named.users, inter.users)


@pytest.mark.parametrize("case", ["literal quote", "lone CR", "non-ASCII separator", "doubled quotes"])
def test_generic_loader_reads_what_the_csv_module_reads_in_its_corner_cases(tmp_path, case):
    rng = np.random.default_rng(7)
    users = [["ab\"c", "7", "x\"", "007"][i] for i in rng.integers(0, 4, 50)]
    items = [str(BIG + int(i)) for i in rng.integers(0, 5, 50)]
    sep, end = ",", "\n"
    if case == "lone CR":
        end = "\r"
    if case == "non-ASCII separator":
        sep = "§"
    if case == "doubled quotes":
        users = [f'"{u.replace(chr(34), chr(34) * 2)}"' for u in users]
    text = end.join([f"user{sep}item", *(f"{u}{sep}{i}" for u, i in zip(users, items))]) + end
    path = tmp_path / "c.csv"
    path.write_text(text, encoding="utf-8", newline="")
    ref = reference_read(text, sep, "user", "item", None, None)
    inter = load_interactions(path, sep=sep)
    check_keys(inter.keys["user"], inter.users, key_rule(ref["user"]))
    check_keys(inter.keys["item"], inter.items, key_rule(ref["item"]))
    assert inter.keys["item"].dtype == np.int64


def test_generic_loader_errors_name_the_file_and_line(tmp_path):
    def err(text: str, **kw):
        path = tmp_path / "e.csv"
        path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        with pytest.raises(DataFormatError) as e:
            load_interactions(path, **kw)
        return str(e.value)

    assert re.search(r"e\.csv:4: expected 3 fields, got 2", err("user,item,ts\n1,2,3\n\n4,5\n"))
    assert re.search(r"e\.csv:4: expected 3 fields, got 4", err('user,item,ts\n1,"a\nb",3\n4,5,6,7\n'))
    assert re.search(r"e\.csv:2: malformed CSV", err('user,item\n1,"2"x\n'))
    assert re.search(r"e\.csv:3: empty item key", err("user,item\n1,2\n3,\n"))
    assert re.search(r"e\.csv:3: time column 'ts' is neither", err("user,item,ts\n1,2,3\n1,2,soon\n"))
    assert re.search(r"e\.csv:2: weight column 'rating' is not a finite number: 'nan'",
                     err("user,item,rating\n1,2,nan\n"))
    assert re.search(r"e\.csv:3: weight column 'rating' is not a finite number: ''",
                     err('user,item,rating\n1,"2",4\n1,"3",\n'))
    assert re.search(r"e\.csv:2: NUL byte", err(b"user,item\n1,\x002\n"))
    assert re.search(r"e\.csv:3: .*not UTF-8", err(b'user,item\n1,"a"\n2,\xff\n'))
    assert re.search(r"e\.csv:3: item key is not UTF-8", err(b"user,item\n1,a\n2,\xff\n"))
    assert re.search(r"e\.csv: no user column in the header \['who', 'item'\]", err("who,item\n1,2\n"))
    assert re.search(r"e\.csv: no column 'buyer'", err("who,item\n1,2\n", user="buyer"))
    assert re.search(r"e\.csv:1: empty file", err("\n\n"))


def test_generic_loader_reads_date_times_and_guesses_the_separator(tmp_path):
    path = tmp_path / "events.txt"
    path.write_text("customer_id;sku;date\nA;007;2020-01-02\nB;7;2020-01-01T10:00:00\n")
    inter = load_interactions(path)
    assert inter.keys["user"].tolist() == ["A", "B"] and inter.keys["item"].tolist() == ["007", "7"]
    np.testing.assert_array_equal(inter.timestamps, [1577923200, 1577872800])


def test_csv_as_data_source_for_graph_and_sequential_models(tmp_path):
    rng = np.random.default_rng(5)
    lines = ["who\twhat\twhen\tstars"]
    for u in range(30):
        for k in range(6):
            lines.append(f"user-{u}\t{BIG + int(rng.integers(0, 40))}\t{u * 100 + k}\t{1 + k % 5}")
    path = tmp_path / "events.tsv"
    path.write_text("\n".join(lines) + "\n")
    opts = {"user": "who", "item": "what", "time": "when", "weight": "stars"}
    split = pipeline.load_data(str(path), "graph", data_options=opts)
    assert isinstance(split, ImplicitSplit) and len(split.test) == 30 and len(split.valid) == 30
    assert split.keys["user"][split.test.users[0]] == "user-0" and split.keys["item"].dtype == np.int64
    assert sorted(split.test.timestamps.tolist()) == [u * 100 + 5 for u in range(30)]   # each user's last
    liked = pipeline.load_data(str(path), "graph", data_options={**opts, "min_weight": "4"})
    assert len(liked.train) + len(liked.valid) + len(liked.test) == 30 * 2
    rand = pipeline.load_data(str(path), "graph", seed=3, data_options={**opts, "time": "none"})
    assert rand.test.timestamps is None and len(rand.test) == 30
    seq = pipeline.load_data(str(path), "sequential", data_options=opts)
    assert isinstance(seq, SequenceData) and seq.n_users == 30 and (seq.test >= 0).all()
    with pytest.raises(ValueError, match="unknown data option"):
        pipeline.load_data(str(path), "graph", data_options={"colour": "red"})
    # ranking models read the same table as examples (label: at least 4 stars; a seeded 10% of items held out)
    ctr = pipeline.load_data(str(path), "ctr", data_options=opts)
    n_rows = len(lines) - 1
    assert len(ctr.train) + len(ctr.valid) + len(ctr.test) == n_rows
    want = sorted(1.0 if 1 + k % 5 >= 4 else 0.0 for u in range(30) for k in range(6))
    assert sorted(np.concatenate([ctr.train.labels, ctr.valid.labels, ctr.test.labels]).tolist()) == want
    with pytest.raises(ValueError, match="unknown data options"):
        pipeline.load_data(str(path), "ctr", data_options={**opts, "colour": "red"})
    direct = load_interaction_data(path, "graph", options={**opts, "split": "random", "test": "0.5"})
    assert len(direct.test) == 90


# ------------------------------------------------------------------------------------------ real data
def test_movielens_small_loads_without_options_and_keeps_the_movie_ids_of_its_titles():
    root = real("movielens-small")
    split = pipeline.load_data(str(root / "ratings.csv"), "graph")
    assert (split.train.n_users, split.train.n_items) == (610, 9_724)
    assert len(split.train) + len(split.valid) + len(split.test) == 100_836
    assert len(split.test) == 610 and split.keys["user"].tolist() == list(range(1, 611))
    with open(root / "movies.csv", newline="", encoding="utf-8") as f:
        titles = {int(r["movieId"]): r["title"] for r in csv.DictReader(f)}
    items = split.keys["item"]
    assert items.dtype == np.int64 and set(items.tolist()) <= set(titles)
    assert titles[int(items[dense_ids(items, [1])[0]])] == "Toy Story (1995)"
    # user 1's last rating (by time) is the test event, under its own movie id
    with open(root / "ratings.csv", newline="", encoding="utf-8") as f:
        mine = [(int(r["timestamp"]), i, int(r["movieId"])) for i, r in enumerate(csv.DictReader(f))
                if r["userId"] == "1"]
    u1 = dense_ids(split.keys["user"], [1])[0]
    assert items[split.test.items[split.test.users == u1]].tolist() == [max(mine)[2]]
    named = pipeline.load_data(str(root / "ratings.csv"), "graph",
                               data_options={"user": "userId", "item": "movieId", "time": "timestamp"})
    np.testing.assert_array_equal(named.test.items, split.test.items)
    same_dir = pipeline.load_data(str(root), "graph")
    np.testing.assert_array_equal(same_dir.train.items, split.train.items)


def test_real_id_files_keep_their_ids():
    split = load_lightgcn(real("gowalla"))
    assert split.keys is None                              # its ids are 0..n-1: the dense ids are the keys
    seq = load_sasrec(real("sasrec-video") / "Video.txt")
    assert seq.keys["user"].tolist() == list(range(1, 31_014)) and len(seq.keys["item"]) == 23_715
