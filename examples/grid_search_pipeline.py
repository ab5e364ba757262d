"""Tuning inverse-problem hyperparameters with scikit-learn's GridSearchCV and Pipeline.

``InverseSolver.score(Y, X)`` is the mean PSNR, so ``GridSearchCV`` needs no scorer: the
measurements ``Y`` play the role of features and the true signals ``X`` of targets. A flow
prior is fitted once on digits and shared by every clone (it is never refitted). Held-out
digits lose their centre 4x4 block and get noise std 0.05. Three searches, each with
``n_jobs=2`` and 3-fold cross-validation:

- ``Pipeline([("clip", FunctionTransformer(np.clip)), ("solve", likelihood solver)])`` over
  ``solve__alpha`` and whether the noisy measurements are clipped to [0, 1] first;
- ``glowip`` over ``gamma``;
- ``map`` over ``sigma``.

The best estimators are then scored on a test split. Writes ``grid_search.png`` (mean CV
PSNR against each hyperparameter)::

    python examples/grid_search_pipeline.py [--quick] [--out DIR]
"""
import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from flowsk import FlowPrior, InverseSolver
from flowsk.datasets import load_digit_images
from flowsk.operators import Inpainting

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--out", default="example_output/grid_search_pipeline")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    X, shape = load_digit_images()
    X_train, X_rest = train_test_split(X, test_size=0.25, random_state=0)
    n_val, n_test = (12, 12) if args.quick else (90, 150)
    X_val, X_test = X_rest[:n_val], X_rest[n_val:n_val + n_test]
    prior = FlowPrior(image_shape=shape, architecture="mlp", coupling="robust-spline",
                      data_range=(0, 1), dequantize=1 / 16, max_epochs=5 if args.quick else 200,
                      random_state=0, verbose=1).fit(X_train)
    op = Inpainting(shape, box=(2, 2, 6, 6))
    Y_val = op.measure(X_val, noise_std=0.05, random_state=1)
    Y_test = op.measure(X_test, noise_std=0.05, random_state=2)
    n_iter = 20 if args.quick else 200
    clip = FunctionTransformer(np.clip, kw_args={"a_min": 0.0, "a_max": 1.0})

    searches = {
        "likelihood": (Pipeline([("clip", clip), ("solve", InverseSolver(
            prior, op, method="likelihood", n_iter=n_iter, random_state=0))]),
            {"clip": [clip, "passthrough"], "solve__alpha": [0.002, 0.01, 0.05, 0.2]}),
        "glowip": (InverseSolver(prior, op, method="glowip", n_iter=n_iter, random_state=0),
                   {"gamma": [0.0, 0.01, 0.1, 1.0]}),
        "map": (InverseSolver(prior, op, method="map", n_iter=n_iter, random_state=0),
                {"sigma": [0.02, 0.05, 0.1, 0.3]}),
    }
    metrics = {"pinv": {"test_psnr": InverseSolver(prior, op, method="pinv")
                        .score(Y_test, X_test)}}
    fig, axes = plt.subplots(1, len(searches), figsize=(4 * len(searches), 3.3))
    print(f"\n{'method':11s} {'best parameters':45s} {'CV PSNR':>8s} {'test PSNR':>10s}")
    for ax, (name, (estimator, grid)) in zip(axes, searches.items()):
        if args.quick:
            grid = {k: v[:2] for k, v in grid.items()}
        search = GridSearchCV(estimator, grid, cv=2 if args.quick else 3, n_jobs=2)
        search.fit(Y_val, X_val)
        best = {k: v if isinstance(v, (str, float)) else "clip" for k, v in
                search.best_params_.items()}
        metrics[name] = {"best_params": best, "cv_psnr": search.best_score_,
                         "test_psnr": search.score(Y_test, X_test)}
        print(f"{name:11s} {best!s:45s} {search.best_score_:8.2f} "
              f"{metrics[name]['test_psnr']:10.2f}", flush=True)
        key, values = next((k, v) for k, v in grid.items() if k != "clip")
        scores = search.cv_results_["mean_test_score"]
        if name == "likelihood":  # one curve per clip setting
            clipped = np.array([p["clip"] is clip for p in search.cv_results_["params"]])
            ax.semilogx(values, scores[clipped], "o-", label="clip Y to [0, 1]")
            ax.semilogx(values, scores[~clipped], "s--", label="raw Y")
            ax.legend(fontsize=7)
        else:
            ax.plot(values, scores, "o-")
            ax.set_xscale("symlog", linthresh=0.01)
        ax.set(title=f"{name}: best {key.split('__')[-1]} = "
                     f"{search.best_params_[key]}", xlabel=key, ylabel="mean CV PSNR (dB)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "grid_search.png", dpi=120)
    plt.close(fig)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"wrote grid_search.png and metrics.json to {out.resolve()}")


if __name__ == "__main__":
    main()
