"""The shared training loop: seeds, a progress bar per epoch, validation each epoch, early stopping.

Every model family writes its own ``train_epoch`` (what a step is differs: BCE over examples, BPR over
triples, SASRec's positive/negative BCE) and ``validate``; :func:`fit` runs them the same way for all.
"""
from __future__ import annotations

import copy
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass
class TrainConfig:
    """Knobs common to every model; ``params`` holds the model-specific ones (layers, heads, ...)."""

    epochs: int = 20
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    dim: int = 16
    seed: int = 0
    patience: int = 3             # validations without improvement before stopping; 0 = never stop early
    eval_every: int = 1           # validate after every eval_every-th epoch (and after the last one)
    min_epochs: int | None = None  # validations up to this epoch never count toward patience (None: epochs / 10)
    min_delta: float = 1e-3       # relative: a gain below min_delta * |reference| does not reset patience
    time_limit: float | None = None   # seconds: stop (keeping the best epoch) before an epoch that would pass it
    num_threads: int | None = None
    progress: bool = True         # draw a progress bar on stderr
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "dim", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.min_epochs is not None and int(self.min_epochs) < 0:
            raise ValueError(f"min_epochs must be >= 0, got {self.min_epochs}")
        if not (self.min_delta >= 0 and math.isfinite(self.min_delta)):
            raise ValueError(f"min_delta must be a finite number >= 0, got {self.min_delta}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be a positive number of seconds, got {self.time_limit}")

    @property
    def warmup_epochs(self) -> int:
        """``min_epochs``, or when it is None a tenth of ``epochs`` (rounded up): the epochs whose
        validations never count toward ``patience``, so that the noisy first epochs of a run cannot stop it."""
        return int(self.min_epochs) if self.min_epochs is not None else math.ceil(self.epochs / 10)


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and torch; return a NumPy generator for the caller's own sampling."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


class Progress:
    """Wraps an iterable of steps; draws ``label [=====>   ] i/n  loss`` on stderr (if enabled)."""

    def __init__(self, items: Iterable[T], total: int, label: str, enabled: bool = True, width: int = 28):
        self.items, self.total, self.label, self.enabled, self.width = items, max(int(total), 1), label, enabled, width
        self.loss_sum = 0.0
        self.steps = 0
        self.t0 = time.perf_counter()

    def add_loss(self, loss: float) -> None:
        self.loss_sum += float(loss)
        self.steps += 1

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.steps if self.steps else float("nan")

    def _draw(self, i: int, end: bool = False) -> None:
        if not self.enabled:
            return
        filled = int(self.width * i / self.total)
        bar = "=" * filled + (">" if filled < self.width else "") + " " * (self.width - filled - 1)
        sys.stderr.write(f"\r{self.label} [{bar[:self.width]}] {i}/{self.total} "
                         f"loss {self.mean_loss:.4f} {time.perf_counter() - self.t0:.1f}s")
        if end:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def __iter__(self) -> Iterator[T]:
        step = max(self.total // 50, 1)
        for i, item in enumerate(self.items, 1):
            yield item
            if i % step == 0 or i == self.total:
                self._draw(i)
        self._draw(self.total, end=True)


@dataclass
class History:
    """One dict per epoch (epoch, loss, seconds and the validation metrics), and the best one."""

    monitor: str
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False
    stop_reason: str = ""         # "patience", "time limit", "interrupted" or "" (ran every epoch)

    @property
    def best(self) -> dict:
        return self.epochs[self.best_epoch - 1] if self.best_epoch > 0 else {}


def fit(model, train_epoch: Callable[[int, Progress | None], float], validate: Callable[[], dict],
        config: TrainConfig, *, monitor: str, higher_is_better: bool = True,
        log: Callable[[str], None] = print, make_progress: Callable[[int], Progress] | None = None) -> History:
    """Train for up to ``config.epochs`` epochs, validating after every ``config.eval_every``-th one and
    after the last; keep the weights of the best validated epoch by ``monitor`` (restored into ``model``
    at the end). Epochs that are not validated get a history row with their loss only.

    Early stopping is made robust to the noise of a validation metric in three ways:

    - ``patience`` counts validations (not epochs) without a *significant* gain: a value counts as one
      when it beats the reference (the value of the last significant gain) by more than
      ``config.min_delta * |reference|`` (relative). A smaller gain still updates the kept best weights
      but does not reset the count, so noise around a plateau neither stops nor prolongs the run;
      a slow steady climb adds up against the fixed reference and keeps resetting it.
    - validations in the first ``config.warmup_epochs`` epochs (``min_epochs``; by default a tenth of
      ``epochs``) never count toward ``patience``: a lucky first validation followed by a dip while the
      model starts learning cannot stop the run.
    - ``patience = 0`` never stops early.

    ``config.time_limit`` (seconds) ends training once the next epoch would not finish within it
    (estimated from the mean epoch so far, validation included); the epoch where that happens is
    validated even when it is not a validation epoch, so the best weights are never older than needed.

    ``train_epoch(epoch, progress)`` runs one epoch and returns its mean loss; it should iterate its
    batches through ``progress`` (a :class:`Progress` or None) and call ``progress.add_loss``.
    ``make_progress(epoch)`` builds that progress object (None: no progress bar).
    ``validate()`` returns metrics, among them ``monitor``. ``config.num_threads`` sets torch's threads
    for the duration. Ctrl-C (KeyboardInterrupt) during an epoch, once an epoch has been validated, stops
    training like early stopping does: the best epoch's weights are kept and the caller goes on (a long
    run can be cut short and still be evaluated and exported); an interrupt after some epochs but before
    the first validation (``eval_every > 1``) validates and keeps the weights as they are.
    """
    if config.num_threads:      # torch's setting is process-wide: restored when training ends
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(int(config.num_threads))
        try:
            return _fit(model, train_epoch, validate, config, monitor, higher_is_better, log, make_progress)
        finally:
            torch.set_num_threads(threads)
    return _fit(model, train_epoch, validate, config, monitor, higher_is_better, log, make_progress)


def _fit(model, train_epoch, validate, config, monitor, higher_is_better, log, make_progress) -> History:
    hist = History(monitor)
    sign = 1.0 if higher_is_better else -1.0
    best_value = -math.inf           # sign * metric of the kept weights
    reference = -math.inf            # sign * metric of the last significant gain (patience counts from it)
    best_state = None
    stale = 0
    warmup = config.warmup_epochs
    t_start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        if hasattr(model, "train"):
            model.train()
        try:   # an interrupt anywhere in the epoch (training, validation, bookkeeping) stops cleanly
            loss = float(train_epoch(epoch, make_progress(epoch) if make_progress else None))
            if not math.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}: the training loss is {loss}; lower the learning rate")
            elapsed = time.perf_counter() - t_start
            out_of_time = (config.time_limit is not None and epoch < config.epochs
                           and elapsed + elapsed / epoch > config.time_limit)
            if epoch % config.eval_every and epoch != config.epochs and not out_of_time:    # not a validation epoch
                row = {"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - t0}
                hist.epochs.append(row)
                log(f"epoch {epoch}/{config.epochs}  loss {loss:.4f}  ({row['seconds']:.1f}s)")
                continue
            if hasattr(model, "eval"):
                model.eval()
            metrics = validate()
            if monitor not in metrics:
                raise KeyError(f"validate() returned {sorted(metrics)}, without the monitored metric {monitor!r}")
            row = {"epoch": epoch, "loss": loss, **{k: float(v) for k, v in metrics.items()},
                   "seconds": time.perf_counter() - t0}
            value = sign * row[monitor]
            improved = value > best_value
            if improved:   # copy first, then record the best epoch and its weights together
                state = copy.deepcopy(model.state_dict()) if hasattr(model, "state_dict") else None
                best_value, hist.best_epoch, best_state = value, epoch, state
            if reference == -math.inf or value > reference + config.min_delta * abs(reference):
                reference, stale = value, 0
            elif epoch > warmup:
                stale += 1
            hist.epochs.append(row)
            log(f"epoch {epoch}/{config.epochs}  loss {loss:.4f}  "
                + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "users") + f"  ({row['seconds']:.1f}s)"
                + ("  *" if improved else ""))
            if config.patience and stale >= config.patience:
                hist.stopped_early, hist.stop_reason = True, "patience"
                log(f"early stop: no gain in {monitor} above {config.min_delta:g} (relative) for {stale} "
                    f"validations after epoch {warmup}; best epoch {hist.best_epoch}")
                break
            if out_of_time:
                hist.stopped_early, hist.stop_reason = True, "time limit"
                log(f"time limit: {elapsed:.0f}s of {config.time_limit:g}s spent after epoch {epoch}; "
                    f"best epoch {hist.best_epoch}")
                break
        except KeyboardInterrupt:
            if hist.best_epoch < 1:
                if epoch == 1:          # nothing trained yet: the interrupt aborts
                    raise
                # epochs trained but none validated yet (eval_every > 1): the weights as they are now are
                # validated and kept rather than thrown away
                if hasattr(model, "eval"):
                    model.eval()
                metrics = validate()
                row = {"epoch": epoch, "loss": math.nan, **{k: float(v) for k, v in metrics.items()},
                       "seconds": time.perf_counter() - t0, "interrupted": True}
                del hist.epochs[epoch - 1:]
                hist.epochs.append(row)
                hist.best_epoch, best_state = epoch, None
            hist.stopped_early, hist.stop_reason = True, "interrupted"
            log(f"interrupted in epoch {epoch}: keeping best epoch {hist.best_epoch}")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    if hasattr(model, "eval"):
        model.eval()
    return hist


def batches(n: int, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Index batches over ``range(n)``, shuffled when ``rng`` is given."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
