"""Injective flow (TRUMPET) on digits: test reconstruction error and fit time vs FlowPrior.

    python benchmarks/injective_recon.py [--latent-dim 32] [--no-flow-prior] [--threads N]

Fits ``InjectiveFlowPrior(latent_dim=32)`` and, for the fit-time comparison, ``FlowPrior``
(both with their default settings, ``data_range=(0, 1)``, ``random_state=0``) on the digits
training split (``train_test_split(test_size=0.25, random_state=0)``), then reports the
relative reconstruction error ``||x - G(G^+(x))|| / ||x||`` on the test split. Prints a table
and writes ``benchmarks/results/injective_recon.json``.

Log-likelihoods are reported for completeness only: the injective prior's is a density on its
``latent_dim``-dimensional manifold (of the projection of x), FlowPrior's a density on R^64, so
the two are not comparable.
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.model_selection import train_test_split

from flowsk import FlowPrior, InjectiveFlowPrior
from flowsk.datasets import load_digit_images

REQUIRED_MAX_ERROR = 0.15
RESULTS = Path(__file__).resolve().parent / "results" / "injective_recon.json"


def _timed_fit(estimator, X):
    wall, cpu = time.perf_counter(), time.process_time()
    estimator.fit(X)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--no-flow-prior", action="store_true",
                        help="skip fitting FlowPrior (the fit-time baseline)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    X, shape = load_digit_images()
    X_train, X_test = train_test_split(X, test_size=0.25, random_state=0)
    common = {"image_shape": shape, "data_range": (0, 1), "random_state": 0, "device": "cpu"}

    injective = InjectiveFlowPrior(latent_dim=args.latent_dim, **common)
    inj_wall, inj_cpu = _timed_fit(injective, X_train)
    err = injective.reconstruction_error(X_test)
    projected = injective.project(X_test)
    bound_ll = injective.score(X_test)
    exact_ll = injective.set_params(logdet="exact").score(X_test)  # read at scoring time
    injective.set_params(logdet="bound")
    result = {
        "dataset": "digits (1, 8, 8), train_test_split(test_size=0.25, random_state=0)",
        "n_train": len(X_train), "n_test": len(X_test),
        "injective": {
            "params": {k: v for k, v in injective.get_params().items()
                       if isinstance(v, (int, float, str, tuple, type(None)))},
            "latent_dim": int(injective.latent_dim_),
            "n_parameters": int(sum(p.numel() for p in injective.flow_.parameters())),
            "fit_wall_s": inj_wall, "fit_cpu_s": inj_cpu,
            "mse_epochs": len(injective.history_["mse_val_loss"]),
            "ml_epochs": len(injective.history_["val_loss"]),
            "relative_error_mean": float(err.mean()),
            "relative_error_median": float(np.median(err)),
            "relative_error_max": float(err.max()),
            "relative_error_global": float(np.linalg.norm(X_test - projected)
                                           / np.linalg.norm(X_test)),
            "test_log_likelihood_bound": bound_ll,
            "test_log_likelihood_exact": exact_ll,
        },
        "required_max_relative_error": REQUIRED_MAX_ERROR,
    }
    result["passes"] = result["injective"]["relative_error_mean"] <= REQUIRED_MAX_ERROR

    if not args.no_flow_prior:
        flow = FlowPrior(**common)
        flow_wall, flow_cpu = _timed_fit(flow, X_train)
        result["flow_prior"] = {
            "n_parameters": int(sum(p.numel() for p in flow.flow_.parameters())),
            "fit_wall_s": flow_wall, "fit_cpu_s": flow_cpu,
            "epochs": len(flow.history_["val_loss"]),
            "test_log_likelihood": flow.score(X_test),
        }
        result["fit_time_ratio_flow_prior_over_injective"] = flow_wall / inj_wall

    result["environment"] = {
        "torch": torch.__version__, "scikit-learn": sklearn.__version__,
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }

    inj = result["injective"]
    rows = [(f"InjectiveFlowPrior (d={inj['latent_dim']})", inj["fit_wall_s"],
             inj["fit_cpu_s"], inj["n_parameters"], f"{inj['relative_error_mean']:.4f}")]
    if "flow_prior" in result:
        fp = result["flow_prior"]
        rows.append(("FlowPrior", fp["fit_wall_s"], fp["fit_cpu_s"], fp["n_parameters"], "-"))
    print(f"{'model':<26}{'fit wall s':>12}{'fit cpu s':>12}{'params':>10}{'rel. error':>12}")
    for name, wall, cpu, n_params, rel in rows:
        print(f"{name:<26}{wall:>12.1f}{cpu:>12.1f}{n_params:>10d}{rel:>12}")
    print(f"relative reconstruction error on the test split: mean {inj['relative_error_mean']:.4f}"
          f", median {inj['relative_error_median']:.4f}, max {inj['relative_error_max']:.4f}, "
          f"global {inj['relative_error_global']:.4f} (required mean <= {REQUIRED_MAX_ERROR}: "
          f"{'pass' if result['passes'] else 'FAIL'})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
