"""``rec-engine train MODEL --tune N --time-budget SECONDS``: a seeded random search on a validation split
cut from the training data, then the best setting refitted on the whole training data.

Validation data per family (the test split is never looked at during the search):

- graph / CF (:class:`ImplicitSplit`): :func:`validation_split` holds out, per user, the latest
  ``fraction`` of its *train* interactions (by timestamp when ``train.timestamps`` is set, else a seeded
  random subset); each trial trains on the rest (early stopping on the held-out part) and is scored by
  Recall@20 on it. The data's own ``valid`` part, if any, is not used by the trials.
- sequential (:class:`SequenceData`): the data's ``valid`` split (each user's second-to-last item),
  monitored HR@10 with 100 sampled negatives, as in training.
- CTR (:class:`CtrData`): the data's ``valid`` batch, AUC.

Trial 1 is the base setting (the model's defaults under the explicit flags); trials 2..N draw every
searched setting from :func:`rec_engine_train.defaults.search_space`, except those given explicitly
(which stay fixed). The best trial is the earliest whose metric is within ``min_delta`` (relative, the
early-stopping threshold) of the highest: smaller differences are noise, and the defaults stay unless a
setting beats them by more. A trial gets at most ``remaining budget / trials left`` seconds (``time_limit``: an
epoch-trained model stops, keeping its best epoch; a closed-form fit cannot be cut); once the budget is
spent, no trial starts (they are listed as skipped).

Refit: graph models are retrained on the whole training data with the best setting: with early stopping
on the data's ``valid`` part when it has one, else for the best trial's best epoch count with no
per-epoch selection at all (Gowalla-style data has only train and test, and the test split must not
pick anything). For sequential and CTR data the trials already trained on the whole training data with
the data's own validation split, so the best trial's model *is* the refit (retraining it with the same
seed would repeat it) and is kept.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np

from . import defaults as dflt
from . import pipeline
from .data.containers import CtrData, ImplicitSplit, Interactions, SequenceData
from .loop import TrainConfig

MONITOR = {"graph": "recall@20", "sequential": "hr@10", "ctr": "auc"}
_REPORTED = {"graph": ("ndcg@20",), "sequential": ("ndcg@10",), "ctr": ("logloss",)}   # beside the monitor
_clock = time.perf_counter          # the search's clock (tests replace it)


@dataclasses.dataclass
class Trial:
    """One setting of the search: its searched values, validation metric and wall time."""

    index: int
    setting: dict
    status: str = "pending"            # "ok", "failed", "skipped"
    metric: float | None = None
    seconds: float = 0.0
    epochs: int | None = None          # epochs run (epoch-trained models)
    best_epoch: int | None = None
    stop_reason: str = ""
    error: str = ""
    extra: dict = dataclasses.field(default_factory=dict)   # other validation metrics (e.g. ndcg@20)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in ("", None, {})}


@dataclasses.dataclass
class TuneResult:
    result: pipeline.Result            # the refitted (or kept) best model, evaluated on test
    trials: list[Trial]
    best: Trial
    monitor: str
    record: dict                       # what goes into the bundle's meta (metrics.tune) and the metrics JSON


# ------------------------------------------------------------------------------------------ validation split
def validation_split(split: ImplicitSplit, fraction: float = 0.2, seed: int = 0) -> ImplicitSplit:
    """An :class:`ImplicitSplit` cut from ``split.train`` alone: per user, ``round(fraction * n)`` of its
    ``n`` train events (at least 1 when ``n >= 3``, always leaving at least 1 in train) are held out: the
    latest by ``train.timestamps`` (ties: the later in the file) when there are timestamps, else a seeded
    random choice. Held-out events whose (user, item) pair is still in the kept part are dropped (they
    could never be recommended). The result has ``valid`` and ``test`` both the held-out part, the same
    user and item id spaces as ``split``, and nothing of ``split.test`` or ``split.valid``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    train = split.train
    n = len(train)
    users = train.users
    if train.timestamps is not None:
        key = np.asarray(train.timestamps, np.int64)
    else:
        key = np.random.default_rng(seed).permutation(n)
    order = np.lexsort((np.arange(n), key, users))       # by user, then key, then file order
    counts = np.bincount(users, minlength=train.n_users)
    start = np.repeat(np.cumsum(counts) - counts, counts)
    pos = np.empty(n, np.int64)
    pos[order] = np.arange(n) - start                    # rank of each event within its user
    cnt = counts[users]
    held = np.minimum(cnt - 1, np.maximum(np.where(cnt >= 3, 1, 0), np.round(fraction * cnt).astype(np.int64)))
    out = pos >= cnt - held
    keep_idx, out_idx = order[~out[order]], order[out[order]]

    def take(idx):
        ts = None if train.timestamps is None else train.timestamps[idx]
        return Interactions(train.users[idx], train.items[idx], train.n_users, train.n_items, timestamps=ts)

    kept = take(keep_idx)
    kept_pairs = np.unique(kept.users * train.n_items + kept.items)
    out_pairs = train.users[out_idx] * train.n_items + train.items[out_idx]
    out_idx = out_idx[~np.isin(out_pairs, kept_pairs)]
    held_out = take(out_idx)
    return ImplicitSplit(train=kept, test=held_out, valid=held_out, name=f"{split.name}/tune-valid")


# ------------------------------------------------------------------------------------------ settings
def sample_settings(space: dict, n: int, seed: int, fixed=()) -> list[dict]:
    """``n`` settings: the first empty (the base setting), then draws from ``space`` without the keys in
    ``fixed``, seeded; a draw equal to an earlier one is redrawn (up to 20 times)."""
    rng = np.random.default_rng(seed)
    free = {k: v for k, v in space.items() if k not in set(fixed)}
    out: list[dict] = [{}]
    seen: list[dict] = []
    for _ in range(max(n - 1, 0)):
        for _attempt in range(20):
            s = {k: dist.sample(rng) for k, dist in free.items()}
            if s not in seen:
                break
        seen.append(s)
        out.append(s)
    return out[:max(n, 0)]


def apply_setting(config: TrainConfig, setting: dict) -> TrainConfig:
    """``config`` with the searched values: TrainConfig fields by name, the rest into ``params``."""
    fields = {k: v for k, v in setting.items() if k in dflt.CONFIG_FIELDS}
    params = {**config.params, **{k: v for k, v in setting.items() if k not in dflt.CONFIG_FIELDS}}
    return dataclasses.replace(config, **fields, params=params)


def _describe(setting: dict, base: TrainConfig, searched: list[str]) -> dict:
    """The searched values of a trial: drawn ones, and for trial 1 the base values."""
    out = {}
    for k in searched:
        if k in setting:
            out[k] = setting[k]
        elif k in dflt.CONFIG_FIELDS:
            out[k] = getattr(base, k)
        else:
            out[k] = base.params.get(k)
    return out


# ------------------------------------------------------------------------------------------ search
def _fit_trial(name: str, data, config: TrainConfig, log):
    """Train one trial; return (Result or None, validation metrics). Graph: a pipeline run on the
    validation split (its 'test' is the held-out part); sequential / CTR: the family's trainer, its best
    validation epoch (no test evaluation)."""
    fam = pipeline.family_of(name)
    if fam == "graph":
        res = pipeline.train(name, data, config, log=log)
        return res, {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))}
    t0 = time.perf_counter()
    if fam == "ctr":
        from .models.ctr import train_ctr

        model, hist = train_ctr(name, data, config, log=log)
    else:
        from .models.sasrec import train_sasrec

        model, hist = train_sasrec(data, config, log=log)
    res = pipeline.Result(name, model, hist, {}, time.perf_counter() - t0)
    return res, {k: float(v) for k, v in hist.best.items() if k not in ("epoch", "loss", "seconds")}


def tune(name: str, data, base: TrainConfig, n_trials: int, *, time_budget: float | None = None,
         fixed=(), fraction: float = 0.2, log: Callable[[str], None] = print,
         trial_log: Callable[[str], None] | None = None) -> TuneResult:
    """Random search of ``n_trials`` settings for model ``name`` on ``data`` (see the module doc).

    Parameters
    ----------
    base : TrainConfig  the setting of trial 1 and of everything not searched (defaults + explicit flags)
    time_budget : seconds for all trials together (None: no limit)
    fixed : names (TrainConfig fields or params) given explicitly: never searched
    fraction : share of each user's train events held out for validation (graph / CF data)
    trial_log : the trials' training log (default: none, only a line per trial through ``log``)

    Returns
    -------
    TuneResult, whose ``result`` is evaluated on the test split like an untuned run's, with
    ``result.extra["tune"] = record``.
    """
    if int(n_trials) < 1:
        raise ValueError(f"--tune needs at least 1 setting, got {n_trials}")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"the time budget must be a positive number of seconds, got {time_budget}")
    fam = pipeline.family_of(name)
    monitor = MONITOR[fam]
    quiet = trial_log or (lambda _s: None)
    iterative = dflt.is_iterative(name)
    if fam == "graph":
        if not isinstance(data, ImplicitSplit):
            raise TypeError(f"{name} tunes on an ImplicitSplit, got {type(data).__name__}")
        tune_data = validation_split(data, fraction, seed=base.seed)
        how = (f"per user the latest {fraction:.0%} of its train events by timestamp"
               if data.train.timestamps is not None
               else f"per user a random {fraction:.0%} of its train events (seed {base.seed}; no timestamps)")
    elif fam == "sequential":
        if not isinstance(data, SequenceData):
            raise TypeError(f"{name} tunes on a SequenceData, got {type(data).__name__}")
        tune_data, how = data, "the data's valid split (each user's second-to-last item)"
    else:
        if not isinstance(data, CtrData):
            raise TypeError(f"{name} tunes on a CtrData, got {type(data).__name__}")
        tune_data, how = data, "the data's valid examples"
    space = dflt.search_space(name, data)
    fixed = set(fixed)
    searched = [k for k in space if k not in fixed]
    n = int(n_trials) if searched else 1
    settings = sample_settings(space, n, base.seed, fixed)
    log(f"tune {name}: {n} setting(s), {'no time budget' if time_budget is None else f'budget {time_budget:g}s'}; "
        f"validation: {how}; metric {monitor}; searching {', '.join(searched) or 'nothing'}"
        + (f"; fixed {', '.join(sorted(fixed & set(space)))}" if fixed & set(space) else ""))
    trials: list[Trial] = []
    results: dict[int, pipeline.Result] = {}
    t_search = _clock()
    for i, setting in enumerate(settings):
        trial = Trial(i + 1, _describe(setting, base, searched))
        trials.append(trial)
        spent = _clock() - t_search
        if time_budget is not None and spent >= time_budget:
            trial.status = "skipped"
            continue
        config = apply_setting(base, setting)
        if time_budget is not None and iterative:
            config = dataclasses.replace(config, time_limit=(time_budget - spent) / (len(settings) - i))
        t0 = _clock()
        try:
            res, metrics = _fit_trial(name, tune_data, config, quiet)
        except (ValueError, FloatingPointError, RuntimeError, MemoryError) as e:
            trial.status, trial.error, trial.seconds = "failed", f"{type(e).__name__}: {e}", _clock() - t0
            log(f"  trial {trial.index}/{n} failed: {trial.error}")
            continue
        trial.seconds = _clock() - t0
        trial.status, trial.metric = "ok", metrics.get(monitor)
        trial.extra = {k: metrics[k] for k in _REPORTED[fam] if k in metrics}
        hist = res.history
        if hist is not None and hist.epochs:
            trial.epochs, trial.best_epoch, trial.stop_reason = len(hist.epochs), hist.best_epoch, hist.stop_reason
        if fam != "graph":
            results[trial.index] = res
        log(f"  trial {trial.index}/{n}: {monitor} {trial.metric:.4f}  ({trial.seconds:.1f}s)  "
            f"{_fmt_setting(trial.setting)}")
    done = [t for t in trials if t.status == "ok" and t.metric is not None and math.isfinite(t.metric)]
    if not done:
        raise RuntimeError(f"tune {name}: no setting trained successfully: "
                           + "; ".join(f"trial {t.index}: {t.error or t.status}" for t in trials))
    # metrics within min_delta (relative, as in early stopping) of the best are ties: noise, resolved toward
    # the earlier trial, so the defaults (trial 1) are only replaced by a setting that is better beyond it
    top = max(t.metric for t in done)
    best = min((t for t in done if t.metric >= top - base.min_delta * abs(top)), key=lambda t: t.index)
    search_seconds = _clock() - t_search
    final = apply_setting(base, settings[best.index - 1])

    t0 = time.perf_counter()
    if fam == "graph":
        if iterative and data.valid is None:
            epochs = max(int(best.best_epoch or final.epochs), 1)
            final = dataclasses.replace(final, epochs=epochs, eval_every=epochs, patience=0)
            refit = (f"retrained on all train data for the best trial's {epochs} epochs (no valid split: the "
                     "test split selects nothing)")
        elif iterative:
            refit = "retrained on all train data, early stopping on the data's valid split"
        else:
            refit = "refitted on all train data"
        log(f"tune {name}: best trial {best.index} ({monitor} {best.metric:.4f}); {refit}")
        result = pipeline.train(name, data, final, log=log)
    else:
        refit = "kept the best trial's model (it trained on all train data, validated on the data's valid split)"
        res = results[best.index]
        result = pipeline.Result(name, res.model, res.history, pipeline.evaluate_model(name, res.model, data),
                                 res.train_seconds)
    refit_seconds = time.perf_counter() - t0
    record = {
        "n": int(n_trials), "time_budget": time_budget, "monitor": monitor, "validation": how,
        "space": {k: str(v) for k, v in space.items()}, "fixed": sorted(fixed & set(space)),
        "trials": [t.to_dict() for t in trials], "best": best.index, "chosen": best.setting,
        "config": {k: getattr(final, k) for k in dflt.CONFIG_FIELDS} | {"params": final.params},
        "refit": refit, "search_seconds": search_seconds, "refit_seconds": refit_seconds,
        "skipped": [t.index for t in trials if t.status == "skipped"],
    }
    result.extra["tune"] = record
    return TuneResult(result, trials, best, monitor, record)


def _fmt_setting(setting: dict) -> str:
    return " ".join(f"{k}={_fmt_value(v)}" for k, v in setting.items())


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def format_table(tr: TuneResult) -> str:
    """The search as a markdown table: trial, status, every searched setting, the metric, epochs, seconds;
    the chosen trial marked."""
    keys = list(tr.trials[0].setting) if tr.trials else []
    extra = sorted({k for t in tr.trials for k in t.extra})
    head = ["trial", *keys, tr.monitor, *extra, "epochs (best)", "seconds", "status"]
    rows = []
    for t in tr.trials:
        metric = "" if t.metric is None else f"{t.metric:.4f}"
        epochs = "" if t.epochs is None else f"{t.epochs} ({t.best_epoch})"
        if t.stop_reason == "time limit":
            epochs += ", time limit"
        status = t.status + (" (best)" if t is tr.best else "") + (f": {t.error}" if t.error else "")
        if t.status == "skipped":
            status = "skipped (time budget spent)"
        rows.append([str(t.index), *(_fmt_value(t.setting.get(k)) for k in keys), metric,
                     *(f"{t.extra[k]:.4f}" if k in t.extra else "" for k in extra), epochs,
                     f"{t.seconds:.1f}" if t.status != "skipped" else "", status])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
