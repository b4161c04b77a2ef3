"""The offline update (``rec-engine update``): retrain the served pipeline from its data plus the logged events,
compare the new version with the current one on the latest events, promote it only when it is no worse.

Steps, for the pipeline that a model home's ``CURRENT`` names (:mod:`rec_engine.versions`):

1. **Events.** The store's impressions, clicks and conversions are read and split by time: the latest
   ``holdout`` share of the impressions (by timestamp) and the feedback on them, with every event from the
   first held-out impression on, are held out for the comparison; the rest is training data. Users the store
   has forgotten (:meth:`~rec_engine.events.EventStore.forgotten`) are dropped from the base data too.
2. **Retrieval.** The stage retrains on its base interactions plus the logged clicks and conversions
   (new user-item interactions; users new to the model get rows). Items added online (``item_added`` events
   of items still in the catalogue, :func:`read_catalogue`) join the stage after its own items, in the order
   they were added, so their logged clicks train them; positives on items neither holds are dropped. The
   ranking stage's item store gets the same items, encoded from the features they were added with (as the
   engine's ranker encodes them), so both stages of the new version describe the same catalogue.
   Warm start: MF and LightGCN start from the current bundle's layer-0 embeddings of every user and item
   that still exists (new users start at random, items added online from the vector they were served with); NGCF (its layer weights are not in the bundle) and the
   closed-form kinds (GF-CF, BSPM, EASE, popularity) are fitted anew. Item content (a stage trained with
   ``--items``): the new stage keeps it. Each item's content vector is the current stage's row for the same
   key (an item without one, or stored without text, gets zeros and counts as without text: the update does
   not re-read the items file), with the encoder and items-file entries of ``meta["content"]``; the ridge map
   is fitted anew against the newly trained item vectors (:func:`carried_content`).
3. **Ranking.** The CTR model retrains on its base examples plus one example per shown item of every
   training impression: label 1 when a click or conversion with the impression's request id names the
   item, else 0. Its features are assembled exactly as serving assembles them (the bundle's user and item
   feature stores, the context the impression recorded in ``attrs["context"]``), so training sees what
   serving scored. Warm start: both tables and the dense part (the ``dense_state.*`` arrays that export
   writes, else the ONNX initializers when their names match) of the current bundle; the forgotten users'
   ``user_id`` rows are re-initialized. ``shuffle_labels`` shuffles the CTR labels and trains from scratch:
   a deliberately broken model, for testing the gate.
4. **Gate.** Both versions are scored by the serving code on the held-out impressions: the ranking stage's
   AUC and log loss over the shown items (clicked or not), the retrieval stage's recall@K of the held-out
   clicks (K = the pipeline's ``n_candidates``; the user's earlier events folded in as serving does). The new
   version is promoted when its AUC is at least the current one's minus ``tolerance``. Recall is reported,
   not gated: the held-out clicks are on items the current version itself retrieved, which favours it.
5. **Promotion.** The new pipeline is written into the home beside the current one, the comparison beside it
   (``<name>.update.json``); when promoted, ``CURRENT`` points at it (the previous version stays for
   ``rec-engine rollback``) and, with ``server``, ``POST {"bundle": path}`` to ``server/swap``.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from rec_engine.bundle import open_bundle, write_pipeline
from rec_engine.events import open_store, user_hash
from rec_engine.features import EncodedBatch, Schema
from rec_engine.kinds import get_kind

from . import pipeline
from .data.containers import CtrData, ImplicitSplit, Interactions
from .loop import TrainConfig

POSITIVE = ("click", "conversion")
DEFAULT_TOLERANCE = 0.005
DEFAULT_HOLDOUT = 0.2
WARM_KINDS = ("mf", "lightgcn")           # retrieval kinds whose weights the bundle holds in full
_CONFIG_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "dim", "patience", "eval_every", "min_epochs",
                  "min_delta")


# ------------------------------------------------------------------------------------------ events
@dataclass
class Shown:
    """Shown items, one row per (impression, position): user key, item key, context, label, time."""

    users: list = field(default_factory=list)
    items: list = field(default_factory=list)
    contexts: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    ts: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.users)

    def add(self, user, item, context, label, ts) -> None:
        self.users.append(user)
        self.items.append(item)
        self.contexts.append(context)
        self.labels.append(label)
        self.ts.append(ts)


@dataclass
class LoggedEvents:
    """The store's events split by time into training and held-out parts (see the module doc)."""

    train_shown: Shown
    holdout_shown: Shown
    train_positives: list          # (user, item, ts) clicks and conversions before the cut, time order
    holdout_positives: list        # (user, item, ts) clicks and conversions on held-out impressions / after the cut
    cut_ts: float | None           # the first held-out impression's time (None: nothing held out)
    n_impressions: int = 0
    n_positives: int = 0


def _context_of(ev) -> dict:
    attrs = ev.attrs or {}
    ctx = attrs.get("context")
    return dict(ctx) if isinstance(ctx, dict) else {}


def read_events(store, holdout: float = DEFAULT_HOLDOUT) -> LoggedEvents:
    """The store's impressions and positives (clicks, conversions) split by time; see :class:`LoggedEvents`."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    store.flush()
    impressions = sorted(store.read(kinds=["impression"]), key=lambda e: (e.ts, e.id or 0))
    positives = sorted(store.read(kinds=list(POSITIVE)), key=lambda e: (e.ts, e.id or 0))
    n_hold = int(round(holdout * len(impressions)))
    cut = impressions[len(impressions) - n_hold].ts if n_hold else None
    held_ids = {e.request_id for e in impressions[len(impressions) - n_hold:]} if n_hold else set()
    clicked: dict = {}
    for e in positives:
        if e.request_id is not None:
            clicked.setdefault(e.request_id, set()).add(e.item)
    out = LoggedEvents(Shown(), Shown(), [], [], cut, len(impressions), len(positives))
    for e in impressions:
        part = out.holdout_shown if e.request_id in held_ids else out.train_shown
        got, ctx = clicked.get(e.request_id, set()), _context_of(e)
        for item in e.items or ():
            part.add(e.user, item, ctx, float(item in got), e.ts)
    for e in positives:
        held = (e.request_id is not None and e.request_id in held_ids) or (cut is not None and e.ts >= cut)
        (out.holdout_positives if held else out.train_positives).append((e.user, e.item, e.ts))
    return out


def read_catalogue(store) -> dict:
    """The items added online (``item_added`` events) that are still in the catalogue, in the order they were
    first added: ``{key: attrs}`` with the last addition's attributes (``vector``, ``content``, ``text``,
    ``features``). An item removed after its last addition is left out; one re-added counts once."""
    added: dict = {}
    for ev in store.read(kinds=["item_added", "item_removed"]):
        if ev.kind == "item_added":
            added[ev.item] = dict(ev.attrs or {})         # a re-addition keeps its first position
        else:
            added.pop(ev.item, None)
    return added


def _new_items(item_keys: list, added: dict | None) -> list:
    """The keys of ``added`` that ``item_keys`` lacks and whose type is the catalogue's (in order)."""
    if not added:
        return []
    have = set(item_keys)
    key_type = type(item_keys[0]) if item_keys else None
    return [k for k in added if k not in have and (key_type is None or type(k) is key_type)]


# ------------------------------------------------------------------------------------------ base data
def training_record(source: str, *, seed: int, config: TrainConfig | None = None, synthetic: dict | None = None,
                    data_options: dict | None = None, **extra) -> dict:
    """What :func:`pipeline.export` stores as ``meta["training"]``: the data source and its settings, the
    seed and the TrainConfig fields; what :func:`update` retrains from."""
    rec = {"data": source, "seed": int(seed)}
    if synthetic:
        rec["synthetic"] = dict(synthetic)
    if data_options:
        rec["data_options"] = dict(data_options)
    if config is not None:
        rec["config"] = {k: getattr(config, k) for k in _CONFIG_FIELDS}
    rec.update(extra)
    return rec


def load_base(family: str, source: str, record: dict | None, *, seed: int | None = None,
              data_options: dict | None = None):
    """The data a stage was trained on: ``source`` ("synthetic" or a path) with the settings its bundle
    recorded (``meta["training"]``: the synthetic world's size and seed, the number of CTR examples, data
    options); ``data_options`` given here override them."""
    record = dict(record or {})
    same = record.get("data") == source
    seed = int(seed if seed is not None else record.get("seed", 0))
    if source == "synthetic":
        from .data.synthetic import make_synthetic

        world_opts = {**(record.get("synthetic", {}) if same else {}), **(data_options or {})}
        n_examples = int(world_opts.pop("n_examples", record.get("n_examples", 20000) if same else 20000))
        world = make_synthetic(seed=int(world_opts.pop("seed", seed)), **world_opts)
        return world.ctr(n_examples=n_examples) if family == "ctr" else world.implicit()
    options = {**(record.get("data_options", {}) if same else {}), **(data_options or {})}
    return pipeline.load_data(source, family, seed=seed, data_options={k: str(v) for k, v in options.items()} or None)


def _key_list(keys, n: int) -> list:
    """One side's keys as Python values (ints or strs) in dense-id order; the dense ids when ``keys`` is None."""
    return list(range(n)) if keys is None else keys.tolist()


def _config(stage, data, record: dict | None, epochs: int | None, seed: int) -> TrainConfig:
    """The stage's TrainConfig: the fields its bundle recorded (``meta["training"]["config"]``), else the kind's
    defaults with the bundle's ``dim``; the model's own settings exactly as the bundle holds them (``params``,
    or a closed-form kind's settings), so the new model has the current one's shape; ``epochs`` overrides;
    one thread, no progress bar."""
    from . import defaults

    meta = stage.meta
    kind = stage.kind
    fields = {k: v for k, v in ((record or {}).get("config") or {}).items() if k in _CONFIG_FIELDS}
    if "dim" in meta and get_kind(kind).epochs:
        fields["dim"] = int(meta["dim"])
    if epochs is not None:
        fields["epochs"] = int(epochs)
    if kind in pipeline.CLOSED_FORM_SETTINGS:
        params = {k: meta[k] for k in pipeline.CLOSED_FORM_SETTINGS[kind] if k in meta and k != "k_ideal"}
    else:
        params = dict(meta.get("params") or {})
    config = defaults.resolve_config(kind, data, fields, params, seed=seed, num_threads=1, progress=False)
    return replace(config, params=params) if "params" in meta else config


# ------------------------------------------------------------------------------------------ retrieval
def retrieval_data(base: ImplicitSplit, logged: LoggedEvents, forgotten: set[str],
                   added: dict | None = None) -> tuple[ImplicitSplit, dict]:
    """The retrieval stage's training data: ``base`` without the forgotten users, plus the training positives
    as new interactions (users new to ``base`` appended; items added online, ``added`` as
    :func:`read_catalogue` gives it, appended after ``base``'s items in the order they were added; positives on
    items neither holds dropped). Returns the split (with keys) and counts of what was added and dropped."""
    n_u, n_i0 = base.train.n_users, base.train.n_items
    keys = base.keys or {"user": None, "item": None}
    user_keys, item_keys = _key_list(keys["user"], n_u), _key_list(keys["item"], n_i0)
    new_items = _new_items(item_keys, added)
    item_keys = item_keys + new_items
    n_i = len(item_keys)
    keep = np.array([user_hash(k) not in forgotten for k in user_keys], bool)
    new_of_old = np.full(n_u, -1, np.int64)
    new_of_old[keep] = np.arange(int(keep.sum()))
    users = [k for k, kp in zip(user_keys, keep) if kp]
    index = {k: i for i, k in enumerate(users)}
    item_index = {k: i for i, k in enumerate(item_keys)}
    key_type = type(user_keys[0]) if user_keys else None
    ev_u, ev_i, ev_t, dropped = [], [], [], 0
    for user, item, ts in logged.train_positives:
        j = item_index.get(item)
        if j is None or (key_type is not None and type(user) is not key_type) or user_hash(user) in forgotten:
            dropped += 1
            continue
        if user not in index:
            index[user] = len(users)
            users.append(user)
        ev_u.append(index[user])
        ev_i.append(j)
        ev_t.append(ts)
    n_new = len(users)

    def part(p: Interactions | None, extra=None) -> Interactions | None:
        if p is None:
            return None
        m = keep[p.users]
        u, it = new_of_old[p.users[m]], p.items[m]
        t = p.timestamps[m] if p.timestamps is not None else None
        if extra is not None and len(extra[0]):
            u = np.concatenate([u, np.asarray(extra[0], np.int64)])
            it = np.concatenate([it, np.asarray(extra[1], np.int64)])
            if t is not None:   # logged events come after every base event
                last = float(t.max()) if len(t) else 0.0
                t = np.concatenate([t.astype(np.float64), last + 1 + np.arange(len(extra[0]), dtype=np.float64)])
        return Interactions(u, it, n_new, n_i, timestamps=None if t is None else np.asarray(t).astype(np.int64))

    if new_items:
        item_arr = np.array(item_keys, dtype=object if isinstance(item_keys[0], str) else np.int64)
    else:
        item_arr = base.keys["item"] if base.keys is not None else np.arange(n_i, dtype=np.int64)
    keys = {"user": np.array(users, dtype=object if users and isinstance(users[0], str) else np.int64),
            "item": item_arr}
    if base.keys is None and users == list(range(n_new)) and not new_items:
        keys = None                       # the dense ids are still the keys
    split = ImplicitSplit(train=part(base.train, (ev_u, ev_i)), test=part(base.test), valid=part(base.valid),
                          name=base.name, keys=keys)
    on_new = sum(1 for j in ev_i if j >= n_i0)
    return split, {"events_added": len(ev_u), "events_dropped": dropped, "users_forgotten": int((~keep).sum()),
                   "users_new": n_new - int(keep.sum()), "items_added": len(new_items),
                   "events_on_added_items": on_new}


def _warm_graph(stage, split: ImplicitSplit, added: dict | None = None):
    """An ``init`` for :func:`~rec_engine_train.models.graph.train_graph`: the model it builds starts from
    ``stage``'s layer-0 embeddings of every user and item whose key it holds (the rest keep their random
    initialization), when it is the same kind with the same dimension. An item added online (``added``) starts
    from the vector it was served with, when it has the model's dimension."""
    old_users = stage.key_map("user", int(stage.meta["n_users"]))
    old_items = stage.key_map("item", int(stage.meta["n_items"]))
    names = ("users_ego", "items_ego") if stage.kind == "lightgcn" else ("users", "items")
    u_old, i_old = (stage.table(n).to_numpy() for n in names)
    u_map = _lookup(old_users, _key_list(split.keys and split.keys["user"], split.train.n_users))
    i_map = _lookup(old_items, _key_list(split.keys and split.keys["item"], split.train.n_items))

    def init(model) -> None:
        import torch

        ue, ie = model.ego()
        if ue.shape[1] != u_old.shape[1]:
            return
        with torch.no_grad():
            for table, old, m in ((ue, u_old, u_map), (ie, i_old, i_map)):
                ok = np.flatnonzero(m >= 0)
                table[torch.from_numpy(ok)] = torch.from_numpy(old[m[ok]])
            if added:
                item_keys = _key_list(split.keys and split.keys["item"], split.train.n_items)
                for j in np.flatnonzero(i_map < 0):
                    vec = (added.get(item_keys[j]) or {}).get("vector")
                    if vec is not None and len(vec) == ie.shape[1]:
                        ie[int(j)] = torch.tensor(vec, dtype=ie.dtype)

    return init


def _lookup(keymap, keys: list) -> np.ndarray:
    try:
        return keymap.lookup(keys)
    except (TypeError, ValueError):
        return np.full(len(keys), -1, np.int64)


def carried_content(stage, split: ImplicitSplit, log: Callable[[str], None] = print, added: dict | None = None):
    """The item content for the stage retrained from ``stage`` on ``split``: an
    :class:`~rec_engine_train.content_map.ItemContent` in ``split``'s item order whose rows are ``stage``'s
    content vectors matched by item key (float32, as stored), zeros and ``has`` False for an item ``stage``
    holds no vector for or stored without text (a zero row); ``info`` is the encoder and items-file entries of
    ``stage.meta["content"]``, so the export fits the map anew against the new item vectors. None when
    ``stage`` has no content."""
    if stage is None or not stage.has("arrays/content_vectors.npy"):
        return None
    from .content_map import ItemContent

    old = np.asarray(stage.array("content_vectors"), np.float32)
    n_items = split.train.n_items
    rows = _lookup(stage.key_map("item", int(stage.meta["n_items"])),
                   _key_list(split.keys and split.keys["item"], n_items))
    rows = np.where((rows >= 0) & (rows < len(old)), rows, -1)
    vectors = np.zeros((n_items, old.shape[1]), np.float32)
    found = rows >= 0
    vectors[found] = old[rows[found]]
    if added:       # items added online with text: the text vector they were added with
        item_keys = _key_list(split.keys and split.keys["item"], n_items)
        for j in np.flatnonzero(~found):
            c = (added.get(item_keys[j]) or {}).get("content")
            if c is not None and len(c) == old.shape[1]:
                vectors[j] = np.asarray(c, np.float32)
                found[j] = True
    has = found & np.any(vectors != 0, axis=1)
    meta = dict(stage.meta.get("content") or {})
    info = {k: meta[k] for k in ("encoder_sha256", "encoder_weights_sha256", "encoder_model", "text", "source")
            if k in meta}
    if not found.all():
        log(f"content: {int((~found).sum())} of {n_items} items have no content vector in the current version "
            f"(zeros: without text)")
    return ItemContent(vectors, has, info)


def train_retrieval(stage, base: ImplicitSplit, logged: LoggedEvents, forgotten: set[str], *, epochs, seed,
                    warm: bool, log, added: dict | None = None) -> tuple[pipeline.Result, ImplicitSplit, dict]:
    split, info = retrieval_data(base, logged, forgotten, added)
    record = stage.meta.get("training")
    config = _config(stage, split, record, epochs, seed)
    kind = stage.kind
    info["warm_start"] = bool(warm and kind in WARM_KINDS)
    log(f"retrieval {kind}: {len(split.train)} interactions ({info['events_added']} logged, "
        f"{info['events_dropped']} dropped), {split.train.n_items} items ({info['items_added']} added online, "
        f"{info['events_on_added_items']} logged interactions with them), "
        f"{split.train.n_users} users ({info['users_new']} new, "
        f"{info['users_forgotten']} forgotten); " + ("warm start from the current weights" if info["warm_start"]
                                                     else "trained from scratch" + (
                                                         "" if kind in WARM_KINDS or not get_kind(kind).epochs
                                                         else f" ({kind}'s bundle lacks its layer weights)")))
    if info["warm_start"]:
        result = pipeline.train(kind, split, config, log=lambda s: None, init=_warm_graph(stage, split, added))
    else:
        result = pipeline.train(kind, split, config, log=lambda s: None)
    return result, split, info


# ------------------------------------------------------------------------------------------ ranking
class Stores:
    """A ranking bundle's feature assembly, as serving does it: each example's user fields from the user store
    (or, for a user the store lacks, from the context), item fields from the item store, the other fields
    from the context; concatenated in schema order into an :class:`EncodedBatch`."""

    def __init__(self, stage, user_ids: Callable[[list], np.ndarray], added_items: list | None = None):
        meta = stage.meta
        self.schema = Schema.from_dict(meta["schema"])
        groups = meta.get("entity_fields") or {}
        names = self.schema.names
        self.user_fields = [n for n in names if n in set(groups.get("user", ()))]
        self.item_fields = [n for n in names if n in set(groups.get("item", ()))]
        self.context_fields = [n for n in names if n not in set(self.user_fields) | set(self.item_fields)]
        pos = {n: i for i, n in enumerate(names)}
        self.pos = {g: np.array([pos[n] for n in f], np.int64) for g, f in
                    (("user", self.user_fields), ("item", self.item_fields), ("ctx", self.context_fields))}

        def store(entity, n_fields):
            if not n_fields:
                return None
            return EncodedBatch(*(stage.array(f"{entity}_features_{a}") for a in ("indices", "offsets", "weights")),
                                n_fields)

        self.users = store("user", len(self.user_fields))
        self.items = store("item", len(self.item_fields))
        self.n_items = len(self.items) if self.items is not None else 0
        self.item_keys = stage.key_map("item", self.n_items)
        self.user_ids = user_ids
        # items added online ((key, features) in the retrieval stage's order): rows after the store's, encoded
        # from the features they were added with, as the engine's ranker encodes them (CtrRanker.add_items)
        self.added = list(added_items or [])
        self._added_row = {k: self.n_items + j for j, (k, _) in enumerate(self.added)}
        if self.added and self.items is not None:
            cols = {n: [(f or {}).get(n) for _, f in self.added] for n in self.item_fields}
            self.items = _concat([self.items, self.schema.encode(cols, fields=self.item_fields)])

    def item_rows(self, keys: list) -> np.ndarray:
        """Item store rows of ``keys`` (-1: neither the bundle nor the added items hold the key)."""
        rows = _lookup(self.item_keys, keys) if keys else np.zeros(0, np.int64)
        if self._added_row:
            for j in np.flatnonzero(rows < 0):
                rows[j] = self._added_row.get(keys[j], -1)
        return rows

    def encode(self, shown: Shown, labels=None) -> tuple[EncodedBatch, np.ndarray]:
        """The examples of ``shown`` whose item the store holds, and which rows of ``shown`` they are."""
        n = len(shown)
        iids = self.item_rows(shown.items) if n else np.zeros(0, np.int64)
        rows = np.flatnonzero(iids >= 0)
        uids = self.user_ids([shown.users[r] for r in rows]) if len(rows) else np.zeros(0, np.int64)
        ctxs = [shown.contexts[r] for r in rows]
        parts = []
        if self.user_fields:
            known = (uids >= 0) & (uids < len(self.users)) if self.users is not None else np.zeros(len(rows), bool)
            guest = self.schema.encode({f: [ctxs[j].get(f) for j in np.flatnonzero(~known)] for f in self.user_fields},
                                       fields=self.user_fields)
            both = _concat([self.users.take(uids[known]), guest])
            order = np.empty(len(rows), np.int64)
            order[np.flatnonzero(known)] = np.arange(int(known.sum()))
            order[np.flatnonzero(~known)] = int(known.sum()) + np.arange(int((~known).sum()))
            parts.append((both.take(order), self.pos["user"]))
        if self.item_fields:
            parts.append((self.items.take(iids[rows]), self.pos["item"]))
        if self.context_fields:
            parts.append((self.schema.encode({f: [c.get(f) for c in ctxs] for f in self.context_fields},
                                             fields=self.context_fields), self.pos["ctx"]))
        lab = None if labels is None else np.asarray(labels, np.float32)[rows]
        return _merge(parts, self.schema.n_fields, len(rows), lab), rows


def _concat(batches: list[EncodedBatch]) -> EncodedBatch:
    f = batches[0].n_fields
    offsets, indices, weights, base = [np.zeros(1, np.int64)], [], [], 0
    for b in batches:
        offsets.append(b.offsets[1:] + base)
        indices.append(b.indices)
        weights.append(b.weights)
        base += int(b.offsets[-1])
    labels = None if any(b.labels is None for b in batches) else np.concatenate([b.labels for b in batches])
    return EncodedBatch(np.concatenate(indices).astype(np.int64), np.concatenate(offsets).astype(np.int64),
                        np.concatenate(weights).astype(np.float32), f, labels)


def _merge(parts: list, n_fields: int, n: int, labels) -> EncodedBatch:
    """Examples whose fields come from several batches (``(batch, schema positions of its fields)``)."""
    lengths = np.zeros((n, n_fields), np.int64)
    for b, pos in parts:
        lengths[:, pos] = np.diff(b.offsets).reshape(n, len(pos))
    offsets = np.zeros(n * n_fields + 1, np.int64)
    np.cumsum(lengths.ravel(), out=offsets[1:])
    indices = np.empty(int(offsets[-1]), np.int64)
    weights = np.empty(int(offsets[-1]), np.float32)
    for b, pos in parts:
        bags = (np.arange(n)[:, None] * n_fields + pos[None, :]).ravel()      # this part's bags, in its order
        ln = np.diff(b.offsets)
        dst = np.repeat(offsets[bags], ln) + (np.arange(len(b.indices)) - np.repeat(b.offsets[:-1], ln))
        indices[dst] = b.indices
        weights[dst] = b.weights
    return EncodedBatch(indices, offsets, weights, n_fields, labels)


def _ranking_user_ids(ranking_stage, retrieval_stage) -> Callable[[list], np.ndarray]:
    """User keys -> rows of the ranking stage's user store, as the engine maps them: by the ranking stage's
    own keys, else (it stores none) by the retrieval stage's dense ids."""
    meta = ranking_stage.meta
    n = 0
    if (meta.get("entity_fields") or {}).get("user"):
        n = len(ranking_stage.array("user_features_offsets")) - 1
        n //= len(meta["entity_fields"]["user"])
    own = ranking_stage.key_map("user", n)
    if own.kind != "dense" or retrieval_stage is None:
        return lambda keys: _lookup(own, keys)
    other = retrieval_stage.key_map("user", int(retrieval_stage.meta.get("n_users", 0)))
    return lambda keys: _lookup(other, keys)


def _forgotten_ctr_rows(data: CtrData, schema: Schema, forgotten: set[str]) -> tuple[np.ndarray, list]:
    """The table rows of the forgotten users' ``user_id`` values, and their dense ids in ``data``."""
    if not forgotten or "user_id" not in schema.names or not data.extra.get("entity_features"):
        return np.zeros(0, np.int64), []
    users = data.extra["entity_features"]["user"]["user_id"]
    keys = _key_list(data.keys and data.keys["user"], len(users))
    gone = [i for i, k in enumerate(keys) if user_hash(k) in forgotten]
    if not gone:
        return np.zeros(0, np.int64), []
    enc = schema.encode({"user_id": [users[i] for i in gone]}, fields=["user_id"])
    return np.unique(enc.indices), gone


def _drop_rows(batch: EncodedBatch, n_fields: int, field_pos: int, rows: np.ndarray) -> EncodedBatch:
    """``batch`` without the examples whose field ``field_pos`` holds one of the table ``rows``."""
    if not len(rows) or not len(batch):
        return batch
    bags = np.arange(len(batch)) * n_fields + field_pos
    starts, ends = batch.offsets[bags], batch.offsets[bags + 1]
    hit = np.isin(batch.indices, rows)
    cum = np.concatenate([[0], np.cumsum(hit)])
    return batch.take(np.flatnonzero(cum[ends] - cum[starts] == 0))


def _warm_ctr(stage, model, log) -> str:
    """Load ``stage``'s tables and dense weights into ``model``; what was loaded."""
    import torch

    from .export_ctr import DENSE_STATE

    with torch.no_grad():
        model.embedding.copy_(torch.from_numpy(stage.table("embedding").to_numpy()))
        model.linear.copy_(torch.from_numpy(stage.table("linear").to_numpy()))
    want = model.dense.state_dict()
    stored = {k: stage.array(DENSE_STATE + k) for k in want if stage.has(f"arrays/{DENSE_STATE}{k}.npy")}
    if len(stored) == len(want):
        model.dense.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in stored.items()})
        return "tables and dense part"
    try:
        import onnx
        from onnx import numpy_helper

        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(stage.onnx_path("dense"))).graph.initializer}
        params = dict(model.dense.named_parameters())
        if not model.dense.state_dict().keys() - params.keys() and all(
                k in inits and inits[k].shape == tuple(p.shape) for k, p in params.items()):
            model.dense.load_state_dict({k: torch.from_numpy(np.array(inits[k])) for k in params})
            return "tables and dense part (from the ONNX initializers)"
    except ImportError:
        pass
    log("ranking: the bundle's dense part cannot be read back (batch norm folded into ONNX, no dense_state "
        "arrays): its tables are warm, the dense part starts anew")
    return "tables only"


def train_ranking(stage, stores: Stores, base: CtrData, logged: LoggedEvents, forgotten: set[str], *, epochs,
                  seed, warm: bool, shuffle_labels: bool, log) -> tuple[pipeline.Result, CtrData, dict]:
    import torch

    from .models.ctr import CtrModel, train_ctr

    schema = Schema.from_dict(stage.meta["schema"])
    if base.schema != schema:
        raise ValueError(f"the data's feature schema differs from the ranking bundle's ({stage.path}): the update "
                         "retrains from the data the bundle was trained on (--data, --data-option)")
    F = schema.n_fields
    gone_rows, gone_ids = _forgotten_ctr_rows(base, schema, forgotten)
    upos = schema.names.index("user_id") if "user_id" in schema.names else 0
    train = _drop_rows(base.train, F, upos, gone_rows)
    valid = _drop_rows(base.valid, F, upos, gone_rows)
    test = _drop_rows(base.test, F, upos, gone_rows)
    logged_batch, _ = stores.encode(logged.train_shown, logged.train_shown.labels)
    train = _concat([train, logged_batch]) if len(logged_batch) else train
    rng = np.random.default_rng(seed)
    if shuffle_labels:
        train = replace(train, labels=rng.permutation(train.labels))
        valid = replace(valid, labels=rng.permutation(valid.labels))
    data = replace(base, train=train, valid=valid, test=test)
    config = _config(stage, data, stage.meta.get("training"), epochs, seed)
    kind = stage.kind
    torch.manual_seed(seed)
    model = CtrModel(kind, schema, config.dim, config.params)
    loaded = "nothing (shuffled labels: trained from scratch)" if shuffle_labels else "nothing"
    if warm and not shuffle_labels:
        loaded = _warm_ctr(stage, model, log)
        if len(gone_rows):
            std = float(config.params.get("init_std", 0.01))
            with torch.no_grad():
                model.embedding[torch.from_numpy(gone_rows)] = torch.randn(len(gone_rows), config.dim) * std
                model.linear[torch.from_numpy(gone_rows)] = 0.0
    info = {"examples_logged": len(logged_batch), "examples_base": len(train) - len(logged_batch),
            "users_forgotten": len(gone_ids), "warm_start": loaded, "shuffled_labels": bool(shuffle_labels)}
    if stores.added:
        data = _with_added_items(data, stores)
        info["items_added"] = len(stores.added)
    log(f"ranking {kind}: {len(train)} examples ({len(logged_batch)} from logged impressions, "
        f"{int(np.sum(logged_batch.labels)) if len(logged_batch) else 0} clicked), {len(gone_ids)} forgotten users "
        f"dropped; warm start: {loaded}")
    t0 = time.perf_counter()
    model, hist = train_ctr(kind, data, config, log=lambda s: None, model=model)
    metrics = pipeline.evaluate_model(kind, model, data)
    return pipeline.Result(kind, model, hist, metrics, time.perf_counter() - t0), data, info


def _with_added_items(data: CtrData, stores: Stores) -> CtrData:
    """``data`` whose item feature columns (what the export stores as the item store) and item keys go on with
    the items added online, so the ranking stage describes the same items as the retrieval stage."""
    extra = dict(data.extra)
    ent = {e: dict(cols) for e, cols in (extra.get("entity_features") or {}).items()}
    if "item" in ent:
        for name in list(ent["item"]):
            ent["item"][name] = list(ent["item"][name]) + [(f or {}).get(name) for _, f in stores.added]
        extra["entity_features"] = ent
    keys = data.keys
    if keys is not None and keys.get("item") is not None:
        old = _key_list(keys["item"], len(keys["item"]))
        new_keys = old + [k for k, _ in stores.added]
        keys = {**keys, "item": np.array(new_keys, dtype=object if isinstance(new_keys[0], str) else np.int64)}
    return replace(data, extra=extra, keys=keys)


# ------------------------------------------------------------------------------------------ evaluation
def _auc_logloss(labels: np.ndarray, probs: np.ndarray) -> dict:
    from .evaluate import evaluate_ctr

    if len(labels) == 0 or labels.min() == labels.max():
        return {"auc": float("nan"), "logloss": float("nan"), "n": int(len(labels))}
    m = evaluate_ctr(labels.astype(np.float32), probs.astype(np.float32))
    return {"auc": float(m["auc"]), "logloss": float(m["logloss"]), "n": int(len(labels))}


def evaluate_version(path: Path, logged: LoggedEvents, *, k: int | None = None) -> dict:
    """The pipeline at ``path`` on the held-out events: ranking AUC / log loss over the shown items,
    retrieval recall@k (default: the pipeline's ``n_candidates``) of the held-out clicks."""
    from rec_engine.retrieval import UserState, load_retrieval

    top = open_bundle(path)
    stages = pipeline.pipeline_stages(top)
    rb, kb = stages.get("retrieval"), stages.get("ranking")
    out = {"n_candidates": int(top.meta.get("n_candidates", 500))}
    if kb is not None:
        from rec_engine.ranking import load_ranking

        stores = Stores(kb, _ranking_user_ids(kb, rb))
        batch, rows = stores.encode(logged.holdout_shown, logged.holdout_shown.labels)
        probs = load_ranking(kb)(batch) if len(batch) else np.zeros(0, np.float32)
        out["ranking"] = _auc_logloss(batch.labels if batch.labels is not None else np.zeros(0), probs)
        out["ranking"]["clicks"] = int(np.sum(batch.labels)) if len(batch) else 0
    if rb is not None:
        k = int(k or out["n_candidates"])
        ret = load_retrieval(rb)
        users = rb.key_map("user", ret.n_users)
        items = rb.key_map("item", ret.n_items)
        before: dict = {}
        for u, i, _ in logged.train_positives:
            before.setdefault(u, []).append(i)
        hits = total = 0
        by_user: dict = {}
        for u, i, _ in logged.holdout_positives:
            by_user.setdefault(u, []).append(i)
        for u, held in by_user.items():
            uid = int(_lookup(users, [u])[0])
            obs = _lookup(items, before.get(u, []))
            state = UserState(u, uid, np.ascontiguousarray(obs[obs >= 0]), 1 if len(obs) else 0)
            seen = ret.seen(state)
            target = _lookup(items, held)
            target = np.unique(target[(target >= 0) & ~np.isin(target, seen)])
            if not len(target):
                continue
            res = ret.retrieve(state, k, exclude=seen if len(seen) else None)
            got = set() if res is None else set(np.asarray(res.ids).tolist())
            hits += sum(int(t) in got for t in target)
            total += len(target)
        out["retrieval"] = {f"recall@{k}": hits / total if total else float("nan"), "n": total}
    return out


# ------------------------------------------------------------------------------------------ the update
def next_name(home: Path) -> str:
    """``v<N+1>`` for the largest ``v<N>`` bundle in ``home`` (``v2`` when there is none)."""
    nums = [int(m.group(1)) for p in home.iterdir() if (m := re.fullmatch(r"v(\d+)", p.name)) and p.is_dir()]
    return f"v{max(nums, default=1) + 1}"


def _post_swap(server: str, bundle: Path, token_env: str) -> dict:
    body = json.dumps({"bundle": str(bundle)}).encode()
    req = urllib.request.Request(server.rstrip("/") + "/swap", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    token = os.environ.get(token_env)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=120) as r:
        text = r.read().decode() or "{}"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"response": text}


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def format_comparison(report: dict) -> str:
    cur, new = report["current"], report["new"]
    rows = [("ranking AUC", cur.get("ranking", {}).get("auc"), new.get("ranking", {}).get("auc")),
            ("ranking logloss", cur.get("ranking", {}).get("logloss"), new.get("ranking", {}).get("logloss"))]
    rk = next((k for k in new.get("retrieval", {}) if k.startswith("recall@")), None)
    if rk:
        rows.append((f"retrieval {rk}", cur.get("retrieval", {}).get(rk), new.get("retrieval", {}).get(rk)))
    head = ("metric (held-out events)", f"current {report['current_name']}", f"new {report['name']}", "change")
    body = [(m, _fmt(a), _fmt(b), _fmt(None if a is None or b is None else b - a, "+.4f")) for m, a, b in rows]
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(4)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    g = report["gate"]
    lines = [line.format(*head), line.format(*("-" * w for w in widths)), *(line.format(*r) for r in body),
             f"gate: {'PROMOTED' if g['promoted'] else 'REFUSED'} ({g['reason']})"]
    return "\n".join(lines)


def update(home, events, *, data: str = "synthetic", data_options: dict | None = None, epochs: int | None = None,
           tolerance: float = DEFAULT_TOLERANCE, name: str | None = None, server: str | None = None,
           token_env: str = "REC_ENGINE_TOKEN", shuffle_labels: bool = False, holdout: float = DEFAULT_HOLDOUT,
           seed: int | None = None, warm_start: bool = True, log: Callable[[str], None] = print) -> dict:
    """Retrain the pipeline that ``home`` serves from its data plus the events of ``events`` (a store or its
    path), compare, and promote when the gate passes; see the module doc. Returns the comparison (also
    written to ``home/<name>.update.json``): ``current``, ``new`` (metrics), ``gate`` (``promoted``,
    ``reason``, ``tolerance``), ``retrieval`` / ``ranking`` (what the training used), ``bundle``."""
    from rec_engine import versions

    import torch

    home = Path(home)
    if not versions.is_home(home):
        raise ValueError(f"{home} is not a model home (a folder with a CURRENT pointer)")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    cur_name = versions.current(home)
    cur_path = versions.resolve(home)
    name = name or next_name(home)
    if (home / name).exists():
        raise FileExistsError(f"{home / name} exists: choose another --name")
    top = open_bundle(cur_path)
    if top.kind != "pipeline":
        raise ValueError(f"{cur_path} is a {top.kind} bundle: the update retrains pipelines (retrieval + ranking)")
    stages = pipeline.pipeline_stages(top)
    rb, kb = stages.get("retrieval"), stages.get("ranking")
    store = open_store(events)
    own_store = store is not events
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        forgotten = store.forgotten()
        logged = read_events(store, holdout)
        added = read_catalogue(store)
        log(f"events: {logged.n_impressions} impressions ({len(logged.train_shown)} shown items for training, "
            f"{len(logged.holdout_shown)} held out), {logged.n_positives} clicks/conversions, "
            f"{len(forgotten)} forgotten users")
        report = {"name": name, "current_name": cur_name, "current_path": str(cur_path), "tolerance": tolerance,
                  "holdout": holdout, "cut_ts": logged.cut_ts, "data": data}
        with tempfile.TemporaryDirectory(prefix=".update.", dir=home) as tmp:
            tmp = Path(tmp)
            parts = {}
            new_items = None        # keys of the items added online that the new version holds, in order
            for label, stage in (("retrieval", rb), ("ranking", kb)):
                if stage is None:
                    continue
                record = stage.meta.get("training")
                s = seed if seed is not None else int((record or {}).get("seed", 0))
                fam = get_kind(stage.kind).data
                base = load_base(fam, data, record, seed=s, data_options=data_options)
                if label == "retrieval":
                    if fam != "graph":
                        raise ValueError(f"the update retrains retrieval kinds trained on interactions; "
                                         f"{stage.kind} ({fam}) is not one")
                    result, d, info = train_retrieval(stage, base, logged, forgotten, epochs=epochs, seed=s,
                                                      warm=warm_start, log=log, added=added)
                    new_items = _key_list(d.keys and d.keys["item"], d.train.n_items)[base.train.n_items:]
                else:
                    if new_items is None:       # no retrieval stage: the ranking stage's own catalogue
                        n_k = len(stage.array("item_features_offsets")) - 1 if stage.has(
                            "arrays/item_features_offsets.npy") else 0
                        n_k //= max(1, len((stage.meta.get("entity_fields") or {}).get("item", ())))
                        new_items = _new_items(stage.key_map("item", n_k).key_array().tolist(), added)
                    stores = Stores(stage, _ranking_user_ids(stage, rb),
                                    [(k, (added.get(k) or {}).get("features")) for k in new_items])
                    result, d, info = train_ranking(stage, stores, base, logged, forgotten, epochs=epochs, seed=s,
                                                    warm=warm_start, shuffle_labels=shuffle_labels, log=log)
                content = carried_content(stage, d, log, added) if label == "retrieval" else None
                rec = dict(record or {"data": data, "seed": s})
                rec["update"] = {"from": cur_name, "events": getattr(store, "url", ""), **info}
                parts[label] = pipeline.export(result, d, tmp / label, training=rec, content=content)
                if content is not None:
                    c = open_bundle(parts[label], verify=False).meta["content"]
                    info["content"] = {"items_with_text": int(content.has.sum()), "n_fit": c["n_fit"],
                                       "ridge": c["ridge"], "fit_r2": c["fit_r2"], "cv_r2": c["cv_r2"]}
                    log(f"content: {int(content.has.sum())} of {len(content.has)} items' vectors carried over; map "
                        f"refitted on {c['n_fit']} items, R^2 {c['fit_r2']:.3f} (leave-one-out {c['cv_r2']:.3f})")
                report[label] = {"kind": stage.kind, "test": result.metrics, **info}
            ranking_meta = top.meta.get("ranking") or {}
            new_path = write_pipeline(home / name, retrieval=parts.get("retrieval"), ranking=parts.get("ranking"),
                                      n_candidates=int(top.meta.get("n_candidates", 500)),
                                      index=(top.meta.get("index") or {}).get("precision", "float32"),
                                      ranking_precision=ranking_meta.get("precision", "float32"))
        report["bundle"] = str(new_path)
        report["current"] = evaluate_version(cur_path, logged)
        report["new"] = evaluate_version(new_path, logged)
        report["gate"] = gate(report["current"], report["new"], tolerance)
        if not np.isfinite(report["current"].get("ranking", {}).get("auc", float("nan"))):
            report["gate"]["note"] = "no held-out impressions with both clicks and non-clicks"
        report["seconds"] = time.perf_counter() - t0
        if report["gate"]["promoted"]:
            versions.promote(home, name)
            if server:
                report["server"] = _post_swap(server, new_path.resolve(), token_env)
        (home / f"{name}.update.json").write_text(json.dumps(report, indent=1, default=_json_default))
        log(format_comparison(report))
        return report
    finally:
        torch.set_num_threads(threads)
        if own_store:
            store.close()


def gate(current: dict, new: dict, tolerance: float) -> dict:
    """Promote when the new ranking AUC on the held-out impressions is at least the current one's minus
    ``tolerance``; with nothing to compare on (no held-out clicks and non-clicks), refuse."""
    a = current.get("ranking", {}).get("auc", float("nan"))
    b = new.get("ranking", {}).get("auc", float("nan"))
    if not (np.isfinite(a) and np.isfinite(b)):
        return {"promoted": False, "tolerance": tolerance,
                "reason": "nothing to compare on: the held-out impressions lack clicks or non-clicks"}
    ok = bool(b >= a - tolerance)
    return {"promoted": ok, "tolerance": tolerance, "auc_change": b - a,
            "reason": f"new AUC {b:.4f} vs current {a:.4f}: " + (
                "better" if b > a else f"no more than {tolerance:g} below" if ok else f"more than {tolerance:g} below")}


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
