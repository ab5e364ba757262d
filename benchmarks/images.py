"""Quality at image size (issue protocol): density and inverse problems on grey photo patches.

Data: :func:`flowsk.datasets.load_photo_patches`, 8-bit grey patches; the train photographs
give the training tiles (a shuffled 10 % of them, at least 300, held out as the validation
split that every choice below is made on), the test photographs every score. 32x32 training
tiles are doubled by their mirror images (2,379 tiles are few for a 1024-D density).

``density --size S``: test bits per dimension in the image-flow convention (8-bit data on
[0, 1]: ``-log2 p(x) / D + 8`` with ``x = (k + u) / 256``, ``u ~ U[0, 1)``; every model trains
on the same dequantization: ``FlowPrior`` gets the bin centres ``(k + 0.5) / 256`` and
``dequantize=1/256``) of flowsk's architectures and couplings, trained for a fixed epoch budget
(``EPOCHS``, best validation epoch kept), against ``GaussianMixture(n, "full")`` (n picked on
the validation split) and normflows' Glow of the same levels, steps and width with the same
logit, dequantization, epochs, batch size and learning rate. Fit wall and CPU seconds.
Rows marked "permutation start" are an ablation: ``glow``'s 1x1 convolutions start at the
permutations of ``flowsk.nn.builders.step_orders`` (the start of the vector architectures)
instead of random rotations (``LINEAR_START``).

``inverse``: 200 test patches of 32x32 (noise 0.01 unless stated): denoising sigma 25/255,
random 50 % pixel inpainting, a centre 4x4 box, Gaussian deblurring (sigma 1.5 px, 9x9 kernel)
and 2x super-resolution (mean pooling). Classical baselines, each with its parameter picked by
mean PSNR on ``N_VAL`` validation patches (for deblurring also scikit-image's deconvolvers
remade for the operator's zero border: ``wiener_boundary``, ``richardson_lucy_boundary``);
pinv; the exact posterior mean of the GMM above; flowsk's ``glowip`` (``gamma``) and ``map``
(``beta``, with ``sigma`` the task's noise), each tuned by GridSearchCV on the same patches,
with the ``glow``/affine prior trained for ``INVERSE_EPOCHS``; the posterior methods' draws
(mean, per-pixel 90 % coverage) on the first ``N_POSTERIOR`` test patches (``POSTERIOR``).
``--tasks`` runs some tasks and merges their rows into the results file (each row keeps its
own provenance), so tasks can run in separate processes once the prior and the GMM are
cached. Writes
results/images.png: truth / measurement / best classical / best flowsk / posterior std for the
first test patch of each task.

``sbc``: simulation-based calibration of the posterior methods at 32x32 with the inverse
prior as the truth (:func:`flowsk.diagnostics.sbc_ranks` with ``misfit=True``), at the inverse
part's settings: per-pixel coverage of the rank intervals, the p-values of pixel-rank and
misfit-rank uniformity, the misfit's mean fractional rank. It tells the sampler's share of
the inverse part's coverage gap from the prior's.

Priors and GMMs are cached as results/*.joblib (refitted when their settings or the training
code change).

    python benchmarks/images.py density --size 16 [--epochs N --models glow/affine ...] [--quick]
    python benchmarks/images.py inverse [--tasks denoise ...] [--quick]
    python benchmarks/images.py sbc [--tasks denoise ...] [--methods mala ...] [--quick]
"""
import argparse
import functools
import math
import time

import joblib
import numpy as np
import torch
from _common import (
    RESULTS,
    edge_flag,
    linear_start,
    markdown_table,
    metadata,
    normflows_glow,
    provenance,
    read_results,
    sbc_scores,
    training_code,
    update_results,
    write_results,
)

from flowsk import FlowPrior, InverseSolver
from flowsk.datasets import load_photo_patches
from flowsk.metrics import bits_per_dim, psnr, ssim
from flowsk.nn.multiscale import Logit

SEED = 0
LOGIT_ALPHA = 0.05  # FlowPrior's logit squeeze, applied to normflows' Glow as well
#: The fixed training budget per patch size (2 shared CPU cores; every model gets the same).
EPOCHS = {16: 4, 32: 5}
#: (architecture, coupling[, start]) of the flowsk priors per patch size; start
#: "permutation" is an ablation of glow's start.
MODELS = {16: [("glow", "affine"), ("glow", "affine", "permutation"), ("glow", "additive"),
               ("glow", "spline"), ("glow", "spline", "permutation"), ("glow", "robust-spline"),
               ("realnvp", "affine"), ("chavez", "affine")],
          32: [("glow", "affine"), ("glow", "affine", "permutation")]}  # the CPU budget at 32x32
GMM_COMPONENTS = {16: (1, 4, 16), 32: (1, 2, 4)}
GMM_MAX_ITER = {16: 50, 32: 30}
INVERSE_PRIOR = ("glow", "affine")
INVERSE_EPOCHS = 30  # the inverse problems get a prior trained longer than the density budget
N_TEST, N_VAL, N_POSTERIOR = 200, 20, 32
#: flowsk's point methods and their GridSearchCV grids (``map``'s sigma is the task's noise)
GLOWIP = {"gamma": [0.0, 0.001, 0.01, 0.03, 0.1], "n_iter": [300]}
MAP = {"beta": [0.125, 0.25, 0.5, 1.0, 2.0], "n_iter": [1000], "init": ["zeros"]}
#: posterior methods on the first N_POSTERIOR test patches, 32 draws each: no Laplace
#: preconditioner at 1024 dimensions (its Jacobians cost a backward pass per measurement and
#: Gauss-Newton step), chains from perturb-and-MAP points
POSTERIOR = {"n_samples": 32, "method_params": {"burn_in": 200, "thin": 4, "n_chains": 4,
                                                "preconditioner": "identity"}}
POSTERIOR_METHODS = ("mala",)
#: ``sbc``: simulations and draws per simulation (32 ranks); variants, name -> (method, its
#: parameters over POSTERIOR's), run with ``--methods``
N_SBC, N_SBC_DRAWS = 50, 31
SBC_VARIANTS = {"mala-start2000": ("mala", {"start_iter": 2000})}


# -- data ----------------------------------------------------------------------------------------
def photo_data(size, quick=False):
    """``(X_fit, X_val, X_test, shape)`` on the 8-bit lattice ``k / 255``."""
    X, shape = load_photo_patches(size, split="train", random_state=SEED)
    X_test, _ = load_photo_patches(size, split="test", random_state=SEED)
    n_val = max(300, len(X) // 10)
    X_val, X_fit = X[:n_val], X[n_val:]
    if size >= 32:  # mirror images double the few large tiles
        X_fit = np.concatenate([X_fit, X_fit.reshape(-1, size, size)[:, :, ::-1]
                                .reshape(len(X_fit), -1)])
    if quick:
        X_fit, X_val, X_test = X_fit[:256], X_val[:64], X_test[:64]
    return X_fit, X_val, X_test, shape


def centres(X):
    """Lattice ``k / 255`` -> bin centres ``(k + 0.5) / 256``."""
    return (np.round(X * 255) + 0.5) / 256


def dequantized(X, seed):
    """Lattice ``k / 255`` -> ``(k + u) / 256``, ``u ~ U[0, 1)``: the points densities are
    scored on."""
    return (np.round(X * 255) + np.random.RandomState(seed).uniform(size=X.shape)) / 256


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), wall seconds, CPU seconds)``."""
    t, c = time.time(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.time() - t, time.process_time() - c


def cached(name, params, fit):
    """``fit() -> (model, info)`` cached as results/NAME.joblib, reused while ``params``
    (a dict) and the training code are unchanged."""
    path = RESULTS / f"{name}.joblib"
    key = {**params, "training_code": training_code()}
    if path.exists():
        saved_key, out = joblib.load(path)
        if saved_key == key:
            return out
    out = fit()
    joblib.dump((key, out), path)
    return out


# -- density -------------------------------------------------------------------------------------
def flow_prior(size, architecture, coupling, quick=False, epochs=None, start=None):
    """``(prior, info)``: a FlowPrior fitted on the training split for ``epochs`` (default
    ``EPOCHS[size]``), its invertible linear layers at ``start`` (None: the default), cached."""
    X_fit, _, _, shape = photo_data(size, quick)
    epochs = 1 if quick else epochs or EPOCHS[size]
    prior = FlowPrior(image_shape=shape, architecture=architecture, coupling=coupling,
                      data_range=(0, 1), dequantize=1 / 256, max_epochs=epochs, device="cpu",
                      random_state=SEED)

    def fit():
        with linear_start(start):
            _, wall, cpu = timed(prior.fit, centres(X_fit))
        return prior, {"fit_seconds": wall, "cpu_seconds": cpu, "n_fit": len(X_fit)}

    name = (f"prior-images{size}-{architecture}-{coupling}-{epochs}ep"
            + ("" if start is None else f"-{start}"))
    return cached(name, {**prior.get_params(), "n_fit": len(X_fit)}, fit)


def n_params(module):
    return int(sum(p.numel() for p in module.parameters()))


def best_gmm(size, quick=False):
    """``(gmm, info)``: GaussianMixture(n, "full") with n picked by validation likelihood."""
    from sklearn.mixture import GaussianMixture
    X_fit, X_val, _, _ = photo_data(size, quick)
    grid = GMM_COMPONENTS[size][:2] if quick else GMM_COMPONENTS[size]

    def fit():
        fits = {}
        for n in grid:
            gmm = GaussianMixture(n, covariance_type="full", max_iter=GMM_MAX_ITER[size],
                                  random_state=SEED)
            _, wall, cpu = timed(gmm.fit, dequantized(X_fit, 1))
            fits[n] = (gmm, gmm.score(dequantized(X_val, 2)), wall, cpu)
            print(f"  GMM {n}: validation {fits[n][1]:.1f} nats, {wall:.0f} s", flush=True)
        n = max(fits, key=lambda k: fits[k][1])
        gmm, val, wall, cpu = fits[n]
        return gmm, {"n_components": n, "grid": list(grid), "fit_seconds": wall,
                     "cpu_seconds": cpu, "val_loglik": {str(k): v[1] for k, v in fits.items()}}

    name = f"gmm-images{size}{'-quick' if quick else ''}"
    return cached(name, {"grid": list(grid), "max_iter": GMM_MAX_ITER[size],
                         "n_fit": len(X_fit)}, fit)


def fit_normflows(size, reference, quick=False):
    """normflows' Glow with ``reference``'s levels, steps and width, trained like it: Adam at its
    learning rate, batch 64, the same epochs and dequantization, best validation epoch kept.
    Returns ``(test bits per dim, info)``."""
    X_fit, _, X_test, shape = photo_data(size, quick)
    torch.manual_seed(SEED)
    rng = np.random.RandomState(SEED)
    order = rng.permutation(len(X_fit))
    n_val = int(round(0.1 * len(X_fit)))
    fit, val = centres(X_fit[order[n_val:]]), centres(X_fit[order[:n_val]])
    model = normflows_glow(shape, reference.n_levels, reference._setting("n_steps"),
                           reference._setting("hidden_features"), learned_base=True,
                           logit=False)
    logit = Logit((0, 1), LOGIT_ALPHA)
    opt = torch.optim.Adam(model.parameters(), lr=reference._setting("learning_rate"))

    def log_prob(X):
        z, logdet = logit(torch.as_tensor(X, dtype=torch.float32))
        return model.log_prob(z.reshape(-1, *shape), None) + logdet

    def dequant(X):
        return X + (torch.rand_like(X) - 0.5) / 256

    def train():
        best, best_state = np.inf, None
        fit_t, val_t = torch.as_tensor(fit, dtype=torch.float32), torch.as_tensor(val)
        for _ in range(reference.max_epochs):
            model.train()
            for idx in torch.randperm(len(fit_t)).split(64):
                loss = -log_prob(dequant(fit_t[idx])).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                v = -torch.cat([log_prob(dequant(b.float())) for b in val_t.split(512)]).mean()
            if v < best:
                best, best_state = float(v), {k: t.clone() for k, t in
                                              model.state_dict().items()}
        model.load_state_dict(best_state)

    _, wall, cpu = timed(train)
    with torch.no_grad():
        Xd = torch.as_tensor(dequantized(X_test, 3), dtype=torch.float32)
        ll = torch.cat([log_prob(b) for b in Xd.split(512)]).numpy().astype(np.float64)
    bpd = float(bits_per_dim(ll.mean(), X_test.shape[1], n_bits=8))
    return bpd, {"fit_seconds": wall, "cpu_seconds": cpu, "n_params": n_params(model)}


def run_density(size, quick, epochs=None, models=None):
    """The density table at ``size``; ``epochs`` / ``models`` ("arch/coupling" strings) other
    than the defaults write results/images-density{size}-{epochs}ep.json."""
    default = epochs in (None, EPOCHS[size]) and models is None
    epochs = epochs or EPOCHS[size]
    torch.set_num_threads(1)
    meta = metadata(seed=SEED, size=size, quick=quick, epochs=1 if quick else epochs)
    X_fit, X_val, X_test, shape = photo_data(size, quick)
    X_test_d = dequantized(X_test, 3)
    rows = []
    models = MODELS[size] if models is None else [tuple(m.split("/")) for m in models]
    for arch, coupling, *start in models:
        prior, info = flow_prior(size, arch, coupling, quick, epochs, *start)
        bpd = prior.bits_per_dim(X_test_d, n_bits=8)
        label = f"flowsk {arch} / {coupling}" + "".join(f" ({s} start)" for s in start)
        rows.append({"model": label, "test_bpd": float(bpd),
                     "val_bpd": float(prior.bits_per_dim(dequantized(X_val, 2), n_bits=8)),
                     "n_params": n_params(prior.flow_), "epochs": len(prior.history_[
                         "train_loss"]), "best_epoch": int(prior.best_epoch_) + 1, **info})
        print(rows[-1], flush=True)
    reference, _ = flow_prior(size, "glow", "affine", quick, epochs)
    bpd, info = fit_normflows(size, reference, quick)
    rows.append({"model": "normflows Glow", "test_bpd": bpd, "epochs": reference.max_epochs,
                 **info})
    print(rows[-1], flush=True)
    gmm, info = best_gmm(size, quick)
    gmm_params = gmm.n_components * (X_fit.shape[1] + X_fit.shape[1] * (X_fit.shape[1] + 1) / 2
                                     + 1) - 1
    rows.append({"model": "GaussianMixture full", "test_bpd": float(bits_per_dim(
        gmm.score(X_test_d), X_test.shape[1], n_bits=8)), "n_params": int(gmm_params), **info})
    print(rows[-1], flush=True)
    payload = {"size": size, "image_shape": list(shape), "n_fit": len(X_fit),
               "n_val": len(X_val), "n_test": len(X_test), "rows": rows}
    write_results(f"images-density{size}" + ("" if default else f"-{epochs}ep"), payload, meta)


# -- inverse problems ----------------------------------------------------------------------------
def gaussian_kernel(sigma, radius):
    """Normalised 2-D Gaussian ``(2 radius + 1, 2 radius + 1)``."""
    t = np.arange(-radius, radius + 1)
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    k = np.outer(g, g)
    return k / k.sum()


BLUR = gaussian_kernel(1.5, 4)


def tasks(shape):
    """name -> (operator, noise std)."""
    from flowsk.operators import Blur, Denoising, Inpainting, RandomMask, SuperResolution
    _, h, w = shape
    return {"denoise": (Denoising(shape), 25 / 255),
            "inpaint50": (RandomMask(shape, 0.5, random_state=SEED), 0.01),
            "box4": (Inpainting(shape, box=(h // 2 - 2, w // 2 - 2, h // 2 + 2, w // 2 + 2)),
                     0.01),
            "deblur": (Blur(shape, BLUR), 0.01),
            "sr2": (SuperResolution(shape, 2), 0.01)}


def _images(op, Y):
    """Measurements as the images a classical method takes: ``(n, H', W')`` (inpainting:
    missing pixels 0, with the boolean mask of missing pixels)."""
    _, h, w = op.input_shape
    with torch.no_grad():
        full = op.pinv(torch.as_tensor(Y)).numpy()
    if hasattr(op, "indices"):
        mask = np.ones(h * w, bool)
        mask[op.indices.numpy()] = False
        return full.reshape(-1, h, w), mask.reshape(h, w)
    if hasattr(op, "factor"):
        return Y.reshape(len(Y), h // op.factor, w // op.factor), None
    return Y.reshape(len(Y), h, w), None


# scikit-image's deconvolvers model a blur without the operator's zero border: ``wiener`` is
# periodic, and ``richardson_lucy``'s update lacks the division by ``A^T 1`` (< 1 within the
# kernel's radius of the border), so border pixels shrink at every iteration. Tuned, both stay
# below the blurred measurement itself; the ``_boundary`` versions are the same estimators for
# the operator's border.
LAPLACIAN = np.array([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])


@functools.cache
def _zero_border_matrices(side):
    """``(A, D)``, ``(side^2, side^2)``: the ``BLUR`` of the deblurring task
    (:class:`flowsk.operators.Blur`, zero border) and the Laplacian that
    ``skimage.restoration.wiener`` regularises with, on ``side x side`` images."""
    from inverse import dense

    from flowsk.operators import Blur
    shape, n = (1, side, side), side * side
    return dense(Blur(shape, BLUR), n), dense(Blur(shape, LAPLACIAN), n)


@functools.cache
def _wiener_boundary_matrix(side, balance):
    """``(A^T A + balance D^T D)^-1 A^T``."""
    A, D = _zero_border_matrices(side)
    return np.linalg.solve(A.T @ A + balance * D.T @ D, A.T)


def wiener_boundary(img, mask, balance):
    """Wiener-Tikhonov deconvolution with the zero border: ``(H, W) -> (H, W)``."""
    return (_wiener_boundary_matrix(img.shape[0], balance) @ img.ravel()).reshape(img.shape)


def richardson_lucy_boundary(img, mask, n_iter):
    """Richardson-Lucy for the zero border, ``x <- x A^T(y / A x) / A^T 1`` from 0.5, as
    ``skimage.restoration.richardson_lucy`` otherwise: ``(H, W) -> (H, W)``."""
    A, _ = _zero_border_matrices(img.shape[0])
    y = np.clip(img.ravel(), 0, None)
    norm = A.sum(0)  # A^T 1
    x = np.full_like(y, 0.5)
    for _ in range(n_iter):
        x = x * (A.T @ (y / (A @ x + 1e-12))) / norm
    return x.reshape(img.shape)


def classical_methods(task, noise):
    """name -> (grid, fn(image, mask, param) -> (H, W)) for the task's classical baselines."""
    from skimage import restoration
    from skimage.transform import resize

    def bm3d(img, mask, s):
        import bm3d as bm3d_package
        return bm3d_package.bm3d(img, sigma_psd=s)

    f = (0.5, 0.75, 1.0, 1.5)
    if task == "denoise":
        return {
            "bm3d": ([noise * v for v in (0.75, 1.0, 1.5)], bm3d),
            "nl_means": ([noise * v for v in (0.4, 0.6, 0.8, 1.0)],
                         lambda img, mask, h: restoration.denoise_nl_means(
                             img, patch_size=5, patch_distance=6, h=h, sigma=noise)),
            "tv_chambolle": ([0.03, 0.06, 0.1, 0.15],
                             lambda img, mask, wt: restoration.denoise_tv_chambolle(img, wt)),
            "wavelet": ([noise * v for v in f],
                        lambda img, mask, s: restoration.denoise_wavelet(img, sigma=s)),
        }
    if task in ("inpaint50", "box4"):
        return {"biharmonic": ([None],
                               lambda img, mask, _: restoration.inpaint_biharmonic(img, mask))}
    if task == "deblur":
        return {
            "wiener": ([0.01, 0.1, 1.0, 3.0, 10.0],
                       lambda img, mask, b: restoration.wiener(img, BLUR, b, clip=False)),
            "richardson_lucy": ([1, 2, 5, 10], lambda img, mask, n: restoration.richardson_lucy(
                np.clip(img, 0, 1), BLUR, num_iter=n, clip=False)),
            "wiener_boundary": ([0.001, 0.003, 0.01, 0.03, 0.1], wiener_boundary),
            "richardson_lucy_boundary": ([5, 10, 20, 40], richardson_lucy_boundary),
        }
    return {"bicubic": ([None], lambda img, mask, _: resize(img, (2 * img.shape[0],
                                                                  2 * img.shape[1]), order=3))}


def run_classical(fn, images, mask, param):
    return np.stack([fn(img, mask, param) for img in images]).reshape(len(images), -1)


def coverage(X, S, level=0.9):
    """Share of true values inside the central ``level`` interval of the draws, per feature:
    ``X (n, d)``, ``S (n, draws, d)`` -> float."""
    lo, hi = np.quantile(S, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return float(((X >= lo) & (X <= hi)).mean())


def scores(X, R, shape, seconds):
    R = np.clip(R, 0, 1)
    return {"psnr": float(psnr(X, R).mean()), "ssim": float(ssim(X, R, shape).mean()),
            "seconds_per_patch": seconds / len(X)}


def run_inverse(quick, task_names=None):
    """Runs ``task_names`` (default: all) and merges their rows into
    results/images-inverse.json, so tasks can run in separate processes."""
    from inverse import dense, gmm_mmse
    from sklearn.model_selection import GridSearchCV
    torch.set_num_threads(1)
    meta = metadata(seed=SEED, quick=quick)
    _, X_val, X_test, shape = photo_data(32, quick)
    X_val, X_test = X_val[:N_VAL], X_test[:16 if quick else N_TEST]
    prior, prior_info = flow_prior(32, *INVERSE_PRIOR, quick, epochs=INVERSE_EPOCHS)
    gmm, gmm_info = best_gmm(32, quick)
    n_post = 2 if quick else N_POSTERIOR
    suffix = "-quick" if quick else ""
    for task, (op, noise) in tasks(shape).items():
        if task_names and task not in task_names:
            continue
        Y_val = op.measure(X_val, noise_std=noise, random_state=1)
        Y = op.measure(X_test, noise_std=noise, random_state=0)
        row, recon = {}, {}
        # classical baselines, each tuned on the validation patches
        (val_img, mask), (test_img, _) = _images(op, Y_val), _images(op, Y)
        for name, (grid, fn) in classical_methods(task, noise).items():
            val_psnr = [float(psnr(X_val, np.clip(run_classical(fn, val_img, mask, g), 0, 1))
                              .mean()) for g in grid]
            best = grid[int(np.argmax(val_psnr))]
            R, wall, _ = timed(run_classical, fn, test_img, mask, best)
            row[name] = {**scores(X_test, R, shape, wall), "kind": "classical",
                         "param": best, "grid": grid}
            recon[name] = R
        R, wall, _ = timed(InverseSolver(prior, op, method="pinv").predict, Y)
        row["pinv"], recon["pinv"] = {**scores(X_test, R, shape, wall), "kind": "baseline"}, R
        A = dense(op, X_test.shape[1])
        R, wall, _ = timed(gmm_mmse, gmm, A, noise, Y)
        row["gmm-mmse"] = {**scores(X_test, R, shape, wall), "kind": "baseline"}
        recon["gmm-mmse"] = R
        # flowsk point methods, tuned by GridSearchCV on the validation patches
        for method, grid, tuned in (("glowip", GLOWIP, "gamma"), ("map", MAP, "beta")):
            if quick:
                grid = {**grid, "n_iter": [20]}
            solver = InverseSolver(prior, op, method=method, random_state=SEED,
                                   **({"sigma": noise} if method == "map" else {}))
            search = GridSearchCV(solver, grid, cv=2).fit(Y_val, X_val)
            R, wall, _ = timed(search.best_estimator_.predict, Y)
            row[method] = {**scores(X_test, R, shape, wall), "kind": "flowsk", "tuned": tuned,
                           "param": search.best_params_[tuned], "grid": grid[tuned]}
            recon[method] = R
        for method in POSTERIOR_METHODS:
            post = posterior_solver(prior, op, method, noise, quick)
            S, wall, _ = timed(post.sample_posterior, Y[:n_post], POSTERIOR["n_samples"])
            row[method] = {**scores(X_test[:n_post], S.mean(1), shape, wall),
                           "kind": "flowsk-posterior", "n_patches": n_post,
                           "coverage90": coverage(X_test[:n_post], S)}
            recon[f"{method}-std"] = S[0].std(0)
        classical, flowsk = best_of(row, "classical"), best_of(row, "flowsk")
        np.savez(RESULTS / f"images-figure-{task}{suffix}.npz",
                 truth=X_test[0], measurement=_images(op, Y[:1])[0][0],
                 classical=recon[classical][0], flowsk=recon[flowsk][0],
                 std=recon[f"{POSTERIOR_METHODS[-1]}-std"], names=[classical, flowsk])
        print(task, {k: round(v["psnr"], 2) for k, v in row.items()}, flush=True)

        def update(payload, task=task, row=row):  # keeps the rows other processes wrote
            results = {**payload.get("results", {}), task: {**row, "meta": meta}}
            return {"n_test": len(X_test), "n_val": len(X_val), "n_posterior": n_post,
                    "prior": {"architecture": INVERSE_PRIOR[0], "coupling": INVERSE_PRIOR[1],
                              "n_params": n_params(prior.flow_), "epochs": prior.max_epochs,
                              **prior_info},
                    "gmm_components": gmm_info["n_components"], "glowip": GLOWIP, "map": MAP,
                    "posterior": POSTERIOR,
                    "results": {t: results[t] for t in tasks(shape) if t in results}}

        update_results(f"images-inverse{suffix}", update, meta)
    write_figure(quick)


def posterior_solver(prior, op, method, noise, quick, **extra):
    params = {**POSTERIOR["method_params"], **extra}
    return InverseSolver(prior, op, method=method, sigma=noise, random_state=SEED,
                         n_samples=POSTERIOR["n_samples"],
                         method_params={**params, "burn_in": 10, "start_iter": 10}
                         if quick else params)


def run_sbc(quick, task_names=None, methods=None):
    """SBC at 32x32 with the inverse part's prior as the truth (``x = G(z)``, so the prior's
    misfit to photographs drops out): per task, the posterior methods at the inverse part's
    settings, ``N_SBC`` simulations of ``N_SBC_DRAWS`` draws; merges the tasks' rows into
    results/images-sbc.json."""
    torch.set_num_threads(1)
    meta = metadata(seed=SEED, quick=quick)
    prior, _ = flow_prior(32, *INVERSE_PRIOR, quick, epochs=INVERSE_EPOCHS)
    n_sim, n_draws = (10, 7) if quick else (N_SBC, N_SBC_DRAWS)
    for task, (op, noise) in tasks((1, 32, 32)).items():
        if task_names and task not in task_names:
            continue
        row = {}
        for name in methods or POSTERIOR_METHODS:
            method, extra = SBC_VARIANTS.get(name, (name, {}))
            start = time.process_time()
            _, scores = sbc_scores(posterior_solver(prior, op, method, noise, quick, **extra),
                                   n_sim, n_draws, SEED)
            row[name] = {**scores,
                         "cpu_seconds_per_obs": (time.process_time() - start) / n_sim,
                         "meta": meta}
            print(task, name, row[name], flush=True)

        def update(payload, task=task, row=row):  # each method's row keeps its provenance
            results = payload.get("results", {})
            return {"n_simulations": n_sim, "n_draws": n_draws, "posterior": POSTERIOR,
                    "variants": SBC_VARIANTS,
                    "results": {**results, task: {**results.get(task, {}), **row}}}

        update_results(f"images-sbc{'-quick' if quick else ''}", update, meta)


def best_of(row, kind):
    """The name of the row's best-PSNR method of ``kind`` (posterior methods, scored on fewer
    patches, are not candidates)."""
    return max((k for k, v in row.items() if k != "meta" and v["kind"] == kind),
               key=lambda k: row[k]["psnr"])


def write_figure(quick):
    """results/images.png from the tasks' results/images-figure-TASK.npz: truth / measurement /
    best classical / best flowsk / posterior std of the first test patch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    suffix = "-quick" if quick else ""
    figure = {task: np.load(path) for task in tasks((1, 32, 32))
              if (path := RESULTS / f"images-figure-{task}{suffix}.npz").exists()}
    cols = ("truth", "measurement", "best classical", "best flowsk", "posterior std")
    fig, axes = plt.subplots(len(figure), 5, figsize=(7.5, 1.6 * len(figure)), squeeze=False)
    for r, (task, f) in enumerate(figure.items()):
        classical, flowsk = (str(n) for n in f["names"])
        panels = [(f["truth"], "truth"), (f["measurement"], "measurement"),
                  (f["classical"], classical), (f["flowsk"], flowsk), (f["std"], "posterior std")]
        for c, (img, label) in enumerate(panels):
            ax = axes[r, c]
            side = int(round(math.sqrt(img.size)))
            ax.imshow(img.reshape(side, side), cmap="gray", vmin=0, vmax=None if c == 4 else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{cols[c]}\n{label}" if r == 0 and c in (2, 3) else label, fontsize=7)
            if c == 0:
                ax.set_ylabel(task, fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"images{suffix}.png", dpi=120)
    plt.close(fig)


# -- tables --------------------------------------------------------------------------------------
def tables():
    out = {}
    density = sorted((read_results(path.stem) for path in RESULTS.glob("images-density*.json")),
                     key=lambda res: (res["size"], res["meta"]["epochs"]))
    if density:
        rows = []
        for res in density:
            for r in res["rows"]:
                note = (f"n = {edge_flag(r['n_components'], r['grid'])}" if "n_components" in r
                        else f"{r['epochs']} epochs" + (f", best {r['best_epoch']}"
                                                        if "best_epoch" in r else ""))
                rows.append([f"{res['size']}x{res['size']}", r["model"],
                             f"{r['test_bpd']:.3f}", f"{r['n_params']:,}", note,
                             f"{r['fit_seconds']:.0f}", f"{r['cpu_seconds']:.0f}"])
        lines = [markdown_table(["patches", "model", "test bits/dim", "parameters", "budget",
                                 "fit s", "CPU s"], rows)]
        lines += [f"{res['size']}x{res['size']}: {res['n_fit']} training, {res['n_val']} "
                  f"validation, {res['n_test']} test patches. " + provenance(res["meta"])
                  for res in density]
        out["density"] = "\n\n".join(lines)
    if (RESULTS / "images-inverse.json").exists():
        res = read_results("images-inverse")
        rows, metas = [], {}
        for task, row in res["results"].items():
            meta = row.pop("meta")
            metas.setdefault(provenance(meta), []).append(task)
            classical, flowsk = best_of(row, "classical"), best_of(row, "flowsk")
            cells = [task]
            for name in ("pinv", "gmm-mmse"):
                cells.append(f"{row[name]['psnr']:.2f} / {row[name]['ssim']:.3f}")
            c = row[classical]
            param = "" if c["param"] is None else f", {edge_flag(c['param'], c['grid'])}"
            cells.append(f"{c['psnr']:.2f} / {c['ssim']:.3f} ({classical}{param})")
            for name in ("glowip", "map"):
                g = row[name]
                cells.append(f"{g['psnr']:.2f} / {g['ssim']:.3f} ({g['tuned']} "
                             f"{edge_flag(g['param'], g['grid'])})")
            cells.append(f"{row[flowsk]['psnr'] - c['psnr']:+.2f} ({flowsk})")
            cells += [f"{row[m]['psnr']:.2f} / {row[m]['coverage90']:.2f}"
                      for m in POSTERIOR_METHODS]
            rows.append(cells)
        prior = res["prior"]
        out["inverse"] = "\n\n".join([
            markdown_table(["task", "pinv", "GMM posterior mean", "best classical (tuned)",
                            "flowsk glowip", "flowsk map", "best flowsk − classical dB"]
                           + [f"{m} mean PSNR / 90 % coverage ({res['n_posterior']} patches)"
                              for m in POSTERIOR_METHODS], rows),
            f"PSNR dB / SSIM on {res['n_test']} 32x32 test patches; parameters tuned on "
            f"{res['n_val']} validation patches. Prior: {prior['architecture']} / "
            f"{prior['coupling']}, {prior['n_params']:,} parameters, {prior['epochs']} epochs "
            f"({prior['fit_seconds']:.0f} s); GMM with {res['gmm_components']} components. "
            + "; ".join(f"{', '.join(t)}: {line}" for line, t in metas.items())])
        names = list(dict.fromkeys(n for row in res["results"].values() for n in row))
        rows = [[task] + [f"{row[n]['psnr']:.2f} / {row[n]['seconds_per_patch']:.2g}"
                          if n in row else "" for n in names]
                for task, row in res["results"].items()]
        out["inverse_all"] = markdown_table(["task"] + names, rows) + (
            "\n\nPSNR dB / seconds per patch of every method (tuned parameters: "
            "results/images-inverse.json).")
    if (RESULTS / "images-sbc.json").exists():
        res = read_results("images-sbc")
        rows, metas = [], {}
        for task, row in res["results"].items():
            for method, r in row.items():
                metas.setdefault(provenance(r["meta"]), []).append(f"{task} `{method}`")
                rows.append([task, f"`{method}`"] + [f"{v:.3f}" for v in r["coverage"].values()]
                            + [f"{r['p_uniform']:.2g}", f"{r['p_misfit']:.2g}",
                               f"{r['misfit_rank_mean']:.2f}", f"{r['cpu_seconds_per_obs']:.1f}"])
        out["sbc"] = "\n\n".join([
            markdown_table(["task", "method", "0.5", "0.8", "0.9", "0.95", "pixels p",
                            "misfit p", "misfit mean rank", "CPU s / simulation"], rows),
            f"{res['n_simulations']} simulations of {res['n_draws']} draws per task. "
            + "; ".join(f"{', '.join(t)}: {line}" for line, t in metas.items())])
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=("density", "inverse", "sbc"))
    parser.add_argument("--size", type=int, choices=(16, 32), default=16)
    parser.add_argument("--epochs", type=int, help="density: the epoch budget")
    parser.add_argument("--models", nargs="+",
                        help="density: architecture/coupling[/permutation|rotation], ...")
    parser.add_argument("--tasks", nargs="+", choices=tuple(tasks((1, 32, 32))),
                        help="inverse, sbc: the tasks to run (default: all)")
    parser.add_argument("--methods", nargs="+",
                        choices=POSTERIOR_METHODS + tuple(SBC_VARIANTS),
                        help="sbc: the methods to run (default: POSTERIOR_METHODS)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.part == "density":
        run_density(args.size, args.quick, args.epochs, args.models)
    elif args.part == "inverse":
        run_inverse(args.quick, args.tasks)
    else:
        run_sbc(args.quick, args.tasks, args.methods)


if __name__ == "__main__":
    main()
