"""The bundle: a versioned directory that carries a trained model from training to serving.

Layout::

    manifest.json          format_version, kind, created, files {relative path: {sha256, bytes}}, meta
    tables/<name>.npy      embedding tables (float32 / float16, or uint8 codes + <name>.scale_bias.npy)
    arrays/<name>.npy      other arrays (item ids, popularity, CSR parts of a graph, ...)
    <name>.onnx            dense / attention parts, dynamic batch axis; tables stay outside the graph

``meta`` holds what the model's kind needs (schema, dims, vocabularies, metric values, config). The
manifest is written last, and the directory is written beside the target and renamed into place, so a
reader never sees a half-written bundle. :func:`open_bundle` checks every file's size and sha256 before
anything is used.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ._core import RecEngineError
from .embedding import EmbeddingTable
from .keys import KeyMap

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TABLE_DTYPES = ("float32", "float16", "int8")


class BundleError(RecEngineError):
    """A bundle is missing, corrupt, of an unknown format, or does not hold what was asked for."""


def onnx_session(model, sess_options=None, *, what: str = "ONNX model"):
    """An ONNX Runtime CPU session of a bundle's model (a path or the serialized bytes). A model ONNX Runtime
    cannot load (truncated, not a protobuf, an invalid graph) raises :class:`BundleError`, not ONNX
    Runtime's own exception types."""
    import onnxruntime as ort

    src = model if isinstance(model, (bytes, bytearray)) else str(model)
    try:
        return ort.InferenceSession(src, sess_options=sess_options, providers=["CPUExecutionProvider"])
    except Exception as e:
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        raise BundleError(f"{what} cannot be loaded by ONNX Runtime: {e}") from None


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    """np.load of a bundle file; a malformed file (header, size, dtype) raises BundleError naming it."""
    try:
        with open(path, "rb") as fh:            # header first: the array's bytes must be exactly what the file holds,
            version = np.lib.format.read_magic(fh)          # so nothing is allocated from a header's claim alone
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = read(fh)
            need = fh.tell() + math.prod(shape) * dtype.itemsize
            have = os.fstat(fh.fileno()).st_size
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        if need != have:
            raise ValueError(f"header says shape {shape} of {dtype} ({need} bytes with the header), the file has "
                             f"{have} bytes")
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:   # numpy's header parser raises ValueError, EOFError, SyntaxError, TokenError, ...
        raise BundleError(f"{path}: not a readable .npy array: {type(e).__name__}: {e}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"a bundle entry name must be a plain file name, got {name!r}")
    return name


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def write_bundle(path: str | os.PathLike, *, kind: str, meta: Mapping[str, Any] | None = None,
                 tables: Mapping[str, np.ndarray] | None = None, arrays: Mapping[str, np.ndarray] | None = None,
                 onnx: Mapping[str, bytes | str | os.PathLike] | None = None, table_dtype: str = "float32",
                 keys: Mapping[str, Any] | None = None, files: Mapping[str, bytes | str | os.PathLike] | None = None,
                 overwrite: bool = False) -> Path:
    """Write a bundle directory at ``path`` and return it.

    Parameters
    ----------
    kind : str
        The model kind, e.g. "deepfm", "lightgcn", "sasrec"; serving dispatches on it.
    meta : mapping
        JSON-serializable description (schema, dims, config, metrics, ...), stored in the manifest.
    tables : mapping of name -> float array (rows, dim)
        Embedding tables, stored as ``table_dtype`` ("float32", "float16" or row-wise "int8").
    arrays : mapping of name -> array
        Other arrays, stored as they are (``.npy``, no pickles).
    onnx : mapping of name -> serialized model bytes or a path to an ``.onnx`` file
    keys : mapping of entity ("user", "item") -> its keys in dense-id order, optional
        The user's own keys (all int or all str, distinct: a duplicate is a ValueError naming it), stored
        as arrays ``<entity>_keys*`` (see :mod:`rec_engine.keys`); an entity without keys is served by its
        dense ids.
    files : mapping of name -> bytes or a path to a file, optional
        Other files stored as they are at the bundle's top level (e.g. ``tokenizer.json``); read back with
        :meth:`Bundle.file_path`.
    overwrite : bool
        Replace an existing bundle at ``path`` (atomically: the old one stays until the new is complete).
    """
    if table_dtype not in TABLE_DTYPES:
        raise ValueError(f"table_dtype must be one of {TABLE_DTYPES}, got {table_dtype!r}")
    if not isinstance(kind, str) or not kind:
        raise ValueError("kind must be a non-empty string")
    plain_files = dict(files or {})
    key_arrays: dict[str, np.ndarray] = {}
    for entity, given in (keys or {}).items():
        if entity not in ("user", "item"):
            raise ValueError(f"keys are given for 'user' and 'item', got {entity!r}")
        if given is not None:
            km = given if isinstance(given, KeyMap) else KeyMap.from_keys(given)
            key_arrays.update(km.to_arrays(entity))
    clash = set(key_arrays) & set(arrays or {})
    if clash:
        raise ValueError(f"arrays {sorted(clash)} are reserved for the key maps")
    path = Path(path)
    with _staging(path, overwrite) as tmp:
        files: dict[str, dict] = {}
        table_info: dict[str, dict] = {}

        def put(rel: str, writer):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            writer(target)
            files[rel] = {"sha256": _sha256(target), "bytes": target.stat().st_size}

        for name, w in (tables or {}).items():
            _check_name(name)
            t = EmbeddingTable.quantize(w, table_dtype)
            put(f"tables/{name}.npy", lambda p, a=t.weights: np.save(p, a, allow_pickle=False))
            if t.scale_bias is not None:
                put(f"tables/{name}.scale_bias.npy", lambda p, a=t.scale_bias: np.save(p, a, allow_pickle=False))
            table_info[name] = {"rows": t.rows, "dim": t.dim, "dtype": t.dtype}
        for name, a in {**(arrays or {}), **key_arrays}.items():
            _check_name(name)
            a = np.asarray(a)
            if a.dtype == object:
                raise TypeError(f"array {name!r} has dtype object; bundles hold numeric arrays only")
            put(f"arrays/{name}.npy", lambda p, a=a: np.save(p, a, allow_pickle=False))
        for name, model in (onnx or {}).items():
            _check_name(name)
            if isinstance(model, (bytes, bytearray)):
                put(f"{name}.onnx", lambda p, b=model: p.write_bytes(bytes(b)))
            else:
                put(f"{name}.onnx", lambda p, src=model: shutil.copyfile(src, p))
        for name, data in plain_files.items():
            _check_name(name)
            if name == MANIFEST or name.endswith(".onnx"):
                raise ValueError(f"file name {name!r} is reserved (the manifest, or an ONNX model: pass it as onnx=)")
            if isinstance(data, (bytes, bytearray)):
                put(name, lambda p, b=data: p.write_bytes(bytes(b)))
            else:
                put(name, lambda p, src=data: shutil.copyfile(src, p))
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tables": table_info,
            "files": files,
            "meta": _jsonable(dict(meta or {})),
        }
        manifest["digest"] = _manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


INDEX_PRECISIONS = ("float32", "int8", "bf16")
# the ranking model's dense part: as trained, int8 weights (ONNX Runtime), or its products in bf16x3 / bf16 on
# AMX-BF16 tiles (rec_engine._core.DenseNet; float32 where the tiles are not available)
RANKING_PRECISIONS = ("float32", "int8", "bf16x3", "bf16")


def write_pipeline(path: str | os.PathLike, *, retrieval: str | os.PathLike | None = None,
                   ranking: str | os.PathLike | None = None, n_candidates: int = 500, index: str = "float32",
                   ranking_precision: str = "float32", overwrite: bool = False) -> Path:
    """Combine a retrieval bundle and a ranking bundle (either may be None) into a pipeline bundle at
    ``path``: both are copied in, and the pipeline's manifest pins their manifests by sha256.

    ``index`` is the scan the engine serves retrieval with by default: ``"float32"`` (exact), or ``"int8"`` /
    ``"bf16"`` (a reduced-precision scan whose shortlist is checked against its error bound and re-scored in
    float32, :class:`~rec_engine.topk.ItemIndex`: the same candidates as float32): the index arrays are built
    here and stored in the pipeline (``arrays/index_<precision>_{packed,corr,scale}.npy``, memory-mapped at
    load, so worker processes share them), and its recall of the exact top ``n_candidates`` on a sample of
    users (1.0 unless the index was built with ``exact=False``) goes to ``meta["index"]``.

    ``ranking_precision="int8"`` also stores the ranking model's dense part with int8 weights
    (``dense_int8.onnx``, :func:`rec_engine.ranking.quantize_dense`; needs the onnx package here, not at serving
    time), served by default, with its agreement with the float32 model in ``meta["ranking"]``;
    ``"bf16x3"`` / ``"bf16"`` store the setting (the products of the dense part's hidden layers on AMX-BF16 tiles
    where the serving CPU has them) with the agreement measured on this machine (``tiles``: whether it ran them)."""
    if retrieval is None and ranking is None:
        raise ValueError("a pipeline needs a retrieval bundle, a ranking bundle, or both")
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    if index not in INDEX_PRECISIONS:
        raise ValueError(f"index must be one of {INDEX_PRECISIONS}, got {index!r}")
    stages = {name: open_bundle(src) for name, src in (("retrieval", retrieval), ("ranking", ranking))
              if src is not None}
    if ranking_precision not in RANKING_PRECISIONS:
        raise ValueError(f"ranking_precision must be one of {RANKING_PRECISIONS}, got {ranking_precision!r}")
    ranking_meta, dense_int8 = {"precision": ranking_precision}, None
    if ranking_precision != "float32":
        if "ranking" not in stages:
            raise ValueError(f"ranking_precision={ranking_precision!r} needs a ranking stage")
        from .ranking import dense_agreement, quantize_dense

        if ranking_precision == "int8":
            dense_int8 = quantize_dense(stages["ranking"].onnx_path("dense"))
            ranking_meta.update(dense_agreement(stages["ranking"], dense_int8, n=n_candidates))
        else:
            ranking_meta.update(dense_agreement(stages["ranking"], n=n_candidates, matmul_precision=ranking_precision))
    index_arrays, index_meta = {}, {"precision": index}
    if index != "float32":
        if "retrieval" not in stages:
            raise ValueError(f"index={index!r} needs a retrieval stage")
        from .retrieval import build_index   # (retrieval imports this module)

        built, index_meta = build_index(stages["retrieval"], index, n_candidates)
        index_arrays = {f"index_{index}_{name}": getattr(built, name) for name in ("packed", "corr", "scale")}
    path = Path(path)
    with _staging(path, overwrite) as tmp:
        files = {}
        for name, b in stages.items():
            shutil.copytree(b.path, tmp / name)
            files[f"{name}/{MANIFEST}"] = {"sha256": _sha256(tmp / name / MANIFEST),
                                           "bytes": (tmp / name / MANIFEST).stat().st_size}
        for name, a in index_arrays.items():
            target = tmp / "arrays" / f"{name}.npy"
            target.parent.mkdir(exist_ok=True)
            np.save(target, np.ascontiguousarray(a), allow_pickle=False)
            files[f"arrays/{name}.npy"] = {"sha256": _sha256(target), "bytes": target.stat().st_size}
        if dense_int8 is not None:
            (tmp / "dense_int8.onnx").write_bytes(dense_int8)
            files["dense_int8.onnx"] = {"sha256": _sha256(tmp / "dense_int8.onnx"), "bytes": len(dense_int8)}
        manifest = {"format_version": FORMAT_VERSION, "kind": "pipeline",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tables": {}, "files": files,
                    "meta": _jsonable({"stages": {name: name for name in stages}, "n_candidates": int(n_candidates),
                                       "kinds": {name: b.kind for name, b in stages.items()}, "index": index_meta,
                                       "ranking": ranking_meta})}
        manifest["digest"] = _manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


def _manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content without its own ``digest`` (canonical JSON): a manifest edited by
    hand (a meta value changed) no longer matches it, and the bundle is refused at load."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextlib.contextmanager
def _staging(path: Path, overwrite: bool):
    """A temporary directory beside ``path`` to write a bundle into; renamed to ``path`` when the block
    ends normally (replacing what is there only then), removed when it raises."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)                      # every file's bytes on disk before any name points at them
    if path.exists():
        if _exchange(tmp, path):          # one atomic step: the bundle path never stops existing
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "b")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)               # and the rename itself


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(d))


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


class Bundle:
    """A bundle opened for reading (see :func:`open_bundle`)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def meta(self) -> dict:
        return self.manifest["meta"]

    @property
    def table_names(self) -> list[str]:
        return sorted(self.manifest["tables"])

    def _file(self, rel: str) -> Path:
        if rel not in self.manifest["files"]:
            raise BundleError(f"bundle {self.path} has no {rel}")
        return self.path / rel

    def has(self, rel: str) -> bool:
        return rel in self.manifest["files"]

    def table(self, name: str, *, mmap: bool = True) -> EmbeddingTable:
        """The embedding table ``name``, memory-mapped by default (no copy into memory)."""
        if name not in self.manifest["tables"]:
            raise BundleError(f"bundle {self.path} has no table {name!r} (it has {self.table_names})")
        sb = f"tables/{name}.scale_bias.npy"
        w = _load_npy(self._file(f"tables/{name}.npy"), mmap)
        s = _load_npy(self._file(sb), mmap) if self.has(sb) else None
        try:
            return EmbeddingTable(w, s)
        except (ValueError, TypeError) as e:    # a wrong dtype, shape or scale/bias
            raise BundleError(f"bundle {self.path}: table {name!r}: {e}") from None

    def array(self, name: str, *, mmap: bool = False) -> np.ndarray:
        """The array ``name``; BundleError when its file is not a readable ``.npy`` array."""
        return _load_npy(self._file(f"arrays/{name}.npy"), mmap)

    def key_map(self, entity: str, n: int) -> KeyMap:
        """The ``entity``'s ("user" / "item") key map of ``n`` keys (memory-mapped; the identity when the
        bundle stores no keys). Raises BundleError when the stored map is malformed or of another size."""
        names = [f"{entity}_keys", f"{entity}_keys_utf8", f"{entity}_keys_offsets"]
        arrays = {nm: self.array(nm, mmap=True) for nm in names if self.has(f"arrays/{nm}.npy")}
        try:
            return KeyMap.from_arrays(arrays, entity, n)
        except (ValueError, TypeError) as e:
            raise BundleError(f"bundle {self.path}: {e}") from None

    def onnx_path(self, name: str) -> Path:
        return self._file(f"{name}.onnx")

    def file_path(self, name: str) -> Path:
        """The path of a plain file stored with ``write_bundle(files=...)``; BundleError when there is none."""
        return self._file(name)

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, kind={self.kind!r})"


def open_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Open the bundle at ``path``: read its manifest and (``verify=True``) check every listed file's size
    and sha256. Raises :class:`BundleError` naming the file at fault."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path} is not a bundle directory")
    if not mpath.is_file():
        raise BundleError(f"{path} has no {MANIFEST}: not a bundle, or not completely written")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} does not hold a JSON object")
    for key, typ in (("format_version", int), ("kind", str), ("files", dict), ("tables", dict), ("meta", dict)):
        if not isinstance(manifest.get(key), typ):
            raise BundleError(f"{mpath}: '{key}' is missing or not a {typ.__name__}")
    if "digest" in manifest and manifest["digest"] != _manifest_digest(manifest):
        raise BundleError(f"{mpath} does not match its digest: the manifest was edited or corrupted")
    if manifest["format_version"] > FORMAT_VERSION or manifest["format_version"] < 1:
        raise BundleError(f"{mpath}: format_version {manifest['format_version']} is not supported "
                          f"(this rec_engine reads up to {FORMAT_VERSION})")
    for rel, info in manifest["files"].items():
        f = (path / rel).resolve()
        if path.resolve() not in f.parents:
            raise BundleError(f"{mpath}: file entry {rel!r} points outside the bundle")
        if not f.is_file():
            raise BundleError(f"bundle {path}: file {rel} is missing")
        if not isinstance(info, dict) or "sha256" not in info or "bytes" not in info:
            raise BundleError(f"{mpath}: entry for {rel} lacks sha256/bytes")
        if f.stat().st_size != info["bytes"]:
            raise BundleError(f"bundle {path}: {rel} has {f.stat().st_size} bytes, the manifest says {info['bytes']}")
        if verify and _sha256(f) != info["sha256"]:
            raise BundleError(f"bundle {path}: {rel} does not match its sha256 (corrupt or changed)")
    return Bundle(path, manifest)
