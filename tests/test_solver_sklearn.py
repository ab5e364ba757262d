"""InverseSolver under scikit-learn's estimator checks, and its fold-independent score."""
import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

from flowsk import FlowPrior, InverseSolver
from flowsk.operators import Denoising, MatrixOperator

# One-dimensional signals measured twice: the checks feed 2-column measurements (most of them)
# and, for multi-output targets, signals of one column, which is what this solver takes.
_PRIOR = FlowPrior(max_epochs=2, n_steps=1, hidden_features=8, random_state=0,
                   device="cpu").fit(np.random.RandomState(0).randn(50, 1))
_OPERATOR = MatrixOperator([[1.0], [0.5]])
SOLVERS = [
    InverseSolver(_PRIOR, _OPERATOR, method="glowip", n_iter=5, random_state=0),
    InverseSolver(_PRIOR, _OPERATOR, method="amortized-vi", n_iter=2, random_state=0,
                  method_params={"n_simulations": 200, "n_steps": 1, "hidden_features": 8}),
]

_WIDTH = ("the measurement width is the operator's output_dim (2 here); this check feeds "
          "measurements of another width, which InverseSolver rejects with a ValueError")
_EXPECTED_FAILURES = {
    name: _WIDTH for name in (
        "check_fit_score_takes_y", "check_dont_overwrite_parameters",
        "check_n_features_in_after_fitting", "check_positive_only_tag_during_fit",
        "check_estimators_dtypes", "check_dtype_object", "check_pipeline_consistency",
        "check_estimators_nan_inf", "check_estimators_pickle", "check_f_contiguous_array_estimator",
        "check_methods_sample_order_invariance", "check_methods_subset_invariance",
        "check_fit2d_1sample", "check_fit2d_1feature", "check_dict_unchanged",
        "check_fit2d_predict1d")}
_EXPECTED_FAILURES["check_estimators_overwrite_params"] = (
    "joblib.hash of a torch tensor changes under deepcopy, so the check cannot compare the "
    "operator (a torch module) with its copy; test_fit_leaves_prior_and_operator_unchanged "
    "checks the same property directly")


def _expected_failures(solver):
    failures = dict(_EXPECTED_FAILURES)
    if solver.method != "amortized-vi":
        failures["check_estimators_unfitted"] = (
            "point methods need no training: predict works before fit, by design")
    return failures


@parametrize_with_checks(SOLVERS, expected_failed_checks=_expected_failures)
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.method)
def test_fit_leaves_prior_and_operator_unchanged(solver):
    before = {k: v.clone() for k, v in solver.operator.state_dict().items()}
    prior_before = {k: v.clone() for k, v in solver.prior.flow_.state_dict().items()}
    Y = _OPERATOR.measure(np.random.RandomState(1).randn(30, 1), 0.1, random_state=0)
    solver.fit(Y)
    for k, v in solver.operator.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    for k, v in solver.prior.flow_.state_dict().items():
        torch.testing.assert_close(v, prior_before[k], rtol=0, atol=0)


def test_score_peak_is_fixed_by_the_prior_not_by_the_fold():
    rng = np.random.RandomState(0)
    X = rng.randn(60, 2)
    prior = FlowPrior(max_epochs=2, n_steps=1, hidden_features=8, random_state=0,
                      device="cpu").fit(X)
    lo, hi = prior.training_range_
    assert (lo, hi) == (X.min(), X.max())
    op = Denoising(2)
    solver = InverseSolver(prior, op, method="glowip", n_iter=5, random_state=0)
    X_fold = 0.1 * X[:20]  # a fold with a much smaller range than the training data
    Y = op.measure(X_fold, 0.05, random_state=0)
    mse = np.mean((solver.predict(Y) - X_fold) ** 2, axis=1)
    assert solver.score(Y, X_fold) == pytest.approx(np.mean(10 * np.log10((hi - lo) ** 2 / mse)))
