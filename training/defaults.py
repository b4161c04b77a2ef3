"""Per-model defaults and search spaces: what ``rec-engine train MODEL`` uses when a flag is not given,
and what ``--tune N`` searches.

A setting resolves, most specific first: an explicit flag / ``--param`` (``explicit``), then the model's
defaults below, then :class:`TrainConfig`'s own. The defaults were chosen to generalise rather than to win
one data set, checked on Gowalla (810k train interactions), MovieLens ml-latest-small (100k, leave-last-out)
and the synthetic world (21k):

- Graph / CF models trained with BPR (``mf``, ``lightgcn``, ``ngcf``): the settings of the README's best
  Gowalla runs (dim 64, Adam lr 5e-3, L2 1e-3, users sampled uniformly, each negative the hardest of 8
  uniform candidates, batches of 16,384 pairs). On the small sets large batches were as good or better
  than 2,048 (LightGCN 0.1213 both on MovieLens, 0.468 vs 0.464 synthetic; MF 0.407 vs 0.390 synthetic)
  and faster, since LightGCN and NGCF propagate the whole graph every step. These models learn slowly at
  first (the old defaults, dim 16, lr 1e-3, patience 3, stopped LightGCN at epoch 2 on Gowalla), so:
  up to 400 epochs, validation every 5th, patience 8 validations (40 epochs), counted only after the
  first tenth of the run, and a relative gain of 1e-3 to reset it. No per-epoch learning-rate decay,
  NGCF included: the README's 0.96 an epoch helps NGCF on Gowalla (0.1599 vs 0.1554) and the synthetic
  world (0.420 vs 0.406) but costs more on MovieLens (0.095 vs 0.118), where an epoch is 7 steps and the
  rate is a tenth by epoch 56; without it the worst case is overfitting after the peak, which early
  stopping cuts off.
- Training-free graph filters (``gfcf``, ``bspm``): the papers' Gowalla settings (GF-CF alpha 0.3 and 256
  singular vectors; BSPM-EM alpha 0.2, 448 vectors, sharpening 2.5 in one RK4 step), ``k_ideal`` capped at
  a quarter of the smaller side of the train matrix (a rank bound; the best ``k_ideal`` is data-dependent:
  32 on the synthetic world, ~256 on MovieLens: ``--tune``). ``ease``: ridge lambda 200 (best of
  50-2000 on both small sets: 100-200; Steck's values for large sets are 200-1000).
- CTR models: the README's frappe settings; SASRec: the README's Video settings.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .loop import TrainConfig

CONFIG_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "dim", "patience", "eval_every", "min_epochs",
                 "min_delta")


# ------------------------------------------------------------------------------------------ search distributions
@dataclasses.dataclass(frozen=True)
class LogUniform:
    """A float drawn log-uniformly from ``[low, high]``."""

    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        return float(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))

    def __str__(self) -> str:
        return f"log-uniform [{self.low:g}, {self.high:g}]"


@dataclasses.dataclass(frozen=True)
class Uniform:
    """A float drawn uniformly from ``[low, high]``."""

    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))

    def __str__(self) -> str:
        return f"uniform [{self.low:g}, {self.high:g}]"


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of ``values``, uniformly."""

    values: tuple

    def sample(self, rng: np.random.Generator) -> Any:
        v = self.values[int(rng.integers(len(self.values)))]
        return list(v) if isinstance(v, tuple) else v

    def __str__(self) -> str:
        return "{" + ", ".join(_fmt(v) for v in self.values) + "}"


def _fmt(v) -> str:
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# ------------------------------------------------------------------------------------------ defaults per kind
_BPR_CONFIG = {"epochs": 400, "batch_size": 16384, "lr": 5e-3, "dim": 64, "patience": 8, "eval_every": 5}
_BPR_PARAMS = {"reg": 1e-3, "sampling": "user", "dns_candidates": 8}
_CTR_CONFIG = {"epochs": 100, "batch_size": 1024, "lr": 1e-3, "dim": 10, "patience": 5, "eval_every": 1}
_DEEP_PARAMS = {"mlp": [400, 400, 400], "dropout": 0.2, "batch_norm": True, "emb_l2": 1e-5}
_NO_EPOCHS: dict = {}     # training-free / closed-form models: TrainConfig's epoch settings do not apply

DEFAULTS: dict[str, dict[str, dict]] = {
    "popularity": {"config": _NO_EPOCHS, "params": {}},
    "mf": {"config": dict(_BPR_CONFIG), "params": dict(_BPR_PARAMS)},
    "lightgcn": {"config": dict(_BPR_CONFIG), "params": {**_BPR_PARAMS, "n_layers": 3}},
    # no per-epoch learning-rate decay by default (the README's Gowalla run decays 0.96 an epoch): a decay per
    # epoch is a decay per 50 steps on Gowalla but per 2-7 on small data (see the module doc)
    "ngcf": {"config": dict(_BPR_CONFIG), "params": {**_BPR_PARAMS, "n_layers": 3, "dropout": 0.1}},
    "gfcf": {"config": _NO_EPOCHS, "params": {"alpha": 0.3, "k_ideal": 256}},
    "bspm": {"config": _NO_EPOCHS, "params": {"alpha": 0.2, "k_ideal": 448, "sharpen": 2.5, "sharpen_solver": "rk4",
                                              "sharpen_steps": 1}},
    "ease": {"config": _NO_EPOCHS, "params": {"l2": 200.0}},
    "lr": {"config": dict(_CTR_CONFIG), "params": {}},
    "fm": {"config": dict(_CTR_CONFIG), "params": {"emb_l2": 1e-5}},
    "widedeep": {"config": dict(_CTR_CONFIG), "params": dict(_DEEP_PARAMS)},
    "deepfm": {"config": dict(_CTR_CONFIG), "params": dict(_DEEP_PARAMS)},
    "xdeepfm": {"config": dict(_CTR_CONFIG), "params": {**_DEEP_PARAMS, "cin": [64, 64]}},
    "sasrec": {"config": {"epochs": 400, "batch_size": 128, "lr": 1e-3, "dim": 50, "patience": 10, "eval_every": 5},
               "params": {"max_len": 50, "dropout": 0.5, "n_blocks": 2}},
}

# ------------------------------------------------------------------------------------------ search spaces
_BPR_SPACE = {"lr": LogUniform(1e-3, 2e-2), "reg": LogUniform(1e-5, 1e-2), "dim": Choice((32, 64, 128)),
              "dns_candidates": Choice((1, 4, 8, 16))}
_DEEP_SPACE = {"lr": LogUniform(3e-4, 1e-2), "dim": Choice((8, 10, 16, 32)),
               "dropout": Choice((0.0, 0.1, 0.2, 0.3, 0.5)),
               "mlp": Choice(((128, 64), (256, 128), (400, 400, 400), (256, 256, 256))),
               "emb_l2": LogUniform(1e-7, 1e-4)}
_K_IDEAL = Choice((32, 64, 128, 256, 448, 512))

SEARCH_SPACES: dict[str, dict[str, Any]] = {
    "popularity": {},
    "mf": dict(_BPR_SPACE),
    "lightgcn": {**_BPR_SPACE, "n_layers": Choice((1, 2, 3, 4))},
    "ngcf": {**_BPR_SPACE, "dim": Choice((32, 64)), "n_layers": Choice((1, 2, 3)),
             "dropout": Choice((0.0, 0.1, 0.2)), "lr_decay": Choice((1.0, 0.98, 0.96, 0.93))},
    "gfcf": {"alpha": Uniform(0.0, 1.0), "k_ideal": _K_IDEAL},
    "bspm": {"alpha": Uniform(0.0, 1.0), "k_ideal": _K_IDEAL, "sharpen": Uniform(0.5, 4.0),
             "sharpen_solver": Choice(("euler", "rk4")), "sharpen_steps": Choice((1, 2))},
    "ease": {"l2": LogUniform(10.0, 5000.0)},
    "lr": {"lr": LogUniform(3e-4, 1e-2)},
    "fm": {"lr": LogUniform(3e-4, 1e-2), "dim": Choice((8, 10, 16, 32)), "emb_l2": LogUniform(1e-7, 1e-4)},
    "widedeep": dict(_DEEP_SPACE),
    "deepfm": dict(_DEEP_SPACE),
    "xdeepfm": {**_DEEP_SPACE, "cin": Choice(((64, 64), (128, 128), (64, 64, 64)))},
    "sasrec": {"lr": LogUniform(3e-4, 3e-3), "dropout": Choice((0.1, 0.2, 0.3, 0.5)), "n_blocks": Choice((1, 2, 3))},
}


def model_defaults(kind: str) -> dict[str, dict]:
    """``{"config": {TrainConfig field: value}, "params": {...}}`` of model ``kind`` (copies; empty for a
    kind without defaults here: TrainConfig's then apply)."""
    d = DEFAULTS.get(kind, {"config": {}, "params": {}})
    return {"config": dict(d["config"]), "params": {k: (list(v) if isinstance(v, (list, tuple)) else v)
                                                    for k, v in d["params"].items()}}


def search_space(kind: str, data=None) -> dict[str, Any]:
    """What ``--tune`` searches for ``kind``: ``{name: LogUniform | Uniform | Choice}``; a name that is a
    :class:`TrainConfig` field (``lr``, ``dim``, ...) sets that field, any other a ``params`` entry. With
    ``data`` given, ``k_ideal`` choices are capped like the default (:func:`resolve_params`)."""
    space = dict(SEARCH_SPACES.get(kind, {}))
    cap = _k_ideal_cap(data)
    if "k_ideal" in space and cap is not None:
        values = tuple(sorted({min(int(v), cap) for v in space["k_ideal"].values}))
        space["k_ideal"] = Choice(values)
    return space


def is_iterative(kind: str) -> bool:
    """Whether ``kind`` trains by epochs (the TrainConfig epoch settings apply to it), from the registry."""
    from rec_engine.kinds import get_kind

    return bool(get_kind(kind).epochs)


# ------------------------------------------------------------------------------------------ resolving
def _k_ideal_cap(data) -> int | None:
    train = getattr(data, "train", None)
    if train is None or not hasattr(train, "n_users"):
        return None
    return max(1, min(int(train.n_users), int(train.n_items)) // 4)


def resolve_params(kind: str, data=None, explicit: dict | None = None) -> dict:
    """The model's default params updated by ``explicit``, data-dependent values resolved."""
    params = {**model_defaults(kind)["params"], **(explicit or {})}
    cap = _k_ideal_cap(data)
    if "k_ideal" in params and cap is not None and not (explicit and "k_ideal" in explicit):
        params["k_ideal"] = min(int(params["k_ideal"]), cap)
    return params


def resolve_config(kind: str, data=None, explicit: dict | None = None, params: dict | None = None,
                   **common) -> TrainConfig:
    """A :class:`TrainConfig` for ``kind``: ``explicit`` fields (None values are ignored), else the model's
    defaults, else TrainConfig's; ``params`` (explicit ones) over the model's default params;
    ``common`` (``seed``, ``num_threads``, ``progress``, ...) passed as they are; ``data`` caps ``k_ideal``
    (:func:`resolve_params`)."""
    fields = model_defaults(kind)["config"]
    fields.update({k: v for k, v in (explicit or {}).items() if v is not None})
    unknown = set(fields) - set(CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
    return TrainConfig(**fields, **common, params=resolve_params(kind, data, params))


def describe(kind: str) -> str:
    """The defaults and the search space of ``kind``, for ``rec-engine train KIND --help``."""
    d = model_defaults(kind)
    base = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in CONFIG_FIELDS}
    lines = [f"defaults of {kind}:"]
    if d["config"]:
        cfg = {**base, **d["config"]}
        cfg["min_epochs"] = (f"{cfg['min_epochs']}" if cfg["min_epochs"] is not None
                             else f"a tenth of epochs ({math.ceil(cfg['epochs'] / 10)})")
        lines.append("  " + ", ".join(f"{k} {_fmt(v)}" for k, v in cfg.items()))
    else:
        lines.append("  no epochs (closed form / training-free): epoch, batch and lr settings do not apply")
    if d["params"]:
        cap = " (k_ideal capped at a quarter of the smaller side of the train matrix)" * ("k_ideal" in d["params"])
        lines.append("  params: " + ", ".join(f"{k}={_fmt(v)}" for k, v in d["params"].items()) + cap)
    space = SEARCH_SPACES.get(kind, {})
    lines.append("  --tune searches: " + ("; ".join(f"{k} {v}" for k, v in space.items()) if space
                                          else "nothing (no settings)"))
    return "\n".join(lines)
