"""Content understanding: item text -> semantic vector, keywords and sentiment, served without torch.

- :func:`item_text` joins an item's fields (title, genres, tags, description) into the one text that is encoded,
  the same way at training and at serving time;
- :class:`ContentEncoder` serves a bundle of kind ``"content_encoder"`` (written by
  ``rec_engine_train.export_content.export_encoder`` / ``rec-engine content-encoder --out DIR``):
  all-MiniLM-L6-v2 under ONNX Runtime with the ``tokenizers`` library; texts -> float32 ``[n, 384]`` unit
  vectors, batched (texts of similar length together) and cached by text (LRU);
- :meth:`ContentEncoder.keywords`: candidate phrases of a text (1-3 word n-grams without stopwords) ranked by the
  cosine of their own vectors to the text's vector, diversified by maximal marginal relevance;
- :func:`sentiment`: VADER's compound score in [-1, 1] per text (the ``vaderSentiment`` package, imported on
  first use).

Needs the ``content`` extra (``tokenizers``, ``onnxruntime``, ``vaderSentiment``); nothing here imports torch.
"""
from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np

from .bundle import Bundle, BundleError, onnx_session, open_bundle

KIND = "content_encoder"

__all__ = ["ContentEncoder", "ContentProjection", "item_text", "sentiment", "candidate_phrases", "STOPWORDS", "KIND"]

# A small English stopword list (function words, pronouns, auxiliaries, very common adverbs): a candidate
# phrase never contains one of these.
STOPWORDS = frozenset("""
a about above after again against all almost also although am among an and another any anyone anything are
around as at away be because been before being below between both but by can cannot could did do does doing
done down during each either else enough even ever every few for from further get gets got had has have having
he her here hers herself him himself his how however i if in into is it its itself just least less like made
make many may me might more most much must my myself neither never no nobody none nor not nothing now of off
often on once one only onto or other others our ours ourselves out over own per perhaps quite rather really
s same see seem seems several shall she should since so some something still such t than that the their theirs
them themselves then there these they this those though through thus to too toward towards under until up upon
us very via was we well were what whatever when where whether which while who whom whose why will with within
without would yet you your yours yourself yourselves
""".split())

_LABELS = frozenset(("genres", "tags"))          # the field labels item_text writes are never keywords
_WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")
_CLAUSE = re.compile(r"[.,;:!?()\[\]{}|/\"“”\n\t]+")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _field(value, name: str) -> str:
    if _is_missing(value):
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
    return " ".join(value.split())


def _list_field(values, name: str) -> list[str]:
    if _is_missing(values):
        return []
    if isinstance(values, str):
        values = values.split("|")
    elif not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a str ('|'-separated) or an iterable of str, got {type(values).__name__}")
    out: list[str] = []
    seen = set()
    for v in values:
        if _is_missing(v):
            continue
        if not isinstance(v, str):
            raise TypeError(f"{name} must hold str values, got {type(v).__name__}")
        v = " ".join(v.split())
        if v and v.lower() not in seen:
            seen.add(v.lower())
            out.append(v)
    return out


def item_text(title: str | None = None, description: str | None = None, tags: Iterable[str] | str = (),
              genres: Iterable[str] | str = ()) -> str:
    """The one text of an item that the content encoder reads, built the same way at training and at serving
    time: ``"<title>. Genres: <g1>, <g2>. Tags: <t1>, <t2>. <description>"``, leaving out missing parts.

    The short fields come first, so truncation at the encoder's ``max_len`` tokens cuts the description.
    ``tags`` / ``genres`` are iterables of str or one ``'|'``-separated str (MovieLens style); whitespace is
    collapsed, empty and repeated (case-insensitively) entries are dropped; None or NaN (a missing cell of a
    data frame) counts as missing. Raises TypeError for a non-str field."""
    parts = []
    t = _field(title, "title")
    if t:
        parts.append(t)
    g = _list_field(genres, "genres")
    if g:
        parts.append("Genres: " + ", ".join(g))
    tg = _list_field(tags, "tags")
    if tg:
        parts.append("Tags: " + ", ".join(tg))
    d = _field(description, "description")
    if d:
        parts.append(d)
    return ". ".join(p.rstrip(".") if i < len(parts) - 1 else p for i, p in enumerate(parts))


def candidate_phrases(text: str, max_ngram: int = 3, max_candidates: int | None = 256) -> list[str]:
    """The candidate keyphrases of ``text``: n-grams of 1..``max_ngram`` consecutive words within a clause
    (punctuation splits clauses) with no stopword and not only digits, in order of first occurrence,
    deduplicated case-insensitively (the first spelling is kept), at most ``max_candidates`` (None: all)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    out: dict[str, str] = {}
    for clause in _CLAUSE.split(text):
        words = _WORD.findall(clause)
        ok = [w.lower() not in STOPWORDS and w.lower() not in _LABELS and len(w) > 1 for w in words]
        for i in range(len(words)):
            for n in range(1, max_ngram + 1):
                if i + n > len(words) or not ok[i + n - 1]:     # (ok[i..i+n-2] held for n-1)
                    break
                gram = words[i:i + n]
                if all(w.isdigit() for w in gram):
                    continue
                phrase = " ".join(gram)
                out.setdefault(phrase.lower(), phrase)
                if max_candidates is not None and len(out) >= max_candidates:
                    return list(out.values())
    return list(out.values())


def _check_texts(texts, name: str = "texts") -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence) and not isinstance(texts, np.ndarray):
        raise TypeError(f"{name} must be a list of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
    return texts


class _LRU:
    """A thread-safe LRU map text -> vector (float32 [dim], read-only)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._d: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get_many(self, keys: Sequence[str]) -> list:
        with self._lock:
            out = []
            for k in keys:
                v = self._d.get(k)
                if v is not None:
                    self._d.move_to_end(k)
                    self.hits += 1
                else:
                    self.misses += 1
                out.append(v)
            return out

    def put_many(self, items) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            for k, v in items:
                self._d[k] = v
                self._d.move_to_end(k)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)


class ContentEncoder:
    """Item text -> float32 unit vectors with the bundled sentence encoder (ONNX Runtime + ``tokenizers``).

    Use :meth:`load`. Thread-safe: one encoder may serve many threads (ONNX Runtime releases the GIL while it
    runs; the cache has its own lock).

    Attributes
    ----------
    dim : int  the vector size (384)
    max_len : int  texts are truncated to this many tokens (256, special tokens included)
    meta : dict  the bundle's meta (model, package version, weights' sha256, ...)
    """

    def __init__(self, bundle: Bundle, *, ort_threads: int = 1, cache_size: int = 100_000, verify: bool = True):
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(f"the content encoder needs tokenizers and onnxruntime "
                              f"(pip install 'rec_engine[content]'): {e}") from e
        if bundle.kind != KIND:
            raise BundleError(f"bundle {bundle.path} is of kind {bundle.kind!r}, not {KIND!r}")
        if not isinstance(ort_threads, int) or isinstance(ort_threads, bool) or ort_threads < 0:
            raise ValueError(f"ort_threads must be an int >= 0 (0: ONNX Runtime's default), got {ort_threads!r}")
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0 (0: no cache), got {cache_size!r}")
        self.bundle, self.meta = bundle, dict(bundle.meta)
        try:
            self.dim, self.max_len = int(self.meta["dim"]), int(self.meta["max_len"])
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"bundle {bundle.path}: meta lacks an integer 'dim' and 'max_len'") from None
        self._tok = Tokenizer.from_file(str(bundle.file_path("tokenizer.json")))
        self._tok.enable_truncation(max_length=self.max_len)
        self._tok.no_padding()                       # padded here, per batch of similar lengths
        pad = self._tok.token_to_id("[PAD]")
        self._pad_id = 0 if pad is None else int(pad)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = ort_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = onnx_session(bundle.onnx_path("encoder"), opts, what=f"bundle {bundle.path}: encoder.onnx")
        names = [i.name for i in self._session.get_inputs()]
        if names != ["input_ids", "attention_mask"]:
            raise BundleError(f"bundle {bundle.path}: encoder.onnx takes {names}, expected "
                              f"['input_ids', 'attention_mask']")
        self._cache = _LRU(cache_size)
        if verify and bundle.has("arrays/check_vectors.npy") and self.meta.get("check_texts") is not None:
            self._verify()

    @classmethod
    def load(cls, bundle_path: str | os.PathLike | Bundle, *, ort_threads: int = 1, cache_size: int = 100_000,
             verify: bool = True) -> "ContentEncoder":
        """Open a "content_encoder" bundle (its files' sha256 checked) and return its encoder.

        Parameters
        ----------
        bundle_path : path or an opened :class:`~rec_engine.bundle.Bundle`
        ort_threads : int  ONNX Runtime's intra-op threads (1: one core per call, the setting for a server
            that runs many requests at once; 0: ONNX Runtime's default, all cores)
        cache_size : int  texts whose vectors are kept (LRU; 0: no cache); 100,000 vectors take ~150 MB
        verify : bool  re-encode the bundle's check texts and compare with the vectors stored at export
            (cosine > 0.999), which catches a ``tokenizers`` / ONNX Runtime that reads the bundle differently

        Raises
        ------
        BundleError  not a content_encoder bundle, corrupt, or failing the check; ImportError  tokenizers or
        onnxruntime is not installed.
        """
        bundle = bundle_path if isinstance(bundle_path, Bundle) else open_bundle(bundle_path)
        return cls(bundle, ort_threads=ort_threads, cache_size=cache_size, verify=verify)

    def _verify(self) -> None:
        texts = _check_texts(self.meta["check_texts"], "meta['check_texts']")
        want = self.bundle.array("check_vectors")
        got = self.encode(texts, cache=False)
        if want.shape != got.shape:
            raise BundleError(f"bundle {self.bundle.path}: check_vectors is {want.shape}, the encoder gives "
                              f"{got.shape}")
        cos = np.sum(want * got, axis=1)
        if not np.all(cos > 0.999):
            raise BundleError(f"bundle {self.bundle.path}: the encoder's vectors of the check texts differ from the "
                              f"ones stored at export (cosine {np.round(cos, 4).tolist()}); is this tokenizers / "
                              f"onnxruntime version reading the bundle differently?")

    def _run(self, texts: list[str], batch_size: int) -> np.ndarray:
        encs = self._tok.encode_batch(texts, add_special_tokens=True)
        ids = [e.ids for e in encs]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))      # similar lengths share a batch
        out = np.empty((len(ids), self.dim), np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            x = np.full((len(rows), width), self._pad_id, np.int64)
            m = np.zeros((len(rows), width), np.int64)
            for r, i in enumerate(rows):
                x[r, :len(ids[i])] = ids[i]
                m[r, :len(ids[i])] = 1
            out[rows] = self._session.run(None, {"input_ids": x, "attention_mask": m})[0]
        return out

    def encode(self, texts: Sequence[str], batch_size: int = 64, *, cache: bool = True) -> np.ndarray:
        """The unit vectors of ``texts``: float32 ``[len(texts), dim]`` (``(0, dim)`` for an empty list).

        Texts longer than ``max_len`` tokens are truncated. Texts are encoded ``batch_size`` at a time, those of
        similar token counts together (less padding); a text seen before is answered from the LRU cache
        (``cache=False``: neither read nor filled), and repeated texts are encoded once. The result is a new
        array the caller may change.

        Raises TypeError when ``texts`` is not a list (or tuple / array) of str; ValueError for batch_size < 1.
        """
        texts = _check_texts(texts)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        out = np.empty((len(texts), self.dim), np.float32)
        if not texts:
            return out
        use_cache = cache and self._cache.capacity > 0
        found = self._cache.get_many(texts) if use_cache else [None] * len(texts)
        todo: dict[str, list[int]] = {}
        for i, (t, v) in enumerate(zip(texts, found)):
            if v is None:
                todo.setdefault(t, []).append(i)
            else:
                out[i] = v
        if todo:
            uniq = list(todo)
            vecs = self._run(uniq, batch_size)
            for t, v in zip(uniq, vecs):
                out[todo[t]] = v
            if use_cache:
                self._cache.put_many(zip(uniq, vecs.copy()))
        return out

    def cache_info(self) -> dict:
        """``{"size", "capacity", "hits", "misses"}`` of the text cache."""
        return {"size": len(self._cache), "capacity": self._cache.capacity, "hits": self._cache.hits,
                "misses": self._cache.misses}

    def clear_cache(self) -> None:
        self._cache.clear()

    def keywords(self, text: str, vector: np.ndarray | None = None, n: int = 5, diversity: float = 0.5, *,
                 max_ngram: int = 3, max_candidates: int | None = 256) -> list[tuple[str, float]]:
        """Up to ``n`` keyphrases of ``text`` with their cosine to the text's vector, best first.

        Candidates are :func:`candidate_phrases` of the text (1..``max_ngram`` word n-grams without stopwords,
        spelled as in the text). Each is encoded (not cached: phrases would crowd item texts out of the cache) and
        scored by the cosine of its vector to ``vector`` (default: the vector of ``text``; pass the item's stored
        vector to skip encoding it again). The first pick is the most similar candidate; each next one maximizes
        ``(1 - diversity) * similarity - diversity * (max similarity to those picked)`` (maximal marginal
        relevance): ``diversity=0`` ranks by similarity alone, larger values prefer phrases unlike those picked.

        Returns a list of ``(phrase, cosine)``; empty when the text has no candidate. Raises TypeError for a
        non-str text, ValueError for n < 0, diversity outside [0, 1] or a vector of the wrong size.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if not 0.0 <= float(diversity) <= 1.0:
            raise ValueError(f"diversity must be in [0, 1], got {diversity!r}")
        if not isinstance(max_ngram, int) or max_ngram < 1:
            raise ValueError(f"max_ngram must be an int >= 1, got {max_ngram!r}")
        cands = candidate_phrases(text, max_ngram, max_candidates)
        if n == 0 or not cands:
            return []
        if vector is None:
            v = self.encode([text])[0]
        else:
            v = np.asarray(vector, dtype=np.float32).reshape(-1)
            if v.shape != (self.dim,):
                raise ValueError(f"vector must have {self.dim} values, got shape {np.shape(vector)}")
            norm = float(np.linalg.norm(v))
            if norm > 0:
                v = v / norm
        c = self.encode(cands, cache=False)
        sims = c @ v
        picked = [int(np.argmax(sims))]
        if n > 1 and len(cands) > 1:
            pair = c @ c.T
            closest = pair[picked[0]].copy()                     # max similarity to the picked ones
            free = np.ones(len(cands), bool)
            free[picked[0]] = False
            while len(picked) < min(n, len(cands)):
                score = (1.0 - diversity) * sims - diversity * closest
                score[~free] = -np.inf
                j = int(np.argmax(score))
                picked.append(j)
                free[j] = False
                np.maximum(closest, pair[j], out=closest)
        return [(cands[j], float(sims[j])) for j in picked]


_VADER = None
_VADER_LOCK = threading.Lock()


def sentiment(texts: Sequence[str]) -> np.ndarray:
    """VADER's compound sentiment of each text: float32 ``[len(texts)]`` in [-1, 1] (> 0 positive, < 0 negative,
    0 neutral or empty). A lexicon and rule model (Hutto & Gilbert 2014) meant for short, informal English
    such as reviews; needs the ``vaderSentiment`` package (the ``content`` extra), imported on first use.

    Raises TypeError when ``texts`` is not a list of str, ImportError naming the package when it is missing."""
    global _VADER
    texts = _check_texts(texts)
    if _VADER is None:
        with _VADER_LOCK:
            if _VADER is None:
                try:
                    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
                except ImportError as e:
                    raise ImportError("rec_engine.content.sentiment needs the vaderSentiment package: "
                                      "pip install vaderSentiment (or 'rec_engine[content]')") from e
                _VADER = SentimentIntensityAnalyzer()
    return np.array([_VADER.polarity_scores(t)["compound"] if t.strip() else 0.0 for t in texts], np.float32)


# ------------------------------------------------------------------------------------------ content features for ranking
CONTENT_FIELD = "content_"      # ranking fields content_0 .. content_{K-1}


class ContentProjection:
    """The content features a ranking (CTR) model sees: an item's text vector projected on the top ``K``
    principal axes of the trained items' text vectors, whitened (unit variance over those items), as the
    numeric fields ``content_0 .. content_{K-1}``; an item without text has them missing (empty bags).

    One code path at training and at serving time: training fits it (:meth:`fit`) and builds every example's
    and every stored item's content fields with :meth:`features`; a ranking bundle stores it (arrays
    ``content_axes`` ``[c, K]`` and ``content_mean`` ``[c]``), and the engine's ranker describes an item added
    online with text by the same :meth:`features` of its text vector."""

    def __init__(self, axes: np.ndarray, mean: np.ndarray):
        axes = np.ascontiguousarray(axes, np.float32)
        mean = np.ascontiguousarray(mean, np.float32)
        if axes.ndim != 2 or mean.shape != (axes.shape[0],) or not axes.shape[1]:
            raise ValueError(f"content projection: axes [c, K] and mean [c] expected, got {axes.shape} and "
                             f"{mean.shape}")
        if not (np.isfinite(axes).all() and np.isfinite(mean).all()):
            raise ValueError("content projection: axes and mean must be finite")
        self.axes, self.mean = axes, mean

    @property
    def dim(self) -> int:
        """The text vectors' dimension (c)."""
        return self.axes.shape[0]

    @property
    def names(self) -> list[str]:
        return [f"{CONTENT_FIELD}{j}" for j in range(self.axes.shape[1])]

    @classmethod
    def fit(cls, vectors: np.ndarray, k: int = 8) -> "ContentProjection":
        """The top ``k`` principal axes of ``vectors`` (the rows of items with text), scaled so each projection
        has unit variance over them."""
        x = np.asarray(vectors, np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"fitting the content projection needs at least 2 text vectors, got shape {x.shape}")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= min(x.shape):
            raise ValueError(f"k must be an integer in [1, {min(x.shape)}], got {k!r}")
        mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        std = s[:k] / np.sqrt(len(x) - 1)
        axes = vt[:k].T / np.where(std > 1e-12, std, 1.0)
        return cls(axes, mean)

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """float32 ``[n, K]``: the whitened projections of text vectors ``[n, c]``."""
        v = np.asarray(vectors, np.float32)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"text vectors of dimension {self.dim} expected, got shape {v.shape}")
        return (v - self.mean) @ self.axes

    def features(self, vectors: np.ndarray, has: np.ndarray | None = None) -> dict:
        """The content fields of ``n`` items: ``{content_j: [value or None] * n}`` (None where ``has`` is False
        or the vector is all zeros: an item without text)."""
        v = np.asarray(vectors, np.float32)
        p = self.project(v)
        ok = np.any(v != 0, axis=1) if has is None else np.asarray(has, bool) & np.any(v != 0, axis=1)
        return {name: [float(x) if o else None for x, o in zip(p[:, j].tolist(), ok.tolist())]
                for j, name in enumerate(self.names)}

    def to_arrays(self) -> dict:
        return {"content_axes": self.axes, "content_mean": self.mean}

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "ContentProjection | None":
        if not bundle.has("arrays/content_axes.npy"):
            return None
        try:
            return cls(bundle.array("content_axes"), bundle.array("content_mean"))
        except (ValueError, KeyError) as e:
            raise BundleError(f"bundle {bundle.path}: bad content projection: {e}") from None
