"""Posterior benchmark on the five digits tasks of ``benchmarks/inverse.py``.

For each posterior method: PSNR of the MMSE estimate (the mean of the draws), mean PSNR of
single draws (the gap of Whang et al.'s Figure 4), calibration (fraction of true pixels inside
the per-pixel 90 % interval of the draws) and seconds per observation; the exact GMM-10 MMSE of
``benchmarks/inverse.py`` is the reference. The smoothing ``sigma`` is chosen per task by
GridSearchCV for ``vi`` (2 folds of 40 validation digits, grid: the task's noise times 1, 2
and 5) and used by every method (a search per method would multiply the cost);
``amortized-vi`` trains on simulations in ``fit``. The prior is ``benchmarks/inverse.py``'s
with the settings in ``PRIOR``. ``pl-mcmc`` runs on the first 20 test
images only (it is the slow baseline). The first 100 test digits are used unless ``--n-test``
says otherwise. One torch thread (seconds are wall seconds of that thread), so that runs of
different tasks can share a machine's cores. Writes results/posterior.json and
results/posterior.png (truth, measurement, draws, mean, std for vi on inpainting).

    python benchmarks/posterior.py [--quick] [--n-test N] [--methods vi ...] [--tasks cs16 ...]
"""
import argparse
import json
import time

import numpy as np
import torch
from _common import markdown_table, metadata, provenance, read_results, write_results
from inverse import RESULTS, dense, digits_gmm, digits_prior, digits_split, gmm_mmse
from sklearn.model_selection import GridSearchCV

from flowsk import InverseSolver
from flowsk.demo import demo_tasks
from flowsk.metrics import psnr

METHODS = ("vi", "amortized-vi", "langevin", "ambient-vi", "pl-mcmc")
TASKS = ("denoise", "inpaint", "cs16", "deblur", "sr2")
N_MCMC = 20
N_DRAWS = 32
SIGMA_FACTORS = (1, 2, 5)
SIGMA_SEARCH = 40
#: The prior's settings: with the mlp defaults (weight decay 1e-3) the generator overflowed at
#: amortized-vi's draws and the run stopped; this prior trains with less weight decay.
PRIOR = {"name": "prior-digits-posterior", "weight_decay": 1e-4, "learning_rate": 3e-4}


def calibration(X, draws, level=0.9):
    """Fraction of ``X (n, D)`` inside the central ``level`` interval of ``draws (n, k, D)``."""
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return float(np.mean((X >= lo) & (X <= hi)))


def quick_params(method, quick):
    if not quick:
        return {}
    return {"vi": {"n_iter": 30}, "ambient-vi": {"n_iter": 30},
            "amortized-vi": {"method_params": {"n_iter": 2, "n_simulations": 2000}},
            "langevin": {"method_params": {"burn_in": 20}},
            "pl-mcmc": {"method_params": {"burn_in": 20}}}[method]


def choose_sigma(prior, op, noise, Y_val, X_val, quick):
    """The ``sigma`` GridSearchCV picks for ``vi`` on validation digits."""
    solver = InverseSolver(prior, op, method="vi", random_state=0, **quick_params("vi", quick))
    n = 10 if quick else SIGMA_SEARCH
    search = GridSearchCV(solver, {"sigma": [noise * f for f in SIGMA_FACTORS]}, cv=2)
    return search.fit(Y_val[:n], X_val[:n]).best_params_["sigma"]


def solver_for(method, prior, op, sigma, Y_val, quick):
    """A fitted solver at the chosen ``sigma``."""
    solver = InverseSolver(prior, op, method=method, sigma=sigma, random_state=0,
                           **quick_params(method, quick))
    return solver.fit(Y_val)


def figure(X, Y, draws, op, shape, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = min(4, len(X))
    fig, axes = plt.subplots(rows, 7, figsize=(7 * 1.3, rows * 1.4))
    measured = np.clip(op.pinv(torch.as_tensor(Y[:rows], dtype=torch.float32)).numpy(), 0, 1)
    for r in range(rows):
        panels = [X[r], measured[r], *draws[r, :3], draws[r].mean(0), draws[r].std(0)]
        titles = ["truth", "A^+ y", "draw 1", "draw 2", "draw 3", "mean", "std"]
        for ax, img, title in zip(axes[r], panels, titles):
            ax.imshow(img.reshape(shape[1:]), cmap="gray",
                      vmin=0, vmax=None if title == "std" else 1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(results, quick, n_test, meta, per_obs=None):
    """Write results/posterior.json, keeping the rows of methods this run did not measure
    (from an earlier run with the same ``quick`` and ``n_test``)."""
    path = RESULTS / "posterior.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if (old.get("quick"), old.get("n_test")) == (quick, n_test):
        results = {task: {**old["results"].get(task, {}), **rows}
                   for task, rows in {**old["results"], **results}.items()}
    out = {"quick": quick, "n_test": n_test, "n_draws": N_DRAWS, "results": results}
    if per_obs is not None and {"vi", "amortized-vi"} <= per_obs.keys():
        out["speedup_amortized_over_vi"] = per_obs["vi"] / per_obs["amortized-vi"]
    write_results("posterior", out, meta)


def tables():
    """The README's posterior table from results/posterior.json: per task, MMSE PSNR / mean
    single-draw PSNR / 90 % calibration of each method (bold where the MMSE beats the GMM-10
    posterior mean on the same digits), and seconds per digit."""
    data = read_results("posterior")
    results = data["results"]
    methods = [m for m in METHODS if all(m in row for row in results.values())]
    rows = []
    for task, row in results.items():
        cells = []
        for m in methods:
            r = row[m]
            mmse = f"{r['psnr_mmse']:.2f}"
            if r["psnr_mmse"] > r["gmm10_psnr_same_subset"]:
                mmse = f"**{mmse}**"
            cells.append(f"{mmse} / {r['psnr_single']:.2f} / {r['calibration90']:.2f}")
        first = [row[m]["gmm10_psnr_same_subset"] for m in methods if row[m]["n_test"] == N_MCMC]
        rows.append([f"{task} ({row[methods[0]]['sigma']:g})",
                     f"{row['gmm10-mmse']['psnr']:.2f}", *cells,
                     f"{first[0]:.2f}" if first else ""])
    seconds = [np.mean([results[t][m]["seconds_per_obs"] for t in results]) for m in methods]
    rows.append(["seconds per digit", "", *[f"{s:.2g}" for s in seconds], ""])
    meta = data.get("meta")
    when = provenance(meta) if meta else f"<sub>measured {data['date']}</sub>"
    return {"posterior": markdown_table(["task (`sigma`)", "GMM-10 MMSE",
                                         *[f"`{m}`" for m in methods],
                                         f"GMM-10, first {N_MCMC}"], rows) + "\n\n" + when}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-test", type=int, default=None, help="test digits (default 100)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    meta = metadata(seed=0)
    X_fit, X_val, X_test, shape = digits_split()
    X_test = X_test[:args.n_test or (30 if args.quick else 100)]
    prior, _ = digits_prior(X_fit, args.quick, **PRIOR)
    gmm = digits_gmm(X_fit)
    results = {}
    for task in args.tasks:
        op, noise = demo_tasks(shape)[task]
        Y_val = op.measure(X_val, noise_std=noise, random_state=1)
        Y = op.measure(X_test, noise_std=noise, random_state=0)
        gmm_mean = np.clip(gmm_mmse(gmm, dense(op, X_test.shape[1]), noise, Y), 0, 1)
        row = {"gmm10-mmse": {"psnr": float(psnr(X_test, gmm_mean).mean())}}
        sigma = choose_sigma(prior, op, noise, Y_val, X_val, args.quick)
        for method in args.methods:
            n = N_MCMC if method == "pl-mcmc" else len(X_test)
            t = time.time()
            solver = solver_for(method, prior, op, sigma, Y_val, args.quick)
            fit_seconds = time.time() - t
            t = time.time()
            draws = solver.sample_posterior(Y[:n], n_samples=N_DRAWS)
            seconds = time.time() - t
            mean = draws.mean(1)
            row[method] = {
                "psnr_mmse": float(psnr(X_test[:n], mean).mean()),
                "psnr_single": float(np.mean([psnr(X_test[:n], draws[:, j]).mean()
                                              for j in range(N_DRAWS)])),
                "calibration90": calibration(X_test[:n], draws),
                "seconds_per_obs": seconds / n, "fit_seconds": fit_seconds, "n_test": n,
                "sigma": solver.get_params()["sigma"],
                "gmm10_psnr_same_subset": float(psnr(X_test[:n], gmm_mean[:n]).mean())}
            if method == "vi" and task == "inpaint":
                figure(X_test, Y, draws, op, shape, RESULTS / "posterior.png")
            print(task, method, {k: round(v, 3) if isinstance(v, float) else v
                                 for k, v in row[method].items()}, flush=True)
        results[task] = row
        save(results, args.quick, len(X_test), meta)  # an interrupted run keeps the tasks done
    print(f"\nMMSE PSNR dB / single-draw PSNR / 90 % calibration, {len(X_test)} test digits "
          f"(pl-mcmc: first {N_MCMC}), {N_DRAWS} draws")
    print(f"{'task':8s}{'gmm10':>8s}" + "".join(f"{m:>22s}" for m in args.methods))
    for task, row in results.items():
        print(f"{task:8s}{row['gmm10-mmse']['psnr']:8.2f}" + "".join(
            f"{row[m]['psnr_mmse']:9.2f} /{row[m]['psnr_single']:6.2f} /"
            f"{row[m]['calibration90']:5.2f}" for m in args.methods))
    per_obs = {m: np.mean([results[t][m]["seconds_per_obs"] for t in results])
               for m in args.methods}
    print(f"{'s/obs':16s}" + "".join(f"{per_obs[m]:22.4f}" for m in args.methods))
    if {"vi", "amortized-vi"} <= per_obs.keys():
        print(f"amortized-vi speed-up over vi at prediction: "
              f"{per_obs['vi'] / per_obs['amortized-vi']:.0f}x")
    save(results, args.quick, len(X_test), meta, per_obs)
    print(f"wrote {RESULTS / 'posterior.json'}")


if __name__ == "__main__":
    main()
