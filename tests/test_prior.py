"""FlowPrior: the scikit-learn contract, the likelihood it reports, and bad input."""
import io
import pickle

import joblib
import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import flowsk._training
import flowsk.prior
from flowsk import FlowPrior
from flowsk.datasets import load_digit_images
from flowsk.nn.linear import ActNorm
from flowsk.prior import dequantize

SMALL = {"max_epochs": 2, "n_steps": 1, "hidden_features": 8, "batch_size": 32,
         "random_state": 0, "device": "cpu"}


def small(**kw):
    return FlowPrior(**{**SMALL, **kw})


def correlated(n, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, 3)
    return X @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -0.7], [0.0, 0.0, 0.3]]) + [1.0, -2.0, 0.5]


def unit_box(n, seed=0):
    """Non-uniform data in [0, 1]^2 with some values exactly on the bounds."""
    rng = np.random.RandomState(seed)
    X = np.clip(rng.beta(2.0, 5.0, (n, 2)) + [0.0, 0.3], 0.0, 1.0)
    X[:5, 0], X[5:10, 1] = 0.0, 1.0
    return X


@pytest.fixture(scope="module")
def X():
    return correlated(200)


@pytest.fixture(scope="module")
def fitted(X):
    return small(max_epochs=5).fit(X)


@pytest.fixture(scope="module")
def bounded():
    X = unit_box(200)
    return small(data_range=(0.0, 1.0), max_epochs=5).fit(X), X


# -- scikit-learn's estimator checks -------------------------------------------------------------
@parametrize_with_checks([FlowPrior(**SMALL)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_clone_and_params():
    est = small(hidden_features=16, data_range=(0, 1))
    twin = clone(est)
    assert twin is not est
    assert twin.get_params() == est.get_params()
    assert not hasattr(twin, "flow_")
    twin.set_params(hidden_features=4)
    assert twin.hidden_features == 4 and est.hidden_features == 16


def test_fit_is_reproducible_and_clone_refits_identically(X, fitted):
    again = clone(fitted).fit(X)
    np.testing.assert_array_equal(again.score_samples(X), fitted.score_samples(X))
    other = clone(fitted).set_params(random_state=1).fit(X)
    assert not np.allclose(other.score_samples(X), fitted.score_samples(X))


# -- model selection and pipelines ---------------------------------------------------------------
def test_grid_search_selects_by_score():
    X = correlated(160, seed=1)
    grid = {"hidden_features": [4, 16]}
    base = small(max_epochs=3)
    search = GridSearchCV(base, grid, n_jobs=2, cv=2).fit(X)
    # the reference: the same folds, fitted and scored here by hand
    expected = []
    for hidden in grid["hidden_features"]:
        expected.append(np.mean([
            clone(base).set_params(hidden_features=hidden).fit(X[tr]).score(X[te])
            for tr, te in KFold(2).split(X)]))
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], expected, rtol=1e-5)
    assert expected[0] != expected[1]
    assert search.best_params_ == {"hidden_features": grid["hidden_features"][
        int(np.argmax(expected))]}
    assert search.best_estimator_.hidden_features == search.best_params_["hidden_features"]
    np.testing.assert_allclose(search.score(X), search.best_estimator_.score(X))


def test_pipeline_with_scaler():
    X = correlated(200) * [10.0, 0.1, 3.0]
    X_test = correlated(50, seed=2) * [10.0, 0.1, 3.0]
    pipe = make_pipeline(StandardScaler(), small(data_range=None)).fit(X)
    scaler, prior = pipe[0], pipe[-1]
    Xs = scaler.transform(X_test)
    np.testing.assert_allclose(pipe.score_samples(X_test), prior.score_samples(Xs))
    np.testing.assert_allclose(pipe.score(X_test), prior.score(Xs))
    # the pipeline's transform is the flow's latent code of the scaled data
    np.testing.assert_allclose(pipe.transform(X_test), prior.transform(Xs))
    np.testing.assert_allclose(pipe.inverse_transform(pipe.transform(X_test)), X_test,
                               rtol=1e-5, atol=1e-5 * np.abs(X_test).max())
    # the flow was fitted on standardised data
    ref = clone(prior).fit(StandardScaler().fit_transform(X))
    np.testing.assert_array_equal(ref.score_samples(Xs), prior.score_samples(Xs))


# -- persistence ---------------------------------------------------------------------------------
def test_joblib_round_trip(X, fitted, tmp_path):
    path = tmp_path / "prior.joblib"
    joblib.dump(fitted, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.score_samples(X), fitted.score_samples(X))
    np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))
    np.testing.assert_array_equal(loaded.sample(7, random_state=3),
                                  fitted.sample(7, random_state=3))
    assert loaded.history_ == fitted.history_ and loaded.best_epoch_ == fitted.best_epoch_


def test_actnorm_state_survives_pickling(X, fitted):
    loaded = pickle.loads(pickle.dumps(fitted))
    actnorms = [m for m in loaded.flow_.modules() if isinstance(m, ActNorm)]
    assert actnorms and all(bool(m.initialized) for m in actnorms)
    before = fitted.score_samples(X)
    # a train-mode forward on other data must not re-initialise ActNorm
    loaded.flow_.train()
    with torch.no_grad():
        loaded.flow_(torch.as_tensor(10 * X[:50] + 3, dtype=torch.float32))
    loaded.flow_.eval()
    np.testing.assert_array_equal(loaded.score_samples(X), before)


def test_pickle_via_buffer_keeps_cpu_tensors(fitted):
    buf = io.BytesIO()
    joblib.dump(fitted, buf)
    buf.seek(0)
    loaded = joblib.load(buf)
    assert all(p.device.type == "cpu" for p in loaded.flow_.parameters())
    assert loaded.device_.type == "cpu"


# -- the transformer and the sampler -------------------------------------------------------------
def test_transform_inverse_transform_round_trip(X, fitted):
    Z = fitted.transform(X)
    assert Z.shape == X.shape and Z.dtype == np.float64
    np.testing.assert_allclose(fitted.inverse_transform(Z), X, rtol=1e-5, atol=1e-5)
    Z32 = fitted.transform(X.astype(np.float32))
    assert Z32.dtype == np.float32
    assert fitted.inverse_transform(Z32).dtype == np.float32


def test_transform_round_trip_bounded(bounded):
    prior, X = bounded
    np.testing.assert_allclose(prior.inverse_transform(prior.transform(X)), X,
                               rtol=1e-5, atol=1e-5)


def test_sample(X, fitted):
    S = fitted.sample(11, random_state=0)
    assert S.shape == (11, X.shape[1]) and S.dtype == np.float64
    np.testing.assert_array_equal(S, fitted.sample(11, random_state=0))
    assert not np.allclose(S, fitted.sample(11, random_state=1))
    # a sample is G(z), z ~ N(0, temperature^2 I)
    z = 0.7 * np.random.RandomState(5).standard_normal((4, X.shape[1]))
    np.testing.assert_allclose(fitted.sample(4, temperature=0.7, random_state=5),
                               fitted.inverse_transform(z), rtol=1e-6)
    G0 = fitted.inverse_transform(np.zeros((1, X.shape[1])))
    np.testing.assert_array_equal(fitted.sample(3, temperature=0.0), np.repeat(G0, 3, 0))
    assert fitted.sample().shape == (1, X.shape[1])


def test_samples_stay_in_data_range(bounded):
    prior, _ = bounded
    for temperature in (1.0, 5.0):
        S = prior.sample(500, temperature=temperature, random_state=0)
        assert S.min() >= 0.0 and S.max() <= 1.0


def test_score_is_mean_of_score_samples(X, fitted):
    s = fitted.score_samples(X)
    assert s.shape == (len(X),) and s.dtype == np.float64
    assert fitted.score(X) == pytest.approx(np.mean(s), rel=1e-12)
    assert fitted.bits_per_dim(X) == pytest.approx(-np.mean(s) / (X.shape[1] * np.log(2)))
    # float32 input scores the same
    np.testing.assert_allclose(fitted.score_samples(X.astype(np.float32)), s, rtol=1e-5)


def test_score_samples_of_many_rows_are_chunk_independent(fitted):
    X = correlated(5000, seed=3)  # more rows than one chunk
    s = fitted.score_samples(X)
    np.testing.assert_allclose(s[-10:], fitted.score_samples(X[-10:]), rtol=1e-6)


# -- training record -----------------------------------------------------------------------------
def test_history_and_best_weights_restored(monkeypatch):
    """Early stopping restores the weights of the best epoch: the fitted model's loss on the
    validation split equals the best validation loss in ``history_``."""
    splits = []
    real_split = flowsk._training._split

    def recording_split(*args):
        out = real_split(*args)
        splits.append(out)
        return out

    monkeypatch.setattr(flowsk._training, "_split", recording_split)
    X = correlated(60, seed=4)
    prior = small(max_epochs=60, n_iter_no_change=4, hidden_features=32, n_steps=2,
                  learning_rate=1e-2, validation_fraction=0.5, batch_size=10).fit(X)
    h = prior.history_
    assert set(h) >= {"train_loss", "val_loss"}
    assert len(h["train_loss"]) == len(h["val_loss"]) <= 60
    assert h["val_loss"][prior.best_epoch_] == min(h["val_loss"])
    # the best epoch is not the last, so the restore is what is tested
    assert prior.best_epoch_ < len(h["val_loss"]) - 1
    (_, val_idx), = splits
    assert len(val_idx) == 30
    assert -prior.score(X[val_idx]) == pytest.approx(h["val_loss"][prior.best_epoch_],
                                                     rel=1e-5)
    assert -prior.score(X[val_idx]) != pytest.approx(h["val_loss"][-1], rel=1e-5)


def test_early_stopping_stops_at_the_second_plateau():
    X = correlated(40, seed=5)
    prior = small(max_epochs=500, n_iter_no_change=2, hidden_features=32, n_steps=2,
                  learning_rate=2e-2, validation_fraction=0.5, batch_size=10).fit(X)
    val = prior.history_["val_loss"]
    assert len(val) < 500
    assert prior.best_epoch_ == int(np.argmin(val))
    # replay the rule on the recorded losses: the first run of 2 epochs without a new best
    # cuts the learning rate, the second one stops training
    best, stale, plateau_ends = np.inf, 0, []
    for epoch, loss in enumerate(val):
        if loss < best:
            best, stale = loss, 0
        else:
            stale += 1
            if stale == 2:
                plateau_ends.append(epoch)
                stale = 0
    assert plateau_ends == [plateau_ends[0], len(val) - 1]


def test_no_validation_split_uses_training_loss():
    X = correlated(30, seed=6)
    prior = small(validation_fraction=0.0, max_epochs=3).fit(X)
    assert prior.history_["val_loss"] == prior.history_["train_loss"]


def test_dequantize_noise_is_centred_and_reflected_inside_the_range():
    torch.manual_seed(0)
    X = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64).repeat(20000, 1)
    D = dequantize(X, 0.1, (0.0, 1.0))
    assert D.min() >= 0 and D.max() <= 1
    # interior: uniform on [0.45, 0.55]; bounds: reflected, |U| on [0, 0.05] with no point mass
    assert D[:, 1].min() >= 0.45 and D[:, 1].max() <= 0.55
    assert D[:, 1].mean().item() == pytest.approx(0.5, abs=1e-3)
    assert D[:, 0].max() <= 0.05 and D[:, 0].mean().item() == pytest.approx(0.025, abs=1e-3)
    assert D[:, 2].min() >= 0.95 and D[:, 2].mean().item() == pytest.approx(0.975, abs=1e-3)
    assert (D[:, 0] == 0).float().mean() < 1e-3 and (D[:, 2] == 1).float().mean() < 1e-3


def test_dequantized_validation_loss_measures_the_training_objective(monkeypatch):
    """With ``dequantize``, the validation loss is taken on dequantized data like the training
    loss: the best one in ``history_`` is a draw of the fitted model's loss on the dequantized
    validation split, not its loss on the raw (lattice) values."""
    splits = []
    real_split = flowsk._training._split
    monkeypatch.setattr(flowsk._training, "_split",
                        lambda *args: splits.append(real_split(*args)) or splits[-1])
    X, _ = load_digit_images()
    prior = small(data_range=(0, 1), dequantize=1 / 16, max_epochs=4,
                  validation_fraction=0.5).fit(X[:80])
    (_, val_idx), = splits
    X_val = torch.as_tensor(X[val_idx])
    best = prior.history_["val_loss"][prior.best_epoch_]
    torch.manual_seed(1)
    draws = [-prior.score(dequantize(X_val, 1 / 16, (0, 1)).numpy()) for _ in range(30)]
    assert abs(np.mean(draws) - best) < 4 * np.std(draws)
    assert abs(-prior.score(X[val_idx]) - best) > 4 * np.std(draws)


def test_verbose_logs_epochs(capsys):
    small(max_epochs=2, verbose=2).fit(correlated(30))
    out = capsys.readouterr()
    assert "epoch 0" in out.out + out.err and "epoch 1" in out.out + out.err


# -- the likelihood is right ---------------------------------------------------------------------
def test_score_matches_true_gaussian_log_likelihood():
    """On Gaussian data the flow (ActNorm + invertible linear can represent any Gaussian)
    scores test data like the true density, computed independently by scipy. The mean gap is
    the model's estimation error, about 0.005 nats here (0.02 allowed); a wrong log-det term
    (one layer's, or a missing Jacobian factor) costs of order 0.1 to 1 nats."""
    rng = np.random.RandomState(0)
    mean, cov = np.array([1.0, -2.0]), np.array([[2.0, 1.2], [1.2, 1.5]])
    X = rng.multivariate_normal(mean, cov, 3000)
    X_train, X_test = X[:2000], X[2000:]
    prior = FlowPrior(n_steps=2, hidden_features=8, max_epochs=10, batch_size=100,
                      learning_rate=1e-2, random_state=0, device="cpu").fit(X_train)
    true = multivariate_normal(mean, cov).logpdf(X_test)
    assert prior.score(X_test) == pytest.approx(true.mean(), abs=0.02)
    # and it ranks the test points like the true density (per-sample errors of a short fit
    # are a few hundredths of a nat)
    assert np.corrcoef(prior.score_samples(X_test), true)[0, 1] > 0.98


def _grid(lo, hi, n):
    g = lo + (hi - lo) * (np.arange(n) + 0.5) / n  # midpoint rule
    return np.stack(np.meshgrid(g, g), -1).reshape(-1, 2), ((hi - lo) / n) ** 2


def test_density_integrates_to_one():
    """Midpoint quadrature of exp(score_samples) over a box holding all the mass."""
    rng = np.random.RandomState(0)
    X = np.concatenate([rng.randn(150, 2) * 0.5 + [1.5, 0.0],
                        rng.randn(150, 2) * [0.3, 1.0] - [1.5, 0.0]])
    prior = small(n_steps=2, max_epochs=3, learning_rate=5e-3).fit(X)
    grid, cell = _grid(-8.0, 8.0, 320)
    density = np.exp(prior.score_samples(grid))
    assert density.sum() * cell == pytest.approx(1.0, abs=1e-3)
    # the fitted density is not a standard normal: the check is not vacuous
    assert not np.allclose(prior.score_samples(X[:5]),
                           multivariate_normal(np.zeros(2)).logpdf(X[:5]), atol=0.1)


def test_bounded_density_mass_is_that_of_unclamped_samples(bounded):
    """With ``data_range`` the density lives on the box; its mass is the probability that a
    generated sample is not clamped onto the bounds, which sampling estimates independently."""
    prior, _ = bounded
    grid, cell = _grid(0.0, 1.0, 400)
    mass = np.exp(prior.score_samples(grid)).sum() * cell
    S = prior.sample(40000, random_state=0)
    unclamped = ((S > 0.0) & (S < 1.0)).all(1).mean()
    # Monte Carlo standard error sqrt(p (1 - p) / 40000) < 0.0025; quadrature error ~1e-4
    assert mass == pytest.approx(unclamped, abs=0.01)
    assert 0.5 < mass <= 1.0


@pytest.mark.parametrize("architecture", ["glow", "realnvp", "chavez"])
def test_image_architectures_fit_digits(architecture):
    X, shape = load_digit_images()
    X = X[:120]
    prior = small(image_shape=shape, architecture=architecture, data_range=(0, 1),
                  dequantize=1 / 16).fit(X)
    assert np.isfinite(prior.score_samples(X)).all()
    S = prior.sample(5, random_state=0)
    assert S.shape == (5, 64) and S.min() >= 0 and S.max() <= 1
    np.testing.assert_allclose(prior.inverse_transform(prior.transform(X[:10])), X[:10],
                               atol=1e-5)


def test_default_architecture_follows_image_shape():
    X, shape = load_digit_images()
    prior = small(image_shape=shape, data_range=(0, 1)).fit(X[:60])
    assert any(type(m).__name__ == "Multiscale" for m in prior.flow_.modules())
    vector = small(data_range=(0, 1)).fit(X[:60])
    assert not any(type(m).__name__ == "Multiscale" for m in vector.flow_.modules())


@pytest.mark.parametrize("params, expected", [
    ({}, {"learning_rate": 6e-4, "weight_decay": 1.0}),
    ({"image_shape": (1, 8, 8)}, {"learning_rate": 1e-3, "weight_decay": 1e-4}),
    ({"learning_rate": 1e-2, "weight_decay": 0.0}, {"learning_rate": 1e-2, "weight_decay": 0.0}),
])
def test_unset_training_settings_follow_the_architecture(monkeypatch, params, expected):
    seen = {}

    def spy(module, loss_fn, data, **kw):
        seen.update(kw)
        return {"train_loss": [], "val_loss": []}, 0

    monkeypatch.setattr(flowsk.prior, "train", spy)
    FlowPrior(max_epochs=1, **params).fit(load_digit_images()[0][:20])
    assert {name: seen[name] for name in expected} == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_and_pickle_to_cpu(X):
    prior = small(device="cuda").fit(X)
    assert next(prior.flow_.parameters()).device.type == "cuda"
    cpu_ref = small(device="cpu").fit(X)
    np.testing.assert_allclose(prior.score_samples(X), cpu_ref.score_samples(X), rtol=1e-3,
                               atol=1e-3)
    state = prior.__getstate__()
    assert next(state["flow_"].parameters()).device.type == "cpu"


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [(np.nan, "NaN"), (np.inf, "infinity")])
def test_non_finite_input(X, fitted, bad, match):
    Xb = X.copy()
    Xb[3, 1] = bad
    with pytest.raises(ValueError, match=match):
        clone(fitted).fit(Xb)
    for method in (fitted.score_samples, fitted.score, fitted.transform):
        with pytest.raises(ValueError, match=match):
            method(Xb)
    with pytest.raises(ValueError, match=match):
        fitted.inverse_transform(Xb)


def test_wrong_number_of_features(X, fitted):
    for method in (fitted.score_samples, fitted.score, fitted.transform):
        with pytest.raises(ValueError, match="features"):
            method(X[:, :2])
    with pytest.raises(ValueError, match="latent dimension"):
        fitted.inverse_transform(X[:, :2])


def test_one_dimensional_input(X, fitted):
    with pytest.raises(ValueError, match="2D array"):
        clone(fitted).fit(X[:, 0])
    with pytest.raises(ValueError, match="2D array"):
        fitted.score_samples(X[0])


def test_unfitted():
    prior = small()
    X = correlated(5)
    for call in (lambda: prior.score_samples(X), lambda: prior.score(X),
                 lambda: prior.transform(X), lambda: prior.inverse_transform(X),
                 lambda: prior.sample(2), lambda: prior.bits_per_dim(X)):
        with pytest.raises(NotFittedError):
            call()


def test_too_few_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        small().fit(correlated(1))


def test_image_shape_must_match_features():
    X, _ = load_digit_images()
    with pytest.raises(ValueError, match="image_shape"):
        small(image_shape=(1, 4, 4)).fit(X[:20])
    with pytest.raises(ValueError, match="image_shape"):
        small(image_shape=(1, 8)).fit(X[:20])
    with pytest.raises(ValueError, match="squeezed"):
        small(image_shape=(4, 4, 4), n_levels=3).fit(np.random.rand(20, 64))


def test_data_outside_range(bounded):
    prior, X = bounded
    for shift in (-1e-3, 1e-3):
        Xb = X.copy()
        Xb[0, 0] = (0.0 if shift < 0 else 1.0) + shift
        with pytest.raises(ValueError, match="outside data_range"):
            clone(prior).fit(Xb)
        for method in (prior.score_samples, prior.score, prior.transform):
            with pytest.raises(ValueError, match="outside data_range"):
                method(Xb)


def test_values_on_the_bounds_are_valid(bounded):
    prior, X = bounded
    corners = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert np.isfinite(prior.score_samples(corners)).all()
    assert np.isfinite(prior.transform(corners)).all()
    np.testing.assert_allclose(prior.inverse_transform(prior.transform(corners)), corners,
                               atol=1e-6)
    assert np.isfinite(prior.score_samples(X)).all()  # the training data had exact bounds


@pytest.mark.parametrize("params, match", [
    ({"learning_rate": -1e-3}, "learning_rate"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"coupling": "nope"}, "coupling must be one of"),
    ({"architecture": "nope"}, "architecture must be one of"),
    ({"architecture": "glow"}, "needs image_shape"),
    ({"architecture": "chavez"}, "needs image_shape"),
    ({"n_steps": 0}, "n_steps"),
    ({"n_levels": 0}, "n_levels"),
    ({"hidden_features": 2.5}, "hidden_features"),
    ({"max_epochs": 0}, "max_epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"n_iter_no_change": 0}, "n_iter_no_change"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"data_range": (1.0, 0.0)}, "data_range"),
    ({"data_range": (0.0, np.inf)}, "data_range"),
    ({"dequantize": -0.1}, "dequantize"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"),
    ({"image_shape": (1, 0, 3)}, "image_shape"),
])
def test_bad_hyperparameters(params, match):
    with pytest.raises(ValueError, match=match):
        small(**params).fit(correlated(20))


def test_bad_sample_arguments(fitted):
    with pytest.raises(ValueError, match="n_samples"):
        fitted.sample(0)
    with pytest.raises(ValueError, match="temperature"):
        fitted.sample(2, temperature=-1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        small(device="cuda").fit(correlated(20))
