"""Loaders (and writers) of the real data formats: LightGCN text splits, SASRec sequences, libfm rows
(Frappe), CSV/TSV with a declared schema, and MovieLens ratings.

Every loader returns 0-based dense ids. A malformed line raises :class:`DataFormatError` whose message
starts with ``"<file>:<line>: "`` (lines counted from 1). Integer formats are parsed with NumPy over the
file's bytes (no Python work per token), so Gowalla's 810k training pairs load in a fraction of a second.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rec_engine.features import Schema

from .containers import CtrData, ImplicitSplit, Interactions, SequenceData

FRAPPE_FIELDS = ("user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country",
                 "city")


class DataFormatError(ValueError):
    """A data file does not follow its format; the message reads ``"<file>:<line>: <what>"``."""

    def __init__(self, path, line: int | None, what: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {what}" if line is not None else f"{path}: {what}")


def data_dir() -> Path | None:
    """The folder of real data sets: ``$REC_ENGINE_DATA`` when set; else the first ``../shared/data`` seen
    from the working directory or one of its parents (a checkout beside ``shared/``), or from this source
    file's parents (a development checkout); None when there is none."""
    env = os.environ.get("REC_ENGINE_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    here = Path(__file__).resolve()
    for base in (Path.cwd().resolve(), *Path.cwd().resolve().parents, *here.parents):
        path = base.parent / "shared" / "data"
        if path.is_dir():
            return path
    return None


# ------------------------------------------------------------------------------------------ tokenizing
_SEP, _DIGIT, _SIGN, _BAD = 0, 1, 2, 3
_POW10 = 10 ** np.arange(19, dtype=np.int64)


@dataclass
class _Tokens:
    """Integer tokens of a text: ``values`` int64, ``line`` (0-based line of each token), ``start`` and
    ``end`` (byte offsets, end exclusive), and ``n_lines``."""

    values: np.ndarray
    line: np.ndarray
    start: np.ndarray
    end: np.ndarray
    n_lines: int


def _line_of(buf: np.ndarray, pos: int) -> int:
    return int(np.count_nonzero(buf[:pos] == 10)) + 1


def _token_at(data: bytes, pos: int) -> str:
    lo = max(data.rfind(b" ", 0, pos), data.rfind(b"\t", 0, pos), data.rfind(b"\n", 0, pos)) + 1
    ends = [e for e in (data.find(b" ", pos), data.find(b"\t", pos), data.find(b"\n", pos), data.find(b"\r", pos))
            if e >= 0]
    return data[lo:min(ends) if ends else len(data)].decode("utf-8", "replace")


def _tokenize(data: bytes, path, separators: bytes = b"", signed: bool = False) -> _Tokens:
    """Split ``data`` into integer tokens separated by whitespace (and ``separators``); raise
    :class:`DataFormatError` at the first byte that cannot belong to an integer."""
    buf = np.frombuffer(data, np.uint8)
    table = np.full(256, _BAD, np.int8)
    table[list(b" \t\r\n\v\f" + separators)] = _SEP
    table[list(b"0123456789")] = _DIGIT
    if signed:
        table[list(b"+-")] = _SIGN
    cls = table[buf]
    is_sep = cls == _SEP
    prev_sep = np.concatenate([[True], is_sep[:-1]])
    next_digit = np.concatenate([cls[1:] == _DIGIT, [False]])
    bad = (cls == _BAD) | ((cls == _SIGN) & ~(prev_sep & next_digit))
    if bad.any():
        pos = int(np.argmax(bad))
        raise DataFormatError(path, _line_of(buf, pos),
                              f"expected an integer, got {_token_at(data, pos)!r}")
    tok = ~is_sep
    start = np.flatnonzero(tok & prev_sep)
    end = np.flatnonzero(tok & np.concatenate([is_sep[1:], [True]])) + 1
    lengths = end - start
    if len(lengths) and lengths.max() > 18:
        i = int(np.argmax(lengths > 18))
        raise DataFormatError(path, _line_of(buf, int(start[i])),
                              f"integer too large: {data[start[i]:end[i]].decode()!r}")
    chars = np.flatnonzero(tok)                                  # token characters, tokens contiguous
    tok_id = np.repeat(np.arange(len(start)), lengths)
    digit = np.where(cls[chars] == _DIGIT, buf[chars].astype(np.int64) - 48, 0)
    contrib = digit * _POW10[end[tok_id] - 1 - chars]
    values = np.add.reduceat(contrib, np.cumsum(lengths) - lengths) if len(start) else np.zeros(0, np.int64)
    if signed and len(start):
        values = np.where(buf[start] == ord("-"), -values, values)
    newline_before = np.cumsum(buf == 10)
    line = newline_before[start]                  # newlines before the token (a token never starts at one)
    n_lines = int(newline_before[-1]) + (1 if len(buf) and buf[-1] != 10 else 0) if len(buf) else 0
    return _Tokens(values.astype(np.int64), line.astype(np.int64), start, end, n_lines)


def _per_line(tokens: _Tokens):
    """For each token: its index within its line; and, per line, the number of tokens."""
    counts = np.bincount(tokens.line, minlength=tokens.n_lines)
    first = np.cumsum(counts) - counts
    return np.arange(len(tokens.line)) - first[tokens.line], counts


# ------------------------------------------------------------------------------------------ LightGCN
def _read_lightgcn_file(path: Path):
    t = _tokenize(path.read_bytes(), path)
    k, counts = _per_line(t)
    head = k == 0
    line_users = t.values[head]
    dup = np.flatnonzero(np.diff(np.sort(line_users)) == 0)
    if dup.size:
        u = np.sort(line_users)[dup[0]]
        second = np.flatnonzero(line_users == u)[1]
        raise DataFormatError(path, int(t.line[head][second]) + 1, f"user {u} has a second line")
    users = np.repeat(line_users, counts[counts > 0] - 1)
    items = t.values[~head]
    return users, items


def load_lightgcn(directory) -> ImplicitSplit:
    """Read a LightGCN split: ``train.txt`` and ``test.txt`` (and ``valid.txt`` when present), one line
    per user ``"<user> <item> <item> ..."`` with 0-based ids (a line may hold the user alone).

    ``n_users`` / ``n_items`` are one more than the largest id in any of the files. Items keep their
    order in the file within each user."""
    directory = Path(directory)
    names = ["train", "test"] + (["valid"] if (directory / "valid.txt").exists() else [])
    parts = {n: _read_lightgcn_file(directory / f"{n}.txt") for n in names}
    n_users = max((int(u.max()) + 1 for u, _ in parts.values() if len(u)), default=0)
    n_items = max((int(i.max()) + 1 for _, i in parts.values() if len(i)), default=0)
    inter = {n: Interactions(u, i, n_users, n_items) for n, (u, i) in parts.items()}
    return ImplicitSplit(train=inter["train"], test=inter["test"], valid=inter.get("valid"), name=directory.name)


def _write_lists(inter: Interactions, path: Path) -> None:
    lists = inter.by_user()
    with open(path, "w") as f:
        for u in range(inter.n_users):
            f.write(" ".join(map(str, [u, *lists[u].tolist()])) + "\n")


def write_lightgcn(split: ImplicitSplit, directory) -> None:
    """Write ``split`` as ``train.txt`` / ``test.txt`` (and ``valid.txt``) in LightGCN's format, one line
    per user (every user, so ``n_users`` survives a round trip)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_lists(split.train, directory / "train.txt")
    _write_lists(split.test, directory / "test.txt")
    if split.valid is not None:
        _write_lists(split.valid, directory / "valid.txt")


# ------------------------------------------------------------------------------------------ SASRec
def load_sasrec(path) -> SequenceData:
    """Read SASRec's text format: lines ``"user item"`` with 1-based ids, each user's lines in time order.

    Split like SASRec's ``data_partition``: a user with 3 or more items gets the last as test, the
    second-to-last as valid, the rest as train; a user with fewer keeps all in train (valid/test -1).
    Ids become 0-based (``id - 1``); ``n_users`` / ``n_items`` are the largest ids."""
    path = Path(path)
    t = _tokenize(path.read_bytes(), path)
    _, counts = _per_line(t)
    wrong = np.flatnonzero((counts != 0) & (counts != 2))
    if wrong.size:
        raise DataFormatError(path, int(wrong[0]) + 1, f"expected 2 integers 'user item', got {counts[wrong[0]]}")
    pairs = t.values.reshape(-1, 2)
    low = np.flatnonzero((pairs < 1).any(axis=1))
    if low.size:
        raise DataFormatError(path, int(t.line[2 * low[0]]) + 1, "ids are 1-based: got an id below 1")
    users, items = pairs[:, 0] - 1, pairs[:, 1] - 1
    n_users = int(users.max()) + 1 if len(users) else 0
    n_items = int(items.max()) + 1 if len(items) else 0
    order = np.argsort(users, kind="stable")
    per_user = np.bincount(users, minlength=n_users)
    seqs = np.split(items[order], np.cumsum(per_user)[:-1]) if n_users else []
    long = per_user >= 3
    ends = np.cumsum(per_user)[long]
    valid = np.full(n_users, -1, np.int64)
    test = np.full(n_users, -1, np.int64)
    valid[long], test[long] = items[order][ends - 2], items[order][ends - 1]
    train = [s[:-2].copy() if n >= 3 else s.copy() for s, n in zip(seqs, per_user)]
    return SequenceData(train=train, valid=valid, test=test, n_items=n_items, name=path.stem)


def write_sasrec(seq: SequenceData, path) -> None:
    """Write ``seq`` in SASRec's format (1-based ``"user item"`` lines: train, then valid, then test)."""
    full = [np.concatenate([s, [v] if v >= 0 else [], [t] if t >= 0 else []]).astype(np.int64)
            for s, v, t in zip(seq.train, seq.valid, seq.test)]
    lengths = np.array([len(x) for x in full], np.int64)
    items = np.concatenate(full) if full else np.zeros(0, np.int64)
    users = np.repeat(np.arange(len(full)), lengths)
    np.savetxt(path, np.column_stack([users + 1, items + 1]), fmt="%d")


# ------------------------------------------------------------------------------------------ libfm
def load_libfm(path) -> tuple[np.ndarray, np.ndarray]:
    """Read one-hot libfm rows ``"label fid:1 fid:1 ..."``, every row with the same number of fields.

    Returns
    -------
    indices : int64 ``[n, F]``
        Global feature ids in the order of the row.
    labels : float32 ``[n]``
        1 for a label of +1 / 1, 0 for -1 / 0."""
    path = Path(path)
    data = path.read_bytes()
    t = _tokenize(data, path, separators=b":", signed=True)
    k, counts = _per_line(t)
    rows = np.flatnonzero(counts)
    if not rows.size:
        return np.zeros((0, 0), np.int64), np.zeros(0, np.float32)
    n0 = int(counts[rows[0]])
    if n0 < 3 or n0 % 2 == 0:
        raise DataFormatError(path, int(rows[0]) + 1, "expected 'label fid:1 fid:1 ...'")
    F = (n0 - 1) // 2
    wrong = rows[counts[rows] != n0]
    if wrong.size:
        raise DataFormatError(path, int(wrong[0]) + 1,
                              f"row has {(counts[wrong[0]] - 1) / 2:g} fields, expected {F} like line {rows[0] + 1}")
    buf = np.frombuffer(data, np.uint8)
    after = np.where(t.end < len(buf), buf[np.minimum(t.end, len(buf) - 1)], 0) == ord(":")
    before = np.where(t.start > 0, buf[np.maximum(t.start - 1, 0)], 0) == ord(":")
    is_fid, is_val = (k % 2 == 1), (k > 0) & (k % 2 == 0)
    colons = np.bincount(np.cumsum(buf == 10)[buf == ord(":")], minlength=t.n_lines + 1)[:t.n_lines]
    ok = np.where(k == 0, ~after & ~before, np.where(is_fid, after & ~before, before & ~after))
    ok &= ~(is_fid & (t.values < 0))
    bad_line = np.concatenate([t.line[~ok], rows[colons[rows] != F]])
    if bad_line.size:
        raise DataFormatError(path, int(bad_line.min()) + 1, "expected 'label fid:1 fid:1 ...' (fid a feature id >= 0)")
    not_one = is_val & (t.values != 1)
    if not_one.any():
        raise DataFormatError(path, int(t.line[np.argmax(not_one)]) + 1,
                              f"only one-hot rows are supported (fid:1), got value {t.values[np.argmax(not_one)]}")
    table = t.values.reshape(-1, n0)
    labels = table[:, 0]
    bad = np.flatnonzero(~np.isin(labels, (-1, 0, 1)))
    if bad.size:
        raise DataFormatError(path, int(rows[bad[0]]) + 1, f"bad label {labels[bad[0]]} (expected +1/-1 or 1/0)")
    return np.ascontiguousarray(table[:, 1::2]), (labels > 0).astype(np.float32)


def write_libfm(path, indices, labels) -> None:
    """Write one-hot libfm rows: label +1 / -1 (from labels > 0), then ``fid:1`` for each column of
    ``indices`` (int ``[n, F]``)."""
    indices = np.asarray(indices, np.int64)
    labels = np.asarray(labels).reshape(-1)
    if indices.ndim != 2 or len(indices) != len(labels):
        raise ValueError(f"indices must be [n, F] and labels [n], got {indices.shape} and {labels.shape}")
    fmt = " ".join(["%d"] + ["%d:1"] * indices.shape[1])
    np.savetxt(path, np.column_stack([np.where(labels > 0, 1, -1), indices]), fmt=fmt)


def load_frappe(directory, seed: int = 0, holdout: float = 0.1, hash_buckets: int = 1) -> CtrData:
    """Frappe under the protocol of this project (its train file is unavailable): train on
    ``frappe.validation.libfm`` minus a seeded ``holdout`` fraction (which becomes valid), test on
    ``frappe.test.libfm``. Fields are named :data:`FRAPPE_FIELDS` by position; the schema is fitted on
    train. ``extra["n_features"]`` is one more than the largest global feature id."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    directory = Path(directory)
    x, y = load_libfm(directory / "frappe.validation.libfm")
    xt, yt = load_libfm(directory / "frappe.test.libfm")
    for name, arr in (("frappe.validation.libfm", x), ("frappe.test.libfm", xt)):
        if arr.shape[1] != len(FRAPPE_FIELDS):
            raise DataFormatError(directory / name, None,
                                  f"expected {len(FRAPPE_FIELDS)} fields per row, got {arr.shape[1]}")
    perm = np.random.default_rng(seed).permutation(len(x))
    n_valid = int(round(holdout * len(x)))
    valid_rows, train_rows = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])

    def cols(a):
        return {name: a[:, j] for j, name in enumerate(FRAPPE_FIELDS)}

    schema = Schema.fit(cols(x[train_rows]), hash_buckets=max(1, hash_buckets))
    return CtrData(schema=schema, train=schema.encode(cols(x[train_rows]), y[train_rows]),
                   valid=schema.encode(cols(x[valid_rows]), y[valid_rows]), test=schema.encode(cols(xt), yt),
                   name="frappe", extra={"n_features": int(max(x.max(), xt.max())) + 1})


# ------------------------------------------------------------------------------------------ CSV
def _floats(values: list[str], path, lines: np.ndarray, what: str) -> np.ndarray:
    """Strings to float64 (empty -> NaN); the first non-number raises with its line."""
    arr = np.array([v.strip() or "nan" for v in values], dtype=str)
    try:
        return arr.astype(np.float64)
    except ValueError:
        for r, v in enumerate(arr):
            try:
                float(v)
            except ValueError:
                raise DataFormatError(path, int(lines[r]), f"{what} is not a number: {str(v)!r}") from None
        raise


def load_csv(path, *, label: str, categorical: Sequence[str] = (), numeric: Sequence[str] = (),
             multi: Mapping[str, str] | None = None, sep: str = ",", header: bool = True,
             names: Sequence[str] | None = None) -> tuple[dict, np.ndarray]:
    """Read a CSV/TSV file with a declared schema.

    Parameters
    ----------
    label : the label column (numbers; empty is an error).
    categorical : columns kept as text (object arrays, ``None`` where empty).
    numeric : columns parsed as float64 (NaN where empty).
    multi : ``{column: separator}``: columns holding lists of values (a list per row).
    sep : field separator (``"\\t"`` for TSV).
    header : whether the first line names the columns; otherwise pass ``names``.

    Returns
    -------
    columns : dict of the declared columns (categorical, numeric, multi), in a form ``Schema.fit`` /
        ``Schema.encode`` take.
    labels : float32 ``[n]``."""
    columns, labels, _ = _read_csv(path, label=label, categorical=categorical, numeric=numeric, multi=multi,
                                   sep=sep, header=header, names=names)
    return columns, labels


def _read_csv(path, *, label, categorical=(), numeric=(), multi=None, sep=",", header=True, names=None):
    """:func:`load_csv`, also returning the line number of each row (int64 ``[n]``)."""
    path = Path(path)
    multi = dict(multi or {})
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=sep)
        if header:
            try:
                names = next(reader)
            except StopIteration:
                raise DataFormatError(path, 1, "empty file, expected a header line") from None
        elif names is None:
            raise ValueError("header=False needs the column names in names=")
        names = list(names)
        declared = [label, *categorical, *numeric, *multi]
        missing = [c for c in declared if c not in names]
        if missing:
            raise DataFormatError(path, None, f"declared column(s) {missing} not in the columns {names}")
        rows, lines = [], []
        for row in reader:
            if not row:
                continue
            if len(row) != len(names):
                raise DataFormatError(path, reader.line_num, f"expected {len(names)} fields, got {len(row)}")
            rows.append(row)
            lines.append(reader.line_num)
    lines = np.asarray(lines, np.int64)
    by_name = dict(zip(names, zip(*rows))) if rows else {c: () for c in names}
    raw_label = list(by_name[label])
    empty = [r for r, v in enumerate(raw_label) if not v.strip()]
    if empty:
        raise DataFormatError(path, int(lines[empty[0]]), f"label {label!r} is empty")
    labels = _floats(raw_label, path, lines, f"label {label!r}").astype(np.float32)
    columns: dict = {}
    for c in categorical:
        columns[c] = np.array([v if v != "" else None for v in by_name[c]], dtype=object)
    for c in numeric:
        columns[c] = _floats(list(by_name[c]), path, lines, f"numeric column {c!r}")
    for c, s in multi.items():
        columns[c] = [[p for p in v.split(s) if p] for v in by_name[c]]
    return columns, labels, lines


# ------------------------------------------------------------------------------------------ MovieLens
@dataclass
class RatedInteractions(Interactions):
    """Interactions with explicit ratings and the raw ids: dense user ``u`` is raw ``raw_users[u]``
    (raw -> dense: ``np.searchsorted(raw_users, raw)``)."""

    ratings: np.ndarray | None = None     # float32 [n]
    raw_users: np.ndarray | None = None   # int64 [n_users], sorted
    raw_items: np.ndarray | None = None   # int64 [n_items], sorted


_ML_COLUMNS = {"user": ("user_id", "userId", "user"), "item": ("movie_id", "movieId", "item_id", "item"),
               "rating": ("rating",), "timestamp": ("timestamp", "ts", "time")}


def load_movielens(path) -> RatedInteractions:
    """Read MovieLens ratings: ``u.data`` (tab-separated ``user item rating timestamp``), ``ratings.dat``
    (``::``-separated) or a CSV with a header (``user_id``/``userId``, ``movie_id``/``movieId``,
    ``rating``, ``timestamp``; other columns ignored). The format is detected from the content. Ids are
    remapped to dense 0-based ids (sorted raw ids), events keep the file order."""
    path = Path(path)
    data = path.read_bytes()
    first = data.split(b"\n", 1)[0]
    if b"," in first and b"::" not in first:
        header = next(csv.reader(io.StringIO(first.decode("utf-8", "replace"))), [])
        found = {k: next((c for c in opts if c in header), None) for k, opts in _ML_COLUMNS.items()}
        missing = [k for k, c in found.items() if c is None]
        if missing:
            raise DataFormatError(path, 1, f"no column for {missing} in the header {header}")
        id_cols = [found[k] for k in ("user", "item", "timestamp")]
        cols, ratings, lines = _read_csv(path, label=found["rating"], numeric=id_cols)
        for c in id_cols:
            bad = np.flatnonzero(~np.isfinite(cols[c]) | (cols[c] != np.round(cols[c])))
            if bad.size:
                raise DataFormatError(path, int(lines[bad[0]]), f"{c!r} must be an integer, got {cols[c][bad[0]]}")
        users, items, ts = (cols[c].astype(np.int64) for c in id_cols)
    else:
        t = _tokenize(data.replace(b"::", b"  "), path)
        _, counts = _per_line(t)
        wrong = np.flatnonzero((counts != 0) & (counts != 4))
        if wrong.size:
            raise DataFormatError(path, int(wrong[0]) + 1,
                                  f"expected 4 integers 'user item rating timestamp', got {counts[wrong[0]]}")
        users, items, ratings, ts = t.values.reshape(-1, 4).T
    raw_users, u = np.unique(users, return_inverse=True)
    raw_items, i = np.unique(items, return_inverse=True)
    return RatedInteractions(u.reshape(-1), i.reshape(-1), len(raw_users), len(raw_items),
                             timestamps=np.asarray(ts, np.int64), ratings=np.asarray(ratings, np.float32),
                             raw_users=raw_users, raw_items=raw_items)


# ------------------------------------------------------------------------------------------ splits
def _positions(inter: Interactions, key: np.ndarray):
    """Order events by (user, key, file order); return that order and each event's position within its
    user in it, plus each user's event count."""
    order = np.lexsort((np.arange(len(inter)), key, inter.users))
    counts = np.bincount(inter.users, minlength=inter.n_users)
    pos = np.empty(len(inter), np.int64)
    pos[order] = np.arange(len(inter)) - np.repeat(np.cumsum(counts) - counts, counts)
    return order, pos, counts


def _split(inter: Interactions, order, part, name: str) -> ImplicitSplit:
    def take(p):
        sel = order[part[order] == p]
        ts = None if inter.timestamps is None else inter.timestamps[sel]
        return Interactions(inter.users[sel], inter.items[sel], inter.n_users, inter.n_items, timestamps=ts)

    return ImplicitSplit(train=take(0), valid=take(1), test=take(2), name=name)


def split_leave_last_out(inter: Interactions) -> ImplicitSplit:
    """Per user by timestamp (file order when there are none, and for ties): the last event -> test,
    the second-to-last -> valid, the rest -> train; users with fewer than 3 events keep all in train
    (SASRec's convention). Each part is sorted by user, then time."""
    key = inter.timestamps if inter.timestamps is not None else np.zeros(len(inter), np.int64)
    order, pos, counts = _positions(inter, key)
    n = counts[inter.users]
    part = np.where(n < 3, 0, np.where(pos == n - 1, 2, np.where(pos == n - 2, 1, 0)))
    return _split(inter, order, part, "leave-last-out")


def split_ratio(inter: Interactions, test: float = 0.2, valid: float = 0.1, seed: int = 0,
                by_time: bool = True) -> ImplicitSplit:
    """Per user: the latest ``test`` fraction of events -> test, the ``valid`` fraction before them ->
    valid, the rest -> train (``by_time=False``: a seeded random order instead of time). Counts are
    rounded with at least one test (and one valid when ``valid > 0``) for users with 3 or more events;
    users with fewer keep all in train."""
    if not (0 < test < 1 and 0 <= valid < 1 and test + valid < 1):
        raise ValueError(f"need 0 < test, 0 <= valid and test + valid < 1, got test={test}, valid={valid}")
    if by_time:
        key = inter.timestamps if inter.timestamps is not None else np.zeros(len(inter), np.int64)
    else:
        key = np.random.default_rng(seed).random(len(inter))
    order, pos, counts = _positions(inter, key)
    n = counts[inter.users]
    n_test = np.where(n >= 3, np.maximum(1, np.round(test * n)), 0).astype(np.int64)
    n_valid = np.where(n >= 3, np.maximum(1 if valid > 0 else 0, np.round(valid * n)), 0).astype(np.int64)
    n_valid = np.minimum(n_valid, np.maximum(n - 1 - n_test, 0))      # keep a train event
    back = n - 1 - pos                                   # 0 for the latest event
    part = np.where(back < n_test, 2, np.where(back < n_test + n_valid, 1, 0))
    return _split(inter, order, part, "ratio")
