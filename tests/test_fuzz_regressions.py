"""Inputs the fuzzers (fuzz/, scripts/fuzz.sh) found to crash or misbehave, each now refused with a documented
error. Under the ASan/UBSan core (scripts/sanitize.sh) the first three were reports (signed overflow,
misaligned loads, a heap-buffer-overflow); in a release build they were silent undefined behaviour."""
import json
import shutil

import numpy as np
import pytest

import rec_engine
from rec_engine import _core
from rec_engine.bundle import BundleError, _manifest_digest, _sha256, open_bundle, write_bundle


def test_adjacency_sizes_whose_sum_overflows_int64_are_refused():
    # graph.cpp added n_users + n_items before checking them (signed overflow: UB, a negative node count)
    e = np.zeros(0, np.int64)
    for n_users, n_items in [(2**62, 2**62), (2**63 - 1, 1), (1, 2**63 - 1), (2**31, 0)]:
        with pytest.raises(ValueError, match="must fit in int32"):
            _core.normalized_adjacency(e, e, n_users, n_items)


def _misaligned(a: np.ndarray) -> np.ndarray:
    buf = np.zeros(a.nbytes + 1, np.uint8)
    v = buf[1:].view(a.dtype).reshape(a.shape)
    v[...] = a
    assert v.flags.c_contiguous and not v.flags.aligned
    return v


def test_misaligned_arrays_are_refused_by_the_core_and_copied_by_the_facade(rng):
    # the core dereferenced int64 / float pointers at odd addresses (UB; a vectorized loop may fault)
    keys = np.array([5, 7, 11], np.int64)
    with pytest.raises(TypeError, match="not aligned"):
        _core.KeyIndex(_misaligned(keys))
    q = rng.normal(size=(2, 8)).astype(np.float32)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    with pytest.raises(TypeError, match="queries must be a C-contiguous float32 array, got .*not aligned"):
        _core.topk(_misaligned(q), x, 3)
    want = rec_engine.topk(q, x, 3)
    got = rec_engine.topk(_misaligned(q), _misaligned(x), 3)
    np.testing.assert_array_equal(got.ids, want.ids)
    index = _core.KeyIndex(keys)     # a misaligned look-up array takes the sequence path: same answer
    np.testing.assert_array_equal(index.lookup(_misaligned(np.array([7, 8, 5], np.int64))), [1, -1, 0])
    t = rec_engine.EmbeddingTable(x)
    np.testing.assert_array_equal(t.gather(_misaligned(np.array([3, 1], np.int64))), x[[3, 1]])
    pooled = t.pool(_misaligned(np.array([0, 1, 2], np.int64)), _misaligned(np.array([0, 2], np.int64)))
    np.testing.assert_allclose(pooled, [x[0] + x[1], x[2]], rtol=1e-6)


def test_exclude_indptr_that_overruns_then_decreases_is_refused_before_reading():
    # check_lists read ids[indptr[q]:indptr[q + 1]] before seeing that a later step decreased: with
    # indptr [0, 100, 3] it read 97 int64 past the end of the 3 ids (heap-buffer-overflow)
    q = np.ones((2, 4), np.float32)
    x = np.ones((10, 4), np.float32)
    ids = np.array([1, 2, 3], np.int64)
    for fn in (lambda ip: _core.topk(q, x, 2, exclude_indptr=ip, exclude_ids=ids),
               lambda ip: _core.topk(q, x, 2, candidates_indptr=ip, candidates_ids=ids)):
        with pytest.raises(ValueError, match="non-decreasing"):
            fn(np.array([0, 100, 3], np.int64))
    packed, corr, scale = _core.quantize_items(x, "int8")
    with pytest.raises(ValueError, match="non-decreasing"):
        _core.topk_quantized(q, x, packed, corr, scale, "int8", 2, 4, exclude_indptr=np.array([0, 100, 3], np.int64),
                             exclude_ids=ids)


# ---------------------------------------------------------------- bundles (fuzz/fuzz_bundle.py)

def _reseal(root):
    """Recompute the manifest's hashes and digest, as a hostile or buggy writer would."""
    m = root / "manifest.json"
    doc = json.loads(m.read_text())
    for rel, info in doc["files"].items():
        info["sha256"], info["bytes"] = _sha256(root / rel), (root / rel).stat().st_size
    doc["digest"] = _manifest_digest(doc)
    m.write_text(json.dumps(doc))


def test_truncated_npy_with_recomputed_hash_is_a_bundle_error(tmp_path):
    p = write_bundle(tmp_path / "b", kind="x", tables={"t": np.ones((4, 3), np.float32)},
                     arrays={"a": np.arange(5)})
    for rel in ("arrays/a.npy", "tables/t.npy"):
        f = p / rel
        f.write_bytes(f.read_bytes()[:20])
    _reseal(p)
    b = open_bundle(p)
    with pytest.raises(BundleError, match="arrays/a.npy: not a readable .npy array"):
        b.array("a")
    with pytest.raises(BundleError, match="tables/t.npy: not a readable .npy array"):
        b.table("t")


@pytest.mark.parametrize("shape", [(4_000_000_000_000, 3), (5, 3), (3, 3), (2, 3, 2, 2)])
def test_npy_header_claiming_other_bytes_than_the_file_holds_is_refused_before_allocating(tmp_path, shape):
    p = write_bundle(tmp_path / "b", kind="x", tables={"t": np.ones((4, 3), np.float32)},
                     arrays={"a": np.ones((4, 3), np.float32)})
    for rel in ("arrays/a.npy", "tables/t.npy"):         # the same 48 data bytes under a header claiming ``shape``
        with open(p / rel, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
            fh.write(np.ones(12, np.float32).tobytes())
    _reseal(p)
    b = open_bundle(p)
    with pytest.raises(BundleError, match="arrays/a.npy: not a readable .npy array: ValueError: header says"):
        b.array("a")
    with pytest.raises(BundleError, match="tables/t.npy: not a readable .npy array"):
        b.table("t", mmap=False)


def test_table_of_a_wrong_shape_is_a_bundle_error(tmp_path):
    p = write_bundle(tmp_path / "b", kind="x", tables={"t": np.ones((4, 3), np.float32)})
    np.save(p / "tables" / "t.npy", np.ones(12, np.float32))
    _reseal(p)
    with pytest.raises(BundleError, match="table 't'"):
        open_bundle(p).table("t")


def test_unloadable_onnx_with_recomputed_hash_is_a_bundle_error(tmp_path):
    from rec_engine.bundle import onnx_session

    with pytest.raises(BundleError, match="cannot be loaded by ONNX Runtime"):
        onnx_session(b"\x08\x07 not a protobuf", what="dense.onnx")


@pytest.fixture
def ranking_bundle(trained, tmp_path):
    p = tmp_path / "deepfm"
    shutil.copytree(trained.bundle("deepfm"), p)
    return p


def _engine_load(p):
    from rec_engine import Engine

    return Engine.load(p, ort_threads=1)


def test_ranking_bundle_with_a_truncated_onnx_is_a_bundle_error(ranking_bundle):
    f = ranking_bundle / "dense.onnx"
    f.write_bytes(f.read_bytes()[:100])
    _reseal(ranking_bundle)
    with pytest.raises(BundleError, match="cannot be loaded by ONNX Runtime"):
        _engine_load(ranking_bundle)


@pytest.mark.parametrize("mutate, match", [
    # a stored feature row past the table: every request of that item failed later with IndexError
    (lambda a: a.__setitem__(0, 2293840), "indices must be table rows"),
    (lambda a: a.__setitem__(0, -1), "indices must be table rows"),
], ids=["row_past_table", "negative_row"])
def test_ranking_feature_store_out_of_range_is_refused_at_load(ranking_bundle, mutate, match):
    f = ranking_bundle / "arrays" / "item_features_indices.npy"
    a = np.load(f)
    mutate(a)
    np.save(f, a)
    _reseal(ranking_bundle)
    with pytest.raises(BundleError, match=match):
        _engine_load(ranking_bundle)


def test_ranking_feature_offsets_that_decrease_are_refused_at_load(ranking_bundle):
    # (a request then failed in np.repeat: "repeats may not contain negative values")
    f = ranking_bundle / "arrays" / "item_features_offsets.npy"
    a = np.load(f)
    a[1], a[2] = a[2], a[1] - 1 if a[1] > 0 else 0
    if not (np.diff(a) < 0).any():
        a[1] = a[2] + 1
    np.save(f, a)
    _reseal(ranking_bundle)
    with pytest.raises(BundleError, match="offsets"):
        _engine_load(ranking_bundle)


def test_ranking_meta_of_a_wrong_type_is_a_bundle_error(ranking_bundle):
    # meta dim {} gave TypeError from int() at load
    m = ranking_bundle / "manifest.json"
    doc = json.loads(m.read_text())
    doc["meta"]["dim"] = {}
    m.write_text(json.dumps(doc))
    _reseal(ranking_bundle)
    with pytest.raises(BundleError, match="malformed"):
        _engine_load(ranking_bundle)


def test_retrieval_bundle_with_decreasing_train_indptr_is_a_bundle_error(trained, tmp_path):
    p = tmp_path / "lightgcn"
    shutil.copytree(trained.bundle("lightgcn"), p)
    f = p / "arrays" / "train_indptr.npy"
    a = np.load(f)
    a[len(a) // 2] = a[-1] + 5
    np.save(f, a)
    _reseal(p)
    with pytest.raises(BundleError):
        _engine_load(p)


def test_npy_header_that_is_not_a_python_literal_is_a_bundle_error(tmp_path):
    # numpy's header parser raised tokenize.TokenError (not a ValueError) for an unterminated literal
    p = write_bundle(tmp_path / "b", kind="x", arrays={"a": np.arange(5)})
    f = p / "arrays" / "a.npy"
    body = b"{'descr': '<i8', 'fortran_order': False, 'shape': (5,"
    body += b" " * (64 - (10 + len(body) + 1) % 64) + b"\n"
    f.write_bytes(b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body + b"\0" * 40)
    _reseal(p)
    with pytest.raises(BundleError, match="not a readable .npy array"):
        open_bundle(p).array("a")


@pytest.mark.parametrize("array, mutate", [
    ("adj_indices", lambda a: a.__setitem__(0, a.max() + 5)),                       # a column past the graph
    ("adj_indptr", lambda a: a.__setitem__(len(a) // 2, a[-1] * 1000 + 7)),         # a step that decreases
], ids=["column_out_of_range", "indptr_decreases"])
def test_lightgcn_fold_in_graph_malformed_is_a_bundle_error(trained, tmp_path, array, mutate):
    # the fold-in set-up at load (whole-graph propagation) raised IndexError / ValueError from spmm
    p = tmp_path / "lightgcn"
    shutil.copytree(trained.bundle("lightgcn"), p)
    f = p / "arrays" / f"{array}.npy"
    a = np.load(f)
    mutate(a)
    np.save(f, a)
    _reseal(p)
    with pytest.raises(BundleError, match="fold-in graph is malformed"):
        _engine_load(p)


def test_lightgcn_layer_weights_of_a_wrong_length_are_a_bundle_error(trained, tmp_path):
    p = tmp_path / "lightgcn"
    shutil.copytree(trained.bundle("lightgcn"), p)
    m = p / "manifest.json"
    doc = json.loads(m.read_text())
    doc["meta"]["layer_weights"] = [1.0]
    m.write_text(json.dumps(doc))
    _reseal(p)
    with pytest.raises(BundleError, match="fold-in graph is malformed"):
        _engine_load(p)


@pytest.mark.parametrize("key, value", [
    ("output", ["logit"]),          # a list: "unhashable type" on the first request
    ("inputs", ["emb", "nope"]),    # a name the ONNX model does not take: ORT's run() refused every request
    ("entity_fields", 3),           # AttributeError at load
    ("dim", float("inf")),          # OverflowError from int() at load
], ids=["output_list", "inputs_unknown", "entity_fields_int", "dim_inf"])
def test_ranking_meta_that_does_not_fit_the_model_is_refused_at_load(ranking_bundle, key, value):
    m = ranking_bundle / "manifest.json"
    doc = json.loads(m.read_text())
    doc["meta"][key] = value
    m.write_text(json.dumps(doc))
    _reseal(ranking_bundle)
    with pytest.raises(BundleError):
        _engine_load(ranking_bundle)


from serving_fixtures import trained  # noqa: E402,F401 (fixture)


@pytest.mark.parametrize("edit", [{"n_candidates": "many"}, {"n_candidates": 0}, {"ranking": {"precision": "int4"}}])
def test_pipeline_manifest_settings_of_the_wrong_kind_are_a_bundle_error(trained, tmp_path, edit):  # noqa: F811
    import json
    import shutil

    from rec_engine.engine import Engine

    src = trained.bundle("pipe_a")
    dst = tmp_path / "pipe"
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["meta"].update(edit)
    if "digest" in m:
        m["digest"] = _manifest_digest(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError):
        Engine.load(dst, num_threads=1)
