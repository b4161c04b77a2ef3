"""Item content at training time: the items file, its texts encoded, and the map from content vectors into a
retrieval model's item space (what ``rec-engine train --items items.csv`` adds to an mf / lightgcn / ngcf bundle).

- :func:`read_items` reads a CSV/TSV of items (a key column and title / description / genre / tag columns,
  named by options, ``|``-separated lists allowed; rows of one key are merged), optionally with a second file
  of one row per (item, tag) such as MovieLens's ``tags.csv``, aggregated per item (most used tags first);
- :func:`item_content` builds each trained item's text with :func:`rec_engine.content.item_text` (the function
  serving uses) and encodes it with the content encoder (:class:`rec_engine.content.ContentEncoder`, a bundle
  from ``rec-engine content-encoder``; exported once to a cache folder when none is given);
- :func:`fit_content_map` fits ridge regression from content vectors to the trained item vectors (the vectors
  retrieval scans: LightGCN's propagated ones), with its ridge chosen by exact leave-one-out error;
- :func:`content_bundle_parts` gives the arrays and meta that :func:`~rec_engine_train.export_graph.export_graph`
  writes into the bundle:

  ``arrays/content_vectors.npy``  float32 (float16 when the tables are float16 / int8) ``[n_items, 384]``, row
  ``i`` the unit content vector of dense item ``i`` (the bundle's item id order); all zeros for an item the
  items file does not describe;
  ``arrays/content_map.npy``  float32 ``[385, D]``: a new item with content vector ``c`` (float32 ``[384]``)
  gets the retrieval vector ``[c, 1] @ W`` (the last row is the intercept);
  ``meta["content"]``  ``{"dim", "encoder_sha256", "encoder_weights_sha256", "encoder_model", "ridge",
  "fit_r2", "cv_r2", "n_fit", "n_missing", "min_count", "vectors_dtype", "text", "source"}`` (see
  :func:`content_bundle_parts`).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

ITEMS_OPTIONS = {
    "key": "the item key column (default: found by name: item, item_id, itemId, movieId, ...)",
    "title": "the title column (alias text=; default: title / name / text if present; 'none': none)",
    "description": "a longer text column (default: description / overview / plot / summary if present)",
    "genres": "a genre column, '|'-separated lists allowed (default: genres / genre / category if present)",
    "tags": "a tag column, '|'-separated lists allowed (default: tags / tag if present)",
    "tags_file": "a second CSV/TSV of one row per (item, tag), e.g. MovieLens tags.csv, aggregated per item",
    "tags_key": "the item key column of tags_file (default: found by name, as key)",
    "tags_column": "the tag column of tags_file (default: tag / tags)",
    "max_tags": "keep each item's N most used tags from tags_file (default 20)",
    "sep": "the field separator of the items file(s): a character, 'tab' (default: by suffix, else guessed)",
    "keywords": "store each described item's N keyphrases (ContentEncoder.keywords; default 0: none)",
    "reviews_file": "a CSV/TSV of one row per (item, review text); each item's sentiment is the mean VADER "
                    "compound score of its reviews (stored as item_sentiment)",
    "reviews_key": "the item key column of reviews_file (default: found by name, as key)",
    "reviews_column": "the text column of reviews_file (default: review / text / comment / tag)",
}
_TEXT_ROLES = {"title": ("title", "name", "text"), "description": ("description", "overview", "plot", "summary"),
               "genres": ("genres", "genre", "category", "categories"), "tags": ("tags", "tag")}
DEFAULT_MAX_TAGS = 20
CONTENT_DIM = 384


class ItemsFileError(ValueError):
    """The items file or its options are wrong (a missing column, an unknown option, no text column)."""


@dataclass
class ItemFields:
    """The fields of one item, as :func:`rec_engine.content.item_text` takes them."""

    title: str | None = None
    description: str | None = None
    genres: list = field(default_factory=list)
    tags: list = field(default_factory=list)
    reviews: list = field(default_factory=list)     # review texts (reviews_file): sentiment only, not encoded

    def text(self) -> str:
        from rec_engine.content import item_text

        return item_text(title=self.title, description=self.description, genres=self.genres, tags=self.tags)


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


def _pick(names: Sequence[str], given, candidates: Sequence[str], role: str, path) -> str | None:
    """The column for ``role``: ``given`` (must exist; 'none' / '' / False: no column), else the first header
    name matching ``candidates`` (case, ``_``, ``-``, spaces ignored), else None."""
    if given is False or (isinstance(given, str) and given.lower() in ("", "none")):
        return None
    if given is not None:
        given = str(given)
        if given not in names:
            raise ItemsFileError(f"{path}: no column {given!r} (the {role} column) in the header {list(names)}")
        return given
    normed: dict[str, str] = {}
    for n in names:
        normed.setdefault(_norm(n), n)
    return next((normed[c] for c in map(_norm, candidates) if c in normed), None)


def _sep(opts: Mapping) -> str | None:
    s = opts.get("sep")
    if s in (None, ""):
        return None
    return {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "space": " "}.get(str(s), str(s))


def _column_text(table, name: str) -> list[str]:
    return [b.decode("utf-8", "replace").strip() for b in table.text(name).tolist()]


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split("|") if v.strip()]


def read_items(path, options: Mapping | None = None) -> dict[str, ItemFields]:
    """Read an items file: ``{key (as written, str): ItemFields}`` in file order.

    ``options`` (values may be strings, as ``--items-option KEY=VALUE`` gives them) are those of
    :data:`ITEMS_OPTIONS`; ``text`` is another name for ``title``. Columns not named are found by their usual
    names; a named column that is not in the header raises :class:`ItemsFileError` naming it. Rows with the same
    key are merged (the first non-empty title / description; genres and tags joined without repeats). With
    ``tags_file``, its rows (one per item and tag) add each item's ``max_tags`` most used tags (ties: first
    used first) after the items file's own tags; keys of tags_file not in the items file get items of their own.
    """
    from .data.loaders import _find_column, _read_table

    opts = dict(options or {})
    opts.pop("keywords", None)               # not about reading the file: see item_content
    if "text" in opts:
        if "title" in opts:
            raise ItemsFileError("give the title column once: text= and title= name the same role")
        opts["title"] = opts.pop("text")
    unknown = sorted(set(opts) - set(ITEMS_OPTIONS))
    if unknown:
        raise ItemsFileError(f"unknown items option(s) {unknown}; known: text, {', '.join(ITEMS_OPTIONS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"items file {path} does not exist")
    sep = _sep(opts)
    table = _read_table(path, sep)
    if opts.get("key") not in (None, ""):
        key_col = _pick(table.names, opts["key"], (), "key", path)
    else:
        key_col = _find_column(table, "item", None, required=True)
    cols = {role: _pick(table.names, opts.get(role), cands, role, path) for role, cands in _TEXT_ROLES.items()}
    cols = {role: c for role, c in cols.items() if c is not None and c != key_col}
    if not cols and not opts.get("tags_file"):
        raise ItemsFileError(f"{path}: no text column (title, description, genres or tags) in the header "
                             f"{table.names}: name one with text=COLUMN, genres=COLUMN, ...")
    keys = _column_text(table, key_col)
    values = {role: _column_text(table, c) for role, c in cols.items()}
    items: dict[str, ItemFields] = {}
    for r, key in enumerate(keys):
        if not key:
            raise ItemsFileError(f"{path}:{table.line(r)}: empty item key (column {key_col!r})")
        it = items.get(key)
        if it is None:
            it = items[key] = ItemFields()
        for role in ("title", "description"):
            v = values.get(role)
            if v is not None and v[r] and not getattr(it, role):
                setattr(it, role, v[r])
        for role in ("genres", "tags"):
            v = values.get(role)
            if v is not None and v[r]:
                have = {x.lower() for x in getattr(it, role)}
                getattr(it, role).extend(x for x in _split_list(v[r]) if x.lower() not in have
                                         and not have.add(x.lower()))
    if opts.get("tags_file"):
        _add_tag_file(items, Path(str(opts["tags_file"])), opts, sep, key_col)
    elif any(k in opts for k in ("tags_key", "tags_column", "max_tags")):
        raise ItemsFileError("tags_key / tags_column / max_tags apply to a tags_file: give tags_file=PATH")
    if opts.get("reviews_file"):
        _add_reviews(items, Path(str(opts["reviews_file"])), opts, sep, key_col)
    elif any(k in opts for k in ("reviews_key", "reviews_column")):
        raise ItemsFileError("reviews_key / reviews_column apply to a reviews_file: give reviews_file=PATH")
    return items


def _add_reviews(items: dict, path: Path, opts: Mapping, sep, key_col: str) -> None:
    """Each row of ``path`` (item key, review text) appends the text to its item's reviews (items the items
    file does not describe are left out: a review alone is not an item)."""
    from .data.loaders import _find_column, _read_table

    if not path.is_file():
        raise FileNotFoundError(f"reviews_file {path} does not exist")
    table = _read_table(path, sep)
    given = opts.get("reviews_key")
    if given not in (None, ""):
        kcol = _pick(table.names, given, (), "reviews_key", path)
    elif key_col in table.names:
        kcol = key_col
    else:
        kcol = _find_column(table, "item", None, required=True)
    tcol = _pick(table.names, opts.get("reviews_column"), ("review", "text", "comment", "body", "tag"),
                 "reviews_column", path)
    if tcol is None:
        raise ItemsFileError(f"{path}: no review text column in the header {table.names}: name it with "
                             f"reviews_column=COLUMN")
    for key, text in zip(_column_text(table, kcol), _column_text(table, tcol)):
        it = items.get(key)
        if it is not None and text:
            it.reviews.append(text)


def _add_tag_file(items: dict, path: Path, opts: Mapping, sep, key_col: str) -> None:
    from .data.loaders import _find_column, _read_table

    if not path.is_file():
        raise FileNotFoundError(f"tags_file {path} does not exist")
    table = _read_table(path, sep)
    given = opts.get("tags_key")
    if given not in (None, ""):
        kcol = _pick(table.names, given, (), "tags_key", path)
    elif key_col in table.names:
        kcol = key_col
    else:
        kcol = _find_column(table, "item", None, required=True)
    tcol = _pick(table.names, opts.get("tags_column"), ("tag", "tags"), "tags_column", path)
    if tcol is None:
        raise ItemsFileError(f"{path}: no tag column in the header {table.names}: name it with tags_column=COLUMN")
    try:
        max_tags = int(opts.get("max_tags", DEFAULT_MAX_TAGS))
    except (TypeError, ValueError):
        raise ItemsFileError(f"max_tags must be an integer, got {opts.get('max_tags')!r}") from None
    counts: dict[str, dict[str, list]] = {}          # key -> lowercased tag -> [count, first row, spelling]
    for r, (key, tag) in enumerate(zip(_column_text(table, kcol), _column_text(table, tcol))):
        if not key:
            raise ItemsFileError(f"{path}:{table.line(r)}: empty item key (column {kcol!r})")
        for t in _split_list(tag):
            c = counts.setdefault(key, {}).setdefault(" ".join(t.split()).lower(), [0, r, t])
            c[0] += 1
    for key, tags in counts.items():
        ranked = sorted(tags.values(), key=lambda c: (-c[0], c[1]))[:max(max_tags, 0)]
        it = items.setdefault(key, ItemFields())
        have = {x.lower() for x in it.tags}
        it.tags.extend(c[2] for c in ranked if c[2].lower() not in have and not have.add(c[2].lower()))


def item_keys_as_text(keys: np.ndarray | None, n_items: int) -> list[str]:
    """The data's item keys in dense-id order as the items file writes them (integers in decimal)."""
    if keys is None:
        return [str(i) for i in range(n_items)]
    return [str(k) for k in np.asarray(keys).tolist()]


def texts_for_keys(items: Mapping[str, ItemFields], keys: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Each key's item text (``""`` for a key the items do not describe) and whether it had one (bool [n])."""
    texts, has = [], np.zeros(len(keys), bool)
    for i, k in enumerate(keys):
        it = items.get(k)
        t = it.text() if it is not None else ""
        texts.append(t)
        has[i] = bool(t)
    return texts, has


# ------------------------------------------------------------------------------------------ the encoder
def default_encoder_dir() -> Path:
    """Where an exported encoder is kept between runs: ``$REC_ENGINE_CACHE/content_encoder``, else
    ``$XDG_CACHE_HOME/rec_engine/content_encoder``, else ``~/.cache/rec_engine/content_encoder``."""
    base = os.environ.get("REC_ENGINE_CACHE")
    if base:
        return Path(base) / "content_encoder"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rec_engine" / "content_encoder"


def load_encoder(path=None, *, log: Callable[[str], None] = print, ort_threads: int = 0):
    """The content encoder of the bundle at ``path`` (``rec-engine content-encoder --out DIR``); with None the one
    cached at :func:`default_encoder_dir`, exported there first (about ten seconds, needs torch) if absent."""
    from rec_engine.bundle import BundleError
    from rec_engine.content import ContentEncoder

    if path is None:
        path = default_encoder_dir()
        try:
            return ContentEncoder.load(path, ort_threads=ort_threads)
        except BundleError:
            from .export_content import export_encoder

            log(f"content encoder: exporting it once to {path} (pass --content-encoder DIR to use another)")
            export_encoder(path, overwrite=path.exists())
    return ContentEncoder.load(path, ort_threads=ort_threads)


def encoder_info(encoder) -> dict:
    """What identifies an encoder bundle: ``encoder_sha256`` (of its ``encoder.onnx``, as its manifest lists it),
    ``encoder_weights_sha256`` (of the package weights it was exported from: the same for every export of the
    same model) and ``encoder_model``."""
    files = encoder.bundle.manifest.get("files", {})
    return {"encoder_sha256": files.get("encoder.onnx", {}).get("sha256"),
            "encoder_weights_sha256": encoder.meta.get("weights_sha256"),
            "encoder_model": encoder.meta.get("model")}


@dataclass
class ItemContent:
    """The content of a data set's items, in its dense item id order."""

    vectors: np.ndarray          # float32 [n_items, dim], unit rows; zeros where has is False
    has: np.ndarray              # bool [n_items]: the items file describes the item
    info: dict                   # encoder_info(...) plus "text" (the options) and "source" (the files)
    texts: list = field(default_factory=list)
    keywords: list | None = None  # per item: its keyphrases, best first (items option keywords=N)
    labels: list | None = None    # per item: its genres then its tags (the items file's lists), [] without
    sentiment: np.ndarray | None = None   # float32 [n_items]: mean VADER compound of its reviews, NaN without


def encode_texts(encoder, texts: Sequence[str], has: np.ndarray | None = None, batch_size: int = 64) -> np.ndarray:
    """float32 ``[len(texts), dim]``: the encoder's vectors of the texts, zeros where ``has`` is False."""
    has = np.ones(len(texts), bool) if has is None else np.asarray(has, bool)
    out = np.zeros((len(texts), encoder.dim), np.float32)
    rows = np.flatnonzero(has)
    if rows.size:
        out[rows] = encoder.encode([texts[i] for i in rows], batch_size=batch_size, cache=False)
    return out


def item_content(item_keys: np.ndarray | None, n_items: int, items_path, options: Mapping | None = None, *,
                 encoder=None, encoder_path=None, log: Callable[[str], None] = print) -> ItemContent:
    """Read ``items_path`` (:func:`read_items`), match it to the data's items (``item_keys`` in dense-id order,
    None: the keys are ``0..n_items-1``) and encode each item's text. ``encoder``: a loaded ContentEncoder, else
    the one at ``encoder_path`` (:func:`load_encoder`). Raises ItemsFileError when no item of the data is
    described."""
    import time

    items = read_items(items_path, options)
    keys = item_keys_as_text(item_keys, n_items)
    texts, has = texts_for_keys(items, keys)
    if not has.any():
        sample = ", ".join(list(items)[:3])
        raise ItemsFileError(f"{items_path}: none of its {len(items)} keys ({sample}, ...) is an item of the data "
                             f"({', '.join(keys[:3])}, ...); is key= the right column?")
    if encoder is None:
        encoder = load_encoder(encoder_path, log=log)
    t0 = time.perf_counter()
    vectors = encode_texts(encoder, texts, has)
    log(f"content: {int(has.sum())} of {n_items} items described by {items_path} ({len(items)} keys in it), "
        f"encoded in {time.perf_counter() - t0:.1f}s")
    opts = dict(options or {})
    try:
        n_kw = int(opts.get("keywords", 0))
    except ValueError:
        raise ItemsFileError(f"keywords must be a number of phrases, got {opts['keywords']!r}") from None
    keywords = None
    if n_kw > 0:
        t0 = time.perf_counter()
        keywords = [[p for p, _ in encoder.keywords(texts[i], vectors[i], n=n_kw)] if has[i] else []
                    for i in range(n_items)]
        log(f"content: {n_kw} keyphrases per item in {time.perf_counter() - t0:.1f}s")
    source = {"items": str(items_path), **({"tags_file": str(opts["tags_file"])} if opts.get("tags_file") else {})}
    info = {**encoder_info(encoder), "text": {k: str(v) for k, v in opts.items() if k != "tags_file"},
            "source": source}
    labels = [list(dict.fromkeys([*items[k].genres, *items[k].tags])) if k in items else [] for k in keys]
    sentiment = None
    if opts.get("reviews_file"):
        from rec_engine.content import sentiment as vader

        t0 = time.perf_counter()
        reviews = [items[k].reviews if k in items else [] for k in keys]
        flat = [r for rs in reviews for r in rs]
        scores = vader(flat) if flat else np.zeros(0, np.float32)
        counts = np.array([len(rs) for rs in reviews], np.int64)
        sums = np.add.reduceat(np.append(scores, 0.0), np.concatenate([[0], np.cumsum(counts)[:-1]]))
        with np.errstate(invalid="ignore"):
            sentiment = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)
        log(f"content: sentiment of {len(flat)} reviews of {int((counts > 0).sum())} items in "
            f"{time.perf_counter() - t0:.1f}s")
    return ItemContent(vectors, has, info, texts, keywords, labels, sentiment)


# ------------------------------------------------------------------------------------------ the ridge map
@dataclass
class ContentMap:
    """Ridge regression from content vectors to item vectors: ``[c, 1] @ weights``."""

    weights: np.ndarray          # float32 [dim + 1, D]; the last row is the intercept
    ridge: float                 # the L2 penalty (on the content rows only; the intercept is not penalized)
    fit_r2: float                # R^2 on the items it was fitted on (all output dims pooled)
    cv_r2: float                 # leave-one-out R^2 at the chosen ridge
    n_fit: int

    def predict(self, content: np.ndarray) -> np.ndarray:
        c = np.asarray(content, np.float32)
        return c @ self.weights[:-1] + self.weights[-1]


def fit_content_map(content: np.ndarray, targets: np.ndarray, ridge: float | Sequence[float] | None = None, *,
                    max_cv_rows: int = 50_000, seed: int = 0) -> ContentMap:
    """Fit ridge regression ``targets ~ [content, 1] @ W`` (the intercept not penalized).

    Parameters
    ----------
    content : float ``[n, d]``  content vectors of the items to fit on
    targets : float ``[n, D]``  their item vectors
    ridge : float, sequence of floats or None  the penalty, or candidates to choose from by exact leave-one-out
        error (None: 19 values from 1e-4 to 1e2 times the mean eigenvalue of the centred content's Gram matrix)
    max_cv_rows : int  the leave-one-out error is averaged over at most this many (seeded) rows

    The fit goes through the eigendecomposition of the ``d x d`` Gram matrix, so every candidate costs one
    pass over the rows; ``fit_r2`` is in-sample, ``cv_r2`` the leave-one-out R^2 of the chosen penalty.
    """
    X = np.asarray(content, np.float64)
    Y = np.asarray(targets, np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"content [n, d] and targets [n, D] must have the same rows, got {X.shape} and {Y.shape}")
    n = X.shape[0]
    if n < 2:
        raise ValueError(f"a content map needs at least 2 items to fit on, got {n}")
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise ValueError("content and targets must be finite")
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    evals, V = np.linalg.eigh(Xc.T @ Xc)
    evals = np.maximum(evals, 0.0)
    P = Xc @ V                                           # [n, d]: the rows in the eigenbasis
    A = P.T @ Yc                                         # [d, D]
    ss_tot = float((Yc ** 2).sum()) or 1.0
    if ridge is None:
        base = max(float(evals.sum()) / max(len(evals), 1), 1e-12)
        candidates = list(base * np.geomspace(1e-4, 1e2, 19))
    elif np.ndim(ridge) == 0:
        candidates = [float(ridge)]
    else:
        candidates = [float(r) for r in ridge]
    if not candidates or any(not np.isfinite(r) or r < 0 for r in candidates):
        raise ValueError(f"ridge must be finite values >= 0, got {ridge!r}")
    rows = np.arange(n) if n <= max_cv_rows else np.sort(np.random.default_rng(seed).choice(n, max_cv_rows, False))
    Pr, Yr = P[rows], Yc[rows]
    best = None
    for lam in candidates:
        inv = 1.0 / np.maximum(evals + lam, 1e-12)
        fitted = (Pr * inv) @ A
        h = 1.0 / n + (Pr ** 2) @ inv                     # the hat matrix's diagonal (intercept included)
        loo = (Yr - fitted) / np.maximum(1.0 - h, 1e-6)[:, None]
        err = float((loo ** 2).sum()) / len(rows)
        if best is None or err < best[0]:
            best = (err, lam)
    err, lam = best
    inv = 1.0 / np.maximum(evals + lam, 1e-12)
    B = V @ (inv[:, None] * A)                           # [d, D]
    bias = my - mx @ B
    resid = Yc - P @ (inv[:, None] * A)
    fit_r2 = 1.0 - float((resid ** 2).sum()) / ss_tot
    cv_r2 = 1.0 - err * len(rows) / max(float((Yr ** 2).sum()), 1e-300)
    W = np.vstack([B, bias[None, :]]).astype(np.float32)
    return ContentMap(np.ascontiguousarray(W), float(lam), fit_r2, cv_r2, n)


def content_bundle_parts(content: ItemContent, item_vectors: np.ndarray, *, vectors_dtype: str = "float32",
                         ridge=None, item_counts: np.ndarray | None = None, min_count: int = 1) -> tuple[dict, dict]:
    """The arrays and the meta entry a retrieval bundle stores for its items' content.

    ``item_vectors``: the bundle's item vectors (the ``items`` table, float32 ``[n_items, D]``); the map is
    fitted on the items with text and (given ``item_counts``, the train interactions per item) at least
    ``min_count`` train interactions: an item never trained on keeps its initial vector, which the map should
    not learn. Returns ``({"content_vectors": [n_items, dim] vectors_dtype,
    "content_map": float32 [dim + 1, D]}, meta)`` where meta (``meta["content"]``) holds ``dim``,
    ``encoder_sha256``, ``encoder_weights_sha256``, ``encoder_model``, ``ridge``, ``fit_r2``, ``cv_r2``,
    ``n_fit`` (the items fitted on), ``n_missing`` (items without text), ``min_count``, ``vectors_dtype``,
    ``text`` (the items options) and ``source`` (the files)."""
    if vectors_dtype not in ("float32", "float16"):
        raise ValueError(f"vectors_dtype must be float32 or float16, got {vectors_dtype!r}")
    items = np.asarray(item_vectors, np.float32)
    if content.vectors.shape[0] != items.shape[0]:
        raise ValueError(f"content covers {content.vectors.shape[0]} items, the model has {items.shape[0]}")
    fit = content.has.copy()
    if item_counts is not None:
        counts = np.asarray(item_counts)
        if counts.shape != (items.shape[0],):
            raise ValueError(f"item_counts must hold {items.shape[0]} counts, got shape {counts.shape}")
        fit &= counts >= min_count
    fit_rows = np.flatnonzero(fit)
    if fit_rows.size < 2:
        raise ValueError(f"the content map needs at least 2 items with text and >= {min_count} train interactions, "
                         f"got {fit_rows.size}")
    cmap = fit_content_map(content.vectors[fit_rows], items[fit_rows], ridge)
    arrays = {"content_vectors": np.ascontiguousarray(content.vectors, dtype=vectors_dtype),
              "content_map": cmap.weights}
    if content.keywords is not None:          # item i's phrases: utf8[offsets[i]:offsets[i+1]], split on "\x1f"
        arrays.update(string_lists_arrays("item_keywords", content.keywords))
    if content.labels is not None and any(content.labels):      # genres and tags, the same layout
        arrays.update(string_lists_arrays("item_labels", content.labels))
    if content.sentiment is not None:
        arrays["item_sentiment"] = np.asarray(content.sentiment, np.float32)
    meta = {"dim": int(content.vectors.shape[1]), **content.info, "ridge": cmap.ridge,
            "fit_r2": round(cmap.fit_r2, 6), "cv_r2": round(cmap.cv_r2, 6), "n_fit": cmap.n_fit,
            "n_missing": int((~content.has).sum()), "min_count": int(min_count) if item_counts is not None else 0,
            "vectors_dtype": vectors_dtype}
    return arrays, meta


def string_lists_arrays(name: str, lists: Sequence[Sequence[str]]) -> dict:
    """``{name_utf8, name_offsets}``: item ``i``'s strings are ``utf8[offsets[i]:offsets[i+1]]`` joined by
    ``"\x1f"`` (what :func:`rec_engine.engine.read_string_lists` reads back)."""
    blobs = ["\x1f".join(k).encode("utf-8") for k in lists]
    offsets = np.zeros(len(blobs) + 1, np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return {f"{name}_utf8": np.frombuffer(b"".join(blobs), np.uint8) if offsets[-1] else np.zeros(0, np.uint8),
            f"{name}_offsets": offsets}


def texts_sha256(texts: Sequence[str]) -> str:
    """A digest of a list of texts (for caching their vectors)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
