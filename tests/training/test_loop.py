"""The shared training loop: best-epoch restore, early stopping, interruption."""
import pytest
import torch

from rec_engine_train.loop import TrainConfig, fit


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

    hist = fit(model, train_epoch, lambda: {"m": next(scores)}, TrainConfig(epochs=5, patience=2), monitor="m",
               log=lambda _s: None)
    assert hist.best_epoch == 2 and hist.stopped_early and len(hist.epochs) == 4
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

    hist = fit(model, train_epoch, validate, TrainConfig(epochs=10, patience=2, eval_every=2), monitor="m",
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
