"""Bundles: what is written comes back, and a bundle that cannot be trusted is refused with a clear error."""
import json
import mmap

import numpy as np
import pytest

from rec_engine.bundle import FORMAT_VERSION, BundleError, _manifest_digest, open_bundle, write_bundle


@pytest.fixture
def bundle_dir(tmp_path, rng):
    w = rng.normal(size=(50, 8)).astype(np.float32)
    p = write_bundle(tmp_path / "b", kind="mf", meta={"dim": 8, "metrics": {"recall@20": np.float32(0.5)}},
                     tables={"items": w}, arrays={"counts": np.arange(50)}, onnx={"dense": b"not really onnx"})
    return p, w


def test_round_trip_tables_arrays_meta(bundle_dir):
    p, w = bundle_dir
    b = open_bundle(p)
    assert b.kind == "mf" and b.meta["dim"] == 8 and b.meta["metrics"]["recall@20"] == 0.5
    t = b.table("items")
    assert t.dtype == "float32"
    np.testing.assert_array_equal(t.to_numpy(), w)
    base = t.weights                                  # memory-mapped, not read into memory
    while base is not None and not isinstance(base, (np.memmap, mmap.mmap)):
        base = base.base
    assert base is not None
    np.testing.assert_array_equal(b.array("counts"), np.arange(50))
    assert b.onnx_path("dense").read_bytes() == b"not really onnx"
    m = json.loads((p / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION
    assert set(m["files"]) == {"tables/items.npy", "arrays/counts.npy", "dense.onnx"}


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-2), ("int8", None)])
def test_reduced_precision_tables(tmp_path, rng, dtype, tol):
    w = rng.normal(size=(40, 16)).astype(np.float32)
    b = open_bundle(write_bundle(tmp_path / dtype, kind="x", tables={"t": w}, table_dtype=dtype))
    t = b.table("t")
    assert t.dtype == dtype
    err = np.abs(t.to_numpy() - w)
    bound = tol if tol is not None else ((w.max(1) - w.min(1)) / 255 / 2 + 1e-6)[:, None]
    assert (err <= bound).all()


def test_corrupt_file_is_refused_naming_it(bundle_dir):
    p, _ = bundle_dir
    f = p / "tables" / "items.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="tables/items.npy does not match its sha256"):
        open_bundle(p)


def test_truncated_and_missing_files_are_refused(bundle_dir):
    p, _ = bundle_dir
    f = p / "arrays" / "counts.npy"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(BundleError, match="arrays/counts.npy has .* bytes"):
        open_bundle(p)
    f.unlink()
    with pytest.raises(BundleError, match="arrays/counts.npy is missing"):
        open_bundle(p)


@pytest.mark.parametrize("mutate, match", [
    (lambda m: "{not json", "not valid JSON"),
    (lambda m: json.dumps({**m, "format_version": FORMAT_VERSION + 1}), "format_version .* not supported"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "kind"}), "'kind' is missing"),
    (lambda m: json.dumps({**m, "files": {**m["files"], "../escape": {"sha256": "0", "bytes": 1}}}), "outside the bundle"),
])
def test_bad_manifest_is_refused(bundle_dir, mutate, match):
    p, _ = bundle_dir
    mp = p / "manifest.json"
    text = mutate(json.loads(mp.read_text()))
    try:                                   # sealed again, so each check is reached, not the digest's
        doc = json.loads(text)
        doc["digest"] = _manifest_digest(doc)
        text = json.dumps(doc)
    except (ValueError, TypeError):
        pass
    mp.write_text(text)
    with pytest.raises(BundleError, match=match):
        open_bundle(p)


def test_a_hand_edited_manifest_is_refused_and_older_ones_without_a_digest_load(bundle_dir):
    p, _ = bundle_dir
    mp = p / "manifest.json"
    doc = json.loads(mp.read_text())
    doc["meta"]["n_layers"] = 7
    mp.write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="does not match its digest"):
        open_bundle(p)
    doc.pop("digest")                     # a bundle written before manifests carried a digest
    mp.write_text(json.dumps(doc))
    assert open_bundle(p).meta["n_layers"] == 7


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a bundle directory"):
        open_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        open_bundle(tmp_path / "empty")


def test_asking_for_an_absent_entry(bundle_dir):
    b = open_bundle(bundle_dir[0])
    with pytest.raises(BundleError, match="no table 'users'"):
        b.table("users")
    with pytest.raises(BundleError, match="no arrays/nope.npy"):
        b.array("nope")


def test_overwrite_is_explicit_and_replaces_atomically(bundle_dir, rng):
    p, _ = bundle_dir
    with pytest.raises(FileExistsError):
        write_bundle(p, kind="mf")
    w2 = rng.normal(size=(3, 2)).astype(np.float32)
    write_bundle(p, kind="lightgcn", tables={"items": w2}, overwrite=True)
    b = open_bundle(p)
    assert b.kind == "lightgcn"
    np.testing.assert_array_equal(b.table("items").to_numpy(), w2)
    assert not b.has("arrays/counts.npy")
    assert [q.name for q in p.parent.iterdir()] == [p.name]      # no temporary directories left behind


def test_bad_writer_arguments_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        write_bundle(tmp_path / "b", kind="x", tables={"../t": np.zeros((1, 1))})
    with pytest.raises(TypeError, match="dtype object"):
        write_bundle(tmp_path / "b", kind="x", arrays={"a": np.array([1, "x"], dtype=object)})
    with pytest.raises(ValueError, match="table_dtype"):
        write_bundle(tmp_path / "b", kind="x", table_dtype="bf16")
    assert list(tmp_path.iterdir()) == []


def test_overwriting_a_bundle_swaps_it_in_one_step_and_leaves_no_staging(tmp_path, monkeypatch):
    import os as _os

    from rec_engine import bundle as b

    path = tmp_path / "b"
    b.write_bundle(path, kind="mf", arrays={"x": np.arange(3)})
    renames = []
    real = _os.replace
    monkeypatch.setattr(b.os, "replace", lambda s, d: (renames.append((s, d)), real(s, d))[1])
    b.write_bundle(path, kind="mf", arrays={"x": np.arange(5)}, overwrite=True)
    (tmp_path / "p1").mkdir()
    (tmp_path / "p2").mkdir()
    (tmp_path / "p1" / "one").write_text("1")
    exchanged = b._exchange(tmp_path / "p1", tmp_path / "p2")     # can this system swap two paths?
    if exchanged:
        assert (tmp_path / "p2" / "one").exists()
    assert renames == ([] if exchanged else renames[:2])       # one atomic exchange, else two renames
    for p in ("p1", "p2"):
        import shutil
        shutil.rmtree(tmp_path / p)
    assert b.open_bundle(path).array("x").tolist() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
