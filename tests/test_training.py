"""The shared training loop: early stopping, best-weight restore, the non-finite guard."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

import flowsk._training
from flowsk._training import _split, resolve_device, train

N, BATCH = 40, 10  # 20 training samples (validation_fraction=0.5): two batches per epoch


class NaNGradient(torch.autograd.Function):
    """Identity whose gradient is NaN: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def regression_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 2, generator=g)
    y = X @ torch.tensor([1.5, -2.0]) + 0.5 + 0.1 * torch.randn(N, generator=g)
    return torch.cat([X, y[:, None]], 1)


class Recorder:
    """A regression loss that records the weights at every call and can misbehave on cue.

    ``on_train_call``: {k: action} for the k-th training-mode call (1-based), with action
    ``"nan-loss"``, ``"nan-grad"`` or ``"nan-weight"``. ``val_losses``: scripted validation
    losses (else the true loss).
    """

    def __init__(self, on_train_call=None, always=None, val_losses=None):
        self.on_train_call = on_train_call or {}
        self.always = always
        self.val_losses = val_losses
        self.train_calls, self.val_calls = 0, 0
        self.train_weights, self.val_weights = [], []

    @staticmethod
    def snapshot(module):
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()

    def __call__(self, module, batch):
        pred = module(batch[:, :2])[:, 0]
        loss = ((pred - batch[:, 2]) ** 2).mean()
        if not module.training:
            self.val_weights.append(self.snapshot(module))
            self.val_calls += 1
            if self.val_losses is not None:
                return torch.tensor(self.val_losses[self.val_calls - 1])
            return loss
        self.train_weights.append(self.snapshot(module))
        self.train_calls += 1
        action = self.always or self.on_train_call.get(self.train_calls)
        if action == "nan-loss":
            return loss * float("nan")
        if action == "nan-grad":
            return NaNGradient.apply(loss)
        if action == "nan-weight":
            with torch.no_grad():
                next(module.parameters()).view(-1)[0] = float("nan")
        return loss


@pytest.fixture
def adams(monkeypatch):
    """Every Adam optimizer the loop creates, to read its learning rate afterwards."""
    made = []

    class RecordingAdam(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(flowsk._training.torch.optim, "AdamW", RecordingAdam)
    return made


def fit(loss_fn, **kw):
    torch.manual_seed(0)
    module = torch.nn.Linear(2, 1)
    args = {"max_epochs": 8, "batch_size": BATCH, "learning_rate": 1e-2,
            "validation_fraction": 0.5, "n_iter_no_change": 100, "rng": np.random.RandomState(0)}
    args.update(kw)
    history, best_epoch = train(module, loss_fn, regression_data(), **args)
    return module, history, best_epoch


def test_plain_training_decreases_the_loss():
    rec = Recorder()
    module, h, best = fit(rec, max_epochs=30, learning_rate=5e-2)
    assert len(h["train_loss"]) == len(h["val_loss"]) == 30
    assert h["val_loss"][-1] < 0.2 * h["val_loss"][0]
    assert best == int(np.argmin(h["val_loss"]))
    assert not module.training  # the loop leaves the module in eval mode
    assert rec.train_calls == 30 * 2 and rec.val_calls == 30


@pytest.mark.parametrize("action", ["nan-loss", "nan-grad", "nan-weight"])
def test_transient_divergence_restores_lowers_lr_and_continues(action, adams):
    # the 3rd training call is the first batch of epoch 1
    rec = Recorder(on_train_call={3: action})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        module, h, best = fit(rec)
    (opt,) = adams
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 2)
    # epoch 1 was undone: it is recorded as NaN, the others are finite
    assert len(h["val_loss"]) == len(h["train_loss"]) == 8
    assert np.isnan(h["val_loss"][1]) and np.isnan(h["train_loss"][1])
    assert np.isfinite(np.delete(h["val_loss"], 1)).all()
    # epoch 2 started from the weights kept at the end of epoch 0 (its validation snapshot)
    first_call_of_epoch_2 = rec.train_weights[4] if action == "nan-weight" else \
        rec.train_weights[3]
    torch.testing.assert_close(first_call_of_epoch_2, rec.val_weights[0], rtol=0, atol=0)
    # training went on: 7 finished epochs, weights finite, loss kept decreasing
    assert rec.val_calls == 7
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert h["val_loss"][-1] < h["val_loss"][0]
    assert best == int(np.nanargmin(h["val_loss"])) == 7


@pytest.mark.parametrize("action", ["nan-loss", "nan-grad"])
def test_persistent_divergence_warns_and_keeps_finite_weights(action, adams):
    rec = Recorder(always=action)
    with pytest.warns(ConvergenceWarning, match="diverged"):
        module, h, best = fit(rec, max_epochs=50)
    # one first try and three halvings of the learning rate, then the loop gives up
    assert len(h["train_loss"]) == len(h["val_loss"]) == 4
    assert np.isnan(h["val_loss"]).all()
    assert adams[0].param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # nothing was ever better than the initial weights, which are what is kept
    torch.testing.assert_close(Recorder.snapshot(module), rec.train_weights[0], rtol=0, atol=0)
    assert best == 0


def test_a_plateau_restores_the_best_epoch_and_cuts_the_lr_once(adams):
    # best at epoch 2 (ties do not count); 3 epochs without improvement cut the learning rate
    # after epoch 5, 3 more stop training after epoch 8
    val = [5.0, 4.0, 3.0, 3.5, 3.25, 3.0, 9.0, 9.0, 9.0, 1.0]
    rec = Recorder(val_losses=val)
    module, h, best = fit(rec, max_epochs=10, n_iter_no_change=3)
    assert best == 2
    assert h["val_loss"] == val[:9]
    assert len(h["train_loss"]) == 9 and rec.val_calls == 9
    assert adams[0].param_groups[0]["lr"] == pytest.approx(1e-2 / 10)
    # epoch 6 started from the weights of epoch 2, which are also the ones kept
    torch.testing.assert_close(rec.train_weights[6 * 2], rec.val_weights[2], rtol=0, atol=0)
    torch.testing.assert_close(Recorder.snapshot(module), rec.val_weights[2], rtol=0, atol=0)
    assert not torch.equal(rec.val_weights[2], rec.val_weights[5])


def test_training_improves_after_the_lr_cut():
    val = [5.0, 4.0, 3.0, 3.5, 3.25, 3.0, 2.0, 2.5, 2.25, 2.75, 1.0]
    rec = Recorder(val_losses=val)
    module, h, best = fit(rec, max_epochs=11, n_iter_no_change=3)
    assert best == 6 and h["val_loss"] == val[:10]
    torch.testing.assert_close(Recorder.snapshot(module), rec.val_weights[6], rtol=0, atol=0)


def test_no_validation_split():
    rec = Recorder()
    _module, h, _ = fit(rec, validation_fraction=0.0, max_epochs=3)
    assert rec.val_calls == 0
    assert h["val_loss"] == h["train_loss"]
    assert rec.train_calls == 3 * 4  # all 40 samples train, 4 batches per epoch


def test_gradients_are_clipped(monkeypatch, adams):
    norms = []
    real_step = torch.optim.AdamW.step

    def spy_step(self, *args, **kwargs):
        norms.append(torch.cat([p.grad.reshape(-1) for g in self.param_groups
                                for p in g["params"]]).norm().item())
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)

    def huge_loss(module, batch):
        return 1e6 * ((module(batch[:, :2])[:, 0] - batch[:, 2]) ** 2).mean()

    fit(huge_loss, max_epochs=2, clip_norm=0.5)
    assert len(norms) == 4
    assert max(norms) == pytest.approx(0.5, rel=1e-5)


def test_split_sizes():
    rng = np.random.RandomState(0)
    train_idx, val_idx = _split(50, 0.1, rng)
    assert len(val_idx) == 5 and len(train_idx) == 45
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(50))
    train_idx, val_idx = _split(50, 0.0, rng)
    assert len(val_idx) == 0 and len(train_idx) == 50
    train_idx, val_idx = _split(3, 0.1, rng)  # too few samples for a validation split
    assert len(val_idx) == 0 and len(train_idx) == 3


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_weight_decay_is_decoupled_and_skips_norms_biases_and_lu_factors():
    from flowsk.nn.linear import ActNorm, InvertibleLinear
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Conv2d(3, 3, 1), ActNorm(3),
                                 InvertibleLinear(3))
    groups = flowsk._training.param_groups(module, 0.5)
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(module[0].weight), id(module[1].weight)}
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))
    # a loss with zero gradient: AdamW shrinks the decayed weights by lr * wd, nothing else
    before = [p.detach().clone() for p in module.parameters()]
    opt = torch.optim.AdamW(groups, lr=0.1)
    (0.0 * sum(p.sum() for p in module.parameters())).backward()
    opt.step()
    for p, b in zip(module.parameters(), before):
        expected = b * (1 - 0.1 * 0.5) if id(p) in decayed else b
        torch.testing.assert_close(p.detach(), expected)


def test_large_arrays_stream_from_a_memory_map(tmp_path, monkeypatch):
    data = regression_data().numpy().astype(np.float32)
    path = tmp_path / "data.npy"
    np.save(path, data)
    mapped = np.load(path, mmap_mode="r")
    monkeypatch.setattr(flowsk._training, "_DEVICE_COPY_LIMIT", 64)
    batches = flowsk._training.Batches(mapped, torch.device("cpu"))
    assert batches.data is mapped  # read batch by batch, never copied whole
    rows = np.array([7, 2, 30])
    torch.testing.assert_close(batches[rows], torch.from_numpy(data[np.sort(rows)]))
    # training on the map gives what training on the tensor gives, batch for batch (rows of a
    # batch are read in ascending order: the same rows, so the same mean loss)
    histories = []
    for source in (mapped, torch.from_numpy(data)):
        torch.manual_seed(0)
        module = torch.nn.Linear(2, 1)
        histories.append(train(module, Recorder(), source, max_epochs=3, batch_size=BATCH,
                               learning_rate=1e-2, validation_fraction=0.5,
                               rng=np.random.RandomState(0))[0])
    assert histories[0]["train_loss"] == pytest.approx(histories[1]["train_loss"], rel=1e-5)
    assert histories[0]["val_loss"] == pytest.approx(histories[1]["val_loss"], rel=1e-5)
