"""Injective flow (TRUMPET) on digits: fit time, reconstruction error, log-densities on the
manifold by log-det method, and inverse problems.

    python benchmarks/injective.py [--quick] [--n-test N] [--prior PATH]

Protocol of ``benchmarks/inverse.py`` (its ``digits_split``, tasks from
``flowsk.demo.demo_tasks``): ``InjectiveFlowPrior(latent_dim=32)`` (default settings,
``data_range=(0, 1)``, ``random_state=0``) is fitted on the training split less the 100
validation images; the fit-time comparison is with the benchmarks' ``FlowPrior``
(``digits_prior`` of ``benchmarks/inverse.py``, whose fit time is cached with it). Reported:

1. the relative reconstruction error ``||x - G(G^+(x))|| / ||x||`` on the test split
   (required: mean <= 0.15) and both fit times;
2. the mean log-density of the test digits with each log-det method (``exact``,
   ``stochastic``, ``bound``) and its seconds, for that prior and for priors trained one epoch
   with and without ``data_range``. These are densities on the prior's 32-dimensional
   manifold (of the projection of x): not comparable with a ``FlowPrior``'s log-likelihood on
   R^64 (``benchmarks/density.py``), which this benchmark does not report;
3. ``iflow``, ``iflow-l`` and ``csgm`` with the injective prior (and ``pinv``) on the five
   tasks: PSNR / SSIM on the test split and seconds, with ``iflow-l``'s ``beta`` and
   ``csgm``'s ``gamma`` chosen by ``GridSearchCV(cv=2)`` on the validation images (``iflow``
   has nothing to tune).

Prints tables and writes ``benchmarks/results/injective.json``.
"""
import argparse
import copy
import time
from pathlib import Path

import joblib
import numpy as np
import torch
from _common import edge_flag, markdown_table, metadata, provenance, read_results, write_results
from inverse import GRIDS, digits_prior, digits_split
from sklearn.model_selection import GridSearchCV

from flowsk import InjectiveFlowPrior, InverseSolver
from flowsk.demo import demo_tasks
from flowsk.metrics import psnr, ssim

NAME = "injective"
REQUIRED_MAX_ERROR = 0.15
METHODS = {"iflow": {}, "iflow-l": {"beta": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]}, "csgm": GRIDS["csgm"]}
LOGDET_METHODS = ("exact", "stochastic", "bound")


def _timed_fit(estimator, X):
    wall, cpu = time.perf_counter(), time.process_time()
    estimator.fit(X)
    return time.perf_counter() - wall, time.process_time() - cpu


def reconstruction(prior, X_test):
    """Relative projection errors of a fitted InjectiveFlowPrior on ``X_test``."""
    err = prior.reconstruction_error(X_test)
    return {"relative_error_mean": float(err.mean()),
            "relative_error_median": float(np.median(err)),
            "relative_error_max": float(err.max()),
            "relative_error_global": float(np.linalg.norm(X_test - prior.project(X_test))
                                           / np.linalg.norm(X_test))}


def manifold_log_densities(prior, X):
    """``{method: {"mean": nats, "seconds": s}}``: mean ``score_samples`` of ``X`` with each
    log-det method (the prior's own ``logdet`` is left as it is)."""
    out = {}
    for method in LOGDET_METHODS:
        scorer = copy.copy(prior).set_params(logdet=method)
        t = time.perf_counter()
        out[method] = {"mean": float(scorer.score_samples(X).mean()),
                       "seconds": time.perf_counter() - t}
    print(", ".join(f"{m} {v['mean']:.1f} nats ({v['seconds']:.1f} s)" for m, v in out.items()),
          flush=True)
    return out


def inverse_problems(prior, X_val, X_test, shape, n_iter=None, on_task=None):
    """``{task: {method: {psnr, ssim, seconds, select_seconds, params}}}``; ``on_task(results)``
    runs after each task."""
    results = {}
    for task, (op, noise) in demo_tasks(shape).items():
        Y_val = op.measure(X_val, noise_std=noise, random_state=1)
        Y = op.measure(X_test, noise_std=noise, random_state=0)
        row = {}
        for method, grid in {"pinv": {}, **METHODS}.items():
            if n_iter is not None and "n_iter" in grid:
                grid = {**grid, "n_iter": [n_iter]}
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = metadata(seed=0)

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
    result = {"quick": args.quick,
              "dataset": "digits (1, 8, 8), benchmarks/inverse.py digits_split",
              "n_fit": len(X_fit), "n_val": len(X_val), "n_test": len(X_test),
              "injective": inj, "required_max_relative_error": REQUIRED_MAX_ERROR,
              "passes": inj["relative_error_mean"] <= REQUIRED_MAX_ERROR}
    flow, flow_wall = digits_prior(X_fit, args.quick)
    result["flow_prior"] = {
        "n_parameters": int(sum(p.numel() for p in flow.flow_.parameters())),
        "fit_wall_s": flow_wall, "epochs": len(flow.history_["val_loss"])}
    if inj_wall:
        result["fit_time_ratio_flow_prior_over_injective"] = flow_wall / inj_wall
    print(f"relative reconstruction error on the test split: mean "
          f"{inj['relative_error_mean']:.4f}, median {inj['relative_error_median']:.4f}, max "
          f"{inj['relative_error_max']:.4f} (required mean <= {REQUIRED_MAX_ERROR}: "
          f"{'pass' if result['passes'] else 'FAIL'})", flush=True)

    n_density = 50 if args.quick else len(X_test)
    result["n_test_log_densities"] = n_density
    densities = {"trained, data_range (0, 1)": manifold_log_densities(injective,
                                                                      X_test[:n_density])}
    for key, data_range in (("1 epoch, data_range (0, 1)", (0, 1)),
                            ("1 epoch, no data_range", None)):
        short = InjectiveFlowPrior(image_shape=shape, latent_dim=args.latent_dim,
                                   data_range=data_range, max_epochs=1, random_state=0,
                                   device="cpu").fit(X_fit)
        densities[key] = manifold_log_densities(short, X_test[:n_density])
    result["manifold_log_densities"] = densities

    n_test = args.n_test or (20 if args.quick else len(X_test))
    result["n_test_inverse_problems"] = n_test

    def save(results):  # after each task, so that an interrupted run keeps what it has
        result["inverse_problems"] = results
        write_results(NAME, result, meta)

    results = inverse_problems(injective, X_val, X_test[:n_test], shape,
                               n_iter=20 if args.quick else None, on_task=save)
    wins = [t for t, row in results.items() if row["iflow-l"]["psnr"] >= row["iflow"]["psnr"]]
    result["iflow_l_at_least_iflow"] = {"tasks": wins, "count": len(wins),
                                        "of": len(results)}
    save(results)
    for table in tables().values():
        print("\n" + table)
    return result


def tables():
    r = read_results(NAME)
    inj, fp = r["injective"], r["flow_prior"]
    fit_rows = [[f"`InjectiveFlowPrior` (d={inj['latent_dim']})",
                 "-" if inj["fit_wall_s"] is None else f"{inj['fit_wall_s']:.1f}",
                 "-" if inj["fit_cpu_s"] is None else f"{inj['fit_cpu_s']:.1f}",
                 f"{inj['n_parameters']:,}",
                 f"{inj['relative_error_mean']:.3f} / {inj['relative_error_median']:.3f} / "
                 f"{inj['relative_error_max']:.2f}"],
                ["`FlowPrior` (bijective, benchmarks' settings)", f"{fp['fit_wall_s']:.1f}", "-",
                 f"{fp['n_parameters']:,}", "-"]]
    fit = markdown_table(["prior", "fit wall s", "fit CPU s", "parameters",
                          f"relative error mean / median / max on {r['n_test']} test digits "
                          f"(required mean ≤ {r['required_max_relative_error']})"], fit_rows)

    density_rows = [[key] + [f"{v[m]['mean']:.1f} ({v[m]['seconds']:.1f} s)"
                             for m in LOGDET_METHODS]
                    for key, v in r["manifold_log_densities"].items()]
    density = markdown_table(
        ["`InjectiveFlowPrior` (d=32)"] + [f"`{m}`: nats on the manifold (s)"
                                           for m in LOGDET_METHODS], density_rows)

    names = list(next(iter(r["inverse_problems"].values())))
    inverse_rows = []
    for task, row in r["inverse_problems"].items():
        best = max(names, key=lambda n: row[n]["psnr"])
        cells = []
        for n in names:
            cell = f"{row[n]['psnr']:.2f} / {row[n]['ssim']:.3f}"
            if row[n]["params"]:
                name, value = next((k, v) for k, v in row[n]["params"].items()
                                   if k != "n_iter")
                flag = edge_flag(value, METHODS[n][name]).replace(" (edge)", ", edge")
                cell += f" ({name} {flag})"
            cells.append(f"**{cell}**" if n == best else cell)
        inverse_rows.append([task] + cells)
    inverse = markdown_table(["task"] + [f"`{n}`" for n in names], inverse_rows)
    note = (f"PSNR dB / SSIM on {r['n_test_inverse_problems']} test digits; `iflow-l` ≥ "
            f"`iflow` on {r['iflow_l_at_least_iflow']['count']} of "
            f"{r['iflow_l_at_least_iflow']['of']} tasks.")
    line = provenance(r["meta"])
    return {"fit": fit + "\n\n" + line,
            "log-density": density + "\n\n" + f"Mean over {r['n_test_log_densities']} test "
                           "digits. " + line,
            "inverse": inverse + "\n\n" + note + " " + line}


if __name__ == "__main__":
    main()
