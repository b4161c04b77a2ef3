"""Loaders (and writers) of the real data formats: LightGCN text splits, SASRec sequences, libfm rows
(Frappe), CSV/TSV with a declared schema, MovieLens ratings, and generic CSV/TSV interaction files.

Every loader returns 0-based dense ids and keeps the user's own ids (*keys*, see
:mod:`~rec_engine_train.data.containers`): a key column holds integers when every value in it is a
canonical integer (``0`` or ``-?[1-9][0-9]*``) fitting int64, else strings exactly as written (``"007"``
and ``"7"`` are two keys); keys are numbered densely in sorted order, and a container's ``keys`` is None
when they are the integers ``0..n-1``. A malformed line raises :class:`DataFormatError` whose message
starts with ``"<file>:<line>: "`` (lines counted from 1). Files are parsed with NumPy over their bytes (no
Python work per token), so Gowalla's 810k training pairs load in a fraction of a second; only CSV files
with quoted fields go through the csv module.
"""
from __future__ import annotations

import codecs
import csv
import io
import itertools
import math
import os
from dataclasses import dataclass, field
from operator import itemgetter
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


# ------------------------------------------------------------------------------------------ fields and keys
_WHITESPACE = b" \t\r\n\v\f"          # what bytes.split() splits on


@dataclass
class _Fields:
    """Whitespace-separated tokens of a text (any bytes but whitespace): byte offsets ``start`` / ``end``
    (end exclusive), the 0-based ``line`` of each, and ``n_lines``; ``buf`` is the text."""

    buf: np.ndarray
    start: np.ndarray
    end: np.ndarray
    line: np.ndarray
    n_lines: int


def _check_no_nul(buf: np.ndarray, path) -> None:
    nul = np.flatnonzero(buf == 0)
    if nul.size:
        raise DataFormatError(path, _line_of(buf, int(nul[0])), "NUL byte in a text file")


def _ws_fields(data: bytes, path) -> _Fields:
    buf = np.frombuffer(data, np.uint8)
    _check_no_nul(buf, path)
    if not len(buf):
        empty = np.zeros(0, np.int64)
        return _Fields(buf, empty, empty, empty, 0)
    table = np.zeros(256, bool)
    table[list(_WHITESPACE)] = True
    is_sep = table[buf]
    tok = ~is_sep
    start = np.flatnonzero(tok & np.concatenate([[True], is_sep[:-1]]))
    end = np.flatnonzero(tok & np.concatenate([is_sep[1:], [True]])) + 1
    newline_before = np.cumsum(buf == 10)
    n_lines = int(newline_before[-1]) + (1 if buf[-1] != 10 else 0)
    return _Fields(buf, start, end, newline_before[start].astype(np.int64), n_lines)


def _parse_ints(buf: np.ndarray, start: np.ndarray, end: np.ndarray, canonical: bool = True) -> np.ndarray | None:
    """The int64 values of the byte ranges ``[start, end)`` of ``buf``, or None unless every one is an
    integer fitting int64 (``canonical``: written ``0`` or ``-?[1-9][0-9]*``, so ``str(value)`` is the
    text; else leading zeros are allowed). NumPy over the values digit by digit, no Python work per value."""
    if not len(start):
        return np.zeros(0, np.int64)
    neg = buf[start] == ord("-")
    ds = start + neg
    dl = end - ds
    shortest, longest = int(dl.min()), int(dl.max())
    if shortest < 1 or longest > 19:
        return None
    values = np.zeros(len(start), np.int64)
    last = len(buf) - 1
    for j in range(longest):
        digit = buf[np.minimum(ds + j, last)].astype(np.int64) - 48
        if j < shortest:
            if ((digit < 0) | (digit > 9)).any():
                return None
            values = values * 10 + digit
        else:
            active = dl > j
            if (active & ((digit < 0) | (digit > 9))).any():
                return None
            values = np.where(active, values * 10 + digit, values)
    if canonical and ((buf[ds] == ord("0")) & ((dl > 1) | neg)).any():
        return None
    values = np.where(neg, -values, values)
    for i in np.flatnonzero(dl == 19):             # 19 digits may not fit int64: exact check (rare)
        x = int(buf[start[i]:end[i]].tobytes())
        if not -2**63 <= x < 2**63:
            return None
        values[i] = x
    return values


def _gather(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The byte ranges ``[start, end)`` of ``buf`` as a NumPy bytes (``S``) array (no NUL in ``buf``, so
    nothing is lost to the type's NUL padding); an object array of bytes when that would be too large."""
    n = len(start)
    lengths = end - start
    width = max(int(lengths.max()) if n else 1, 1)
    if n * width > 1 << 27:
        data = buf.tobytes()
        out = np.empty(n, object)
        out[:] = [data[s:e] for s, e in zip(start.tolist(), end.tolist())]
        return out
    cols = np.arange(width)
    idx = np.minimum(start[:, None] + cols, max(len(buf) - 1, 0))
    chars = np.where(cols[None, :] < lengths[:, None], buf[idx] if len(buf) else 0, 0).astype(np.uint8)
    return np.ascontiguousarray(chars).view(f"S{width}").reshape(n)


@dataclass
class _Column:
    """One column of keys as read: ``ints`` (int64) when every value is a canonical integer, else ``strs``
    (``S`` bytes, ``U`` or object str array); ``lines`` gives each value's 1-based line in ``path`` (an
    array, or a function of the value's index for files whose lines are found only on demand)."""

    ints: np.ndarray | None
    strs: np.ndarray | None
    path: object
    lines: object

    @classmethod
    def from_bytes(cls, buf, start, end, path, lines) -> "_Column":
        ints = _parse_ints(buf, start, end)
        return cls(ints, None if ints is not None else _gather(buf, start, end), path, lines)

    def __len__(self) -> int:
        return len(self.ints if self.ints is not None else self.strs)

    def line(self, i: int) -> int:
        return int(self.lines[i]) if isinstance(self.lines, np.ndarray) else int(self.lines(i))

    def take(self, idx: np.ndarray) -> "_Column":
        lines = self.lines[idx] if isinstance(self.lines, np.ndarray) else (lambda i, f=self.lines: f(int(idx[i])))
        return _Column(None if self.ints is None else self.ints[idx], None if self.strs is None else self.strs[idx],
                       self.path, lines)


def _dense_ints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense ids of integer keys (in sorted key order) and the distinct keys."""
    if not len(values):
        return values.astype(np.int64), np.zeros(0, np.int64)
    lo, hi = int(values.min()), int(values.max())
    if lo >= 0 and hi < 2 * len(values) + 1024:            # small non-negative ids: a presence table
        present = np.zeros(hi + 1, bool)
        present[values] = True
        if present.all():
            return values, np.arange(hi + 1, dtype=np.int64)
        rank = np.cumsum(present) - 1
        return rank[values], np.flatnonzero(present).astype(np.int64)
    keys, inv = np.unique(values, return_inverse=True)
    return inv.reshape(-1).astype(np.int64), keys.astype(np.int64)


def _id_range(values: np.ndarray, base: int) -> bool:
    """Whether integer keys read as ids counted from ``base`` (0 or 1) can stay ids: all ``>= base`` and
    their range at most ``2 * distinct + 1024`` long (so ids without events cost little)."""
    if not len(values) or int(values.min()) < base:
        return False
    span = int(values.max()) - base + 1
    if span > 2 * len(values) + 1024:
        return False
    return span <= 2 * np.count_nonzero(np.bincount(values - base)) + 1024


def _encode_keys(columns: Sequence[_Column], what: str, ids_from: int | None = None
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """Dense ids (one int64 array per column) over the keys of all ``columns`` together, and the keys in
    dense-id order (sorted): integers (int64) when every value of every column is a canonical integer,
    else strings exactly as written (object array of str).

    ``ids_from`` (formats of ids, LightGCN 0 and SASRec 1): integer keys ``>= ids_from`` spanning at most
    about twice as many ids as occur stay ids: dense ``key - ids_from``, keys ``ids_from..max`` (so ids
    without events are kept, as the format's own tools do)."""
    sizes = [len(c) for c in columns]
    if all(c.ints is not None for c in columns):
        values = np.concatenate([c.ints for c in columns]) if columns else np.zeros(0, np.int64)
        if ids_from is not None and _id_range(values, ids_from):
            dense, keys = values - ids_from, np.arange(ids_from, int(values.max()) + 1, dtype=np.int64)
        else:
            dense, keys = _dense_ints(values)
    else:
        kinds = {c.strs.dtype.kind for c in columns if c.strs is not None}
        target = "S" if kinds == {"S"} else "U" if kinds <= {"S", "U"} else "O"

        def common(c: _Column) -> np.ndarray:
            if c.ints is not None:
                text = c.ints.astype("S" if target == "S" else str)
            elif target == "S" or c.strs.dtype.kind == "U":
                text = c.strs
            else:
                text = _decode(c, what)
            return text.astype(object) if target == "O" else text

        flat = np.concatenate([common(c) for c in columns])
        uniq, inv = np.unique(flat, return_inverse=True)
        dense = inv.reshape(-1).astype(np.int64)
        if target == "S":
            try:
                uniq = np.char.decode(uniq, "utf-8")
            except UnicodeDecodeError:
                bad = next(j for j, b in enumerate(uniq.tolist()) if not _is_utf8(b))
                k = int(np.argmax(dense == bad))
                c = int(np.searchsorted(np.cumsum(sizes), k, side="right"))
                raise DataFormatError(columns[c].path, columns[c].line(k - sum(sizes[:c])),
                                      f"{what} key is not UTF-8: {uniq[bad]!r}") from None
        keys = np.empty(len(uniq), object)
        keys[:] = uniq.tolist()
    out, at = [], 0
    for n in sizes:
        out.append(dense[at:at + n])
        at += n
    return out, keys


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _decode(col: _Column, what: str) -> np.ndarray:
    """A column's bytes (``S`` or object array of bytes) as str (``U`` or object array)."""
    values = col.strs.tolist()
    bad = next((j for j, b in enumerate(values) if isinstance(b, bytes) and not _is_utf8(b)), None) \
        if col.strs.dtype.kind == "O" else None
    if bad is None and col.strs.dtype.kind == "S":
        try:
            return np.char.decode(col.strs, "utf-8")
        except UnicodeDecodeError:
            bad = next(j for j, b in enumerate(values) if not _is_utf8(b))
    if bad is not None:
        raise DataFormatError(col.path, col.line(bad), f"{what} key is not UTF-8: {values[bad]!r}")
    out = np.empty(len(values), object)
    out[:] = [b.decode("utf-8") if isinstance(b, bytes) else b for b in values]
    return out


def _keys_or_none(user_keys: np.ndarray, item_keys: np.ndarray) -> dict | None:
    """``{"user": ..., "item": ...}``, or None when both are the integers ``0..n-1`` (dense ids = keys)."""
    def identity(k):
        return k.dtype.kind == "i" and bool((k == np.arange(len(k))).all())

    return None if identity(user_keys) and identity(item_keys) else {"user": user_keys, "item": item_keys}


def _show(key) -> str:
    return repr(key) if isinstance(key, str) else str(int(key))


def _key_text(keys: np.ndarray | None, ids: np.ndarray, offset: int = 0) -> list[str]:
    """The text of the keys of dense ``ids`` for a whitespace-separated format (``offset`` added to dense
    ids when there are no keys); ValueError for a string key that holds whitespace or is empty."""
    if keys is None:
        return (np.asarray(ids, np.int64) + offset).astype(str).tolist()
    text = [str(k) for k in keys[np.asarray(ids, np.int64)].tolist()]
    if keys.dtype == object:
        bad = next((t for t in text if not t or any(ch in " \t\r\n\v\f" for ch in t)), None)
        if bad is not None:
            raise ValueError(f"key {bad!r} cannot be written in a whitespace-separated format")
    return text


# ------------------------------------------------------------------------------------------ LightGCN
def load_lightgcn(directory) -> ImplicitSplit:
    """Read a LightGCN split: ``train.txt`` and ``test.txt`` (and ``valid.txt`` when present), one line
    per user ``"<user> <item> <item> ..."`` (a line may hold the user alone).

    Users and items are the keys as written (integers, or strings when any token of that side is not a
    canonical integer). Non-negative integer ids stay the dense ids, ``n_users`` / ``n_items`` one more
    than the largest (ids without events included), and ``keys`` is None, unless they are too sparse
    (spanning more than about twice the ids that occur; e.g. ``2**40 + 3``) or negative: then they, like
    string keys, are numbered densely in sorted order over all the files together, and ``keys`` holds
    them. Gowalla's files hold ids ``0..n-1`` (``user_list.txt`` / ``item_list.txt`` map the original
    SNAP ids to them; they are not read), so its ``keys`` is None. Items keep their order in the file
    within each user."""
    directory = Path(directory)
    names = ["train", "test"] + (["valid"] if (directory / "valid.txt").exists() else [])
    files = []
    for n in names:
        path = directory / f"{n}.txt"
        f = _ws_fields(path.read_bytes(), path)
        k, counts = _per_line(f)
        files.append((path, f, k == 0, counts))
    user_cols = [_Column.from_bytes(f.buf, f.start[h], f.end[h], p, f.line[h] + 1) for p, f, h, _ in files]
    item_cols = [_Column.from_bytes(f.buf, f.start[~h], f.end[~h], p, f.line[~h] + 1) for p, f, h, _ in files]
    line_users, user_keys = _encode_keys(user_cols, "user", ids_from=0)
    item_ids, item_keys = _encode_keys(item_cols, "item", ids_from=0)
    inter = {}
    for n, (path, f, head, counts), lu, items in zip(names, files, line_users, item_ids):
        srt = np.sort(lu)
        dup = np.flatnonzero(np.diff(srt) == 0)
        if dup.size:
            u = srt[dup[0]]
            second = np.flatnonzero(lu == u)[1]
            raise DataFormatError(path, int(f.line[head][second]) + 1, f"user {_show(user_keys[u])} has a second line")
        users = np.repeat(lu, counts[counts > 0] - 1)
        inter[n] = Interactions(users, items, len(user_keys), len(item_keys))
    return ImplicitSplit(train=inter["train"], test=inter["test"], valid=inter.get("valid"), name=directory.name,
                         keys=_keys_or_none(user_keys, item_keys))


def _write_lists(inter: Interactions, path: Path, keys: dict | None) -> None:
    lists = inter.by_user()
    users = _key_text(None if keys is None else keys["user"], np.arange(inter.n_users))
    items = _key_text(None if keys is None else keys["item"], lists.ids)
    ptr = lists.indptr.tolist()
    with open(path, "w", encoding="utf-8") as f:
        for u in range(inter.n_users):
            f.write(" ".join([users[u], *items[ptr[u]:ptr[u + 1]]]) + "\n")


def write_lightgcn(split: ImplicitSplit, directory) -> None:
    """Write ``split`` as ``train.txt`` / ``test.txt`` (and ``valid.txt``) in LightGCN's format, one line
    per user (every user, so ``n_users`` survives a round trip), with the split's keys (dense ids when it
    has none); ValueError for a string key that is empty or holds whitespace."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_lists(split.train, directory / "train.txt", split.keys)
    _write_lists(split.test, directory / "test.txt", split.keys)
    if split.valid is not None:
        _write_lists(split.valid, directory / "valid.txt", split.keys)


# ------------------------------------------------------------------------------------------ SASRec
def load_sasrec(path) -> SequenceData:
    """Read SASRec's text format: lines ``"user item"``, each user's lines in time order.

    Split like SASRec's ``data_partition``: a user with 3 or more items gets the last as test, the
    second-to-last as valid, the rest as train; a user with fewer keeps all in train (valid/test -1).
    Users and items are the keys as written. SASRec's 1-based integer ids become dense ``id - 1``
    (``n_users`` / ``n_items`` the largest ids, ids without events included; ``keys`` the integers
    ``1..n``), unless they are too sparse (spanning more than about twice the ids that occur) or below
    1: then they, like string keys, are numbered densely in sorted order."""
    path = Path(path)
    f = _ws_fields(path.read_bytes(), path)
    _, counts = _per_line(f)
    wrong = np.flatnonzero((counts != 0) & (counts != 2))
    if wrong.size:
        raise DataFormatError(path, int(wrong[0]) + 1, f"expected 2 fields 'user item', got {counts[wrong[0]]}")
    lines = f.line[0::2] + 1
    (users,), user_keys = _encode_keys([_Column.from_bytes(f.buf, f.start[0::2], f.end[0::2], path, lines)], "user",
                                       ids_from=1)
    (items,), item_keys = _encode_keys([_Column.from_bytes(f.buf, f.start[1::2], f.end[1::2], path, lines)], "item",
                                       ids_from=1)
    n_users, n_items = len(user_keys), len(item_keys)
    order = np.argsort(users, kind="stable")
    per_user = np.bincount(users, minlength=n_users)
    seqs = np.split(items[order], np.cumsum(per_user)[:-1]) if n_users else []
    long = per_user >= 3
    ends = np.cumsum(per_user)[long]
    valid = np.full(n_users, -1, np.int64)
    test = np.full(n_users, -1, np.int64)
    valid[long], test[long] = items[order][ends - 2], items[order][ends - 1]
    train = [s[:-2].copy() if n >= 3 else s.copy() for s, n in zip(seqs, per_user)]
    return SequenceData(train=train, valid=valid, test=test, n_items=n_items, name=path.stem,
                        keys=_keys_or_none(user_keys, item_keys))


def write_sasrec(seq: SequenceData, path) -> None:
    """Write ``seq`` in SASRec's format (``"user item"`` lines: train, then valid, then test) with its keys;
    without keys, the 1-based ids ``dense + 1`` of SASRec's files."""
    full = [np.concatenate([s, [v] if v >= 0 else [], [t] if t >= 0 else []]).astype(np.int64)
            for s, v, t in zip(seq.train, seq.valid, seq.test)]
    lengths = np.array([len(x) for x in full], np.int64)
    items = np.concatenate(full) if full else np.zeros(0, np.int64)
    users = np.repeat(np.arange(len(full)), lengths)
    if seq.keys is None:
        np.savetxt(path, np.column_stack([users + 1, items + 1]), fmt="%d")
        return
    u_text = _key_text(seq.keys["user"], np.arange(len(full)))
    i_text = _key_text(seq.keys["item"], items)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{u_text[u]} {i}\n" for u, i in zip(users.tolist(), i_text))


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
    train. ``extra["n_features"]`` is one more than the largest global feature id. ``keys`` is None:
    frappe's rows are global libfm feature ids, with no user / item entities of their own."""
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


# ------------------------------------------------------------------------------------------ interactions
@dataclass
class _Table:
    """A delimited file with a header: column ``names`` and ``n_rows`` data rows, held either as byte ranges
    of ``buf`` (``starts`` / ``ends`` ``[n_rows, n_columns]``: a file without quotes, split by NumPy) or as
    records of str (``rows``: a file with quotes, read by the csv module; a column in use is turned into
    byte ranges once). ``line(r)`` is the 1-based line of data row ``r``."""

    path: Path
    names: list
    n_rows: int
    buf: np.ndarray | None = None
    starts: np.ndarray | None = None
    ends: np.ndarray | None = None
    rows: list | None = None
    lines: object = None
    quotes: np.ndarray | None = None          # positions of the quotes in buf (a file with quoted fields)
    _encoded: dict = field(default_factory=dict)

    def line(self, r: int) -> int:
        return int(self.lines[r]) if isinstance(self.lines, np.ndarray) else int(self.lines(r))

    def ranges(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The column as ``(buf, start, end)``: value ``r`` is ``buf[start[r]:end[r]]`` (UTF-8)."""
        j = self.names.index(name)
        if self.rows is None and self.quotes is None:
            return self.buf, self.starts[:, j], self.ends[:, j]
        if j in self._encoded:
            return self._encoded[j]
        if self.rows is None:                      # quoted fields: drop the quotes, undo doubled ones
            buf, s, e = self.buf, self.starts[:, j], self.ends[:, j]
            q = (e > s) & (buf[np.minimum(s, len(buf) - 1)] == ord('"'))
            s, e = s + q, e - q
            esc = np.flatnonzero(np.searchsorted(self.quotes, e) - np.searchsorted(self.quotes, s) > 0)
            if esc.size:                           # rewritten values go after the file's bytes
                data = buf.tobytes()
                parts = [data[a:b].replace(b'""', b'"') for a, b in zip(s[esc].tolist(), e[esc].tolist())]
                lengths = np.fromiter(map(len, parts), np.int64, len(parts))
                e[esc] = len(buf) + np.cumsum(lengths)
                s[esc] = e[esc] - lengths
                buf = np.concatenate([buf, np.frombuffer(b"".join(parts), np.uint8)])
            self._encoded[j] = (buf, s, e)
        else:
            values = list(map(itemgetter(j), self.rows))
            joined = "".join(values)
            if joined.isascii():
                lengths = np.fromiter(map(len, values), np.int64, len(values))
                data = joined.encode("ascii")
            else:
                encoded = [v.encode("utf-8") for v in values]
                lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
                data = b"".join(encoded)
            end = np.cumsum(lengths)
            self._encoded[j] = (np.frombuffer(data, np.uint8), end - lengths, end)
        return self._encoded[j]

    def text(self, name: str) -> np.ndarray:
        """The column's values as a bytes (``S``) array."""
        return _gather(*self.ranges(name))

    def empty(self, name: str) -> np.ndarray:
        _, s, e = self.ranges(name)
        return e == s

    def keys(self, name: str) -> _Column:
        return _Column.from_bytes(*self.ranges(name), self.path, self.lines)

    def times(self, name: str) -> np.ndarray:
        ints = _parse_ints(*self.ranges(name), canonical=False)
        if ints is not None:
            return ints
        return _to_times(self.text(name), self.path, self.line, f"time column {name!r}")


def _guess_sep(path: Path, data: bytes) -> str:
    """Tab for ``.tsv``, comma for ``.csv``, else the most frequent of tab, comma, semicolon and bar in the
    first line (comma when none)."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    first = data.split(b"\n", 1)[0]
    counts = {s: first.count(s.encode()) for s in ("\t", ",", ";", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _read_table(path: Path, sep: str | None) -> _Table:
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    buf = np.frombuffer(data, np.uint8)
    _check_no_nul(buf, path)
    if sep is None:
        sep = _guess_sep(path, data)
    if len(sep) != 1 or sep in '"\r\n':
        raise ValueError(f"sep must be one character other than a quote or a line end, got {sep!r}")
    cr = np.flatnonzero(buf == 13)
    lone_cr = bool(cr.size) and bool(((cr + 1 >= len(buf)) | (buf[np.minimum(cr + 1, len(buf) - 1)] != 10)).any())
    if ord(sep) < 128 and not lone_cr:
        table = _table_from_bytes(path, buf, ord(sep), quoted=b'"' in data)
        if table is not None:
            return table
    return _table_from_csv(path, buf, data, sep)


def _unquote(field: bytes) -> bytes:
    return field[1:-1].replace(b'""', b'"') if field[:1] == b'"' else field


def _table_from_bytes(path: Path, buf: np.ndarray, sep: int, quoted: bool = False) -> _Table | None:
    """Split a file (without lone ``\r``) into fields with NumPy: records end at ``\n`` (a ``\r`` before
    it dropped), blank lines are skipped, every other record must have the header's field count.

    ``quoted``: the file holds quotes. Every quote must then open a field, close one (followed by the
    separator or a line end) or be doubled inside one, the way the csv module reads them; a separator or
    ``\n`` after an odd number of quotes is inside a field. Returns None when the quotes are otherwise (the
    csv module then reads the file, and names the line of a malformed one)."""
    n = len(buf)
    if not n:
        raise DataFormatError(path, 1, "empty file, expected a header line")
    all_nl = np.flatnonzero(buf == 10)
    seps = np.flatnonzero(buf == sep)
    nl = all_nl
    quotes = None
    if quoted:
        quotes = np.flatnonzero(buf == ord('"'))
        if len(quotes) % 2:
            return None
        before = np.where(quotes > 0, buf[np.maximum(quotes - 1, 0)], 10)
        after = np.where(quotes < n - 1, buf[np.minimum(quotes + 1, n - 1)], 10)
        opening = np.arange(len(quotes)) % 2 == 0          # the 1st, 3rd, ... quote: outside -> inside
        ok_open = np.isin(before, [sep, 10, 13, ord('"')])
        ok_close = np.isin(after, [sep, 10, 13, ord('"')])
        if not (ok_open[opening].all() and ok_close[~opening].all()):
            return None
        nl = all_nl[np.searchsorted(quotes, all_nl) % 2 == 0]
        seps = seps[np.searchsorted(quotes, seps) % 2 == 0]
    line_end = nl if buf[-1] == 10 else np.append(nl, n)
    line_start = np.concatenate([[0], nl + 1])[:len(line_end)]
    line_end = line_end - ((line_end > line_start) & (buf[np.maximum(line_end - 1, 0)] == 13))
    line_no = np.searchsorted(all_nl, line_start) + 1      # a record's first line
    rows = np.flatnonzero(line_end > line_start)
    if not rows.size:
        raise DataFormatError(path, 1, "empty file, expected a header line")
    n_seps = np.bincount(np.searchsorted(line_start, seps, side="right") - 1, minlength=len(line_start))
    n_cols = int(n_seps[rows[0]]) + 1
    bad = rows[n_seps[rows] != n_cols - 1]
    if bad.size:
        raise DataFormatError(path, int(line_no[bad[0]]), f"expected {n_cols} fields, got {int(n_seps[bad[0]]) + 1}")
    inner = seps.reshape(len(rows), n_cols - 1)            # every kept record holds n_cols - 1 separators, in order
    starts = np.column_stack([line_start[rows], inner + 1])
    ends = np.column_stack([inner, line_end[rows]])
    try:
        names = [_unquote(buf[s:e].tobytes()).decode("utf-8").strip() for s, e in zip(starts[0], ends[0])]
    except UnicodeDecodeError:
        raise DataFormatError(path, int(line_no[rows[0]]), "the header is not UTF-8") from None
    return _Table(path, names, len(rows) - 1, buf=buf, starts=starts[1:], ends=ends[1:],
                  lines=line_no[rows[1:]], quotes=quotes)


def _table_from_csv(path: Path, buf: np.ndarray, data: bytes, sep: str) -> _Table:
    """Read a file with quoted fields through the csv module (strict quoting; blank lines skipped)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, _line_of(buf, e.start), f"not UTF-8 text: {e.reason}") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    try:
        records = list(reader)
    except csv.Error as e:
        raise DataFormatError(path, reader.line_num, f"malformed CSV: {e}") from None
    lens = np.fromiter(map(len, records), np.int64, len(records))
    kept = np.flatnonzero(lens > 0)
    if not kept.size:
        raise DataFormatError(path, 1, "empty file, expected a header line")

    def record_line(i: int) -> int:                        # first line of record i (on demand: errors only)
        again = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
        before = 0
        for _ in range(i + 1):
            before = again.line_num
            next(again)
        return before + 1

    names = [c.strip() for c in records[kept[0]]]
    data_records = kept[1:]
    bad = data_records[lens[data_records] != len(names)]
    if bad.size:
        raise DataFormatError(path, record_line(int(bad[0])), f"expected {len(names)} fields, got {lens[bad[0]]}")
    rows = list(itertools.compress(records, lens > 0))[1:]
    return _Table(path, names, len(rows), rows=rows, lines=lambda r: record_line(int(data_records[r])))


def _to_floats(text: np.ndarray, path, line, what: str) -> np.ndarray:
    """Text (``S``/``U``) to finite float64; the first other value raises with its line."""
    try:
        out = text.astype(np.float64)
        if np.isfinite(out).all():
            return out
    except ValueError:
        pass
    for r, v in enumerate(text.tolist()):
        v = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        try:
            ok = math.isfinite(float(v))
        except ValueError:
            ok = False
        if not ok:
            raise DataFormatError(path, line(r), f"{what} is not a finite number: {v!r}")
    raise DataFormatError(path, None, f"{what} does not parse as numbers")


def _to_times(text: np.ndarray, path, line, what: str) -> np.ndarray:
    """Text (``S``/``U``) to int64 timestamps: integers as they are, else ISO 8601 date-times as Unix seconds;
    the first other value raises with its line."""
    try:
        return text.astype(np.int64)
    except (ValueError, OverflowError):
        pass
    try:
        dt = text.astype("datetime64[s]")
        if not np.isnat(dt).any():
            return dt.astype(np.int64)
    except (ValueError, OverflowError):
        pass
    for r, v in enumerate(text.tolist()):
        v = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        try:
            int(v)
            continue
        except ValueError:
            pass
        try:
            if not np.isnat(np.datetime64(v.strip(), "s")):
                continue
        except ValueError:
            pass
        raise DataFormatError(path, line(r), f"{what} is neither an integer nor an ISO 8601 date-time: {v!r}")
    raise DataFormatError(path, None, f"{what} mixes integers and date-times")


_AUTO_COLUMNS = {"user": ("user", "userid", "uid", "customerid", "visitorid"),
                 "item": ("item", "itemid", "iid", "movieid", "productid", "sku", "asin"),
                 "time": ("timestamp", "time", "ts", "datetime", "date"),
                 "weight": ("rating", "weight")}


def _find_column(table: _Table, role: str, given, required: bool) -> str | None:
    """The column of ``role``: ``given`` (it must exist), None/False to skip an optional one (``given`` is
    False), or when ``given`` is None the first of :data:`_AUTO_COLUMNS` (case, ``_``, ``-`` and spaces
    ignored)."""
    if given is False:
        return None
    if given is not None:
        if given not in table.names:
            raise DataFormatError(table.path, None, f"no column {given!r} (the {role}) in the header {table.names}")
        return given
    normed = {}
    for name in table.names:
        normed.setdefault(name.lower().replace("_", "").replace("-", "").replace(" ", ""), name)
    found = next((normed[c] for c in _AUTO_COLUMNS[role] if c in normed), None)
    if found is None and required:
        raise DataFormatError(table.path, None, f"no {role} column in the header {table.names}: name it with "
                                                f"{role}=COLUMN (recognised: {', '.join(_AUTO_COLUMNS[role])})")
    return found


def load_interactions(path, *, user: str | None = None, item: str | None = None, time: str | bool | None = None,
                      weight: str | bool | None = None, sep: str | None = None,
                      min_weight: float | None = None) -> "RatedInteractions":
    """Read a CSV/TSV file of user-item events with a header line.

    Parameters
    ----------
    user, item : the key columns; None finds them by name (``user``, ``user_id``, ``userId``, ``uid``, ...;
        ``item``, ``item_id``, ``itemId``, ``movieId``, ``product_id``, ``sku``, ...; case, ``_`` and ``-``
        ignored).
    time : the timestamp column (integers, or ISO 8601 date-times read as Unix seconds); None finds one
        named ``timestamp``, ``time``, ``ts``, ``datetime`` or ``date`` if any; False: none.
    weight : a rating / weight column (finite numbers), kept as ``ratings``; None finds ``rating`` or
        ``weight`` if any; False: none.
    sep : the field separator; None: tab for ``.tsv``, comma for ``.csv``, else guessed from the header.
    min_weight : keep only events whose weight is at least this (e.g. 4 for "liked" among 1-5 stars).

    Keys are kept as written: a key column holds integers (int64) when every value is a canonical integer
    (``0`` or ``-?[1-9][0-9]*``) fitting int64, otherwise strings exactly as written (so ``007`` and ``7``
    are two keys); users and items are numbered densely in sorted key order, and ``keys`` holds them (None
    when both are ``0..n-1``). Quoted fields (``"a, b"``, ``""`` for a quote) are read like the csv module
    reads them; blank lines are skipped. Events keep the file order. A malformed line (a field count other
    than the header's, an empty key, a weight or time that does not parse) raises :class:`DataFormatError`
    naming the file and line."""
    path = Path(path)
    table = _read_table(path, sep)
    names = {role: _find_column(table, role, given, required=role in ("user", "item"))
             for role, given in (("user", user), ("item", item), ("time", time), ("weight", weight))}
    chosen = [c for c in names.values() if c is not None]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"one column serves two roles: {names}")
    for role in ("user", "item"):
        empty = table.empty(names[role])
        if empty.any():
            r = int(np.argmax(empty))
            raise DataFormatError(path, table.line(r), f"empty {role} key (column {names[role]!r})")
    ratings = None
    if names["weight"] is not None:
        ratings = _to_floats(table.text(names["weight"]), path, table.line, f"weight column {names['weight']!r}")
    elif min_weight is not None:
        raise ValueError("min_weight needs a weight column (weight=COLUMN)")
    timestamps = table.times(names["time"]) if names["time"] is not None else None
    user_col, item_col = table.keys(names["user"]), table.keys(names["item"])
    if min_weight is not None:
        keep = np.flatnonzero(ratings >= float(min_weight))
        user_col, item_col, ratings = user_col.take(keep), item_col.take(keep), ratings[keep]
        timestamps = None if timestamps is None else timestamps[keep]
    (users,), user_keys = _encode_keys([user_col], "user")
    (items,), item_keys = _encode_keys([item_col], "item")
    return RatedInteractions(users, items, len(user_keys), len(item_keys), timestamps=timestamps,
                             keys=_keys_or_none(user_keys, item_keys),
                             ratings=None if ratings is None else ratings.astype(np.float32),
                             raw_users=user_keys, raw_items=item_keys)


# ------------------------------------------------------------------------------------------ MovieLens
@dataclass
class RatedInteractions(Interactions):
    """Interactions with explicit ratings (None when the file has none) and the keys again under their
    older names: dense user ``u`` is ``raw_users[u]`` (= ``keys["user"][u]``; int64 or str, sorted)."""

    ratings: np.ndarray | None = None     # float32 [n]
    raw_users: np.ndarray | None = None   # [n_users], sorted
    raw_items: np.ndarray | None = None   # [n_items], sorted


_ML_COLUMNS = {"user": ("user_id", "userId", "user"), "item": ("movie_id", "movieId", "item_id", "item"),
               "rating": ("rating",), "timestamp": ("timestamp", "ts", "time")}


def load_movielens(path) -> RatedInteractions:
    """Read MovieLens ratings: ``u.data`` (tab-separated ``user item rating timestamp``), ``ratings.dat``
    (``::``-separated) or a CSV with a header (``user_id``/``userId``, ``movie_id``/``movieId``,
    ``rating``, ``timestamp``; other columns ignored; read by :func:`load_interactions`). The format is
    detected from the content. User and item keys are kept (integers in MovieLens) and numbered densely in
    sorted order; events keep the file order."""
    path = Path(path)
    data = path.read_bytes()
    first = data.split(b"\n", 1)[0]
    if b"," in first and b"::" not in first:
        header = [c.strip() for c in next(csv.reader(io.StringIO(first.decode("utf-8-sig", "replace"))), [])]
        found = {k: next((c for c in opts if c in header), None) for k, opts in _ML_COLUMNS.items()}
        missing = [k for k, c in found.items() if c is None]
        if missing:
            raise DataFormatError(path, 1, f"no column for {missing} in the header {header}")
        return load_interactions(path, user=found["user"], item=found["item"], time=found["timestamp"],
                                 weight=found["rating"], sep=",")
    f = _ws_fields(data.replace(b"::", b"  "), path)
    _, counts = _per_line(f)
    wrong = np.flatnonzero((counts != 0) & (counts != 4))
    if wrong.size:
        raise DataFormatError(path, int(wrong[0]) + 1,
                              f"expected 4 fields 'user item rating timestamp', got {counts[wrong[0]]}")
    lines = f.line[0::4] + 1

    def line(r):
        return int(lines[r])

    (users,), user_keys = _encode_keys([_Column.from_bytes(f.buf, f.start[0::4], f.end[0::4], path, lines)], "user")
    (items,), item_keys = _encode_keys([_Column.from_bytes(f.buf, f.start[1::4], f.end[1::4], path, lines)], "item")
    ratings = _to_floats(_gather(f.buf, f.start[2::4], f.end[2::4]), path, line, "rating")
    ts = _parse_ints(f.buf, f.start[3::4], f.end[3::4], canonical=False)
    if ts is None:
        ts = _to_times(_gather(f.buf, f.start[3::4], f.end[3::4]), path, line, "timestamp")
    return RatedInteractions(users, items, len(user_keys), len(item_keys), timestamps=ts,
                             keys=_keys_or_none(user_keys, item_keys), ratings=ratings.astype(np.float32),
                             raw_users=user_keys, raw_items=item_keys)


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

    return ImplicitSplit(train=take(0), valid=take(1), test=take(2), name=name, keys=inter.keys)


def split_leave_last_out(inter: Interactions) -> ImplicitSplit:
    """Per user by timestamp (file order when there are none, and for ties): the last event -> test,
    the second-to-last -> valid, the rest -> train; users with fewer than 3 events keep all in train
    (SASRec's convention). Each part is sorted by user, then time; the keys are kept."""
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
    users with fewer keep all in train. The keys are kept."""
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


def sequences_from_interactions(inter: Interactions, name: str = "") -> SequenceData:
    """The SASRec protocol over ``inter``: per user the events in time order (file order without
    timestamps, and for ties), the last -> test, the second-to-last -> valid, the rest -> train; users with
    fewer than 3 events keep all in train. The keys are kept."""
    split = split_leave_last_out(inter)
    counts = np.bincount(split.train.users, minlength=inter.n_users)
    train = [s.copy() for s in np.split(split.train.items, np.cumsum(counts)[:-1])] if inter.n_users else []
    valid = np.full(inter.n_users, -1, np.int64)
    test = np.full(inter.n_users, -1, np.int64)
    valid[split.valid.users], test[split.test.users] = split.valid.items, split.test.items
    return SequenceData(train=train, valid=valid, test=test, n_items=inter.n_items, name=name, keys=inter.keys)


# ------------------------------------------------------------------------------------------ --data
INTERACTION_OPTIONS = {
    "user": "the user key column (default: found by name: user, user_id, userId, ...)",
    "item": "the item key column (default: found by name: item, item_id, itemId, movieId, ...)",
    "time": "the timestamp column, or 'none' (default: timestamp / time / ts / datetime / date if present)",
    "weight": "the rating / weight column, or 'none' (default: rating / weight if present)",
    "min_weight": "keep only events whose weight is at least this",
    "sep": "the field separator: a character, 'tab' (default: by suffix, else guessed)",
    "split": "graph models: auto (leave-last-out with timestamps, else random), leave-last-out, random, "
             "time-ratio",
    "test": "random / time-ratio splits: the fraction of each user's events held out for test (0.2)",
    "valid": "random / time-ratio splits: the fraction held out for validation (0.1)",
}


def load_interaction_data(path, family: str = "graph", *, seed: int = 0, options: Mapping | None = None):
    """``--data`` of a CSV/TSV interaction file (:func:`load_interactions`): for graph / CF models an
    :class:`ImplicitSplit` (``split``: by default time-ordered leave-last-out per user when the file has
    timestamps, else a seeded random holdout of ``test`` / ``valid`` per user), for SASRec the
    :class:`SequenceData` of :func:`sequences_from_interactions`. ``options`` (values may be strings, as
    given on the command line) are those of :data:`INTERACTION_OPTIONS`."""
    path = Path(path)
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(INTERACTION_OPTIONS))
    if unknown:
        raise ValueError(f"unknown data option(s) {unknown}; known: {', '.join(INTERACTION_OPTIONS)}")
    kw: dict = {}
    for k in ("user", "item", "time", "weight"):
        if k in opts:
            v = opts[k]
            kw[k] = False if k in ("time", "weight") and (v is False or str(v).lower() in ("", "none")) else str(v)
    if "sep" in opts:
        kw["sep"] = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "space": " "}.get(opts["sep"],
                                                                                               opts["sep"])
    if opts.get("min_weight") not in (None, ""):
        kw["min_weight"] = float(opts["min_weight"])
    method = str(opts.get("split", "auto"))
    if method not in ("auto", "leave-last-out", "random", "time-ratio"):
        raise ValueError(f"split must be auto, leave-last-out, random or time-ratio, got {method!r}")
    test, valid = float(opts.get("test", 0.2)), float(opts.get("valid", 0.1))
    inter = load_interactions(path, **kw)
    name = path.stem
    if family == "sequential":
        return sequences_from_interactions(inter, name=name)
    if family != "graph":
        raise ValueError(f"{path} holds user-item interactions (for graph / CF and sequential models), not "
                         f"{family} data")
    if method == "auto":
        method = "leave-last-out" if inter.timestamps is not None else "random"
    if method == "leave-last-out":
        split = split_leave_last_out(inter)
    else:
        split = split_ratio(inter, test=test, valid=valid, seed=seed, by_time=method == "time-ratio")
    split.name = name
    return split
