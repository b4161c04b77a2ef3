"""The one registry of model kinds: every reader (training, export, the CLI, ``evaluate``, the engine) asks it.

A bundle's ``kind`` names an entry here. An entry says what serves the kind and what trains it:

- ``family``: how a bundle of the kind scores, which decides the class that serves it and the exporter
  that writes it:

  ============  =============================================================================
  ``ctr``        feature-schema CTR model: core lookups + ONNX dense part (ranking)
  ``sequential`` ONNX encoder over the user's latest items -> user vector, top-k over item vectors
  ``graph``      stored user and item vectors scored by inner product (MF, graph CF, popularity)
  ``filter``     a training-free graph filter applied to the user's item row (GF-CF, BSPM)
  ``item_item``  the user's scores are the sum of its items' rows of an item-item matrix (EASE^R)
  ============  =============================================================================

- ``stage``: ``"retrieval"`` (scores every item for a user) or ``"ranking"`` (scores given candidates);
- ``data``: what it trains and is evaluated on (``rec_engine_train.pipeline.load_data``): ``"ctr"``
  (labelled examples over a feature schema), ``"sequential"`` (time-ordered item sequences, split
  leave-last-out) or ``"graph"`` (user-item interactions split into train / test);
- ``epochs``: whether it trains by epochs (gradient descent) or is fitted in one pass / closed form;
- ``folds_in``: whether items a user is observed with online change its scores at once;
- ``description``: one line for help texts.

A new kind is one :func:`register` call (or one entry below). Readers that keep a list of names hold a
:class:`KindNames` view (e.g. ``names(family="graph")``), which asks the registry each time it is used.
No torch here: serving imports this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

STAGES = ("retrieval", "ranking")
DATA = ("ctr", "sequential", "graph")


@dataclass(frozen=True)
class Kind:
    """One model kind (see the module docstring for the fields)."""

    name: str
    family: str
    stage: str
    data: str
    epochs: bool
    folds_in: bool
    description: str

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a kind's name must be an identifier, got {self.name!r}")
        if not isinstance(self.family, str) or not self.family:
            raise ValueError(f"kind {self.name!r}: family must be a non-empty string, got {self.family!r}")
        if self.stage not in STAGES:
            raise ValueError(f"kind {self.name!r}: stage must be one of {STAGES}, got {self.stage!r}")
        if self.data not in DATA:
            raise ValueError(f"kind {self.name!r}: data must be one of {DATA}, got {self.data!r}")


_REGISTRY: dict[str, Kind] = {}


def register(kind: Kind, *, replace: bool = False) -> Kind:
    """Add ``kind`` to the registry (``replace=True`` to redefine an existing name) and return it."""
    if not isinstance(kind, Kind):
        raise TypeError(f"register needs a Kind, got {type(kind).__name__}")
    if kind.name in _REGISTRY and not replace:
        raise ValueError(f"kind {kind.name!r} is already registered (pass replace=True to redefine it)")
    _REGISTRY[kind.name] = kind
    return kind


def get_kind(name: str) -> Kind:
    """The registered kind ``name``; ValueError naming the known kinds otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}") from None


def kinds(stage: str | None = None, family: str | None = None, *, data: str | None = None,
          epochs: bool | None = None) -> tuple[Kind, ...]:
    """The registered kinds (in registration order) matching every filter given."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return tuple(k for k in _REGISTRY.values()
                 if (stage is None or k.stage == stage) and (family is None or k.family == family)
                 and (data is None or k.data == data) and (epochs is None or k.epochs == epochs))


class KindNames(Sequence[str]):
    """The names of the kinds matching a filter, read from the registry at every use (a kind registered
    later shows up); compares equal to, and prints as, a tuple of names."""

    def __init__(self, stage: str | None = None, family: str | None = None, *, data: str | None = None,
                 epochs: bool | None = None):
        self._filters = dict(stage=stage, family=family, data=data, epochs=epochs)

    def _names(self) -> tuple[str, ...]:
        return tuple(k.name for k in kinds(**self._filters))

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __add__(self, other) -> tuple[str, ...]:
        return self._names() + tuple(other)

    def __radd__(self, other) -> tuple[str, ...]:
        return tuple(other) + self._names()

    def __eq__(self, other) -> bool:
        return isinstance(other, (tuple, list, KindNames)) and self._names() == tuple(other)

    def __hash__(self):
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


def names(stage: str | None = None, family: str | None = None, *, data: str | None = None,
          epochs: bool | None = None) -> KindNames:
    """A live :class:`KindNames` view of the kinds matching the filters."""
    return KindNames(stage, family, data=data, epochs=epochs)


for _k in (
    Kind("lr", "ctr", "ranking", "ctr", True, False, "logistic regression over the feature schema"),
    Kind("fm", "ctr", "ranking", "ctr", True, False, "factorization machine: linear terms and pairwise field "
         "interactions"),
    Kind("widedeep", "ctr", "ranking", "ctr", True, False, "Wide & Deep: linear part and an MLP over the field "
         "embeddings"),
    Kind("deepfm", "ctr", "ranking", "ctr", True, False, "DeepFM: FM and an MLP sharing the field embeddings"),
    Kind("xdeepfm", "ctr", "ranking", "ctr", True, False, "xDeepFM: linear part, compressed interaction network "
         "and an MLP"),
    Kind("sasrec", "sequential", "retrieval", "sequential", True, True, "SASRec: self-attention over the user's "
         "latest items gives its vector"),
    Kind("mf", "graph", "retrieval", "graph", True, False, "matrix factorization trained with BPR"),
    Kind("lightgcn", "graph", "retrieval", "graph", True, True, "LightGCN: ID embeddings averaged over graph "
         "propagation layers (BPR); folds new interactions in"),
    Kind("ngcf", "graph", "retrieval", "graph", True, False, "NGCF: graph propagation with feature transforms "
         "(BPR)"),
    Kind("popularity", "graph", "retrieval", "graph", False, False, "train interaction counts, the same order for "
         "every user (baseline)"),
    Kind("gfcf", "filter", "retrieval", "graph", False, True, "GF-CF: training-free normalized item-item filter "
         "plus an ideal low-pass (Shen et al. 2021)"),
    Kind("bspm", "filter", "retrieval", "graph", False, True, "BSPM-EM: GF-CF's filter, then a sharpening ODE "
         "(Choi et al. 2023)"),
    Kind("ease", "item_item", "retrieval", "graph", False, True, "EASE^R: closed-form item-item regression "
         "(Steck 2019); a user's scores sum its items' rows"),
):
    register(_k)
del _k
