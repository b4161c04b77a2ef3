"""The shared training loop: best-epoch restore, early stopping (robust to noise), time limit, interruption."""
import pytest
import torch

from rec_engine_train import loop
from rec_engine_train.loop import TrainConfig, fit

# the early stopping of before min_epochs / min_delta existed: any gain resets patience, every validation counts
PLAIN = dict(min_epochs=0, min_delta=0.0)


class Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_best_epoch_is_restored_and_patience_stops():
    model = Counter()
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.9])

    def train_epoch(epoch, _progress):
        model.w.data.fill_(epoch)
        return 1.0 / epoch

    hist = fit(model, train_epoch, lambda: {"m": next(scores)}, TrainConfig(epochs=5, patience=2, **PLAIN),
               monitor="m", log=lambda _s: None)
    assert hist.best_epoch == 2 and hist.stopped_early and hist.stop_reason == "patience" and len(hist.epochs) == 4
    assert model.w.item() == 2.0


def test_ctrl_c_keeps_the_best_epoch_once_one_exists():
    model = Counter()

    def train_epoch(epoch, _progress):
        if epoch == 3:
            raise KeyboardInterrupt
        model.w.data.fill_(epoch)
        return 1.0

    hist = fit(model, train_epoch, lambda: {"m": float(model.w.item())}, TrainConfig(epochs=10), monitor="m",
               log=lambda _s: None)
    assert hist.best_epoch == 2 and hist.stopped_early and model.w.item() == 2.0

    calls = []

    def validate_interrupted_at_epoch_2():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"m": float(model.w.item())}

    model = Counter()
    hist = fit(model, lambda e, p: model.w.data.fill_(e) and 1.0, validate_interrupted_at_epoch_2,
               TrainConfig(epochs=10), monitor="m", log=lambda _s: None)
    assert hist.best_epoch == 1 and len(hist.epochs) == 1 and model.w.item() == 1.0

    def interrupted_in_epoch_3(epoch, _progress):
        model.w.data.fill_(epoch + 0.5)
        if epoch == 3:
            raise KeyboardInterrupt
        return 1.0

    model = Counter()      # epochs trained, none validated yet (eval_every 5): the weights as they are are kept
    hist = fit(model, interrupted_in_epoch_3, lambda: {"m": float(model.w.item())},
               TrainConfig(epochs=10, eval_every=5), monitor="m", log=lambda _s: None)
    assert hist.best_epoch == 3 and hist.best["m"] == 3.5 and hist.best["interrupted"] and model.w.item() == 3.5
    assert len(hist.epochs) == 3 and hist.stop_reason == "interrupted"

    def interrupted_at_once(epoch, _progress):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(Counter(), interrupted_at_once, lambda: {"m": 0.0}, TrainConfig(epochs=3), monitor="m", log=lambda _s: None)


def test_a_non_finite_loss_is_an_error_naming_the_epoch():
    with pytest.raises(FloatingPointError, match="epoch 1"):
        fit(Counter(), lambda e, p: float("nan"), lambda: {"m": 0.0}, TrainConfig(epochs=2), monitor="m",
            log=lambda _s: None)


def test_eval_every_validates_every_nth_and_the_last_epoch_and_counts_patience_in_validations():
    model = Counter()
    validated = []
    scores = {2: 0.1, 4: 0.5, 6: 0.3, 8: 0.2, 10: 0.9}

    def validate():
        epoch = int(model.w.item())
        validated.append(epoch)
        return {"m": scores.get(epoch, 0.0)}

    def train_epoch(epoch, _progress):
        model.w.data.fill_(epoch)
        return 1.0

    hist = fit(model, train_epoch, validate, TrainConfig(epochs=10, patience=2, eval_every=2, **PLAIN), monitor="m",
               log=lambda _s: None)
    assert validated == [2, 4, 6, 8] and hist.best_epoch == 4 and hist.stopped_early
    assert model.w.item() == 4.0 and len(hist.epochs) == 8 and "m" not in hist.epochs[2] and hist.best["m"] == 0.5

    validated.clear()
    model = Counter()
    hist = fit(model, train_epoch, validate, TrainConfig(epochs=5, patience=0, eval_every=3), monitor="m",
               log=lambda _s: None)
    assert validated == [3, 5] and len(hist.epochs) == 5          # the last epoch is always validated
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=0)


def _run(scores, log=None, **config):
    """fit() over a scripted validation curve (one value per validated epoch); the weight holds the epoch."""
    model = Counter()
    values = iter(scores)

    def train_epoch(epoch, _progress):
        model.w.data.fill_(epoch)
        return 1.0

    hist = fit(model, train_epoch, lambda: {"m": next(values)}, TrainConfig(**config), monitor="m",
               log=log if log is not None else (lambda _s: None))
    return hist, int(model.w.item())


def test_a_noisy_early_dip_does_not_stop_the_run():
    # a lucky first validation, a dip while the model starts to learn, then the real climb
    curve = [0.050, 0.030, 0.035, 0.040, 0.045, 0.052, 0.080, 0.110, 0.130, 0.140, 0.141, 0.1405, 0.140, 0.139,
             0.1395, 0.138, 0.137, 0.136, 0.135, 0.134]
    old, _ = _run(curve, epochs=50, patience=3, **PLAIN)
    assert old.stopped_early and len(old.epochs) == 4 and old.best_epoch == 1       # what used to happen

    hist, weights = _run(curve, epochs=50, patience=3)          # defaults: min_epochs = epochs / 10 = 5
    assert TrainConfig(epochs=50).warmup_epochs == 5
    assert hist.best_epoch == 11 and weights == 11 and hist.best["m"] == 0.141
    assert hist.stopped_early and hist.stop_reason == "patience" and len(hist.epochs) == 14


def test_validations_before_min_epochs_never_count_toward_patience():
    flat = [0.5] + [0.1] * 29
    hist, _ = _run(flat, epochs=30, patience=2, min_epochs=10)
    assert hist.stopped_early and len(hist.epochs) == 12 and hist.best_epoch == 1    # 11 and 12 counted
    hist, _ = _run(flat, epochs=30, patience=2, min_epochs=10, eval_every=5)
    assert len(hist.epochs) == 20                          # validations at 15 and 20 count, 5 and 10 do not
    assert TrainConfig(epochs=400).warmup_epochs == 40 and TrainConfig(epochs=5).warmup_epochs == 1
    with pytest.raises(ValueError, match="min_epochs"):
        TrainConfig(min_epochs=-1)


def test_gains_below_min_delta_keep_the_best_weights_but_do_not_reset_patience():
    plateau = [0.30, 0.50] + [0.50 + 1e-5 * i for i in range(1, 20)]    # noise-sized gains on a plateau
    hist, weights = _run(plateau, epochs=21, patience=3, min_epochs=0)
    assert hist.stopped_early and len(hist.epochs) == 5               # 3 validations after epoch 2's 0.50
    assert hist.best_epoch == 5 and weights == 5                      # the best value seen is still the one kept
    never, _ = _run(plateau, epochs=21, patience=3, **PLAIN)
    assert not never.stopped_early and len(never.epochs) == 21        # any gain resets patience: never stops

    # a slow, steady climb (0.08% a validation) adds up against the fixed reference and keeps resetting it
    climb = [0.5 * (1.0008 ** i) for i in range(30)]
    hist, _ = _run(climb, epochs=30, patience=2, min_epochs=0)
    assert not hist.stopped_early and hist.best_epoch == 30


def test_min_delta_is_relative_and_works_for_a_metric_to_minimize():
    model = Counter()
    losses = iter([1.0, 0.5, 0.4999, 0.4998, 0.4997, 0.2])

    def train_epoch(epoch, _progress):
        model.w.data.fill_(epoch)
        return 1.0

    hist = fit(model, train_epoch, lambda: {"loss": next(losses)},
               TrainConfig(epochs=6, patience=3, min_epochs=0, min_delta=0.01), monitor="loss", higher_is_better=False,
               log=lambda _s: None)
    assert hist.stopped_early and len(hist.epochs) == 5 and hist.best_epoch == 5 and model.w.item() == 5.0
    with pytest.raises(ValueError, match="min_delta"):
        TrainConfig(min_delta=-0.1)


def test_time_limit_validates_the_epoch_it_stops_at_and_keeps_the_best(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    model = Counter()
    validated = []

    def train_epoch(epoch, _progress):
        clock[0] += 10.0
        model.w.data.fill_(epoch)
        return 1.0

    def validate():
        validated.append(int(model.w.item()))
        return {"m": float(model.w.item())}

    lines = []
    hist = fit(model, train_epoch, validate, TrainConfig(epochs=50, eval_every=5, patience=0, time_limit=35.0),
               monitor="m", log=lines.append)
    # after epoch 3 (30 s spent) a fourth 10 s epoch would end past 35 s: epoch 3 is validated and kept
    assert validated == [3] and len(hist.epochs) == 3 and hist.best_epoch == 3 and model.w.item() == 3.0
    assert hist.stopped_early and hist.stop_reason == "time limit" and "time limit" in lines[-1]
    with pytest.raises(ValueError, match="time_limit"):
        TrainConfig(time_limit=0)
