"""Fuzz bundle loading: manifest.json, .npy headers and contents, ONNX files, pipelines.

Each input takes one of the seed bundles (fuzz/make_seeds.py: a LightGCN retrieval bundle, a DeepFM ranking
bundle, a pipeline of both with an int8 index), copies it, and mutates one to three of its files: raw bytes,
overwritten or truncated bytes, a rewritten .npy header (shape, dtype, order) over the same data, a
structurally valid .npy whose values or shape are wrong for the model (ids out of range, rows missing,
another dtype), or a manifest value of another type (a meta entry set to null, a string, a list, a huge
or negative number, NaN). Most inputs then reseal the bundle (every manifest's sha256, sizes and digest
recomputed, innermost first), as a hostile or buggy writer would: the hash checks alone refuse everything
else, and the point is what lies behind them.

The contract: ``Engine.load`` returns or raises ``BundleError`` (any ``RecEngineError``); a loaded engine
answers ``recommend`` for a known user or raises ``RecEngineError``. Anything else (another exception
type, a crash, an ASan / UBSan report) is a finding.

Run through scripts/fuzz.sh; by hand: python fuzz/fuzz_bundle.py -max_total_time=20 [corpus_dir]
(FUZZ_SEEDS names the seed folder, default build/fuzz/seeds).
"""
from __future__ import annotations

import atexit
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import unexpected  # noqa: E402

import numpy as np  # noqa: E402

with atheris.instrument_imports(include=["rec_engine"]):
    import rec_engine  # noqa: F401
    from rec_engine import RecEngineError
    from rec_engine.bundle import _manifest_digest
    from rec_engine.engine import Engine

warnings.simplefilter("ignore")
ROOT = Path(__file__).resolve().parent.parent
SEEDS = Path(os.environ.get("FUZZ_SEEDS", ROOT / "build" / "fuzz" / "seeds"))
BUNDLES = sorted(p for p in SEEDS.iterdir() if p.is_dir()) if SEEDS.is_dir() else []
if not BUNDLES:
    sys.exit(f"fuzz_bundle: no seed bundles in {SEEDS} (run: python fuzz/make_seeds.py {SEEDS})")
FILES = {b: sorted(str(f.relative_to(b)) for f in b.rglob("*") if f.is_file()) for b in BUNDLES}
WORK = Path(tempfile.mkdtemp(prefix="fuzz_bundle.", dir=os.environ.get("FUZZ_WORK") or (
    "/dev/shm" if os.path.isdir("/dev/shm") else None)))
atexit.register(shutil.rmtree, WORK, True)
ALLOWED = (RecEngineError,)
ODD_VALUES = [None, -1, 0, 1, 2**31, 2**63, -2**63, 1e308, -1e308, math.nan, math.inf, "", "x", "float32",
              [], [1], {}, {"a": 1}, True, 0.5]
NPY_DTYPES = ["<f4", "<f2", "<f8", "<i4", "<i8", "|u1", "|i1", ">f4", "|b1", "<u8", "<c8", "|V4", "<M8[s]", "O"]


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def reseal(root: Path) -> None:
    """Recompute every manifest's file entries (sha256, bytes) and digest, innermost manifest first."""
    for m in sorted(root.rglob("manifest.json"), key=lambda p: -len(p.parts)):
        try:
            doc = json.loads(m.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(doc, dict):
            continue
        files = doc.get("files")
        if isinstance(files, dict):
            for rel, info in files.items():
                f = m.parent / rel
                if isinstance(info, dict) and f.is_file() and f.resolve().is_relative_to(root.resolve()):
                    info["sha256"], info["bytes"] = sha256(f), f.stat().st_size
        if "digest" in doc:
            try:
                doc["digest"] = _manifest_digest(doc)
            except (TypeError, ValueError):
                pass
        m.write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=True))


def npy_parts(data: bytes):
    """(header dict, payload bytes) of a .npy file, or None."""
    try:
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        header = np.lib.format._read_array_header(f, version)
        return {"descr": np.lib.format.dtype_to_descr(header[2]), "fortran_order": header[1],
                "shape": header[0]}, data[f.tell():]
    except Exception:  # noqa: BLE001 - a mutated file may be anything
        return None


def npy_bytes(header: dict, payload: bytes) -> bytes:
    body = repr(header).encode("latin1")
    pad = 64 - (10 + len(body) + 1) % 64
    body += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body + payload


def mutate_json(doc, p: atheris.FuzzedDataProvider):
    """Replace (or delete) one value somewhere in doc; returns the new document."""
    path = []
    node = doc
    while isinstance(node, (dict, list)) and node and p.ConsumeIntInRange(0, 3):
        keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        k = keys[p.ConsumeIntInRange(0, len(keys) - 1)]
        path.append(k)
        node = node[k]
    if not path:
        return ODD_VALUES[p.ConsumeIntInRange(0, len(ODD_VALUES) - 1)] if p.ConsumeIntInRange(0, 7) == 0 else doc
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    r = p.ConsumeIntInRange(0, 9)
    if r == 0 and isinstance(parent, dict):
        del parent[path[-1]]
    elif r == 1 and isinstance(node, (int, float)) and not isinstance(node, bool):
        parent[path[-1]] = node + p.ConsumeIntInRange(-3, 3)
    elif r == 2 and isinstance(node, (int, float)) and not isinstance(node, bool):
        parent[path[-1]] = -node if node else 10**p.ConsumeIntInRange(1, 19)
    elif r == 3:
        parent[path[-1]] = p.ConsumeUnicodeNoSurrogates(p.ConsumeIntInRange(0, 12))
    else:
        parent[path[-1]] = ODD_VALUES[p.ConsumeIntInRange(0, len(ODD_VALUES) - 1)]
    return doc


def mutate_npy(data: bytes, p: atheris.FuzzedDataProvider) -> bytes:
    parts = npy_parts(data)
    if parts is None:
        return data
    header, payload = parts
    r = p.ConsumeIntInRange(0, 5)
    if r == 0:                                       # another dtype over the same bytes
        header["descr"] = NPY_DTYPES[p.ConsumeIntInRange(0, len(NPY_DTYPES) - 1)]
    elif r == 1:                                     # another shape over the same bytes
        nd = p.ConsumeIntInRange(0, 3)
        header["shape"] = tuple(p.ConsumeIntInRange(0, 70) if p.ConsumeIntInRange(0, 7) else
                                [2**40, 2**62, -1, 0][p.ConsumeIntInRange(0, 3)] for _ in range(nd))
    elif r == 2:
        header["fortran_order"] = not header["fortran_order"]
    else:                                            # a valid array with wrong content
        try:
            a = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception:  # noqa: BLE001
            return data
        a = np.array(a)
        if r == 3 and a.size:                        # values: out-of-range ids, NaN, extremes
            flat = a.reshape(-1)
            for _ in range(p.ConsumeIntInRange(1, 4)):
                i = p.ConsumeIntInRange(0, flat.size - 1)
                if a.dtype.kind in "iu":
                    info = np.iinfo(a.dtype)
                    flat[i] = [-1, info.max, info.min if a.dtype.kind == "i" else 0, int(flat.max()) + 1,
                               0][p.ConsumeIntInRange(0, 4)]
                elif a.dtype.kind == "f":
                    flat[i] = [np.nan, np.inf, -np.inf, 1e30, 0.0][p.ConsumeIntInRange(0, 4)]
            a = flat.reshape(a.shape)
        elif r == 4 and a.ndim >= 1:                 # rows missing or added
            n = a.shape[0]
            keep = p.ConsumeIntInRange(0, n + 3)
            a = a[:keep] if keep <= n else np.concatenate([a, a[: keep - n]]) if n else a
        else:                                        # another dtype, values converted
            a = a.astype([np.float32, np.float16, np.int32, np.int64, np.uint8][p.ConsumeIntInRange(0, 4)])
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()
    return npy_bytes(header, payload)


def mutate(root: Path, files: list[str], p: atheris.FuzzedDataProvider) -> None:
    rel = files[p.ConsumeIntInRange(0, len(files) - 1)]
    f = root / rel
    data = f.read_bytes()
    kind = p.ConsumeIntInRange(0, 9)
    if rel.endswith("manifest.json") and kind < 6:
        try:
            doc = mutate_json(json.loads(data), p)
            f.write_text(json.dumps(doc, allow_nan=True))
            return
        except ValueError:
            pass
    if rel.endswith(".npy") and kind < 6:
        f.write_bytes(mutate_npy(data, p))
        return
    if kind in (6, 0):                               # truncate
        f.write_bytes(data[: p.ConsumeIntInRange(0, len(data))])
    elif kind == 7:                                  # replace by the fuzzer's bytes
        f.write_bytes(p.ConsumeBytes(p.ConsumeIntInRange(0, 4096)))
    else:                                            # overwrite a few bytes
        b = bytearray(data)
        for _ in range(p.ConsumeIntInRange(1, 8)):
            if b:
                b[p.ConsumeIntInRange(0, len(b) - 1)] = p.ConsumeIntInRange(0, 255)
        f.write_bytes(bytes(b))


def test_one(data: bytes) -> None:
    p = atheris.FuzzedDataProvider(data)
    seed = BUNDLES[p.ConsumeIntInRange(0, len(BUNDLES) - 1)]
    target = WORK / "b"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(seed, target)
    for _ in range(p.ConsumeIntInRange(1, 3)):
        mutate(target, FILES[seed], p)
    if p.ConsumeIntInRange(0, 7):
        reseal(target)
    stage = "load"
    try:
        engine = Engine.load(target, ort_threads=1, num_threads=1)
        stage = "recommend"
        users = engine.user_keys
        if users is not None and len(users):
            key = users.key_array()[0] if hasattr(users, "key_array") else 0
            engine.recommend(key.item() if hasattr(key, "item") else key, k=5)
    except ALLOWED:
        pass
    except Exception as e:  # noqa: BLE001 - anything else is a finding
        unexpected(e, f"bundle.{seed.name}.{stage}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
