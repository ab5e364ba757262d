"""Calibration of the posterior methods (issue 20): SBC on the digits prior, the exact posterior
of a fitted 4-D flow, and coverage on real test digits next to the exact GMM-10 posterior.

Every method runs with its defaults and ``sigma`` = the noise of the task (the Bayesian model a
user would write down). ``vi+is`` is ``vi`` with ``importance_samples=1000`` (sampling
importance resampling with Pareto-smoothed weights), computed from the same fitted ``q`` as
``vi``. Times are CPU seconds per observation (one thread), fits included. For time,
``ambient-vi`` runs in the ``gaussian`` part only, ``hmc`` and ``pl-mcmc`` in ``sbc`` and
``gaussian``.

- ``sbc``: the digits prior (``benchmarks/posterior.py``'s, cached) as the truth: ``x = G(z)``,
  ``y = A(x) + sigma noise``; tasks denoise (sigma 0.1), inpaint (centre 4x4 box) and cs16
  (sigma 0.01); ``N_SIM`` simulations of ``N_DRAWS`` draws each
  (:func:`flowsk.diagnostics.sbc_ranks`). Per method: per-pixel coverage at 0.5 / 0.8 / 0.9 /
  0.95, the p-value of rank uniformity (chi-squared per pixel, Bonferroni over the 64) and that
  of the misfit ``||A(x) - y||``'s rank (``misfit=True``; prior-like draws fail it) with its
  mean fractional rank (low: draws fit the data worse than the truth). ``mala-laplace-start``
  is ``mala`` from draws of the Laplace approximation, ``mala-identity`` ``mala`` with
  ``preconditioner="identity"`` (chains from perturb-and-MAP points, the default start),
  ``mala-prior-start`` the same from prior draws (all SBC only).
  Figures ``results/calibration-sbc-TASK.png``: rank histograms and ECDF differences.
- ``gaussian``: ``FlowPrior()`` (defaults) fitted to 4000 draws of a 4-D Gaussian; cs 4 -> 2,
  noise 0.1, 10 observations, 2000 draws per method. The reference is the exact posterior of
  the fitted flow itself, by importance sampling with ``N_IS`` prior draws (it separates the
  sampler's error from the prior's misfit): the worst |mean error| / posterior std and the
  worst relative std error over observations and features.
- ``digits``: the first ``N_DIGITS`` test digits (``benchmarks/inverse.py``'s split), the
  five tasks of :func:`flowsk.demo.demo_tasks`, ``N_DRAWS`` draws. Digits sit on a 17-level
  lattice with half their pixels exactly 0; the flows' draws are clipped to [0, 1], so ties
  with the truth are common. The score gives tied truths randomised ranks (the coverage of
  :func:`flowsk.diagnostics.coverage`); ``raw`` is the fraction of true pixels inside the
  closed interval between the 5 % and 95 % ``np.quantile`` of the draws (ties count as inside,
  the finite number of draws narrows it), the score of ``benchmarks/posterior.py``. The exact
  GMM-10 posterior (``benchmarks/inverse.py``'s mixture, draws clipped likewise) is scored the
  same way. Also the PSNR of the draws' mean and the TARP-style joint coverage at 0.9.

Results merge into ``results/calibration.json`` (each part, task and method replaces its own
row, and each row keeps its run's provenance, so parts and methods run separately or in
parallel). ``--methods`` runs some methods only; the pixel ranks of every method are kept in
``results/calibration-ranks-TASK.npz`` and the rank figures drawn from all that are stored.
``--quick`` runs tiny sizes into ``results/calibration-quick.json``.

    python benchmarks/calibration.py --part sbc|gaussian|digits [--tasks ...] [--methods ...]
                                     [--quick]
"""
import argparse
import time
import warnings

import joblib
import numpy as np
import torch
from _common import (
    RESULTS,
    markdown_table,
    metadata,
    provenance,
    read_results,
    sbc_scores,
    training_code,
    update_results,
)
from inverse import dense, digits_gmm, digits_prior, digits_split

from flowsk import FlowPrior, InverseSolver
from flowsk.demo import demo_tasks
from flowsk.diagnostics import (
    LEVELS,
    coverage,
    plot_ranks,
)
from flowsk.methods import METHODS
from flowsk.metrics import psnr
from flowsk.operators import CompressedSensing

PRIOR = {"name": "prior-digits-posterior", "weight_decay": 1e-4, "learning_rate": 3e-4}
SBC_TASKS = ("denoise", "inpaint", "cs16")
TASKS = ("denoise", "inpaint", "cs16", "deblur", "sr2")
METHOD_NAMES = ("mala", "hmc", "smc", "langevin", "pl-mcmc", "vi", "vi+is", "amortized-vi",
                "ambient-vi")
SBC_METHODS = ("mala", "mala-laplace-start", "mala-identity", "mala-prior-start", "hmc", "smc",
               "langevin", "pl-mcmc", "vi", "vi+is", "amortized-vi")
#: SBC only: name -> (method, its parameters); ``mala`` from draws of the Laplace
#: approximation, and on the latents themselves (no Laplace preconditioner) from perturb-and-MAP
#: points (the default start) and from prior draws
VARIANTS = {"mala-laplace-start": ("mala", {"start": "laplace"}),
            "mala-identity": ("mala", {"preconditioner": "identity"}),
            "mala-prior-start": ("mala", {"preconditioner": "identity", "start": "prior"})}
#: for time, ``ambient-vi`` runs in the Gaussian part only, ``hmc`` and ``pl-mcmc`` also in SBC
DIGIT_METHODS = ("mala", "smc", "langevin", "vi", "vi+is", "amortized-vi")
N_SIM, N_DRAWS, N_DIGITS, N_IS, IMPORTANCE = 200, 99, 40, 4_000_000, 1000
QUICK = {"n_sim": 20, "n_draws": 19, "n_digits": 10, "n_is": 200_000,
         "params": {"vi": {"n_iter": 20}, "ambient-vi": {"n_iter": 20},
                    "amortized-vi": {"method_params": {"n_iter": 2, "n_simulations": 1000}},
                    "mala": {"method_params": {"burn_in": 20}},
                    "mala-laplace-start": {"method_params": {"burn_in": 20}},
                    "mala-identity": {"method_params": {"burn_in": 20, "start_iter": 20}},
                    "mala-prior-start": {"method_params": {"burn_in": 20}},
                    "hmc": {"method_params": {"burn_in": 10}},
                    "smc": {"method_params": {"n_moves": 2, "n_particles": 32}},
                    "langevin": {"method_params": {"burn_in": 20}},
                    "pl-mcmc": {"method_params": {"burn_in": 20}}}}


class SharedVI:
    """``vi`` and ``vi`` with importance resampling from one fit of ``q`` per set of
    measurements. ``view(importance_samples)`` has the solver protocol that
    :func:`flowsk.diagnostics.sbc_ranks` reads (``prior``, ``operator``, ``sigma``,
    ``sample_posterior``); its ``seconds`` are the CPU seconds of its last call with the fit
    counted in, and ``warnings`` collects the Pareto-k warnings."""

    def __init__(self, solver):
        self.solver, self.method = solver, METHODS["vi"]()
        self.q, self.key, self.fit_seconds, self.warnings = None, None, 0.0, []

    def view(self, importance_samples):
        return _VIView(self, importance_samples)


class _VIView:
    def __init__(self, shared, importance_samples):
        self.shared, self.importance_samples = shared, importance_samples
        solver = shared.solver
        self.prior, self.operator, self.sigma = solver.prior, solver.operator, solver.sigma
        self.seconds = 0.0

    def sample_posterior(self, Y, n_samples):
        shared, start = self.shared, time.process_time()
        problem = shared.solver._problem(shared.method)
        problem.params["importance_samples"] = self.importance_samples
        y = torch.as_tensor(np.asarray(Y, np.float32), device=problem.generator.device)
        fit_now = shared.key != Y.tobytes()
        if fit_now:
            shared.q, shared.key = shared.method.fit_q(problem, y), Y.tobytes()
            shared.fit_seconds = time.process_time() - start
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            with torch.no_grad():
                S = shared.method.draw(problem, shared.q, y, n_samples)
        shared.warnings += [str(w.message) for w in caught]
        self.seconds = time.process_time() - start + (0.0 if fit_now else shared.fit_seconds)
        return S.cpu().numpy().astype(np.float64)


def make_solvers(prior, op, sigma, names, quick, cache=None):
    """name -> object with the solver protocol, each with its defaults at ``sigma``; a
    ``seconds`` attribute, where present, holds its last call's CPU seconds. ``amortized-vi``
    is fitted here (on simulated pairs), or loaded from ``results/CACHE.joblib`` (kept while
    the prior's settings and the training code, ``vi``'s included, are unchanged); its fit
    CPU seconds are returned apart: ``(solvers, fit_seconds)``."""
    out, fit_seconds = {}, {}
    for name in names:
        if name == "vi+is":
            continue
        method, method_params = VARIANTS.get(name, (name, {}))
        params = QUICK["params"][name] if quick else {}
        params = {**params, "method_params": {**method_params, **params.get("method_params", {})}}
        solver = InverseSolver(prior, op, method=method, sigma=sigma, random_state=0, **params)
        if name == "vi":
            shared = SharedVI(solver)
            out["vi"] = shared.view(0)
            if "vi+is" in names:
                out["vi+is"] = shared.view(IMPORTANCE)
            continue
        if name == "amortized-vi":
            path = cache and RESULTS / f"{cache}{'-quick' if quick else ''}.joblib"
            key = {**PRIOR, "training_code": training_code("methods/variational.py")}
            cached = joblib.load(path) if path and path.exists() else ()
            if len(cached) == 3 and cached[2] == key:
                solver.model_, fit_seconds[name] = cached[:2]
                solver.n_features_in_ = op.output_dim
            else:
                start = time.process_time()
                solver.fit(np.zeros((1, op.output_dim)))  # it simulates its training pairs
                fit_seconds[name] = time.process_time() - start
                if path:
                    joblib.dump((solver.model_, fit_seconds[name], key), path)
        out[name] = solver
    return out, fit_seconds


def cpu_seconds(solver, start):
    """CPU seconds of ``solver``'s last draws: since ``start``, or, for ``vi`` with its shared
    fit, the view's own count."""
    return solver.seconds if isinstance(solver, _VIView) else time.process_time() - start


def pareto_warnings(solver):
    return len(solver.shared.warnings) if isinstance(solver, _VIView) else None


# -- SBC on the digits prior -----------------------------------------------------------------
def run_sbc(tasks, methods, quick):
    X_fit, _, _, shape = digits_split()
    prior, _ = digits_prior(X_fit, quick, **PRIOR)
    n_sim, n_draws = (QUICK["n_sim"], QUICK["n_draws"]) if quick else (N_SIM, N_DRAWS)
    rows = {}
    for task in tasks:
        op, noise = demo_tasks(shape)[task]
        solvers, fits = make_solvers(prior, op, noise, methods or SBC_METHODS, quick,
                                     f"amortized-{task}")
        row, ranks_of = {}, {}
        for name, solver in solvers.items():
            start = time.process_time()
            R, scores = sbc_scores(solver, n_sim, n_draws)
            seconds = cpu_seconds(solver, start)
            row[name] = {**scores,
                         "cpu_seconds_per_obs": (seconds + fits.get(name, 0.0)) / n_sim,
                         "sample_cpu_seconds": seconds, "fit_cpu_seconds": fits.get(name),
                         "pareto_warnings": pareto_warnings(solver)}
            ranks_of[name] = R
            print(task, name, row[name], flush=True)
        rows[task] = row
        rank_figure(merge_ranks(ranks_of, task, quick), n_draws, task, quick)
    return rows


def merge_ranks(ranks_of, task, quick):
    """Store this run's pixel ranks (name -> ``(n_sim, 64)``) in
    ``results/calibration-ranks-TASK.npz`` next to those of methods other runs measured, and
    return them all, so the figure shows the rows of the table."""
    path = RESULTS / f"calibration-ranks-{task}{'-quick' if quick else ''}.npz"
    stored = dict(np.load(path)) if path.exists() else {}
    stored.update({name: R.astype(np.int16) for name, R in ranks_of.items()})
    np.savez_compressed(path, **stored)
    return stored


def rank_figure(ranks_of, n_draws, task, quick):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in ("mala", "mala-laplace-start", "hmc", "smc", "langevin", "vi", "vi+is")
             if n in ranks_of]
    fig, axes = plt.subplots(len(names), 2, figsize=(8, 2.3 * len(names)), squeeze=False)
    for name, ax in zip(names, axes):
        plot_ranks(ranks_of[name], n_draws, title=f"{task}: {name}", axes=ax)
    fig.tight_layout()
    fig.savefig(RESULTS / f"calibration-sbc-{task}{'-quick' if quick else ''}.png", dpi=80)
    plt.close(fig)


# -- the exact posterior of a fitted 4-D flow ------------------------------------------------
def importance_reference(flow, A, noise, Y, n_draws, seed=0, chunk=500_000):
    """Mean and std ``(n_obs, D)`` of the flow's own posterior for ``y = A x + noise``, by
    self-normalised importance sampling with ``n_draws`` prior draws, and the effective sample
    size of each observation ``(n_obs,)``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        X = torch.cat([flow.inverse(torch.randn(min(chunk, n_draws - s), flow.latent_dim,
                                                generator=gen))[0]
                       for s in range(0, n_draws, chunk)]).double().numpy()
    X = X[np.isfinite(X).all(1)]
    AX = X @ A.T
    mean, std, ess = [], [], []
    for y in Y:
        log_w = -((AX - y) ** 2).sum(1) / (2 * noise ** 2)
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        m = w @ X
        mean.append(m)
        std.append(np.sqrt(w @ (X - m) ** 2))
        ess.append(1 / (w ** 2).sum())
    return np.array(mean), np.array(std), np.array(ess)


def run_gaussian(methods, quick):
    rng = np.random.RandomState(0)
    d = 4
    mu, B = rng.normal(size=d), rng.normal(size=(d, d))
    cov = B @ B.T / d + 0.1 * np.eye(d)
    X = rng.multivariate_normal(mu, cov, 4000)
    start = time.process_time()
    prior = FlowPrior(random_state=0, max_epochs=3 if quick else 200).fit(X)
    prior_seconds = time.process_time() - start
    op, noise = CompressedSensing(d, 2, random_state=0), 0.1
    A = dense(op, d)
    Y = op.measure(rng.multivariate_normal(mu, cov, 10), noise_std=noise, random_state=1)
    n_is = QUICK["n_is"] if quick else N_IS
    mean, std, ess = importance_reference(prior.flow_, A, noise, Y, n_is)
    solvers, fits = make_solvers(prior, op, noise, methods or METHOD_NAMES, quick)
    rows = {}
    for name, solver in solvers.items():
        start = time.process_time()
        S = solver.sample_posterior(Y, 2000)
        seconds = cpu_seconds(solver, start)
        m, s = S.mean(1), S.std(1)
        rows[name] = {"mean_error_std": float((np.abs(m - mean) / std).max()),
                      "std_error": float(np.abs(s / std - 1).max()),
                      "cpu_seconds_per_obs": (seconds + fits.get(name, 0.0)) / len(Y),
                      "pareto_warnings": pareto_warnings(solver)}
        print("gaussian", name, rows[name], flush=True)
    return {"methods": rows, "importance_draws": n_is, "ess_min": float(ess.min()),
            "prior_fit_cpu_seconds": prior_seconds, "prior_test_loglik_gap": float(
                prior.score(X[:1000]) - _gaussian_loglik(X[:1000], mu, cov))}


def _gaussian_loglik(X, mu, cov):
    from scipy import stats
    return float(stats.multivariate_normal(mu, cov).logpdf(X).mean())


# -- real test digits ------------------------------------------------------------------------
def gmm_posterior_draws(gmm, A, noise, Y, n_draws, rng):
    """Exact draws ``(n, n_draws, D)`` of ``p(x | y)`` for ``x ~ gmm`` (a fitted
    GaussianMixture, full covariances) and ``y = A x + N(0, noise^2 I)``."""
    m = A.shape[0]
    log_w, means, factors = [], [], []
    for w, mu, S in zip(gmm.weights_, gmm.means_, gmm.covariances_):
        C = A @ S @ A.T + max(noise, 1e-6) ** 2 * np.eye(m)
        R = Y - mu @ A.T
        sol = np.linalg.solve(C, R.T).T
        log_w.append(np.log(w) - 0.5 * (np.sum(R * sol, 1) + np.linalg.slogdet(C)[1]))
        gain = S @ A.T
        means.append(mu + sol @ gain.T)
        post = S - gain @ np.linalg.solve(C, gain.T)
        factors.append(np.linalg.cholesky(0.5 * (post + post.T) + 1e-10 * np.eye(len(mu))))
    log_w = np.array(log_w).T  # (n, K)
    prob = np.exp(log_w - log_w.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    comp = np.array([rng.choice(len(p), size=n_draws, p=p) for p in prob])  # (n, n_draws)
    means, factors = np.array(means), np.array(factors)
    eps = rng.standard_normal((*comp.shape, A.shape[1]))
    return (means[comp, np.arange(len(Y))[:, None]]
            + np.einsum("nkij,nkj->nki", factors[comp], eps))


def score(X, S):
    lo, hi = np.quantile(S, [0.05, 0.95], axis=1)
    return {"coverage": dict(zip(map(str, LEVELS), coverage(X, S, LEVELS, random_state=0))),
            "joint90": float(coverage(X, S, (0.9,), joint=True, random_state=0)[0]),
            "raw90": float(np.mean((X >= lo) & (X <= hi))),
            "psnr_mean": float(psnr(X, S.mean(1)).mean())}


def run_digits(tasks, methods, quick):
    X_fit, _, X_test, shape = digits_split()
    prior, _ = digits_prior(X_fit, quick, **PRIOR)
    gmm = digits_gmm(X_fit)
    n, n_draws = (QUICK["n_digits"], QUICK["n_draws"]) if quick else (N_DIGITS, N_DRAWS)
    X = X_test[:n]
    names = methods or DIGIT_METHODS
    rows = {}
    for task in tasks:
        op, noise = demo_tasks(shape)[task]
        Y = op.measure(X, noise_std=noise, random_state=0)
        start = time.process_time()
        S = np.clip(gmm_posterior_draws(gmm, dense(op, X.shape[1]), noise, Y, n_draws,
                                        np.random.RandomState(0)), 0, 1)
        row = {"gmm10": {**score(X, S), "cpu_seconds_per_obs": (time.process_time() - start) / n}}
        solvers, fits = make_solvers(prior, op, noise, names, quick, f"amortized-{task}")
        for name, solver in solvers.items():
            start = time.process_time()
            S = solver.sample_posterior(Y, n_draws)
            seconds = cpu_seconds(solver, start)
            row[name] = {**score(X, S),
                         "cpu_seconds_per_obs": (seconds + fits.get(name, 0.0)) / n,
                         "pareto_warnings": pareto_warnings(solver)}
            print(task, name, row[name], flush=True)
        rows[task] = row
    return rows


# -- results and tables ----------------------------------------------------------------------
def merge(part, rows, meta, quick):
    """Merge ``rows`` (by task and method; by method for ``gaussian``) into the results file;
    each method's row keeps its run's ``meta``."""
    import os
    meta = {**meta, "load_average_end": round(os.getloadavg()[0], 2)}

    def stamped(row):
        return {m: {**r, "meta": meta} for m, r in row.items()}

    def update(payload):
        old = payload.get(part, {})
        if part == "gaussian":
            new = {**rows, "methods": {**old.get("methods", {}), **stamped(rows["methods"])}}
        else:
            new = {**old, **{t: {**old.get(t, {}), **stamped(row)} for t, row in rows.items()}}
        return {**payload, part: new}

    path = update_results("calibration-quick" if quick else "calibration", update, meta)
    print(f"wrote {path}")


def _f(value, digits=2):
    return "" if value is None else f"{value:.{digits}f}"


def _p(value):
    if value == 0:  # below the smallest float
        return "**<1e-300**"
    return f"{value:.2g}" if value >= 0.01 else f"**{value:.0e}**"


def _provenances(part, tasks, names):
    """One provenance line per run that measured some of ``tasks`` x ``names`` (each method's
    row keeps its run's meta), naming what it measured when there is more than one run."""
    runs = {}
    for task in tasks:
        for name in names:
            line = provenance(part[task][name]["meta"])
            runs.setdefault(line, {}).setdefault(task, []).append(name)
    if len(runs) == 1:
        return next(iter(runs))

    def label(task, done):  # the task, or the task and its methods, or the methods alone
        if len(done) == len(names):
            return task
        methods = ", ".join(f"`{n}`" for n in done)
        return f"{task} ({methods})" if task else methods

    return " ".join("; ".join(label(t, ns) for t, ns in done.items()) + f": {line}"
                    for line, done in runs.items())


def tables(name="calibration"):
    results = read_results(name)
    missing = "Not measured yet (`python benchmarks/calibration.py --part {}`).\n"
    out = {"sbc": missing.format("sbc"), "sbc_levels": missing.format("sbc"),
           "gaussian": missing.format("gaussian"), "digits": missing.format("digits"),
           "digits_psnr": missing.format("digits")}
    sbc = results.get("sbc", {})
    tasks = [t for t in SBC_TASKS if t in sbc]
    if tasks:
        names = [m for m in SBC_METHODS if all(m in sbc[t] for t in tasks)]
        rows = []
        for m in names:
            cells = [f"{sbc[t][m]['coverage']['0.9']:.3f} / {_p(sbc[t][m]['p_uniform'])} / "
                     + (_p(sbc[t][m]["p_misfit"]) if "p_misfit" in sbc[t][m] else "–")
                     for t in tasks]
            cpu = np.mean([sbc[t][m]["cpu_seconds_per_obs"] for t in tasks])
            rows.append([f"`{m}`", *cells, _f(cpu, 3)])

        def ratio(a, b):  # mean over the tasks of the CPU time ratio at equal draws
            return np.mean([sbc[t][a]["sample_cpu_seconds"] / sbc[t][b]["sample_cpu_seconds"]
                            for t in tasks])

        ratios = ", ".join(f"`{a}` / `{b}` {ratio(a, b):.2f}x" for a, b in (
            ("mala", "langevin"), ("hmc", "mala"), ("smc", "mala"))
            if a in names and b in names)
        meta = sbc[tasks[0]][names[0]]["meta"]
        out["sbc"] = (markdown_table(["method", *[f"{t}: 90 % cov. / p / misfit p"
                                                  for t in tasks],
                                      "CPU s / obs."], rows)
                      + "\n\n" + (f"CPU time at equal draws: {ratios}; " if ratios else "")
                      + f"{meta['n_sim']} simulations of {meta['n_draws']} draws per task. "
                      + _provenances(sbc, tasks, names) + "\n")
        levels = [[f"`{m}`", *[_f(np.mean([sbc[t][m]["coverage"][str(level)] for t in tasks]),
                                  3) for level in LEVELS]] for m in names]
        out["sbc_levels"] = markdown_table(["method", *[f"{level:g}" for level in LEVELS]],
                                           levels) + "\n"
    if "gaussian" in results:
        g = results["gaussian"]
        names = [m for m in METHOD_NAMES if m in g["methods"]]
        rows = [[f"`{m}`", _f(g["methods"][m]["mean_error_std"]),
                 f"{100 * g['methods'][m]['std_error']:.0f} %",
                 _f(g["methods"][m]["cpu_seconds_per_obs"], 3)] for m in names]
        out["gaussian"] = (markdown_table(["method", "worst mean error (posterior std)",
                                           "worst std error", "CPU s / obs."], rows)
                           + f"\n\nReference: {g['importance_draws']:,} prior draws, smallest "
                           f"effective sample size {g['ess_min']:,.0f}. "
                           + _provenances({"": g["methods"]}, [""], names) + "\n")
    digits = results.get("digits", {})
    tasks = [t for t in TASKS if t in digits]
    if tasks:
        names = ["gmm10"] + [m for m in METHOD_NAMES if all(m in digits[t] for t in tasks)]
        rows, psnr_rows = [], []
        for m in names:
            label = "GMM-10 (exact)" if m == "gmm10" else f"`{m}`"
            rows.append([label, *[f"{digits[t][m]['coverage']['0.9']:.2f} "
                                  f"({digits[t][m]['raw90']:.2f})" for t in tasks],
                         _f(np.mean([digits[t][m]["cpu_seconds_per_obs"] for t in tasks]), 3)])
            psnr_rows.append([label, *[f"{digits[t][m]['psnr_mean']:.2f} / "
                                       f"{digits[t][m]['joint90']:.2f}" for t in tasks]])
        out["digits"] = (markdown_table(["method", *tasks, "CPU s / obs."], rows) + "\n\n"
                         + _provenances(digits, tasks, names) + "\n")
        out["digits_psnr"] = markdown_table(["method", *tasks], psnr_rows) + "\n"
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("sbc", "gaussian", "digits"), required=True)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    parser.add_argument("--methods", nargs="+", default=None,
                        choices=sorted(METHOD_NAMES + tuple(VARIANTS)),
                        help="run only these methods, merging their rows into the results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = QUICK if args.quick else {"n_sim": N_SIM, "n_draws": N_DRAWS,
                                      "n_digits": N_DIGITS, "n_is": N_IS}
    meta = metadata(seed=0, **{k: sizes[k] for k in ("n_sim", "n_draws", "n_digits", "n_is")})
    if args.part == "gaussian":
        merge(args.part, run_gaussian(args.methods, args.quick), meta, args.quick)
    else:  # task by task, so that an interrupted run keeps the tasks done
        run = run_sbc if args.part == "sbc" else run_digits
        for task in args.tasks or (SBC_TASKS if args.part == "sbc" else TASKS):
            merge(args.part, run([task], args.methods, args.quick), meta, args.quick)
    for table in tables("calibration-quick" if args.quick else "calibration").values():
        print(table)


if __name__ == "__main__":
    main()
