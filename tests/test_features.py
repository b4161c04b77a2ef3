"""Feature schema: vocabularies, hashed buckets, the bag layout, and agreement with torch's embedding_bag."""
import zlib

import numpy as np
import pytest

from rec_engine import EmbeddingTable
from rec_engine.features import EncodedBatch, Field, Schema


@pytest.fixture
def schema():
    cols = {"city": ["paris", "rome", "paris", None, "oslo"],
            "tags": [["a", "b"], [], ["a"], None, ["c", "a", "b"]],
            "price": [1.0, 3.0, None, 5.0, 7.0]}
    return Schema.fit(cols, {"tags": "multi", "price": "numeric"}, hash_buckets=3)


def test_fit_orders_vocab_by_frequency_then_value_and_computes_numeric_stats(schema):
    city, tags, price = schema.fields
    assert city.vocab == ("paris", "oslo", "rome")
    assert tags.vocab == ("a", "b", "c")
    assert price.mean == pytest.approx(4.0) and price.std == pytest.approx(np.std([1, 3, 5, 7]))
    assert list(schema.field_offsets) == [0, 6, 12, 13]
    assert schema.n_rows == 13


def test_encode_layout_matches_hand_computed_bags(schema):
    enc = schema.encode({"city": ["rome", None], "tags": [["b", "c"], ["a"]], "price": [6.0, None]}, labels=[1, 0])
    s = np.std([1, 3, 5, 7])
    # example 0: city=rome -> row 2; tags b,c -> rows 6+1, 6+2 weights 1/2; price -> row 12 weight (6-4)/s
    # example 1: city missing -> empty bag; tags a -> row 6; price missing -> empty bag
    assert list(enc.offsets) == [0, 1, 3, 4, 4, 5, 5]
    assert list(enc.indices) == [2, 7, 8, 12, 6]
    np.testing.assert_allclose(enc.weights, [1, 0.5, 0.5, 2 / s, 1], rtol=1e-6)
    assert list(enc.labels) == [1, 0]
    assert len(enc) == 2


def test_unknown_values_go_to_their_crc32_hash_bucket(schema):
    enc = schema.encode({"city": ["tokyo"], "tags": [["zz"]], "price": [4.0]})
    assert enc.indices[0] == 3 + zlib.crc32(b"tokyo") % 3
    assert enc.indices[1] == 6 + 3 + zlib.crc32(b"zz") % 3
    assert enc.weights[2] == 0.0


def test_encode_rows_equals_encode_columns(schema):
    rows = [{"city": "oslo", "tags": ["a"], "price": 2.0}, {"tags": ["c"]}]
    a = schema.encode_rows(rows)
    b = schema.encode({"city": ["oslo", None], "tags": [["a"], ["c"]], "price": [2.0, None]})
    for x, y in ((a.indices, b.indices), (a.offsets, b.offsets), (a.weights, b.weights)):
        np.testing.assert_array_equal(x, y)


def test_integer_and_text_values_are_the_same_key():
    s = Schema([Field("id", vocab=("1", "2", "3"), hash_buckets=1)])
    a = s.encode({"id": np.array([3, 1, 2])})
    b = s.encode({"id": ["3", "1", "2"]})
    c = s.encode({"id": [3.0, 1.0, 2.0]})
    np.testing.assert_array_equal(a.indices, [2, 0, 1])
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.indices, c.indices)


def test_take_selects_examples_in_any_order_with_repeats(schema, rng):
    cols = {"city": ["paris", "rome", None, "x", "oslo", "rome"],
            "tags": [["a"], [], ["b", "c"], None, ["a", "b", "c"], ["c"]],
            "price": [1.0, None, 2.0, 3.0, 4.0, 5.0]}
    enc = schema.encode(cols, labels=np.arange(6))
    rows = np.array([4, 0, 4, 2, 5])
    taken = enc.take(rows)
    ref = schema.encode({k: [v[r] for r in rows] for k, v in cols.items()}, labels=rows)
    for x, y in ((taken.indices, ref.indices), (taken.offsets, ref.offsets), (taken.weights, ref.weights),
                 (taken.labels, ref.labels)):
        np.testing.assert_array_equal(x, y)


def test_core_pool_equals_torch_embedding_bag_on_encoded_batch(schema, rng):
    torch = pytest.importorskip("torch")
    cols = {"city": list(rng.choice(["paris", "rome", "oslo", "new", None], 200)),
            "tags": [list(rng.choice(["a", "b", "c", "d"], rng.integers(0, 4))) for _ in range(200)],
            "price": list(rng.normal(4, 2, 200))}
    enc = schema.encode(cols)
    w = rng.normal(size=(schema.n_rows, 5)).astype(np.float32)
    ours = EmbeddingTable(w).pool(enc.indices, enc.offsets, enc.weights, mode="sum", include_last_offset=True)
    ref = torch.nn.functional.embedding_bag(torch.from_numpy(enc.indices), torch.from_numpy(w),
                                            torch.from_numpy(enc.offsets), mode="sum",
                                            per_sample_weights=torch.from_numpy(enc.weights),
                                            include_last_offset=True).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.shape == (200 * 3, 5)


def test_schema_round_trips_through_dict(schema):
    again = Schema.from_dict(schema.to_dict())
    assert again == schema
    assert list(again.field_offsets) == list(schema.field_offsets)


@pytest.mark.parametrize("bad, match", [
    ({"city": ["a"], "tags": [["a"]]}, "missing \\['price'\\]"),
    ({"city": ["a"], "tags": [["a"]], "price": [1.0], "other": [1]}, "unknown \\['other'\\]"),
    ({"city": ["a", "b"], "tags": [["a"]], "price": [1.0]}, "column 'tags' has 1 values, expected 2"),
    ({"city": ["a"], "tags": [["a"]], "price": ["cheap"]}, "not a number"),
])
def test_encode_rejects_columns_that_do_not_match(schema, bad, match):
    with pytest.raises(ValueError, match=match):
        schema.encode(bad)


def test_multi_field_rejects_a_plain_string(schema):
    with pytest.raises(TypeError, match="multi-valued"):
        schema.encode({"city": ["a"], "tags": ["ab"], "price": [1.0]})


def test_field_and_schema_validation():
    with pytest.raises(ValueError, match="kind"):
        Field("x", kind="dense")
    with pytest.raises(ValueError, match="duplicate"):
        Field("x", vocab=("a", "a"))
    with pytest.raises(ValueError, match="unique"):
        Schema([Field("x"), Field("x")])
    with pytest.raises(ValueError, match="at least one field"):
        Schema([])
    with pytest.raises(ValueError, match="unknown keys"):
        Schema.from_dict({"fields": [{"name": "x", "colour": 1}]})
    closed = Schema([Field("x", vocab=("a",), hash_buckets=0)])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        closed.encode({"x": ["b"]})


def test_empty_batch_encodes_to_no_bags(schema):
    enc = schema.encode({"city": [], "tags": [], "price": []})
    assert len(enc) == 0 and list(enc.offsets) == [0] and enc.indices.size == 0
    assert isinstance(enc, EncodedBatch)


def test_one_example_fast_path_equals_the_vectorized_encoding(rng):
    # one example (a request's context) skips the vectorized path: the same bags as that path gives the
    # example inside a batch, for every kind of scalar, missing values, hashing, transforms and field subsets
    s = Schema([Field("c", "categorical", vocab=["a", "1", "2.5", "True"], hash_buckets=3),
                Field("d", "categorical", vocab=["x"], hash_buckets=0),
                Field("n", "numeric", transform="log1p", mean=0.3, std=2.0),
                Field("m", "numeric", mean=-1.0, std=0.5),
                Field("t", "multi", vocab=["p", "q"], hash_buckets=1)])
    values = {"c": ["a", 1, 1.0, 2.5, np.int64(1), np.float32(2.5), True, np.bool_(True), b"a", "zzz", None, "",
                    float("nan"), np.str_("a")],
              "d": ["x", None, ""],
              "n": [0.0, 3, -2.5, None, float("nan"), np.float64(1e6), "4.5"],
              "m": [1.5, None, np.int32(7)]}
    for trial in range(300):
        row = {f: values[f][rng.integers(len(values[f]))] for f in values}
        fields = ["c", "d", "n", "m"] if trial % 3 else ["m", "c"]
        one = s.encode({f: [row[f]] for f in fields}, fields=fields)
        two = s.encode({f: [row[f], "x" if f == "d" else None] for f in fields}, fields=fields)  # vectorized
        first = two.take(np.array([0]))
        for a, b in ((one.indices, first.indices), (one.offsets, first.offsets), (one.weights, first.weights)):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
        assert one.n_fields == len(fields) and one.labels is None
    # a multi field, a list in a categorical one and labels take the general path, with its errors
    multi = s.encode({"c": ["a"], "d": ["x"], "n": [1.0], "m": [2.0], "t": [["p", "zz"]]})
    assert multi.offsets.tolist() == [0, 1, 2, 3, 4, 6]
    with pytest.raises(ValueError, match="single-valued"):
        s.encode({"c": [["a", "1"]]}, fields=["c"])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        s.encode({"d": ["nope"]}, fields=["d"])
    assert s.encode({"c": ["a"]}, [1.0], fields=["c"]).labels.tolist() == [1.0]
