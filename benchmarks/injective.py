"""Injective flow (TRUMPET) on digits: fit time, reconstruction error and inverse problems.

    python benchmarks/injective.py [--quick] [--n-test N] [--prior PATH]

Protocol of ``benchmarks/inverse.py`` (its ``digits_split``, tasks from
``flowsk.__main__.demo_tasks``): ``InjectiveFlowPrior(latent_dim=32)`` (default settings,
``data_range=(0, 1)``, ``random_state=0``) is fitted on the training split less the 100
validation images; the fit-time comparison is with the benchmarks' ``FlowPrior``
(``digits_prior`` of ``benchmarks/inverse.py``, whose fit time is cached with it). Reported:

1. the relative reconstruction error ``||x - G(G^+(x))|| / ||x||`` on the test split
   (required: mean <= 0.15) and both fit times;
2. ``iflow``, ``iflow-l`` and ``csgm`` with the injective prior (and ``pinv``) on the five
   tasks: PSNR / SSIM on the test split and seconds, with ``iflow-l``'s ``beta`` and
   ``csgm``'s ``gamma`` chosen by ``GridSearchCV(cv=2)`` on the validation images (``iflow``
   has nothing to tune). The issue requires ``iflow-l >= iflow`` on most tasks (the paper's
   ablation).

Log-likelihoods are reported for completeness only: the injective prior's is a density on its
``latent_dim``-dimensional manifold (of the projection of x), FlowPrior's a density on R^64.
Prints tables and writes ``benchmarks/results/injective.json``.
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

import joblib
import numpy as np
import sklearn
import torch
from inverse import GRIDS, digits_prior, digits_split
from sklearn.model_selection import GridSearchCV

from flowsk import InjectiveFlowPrior, InverseSolver
from flowsk.demo import demo_tasks
from flowsk.metrics import psnr, ssim

REQUIRED_MAX_ERROR = 0.15
RESULTS = Path(__file__).resolve().parent / "results" / "injective.json"
METHODS = {"iflow": {}, "iflow-l": {"beta": [1e-4, 1e-3, 1e-2]}, "csgm": GRIDS["csgm"]}


def _timed_fit(estimator, X):
    wall, cpu = time.perf_counter(), time.process_time()
    estimator.fit(X)
    return time.perf_counter() - wall, time.process_time() - cpu


def reconstruction(prior, X_test):
    """Projection error and log-likelihoods of a fitted InjectiveFlowPrior on ``X_test``."""
    err = prior.reconstruction_error(X_test)
    bound_ll = prior.score(X_test)
    exact_ll = prior.set_params(logdet="exact").score(X_test)  # read at scoring time
    prior.set_params(logdet="bound")
    return {"relative_error_mean": float(err.mean()),
            "relative_error_median": float(np.median(err)),
            "relative_error_max": float(err.max()),
            "relative_error_global": float(np.linalg.norm(X_test - prior.project(X_test))
                                           / np.linalg.norm(X_test)),
            "test_log_likelihood_bound": bound_ll, "test_log_likelihood_exact": exact_ll}


def inverse_problems(prior, X_val, X_test, shape, n_iter=None, on_task=None):
    """``{task: {method: {psnr, ssim, seconds, select_seconds, params}}}``; ``on_task(results)``
    runs after each task."""
    results = {}
    for task, (op, noise) in demo_tasks(shape).items():
        Y_val = op.measure(X_val, noise_std=noise, random_state=1)
        Y = op.measure(X_test, noise_std=noise, random_state=0)
        row = {}
        for method, grid in {"pinv": {}, **METHODS}.items():
            solver = InverseSolver(prior, op, method=method, random_state=0,
                                   n_iter=None if method == "pinv" else n_iter)
            t = time.time()
            if grid:
                search = GridSearchCV(solver, grid, cv=2).fit(Y_val, X_val)
                solver, chosen = search.best_estimator_, search.best_params_
            else:
                chosen = None
            select = time.time() - t
            t = time.time()
            R = solver.predict(Y)
            row[method] = {"psnr": float(psnr(X_test, R).mean()),
                           "ssim": float(ssim(X_test, R, shape).mean()),
                           "seconds": time.time() - t, "select_seconds": select,
                           "params": chosen}
        results[task] = row
        print(task, {m: round(v["psnr"], 2) for m, v in row.items()}, flush=True)
        if on_task is not None:
            on_task(results)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=None,
                        help="use the first N test digits for the inverse problems (default: "
                             "all 450; --quick: 20)")
    parser.add_argument("--prior", type=Path, default=None,
                        help="a fitted InjectiveFlowPrior (joblib) to use instead of fitting "
                             "one; its fit time is then not measured")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    X_fit, X_val, X_test, shape = digits_split()
    epochs = {"max_epochs": 2} if args.quick else {}
    if args.prior is None:
        injective = InjectiveFlowPrior(image_shape=shape, latent_dim=args.latent_dim,
                                       data_range=(0, 1), random_state=0, device="cpu", **epochs)
        inj_wall, inj_cpu = _timed_fit(injective, X_fit)
    else:
        injective, inj_wall, inj_cpu = joblib.load(args.prior), None, None
    inj = {"loaded_from": None if args.prior is None else str(args.prior),
           "params": {k: v for k, v in injective.get_params().items()
                      if isinstance(v, (int, float, str, tuple, type(None)))},
           "latent_dim": int(injective.latent_dim_),
           "n_parameters": int(sum(p.numel() for p in injective.flow_.parameters())),
           "fit_wall_s": inj_wall, "fit_cpu_s": inj_cpu,
           "mse_epochs": len(injective.history_["mse_val_loss"]),
           "ml_epochs": len(injective.history_["val_loss"]),
           **reconstruction(injective, X_test)}
    result = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick,
              "dataset": "digits (1, 8, 8), benchmarks/inverse.py digits_split",
              "n_fit": len(X_fit), "n_val": len(X_val), "n_test": len(X_test),
              "injective": inj, "required_max_relative_error": REQUIRED_MAX_ERROR,
              "passes": inj["relative_error_mean"] <= REQUIRED_MAX_ERROR}
    flow, flow_wall = digits_prior(X_fit, args.quick)
    result["flow_prior"] = {
        "n_parameters": int(sum(p.numel() for p in flow.flow_.parameters())),
        "fit_wall_s": flow_wall, "epochs": len(flow.history_["val_loss"]),
        "test_log_likelihood": flow.score(X_test)}
    if inj_wall:
        result["fit_time_ratio_flow_prior_over_injective"] = flow_wall / inj_wall
    print(f"{'model':<26}{'fit wall s':>12}{'fit cpu s':>12}{'params':>10}{'rel. error':>12}")
    wall, cpu = ("-", "-") if inj_wall is None else (f"{inj_wall:.1f}", f"{inj_cpu:.1f}")
    print(f"{'InjectiveFlowPrior (d=' + str(inj['latent_dim']) + ')':<26}{wall:>12}{cpu:>12}"
          f"{inj['n_parameters']:>10d}{inj['relative_error_mean']:>12.4f}")
    fp = result["flow_prior"]
    print(f"{'FlowPrior':<26}{fp['fit_wall_s']:>12.1f}{'-':>12}{fp['n_parameters']:>10d}"
          f"{'-':>12}")
    print(f"relative reconstruction error on the test split: mean "
          f"{inj['relative_error_mean']:.4f}, median {inj['relative_error_median']:.4f}, max "
          f"{inj['relative_error_max']:.4f} (required mean <= {REQUIRED_MAX_ERROR}: "
          f"{'pass' if result['passes'] else 'FAIL'})\n", flush=True)

    result["environment"] = {
        "torch": torch.__version__, "scikit-learn": sklearn.__version__,
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.machine()}
    n_test = args.n_test or (20 if args.quick else len(X_test))
    result["n_test_inverse_problems"] = n_test

    def save(results):  # after each task, so that an interrupted run keeps what it has
        result["inverse_problems"] = results
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    results = inverse_problems(injective, X_val, X_test[:n_test], shape,
                               n_iter=20 if args.quick else None, on_task=save)
    names = list(next(iter(results.values())))
    print(f"\nPSNR dB / SSIM / seconds, {n_test} test digits, InjectiveFlowPrior "
          f"(d={inj['latent_dim']})")
    print(f"{'task':8s}" + "".join(f"{n:>24s}" for n in names))
    for task, row in results.items():
        print(f"{task:8s}" + "".join(f"{row[n]['psnr']:10.2f} /{row[n]['ssim']:5.2f} /"
                                     f"{row[n]['seconds']:5.1f}s" for n in names))
    wins = [t for t, row in results.items() if row["iflow-l"]["psnr"] >= row["iflow"]["psnr"]]
    result["iflow_l_at_least_iflow"] = {"tasks": wins, "count": len(wins),
                                        "of": len(results)}
    print(f"iflow-l >= iflow (PSNR) on {len(wins)} of {len(results)} tasks: {', '.join(wins)}")
    save(results)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
