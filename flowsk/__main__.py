"""flowsk command line: ``python -m flowsk {demo,fit,solve,export} --help``.

Bad input (a missing file, the wrong width, NaN, an unknown method or operator) prints one
``error: ...`` line on stderr and exits with status 2.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

DEMO_METHODS = ("pinv", "glowip", "likelihood", "vi")
ONNX_TOLERANCE = 1e-4


def _load_array(path):
    """A finite 2-D float array from a ``.npy`` file or a comma-separated text file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        A = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",", ndmin=2)
        A = np.asarray(A, dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise ValueError(f"cannot read numbers from {path}: {err}") from None
    if A.ndim != 2:
        raise ValueError(f"{path} holds an array of shape {A.shape}; expected 2-D "
                         "(n_samples, n_features)")
    if not np.isfinite(A).all():
        raise ValueError(f"{path} contains NaN or infinite values; remove or impute them")
    return A


def _save_array(path, A):
    if Path(path).suffix == ".npy":
        np.save(path, A)
    else:
        np.savetxt(path, A, delimiter=",")


def _load_model(path):
    import joblib
    if not Path(path).is_file():
        raise ValueError(f"{path} does not exist")
    try:
        return joblib.load(path)
    except Exception as err:  # noqa: BLE001 - joblib raises anything on a foreign file
        raise ValueError(f"{path} is not a model saved by 'python -m flowsk fit': "
                         f"{type(err).__name__}: {err}") from None


def _operators():
    from . import operators
    return {"denoising": operators.Denoising, "blur": operators.Blur,
            "inpainting": operators.Inpainting, "randommask": operators.RandomMask,
            "colorization": operators.Colorization,
            "superresolution": operators.SuperResolution,
            "compressedsensing": operators.CompressedSensing,
            "tomography": operators.LimitedAngleTomography}


def _operator(spec, shape):
    """``name[:json-kwargs]``, e.g. ``inpainting:{"box": [2, 2, 6, 6]}``, for signals of
    ``shape``; the kwargs go to the class after the shape."""
    name, _, kwargs = spec.partition(":")
    classes = _operators()
    if name not in classes:
        raise ValueError(f"unknown operator {name!r}; valid: {', '.join(classes)}")
    try:
        kwargs = json.loads(kwargs) if kwargs else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"operator arguments {kwargs!r} are not JSON: {err}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(  # noqa: TRY004
            f"operator arguments must be a JSON object, got {kwargs!r}")
    try:
        return classes[name](shape, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for operator {name!r}: {err}") from None


def demo_tasks(shape):
    """The five digits tasks of ``benchmarks/inverse.py``: name -> (operator, noise_std)."""
    from .operators import Blur, CompressedSensing, Denoising, Inpainting, SuperResolution
    return {"denoise": (Denoising(shape), 0.1),
            "inpaint": (Inpainting(shape, box=(2, 2, 6, 6)), 0.01),
            "cs16": (CompressedSensing(shape, 16, random_state=0), 0.01),
            "deblur": (Blur(shape, 3), 0.01),
            "sr2": (SuperResolution(shape, 2), 0.01)}


def demo(args):
    """Fit a prior on digits, reconstruct corrupted held-out digits, export the decoder."""
    import matplotlib
    matplotlib.use("Agg")
    import torch
    from sklearn.model_selection import train_test_split

    from exporters import check_onnx, to_onnx

    from . import FlowPrior, InverseSolver
    from .datasets import load_digit_images
    from .metrics import psnr, ssim

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    X, shape = load_digit_images()
    X_train, X_test = train_test_split(X, test_size=0.25, random_state=0)
    X_test = X_test[:8 if args.quick else 48]
    print(f"[1/3] fitting a FlowPrior on {len(X_train)} digits ...", flush=True)
    # Hong et al.'s spline coupling: its inverse cannot explode on the solvers' latents;
    # 40 epochs keep the demo within minutes (benchmarks/inverse.py trains to convergence)
    prior = FlowPrior(image_shape=shape, architecture="mlp", coupling="robust-spline",
                      data_range=(0, 1), dequantize=1 / 16, max_epochs=3 if args.quick else 40,
                      random_state=0, verbose=1).fit(X_train)
    print(f"      {len(prior.history_['train_loss'])} epochs; held-out log-likelihood "
          f"{prior.score(X_test):.1f} nats per digit ({time.time() - t0:.0f} s)", flush=True)
    samples = prior.sample(16, temperature=0.8, random_state=0)
    _save_grid(out / "samples.png", [(samples[:8], "samples T=0.8", None),
                                     (samples[8:], "", None)], shape)

    print(f"[2/3] reconstructing {len(X_test)} held-out digits with "
          f"{', '.join(DEMO_METHODS)} ...", flush=True)
    # vi starts from a Laplace approximation, so a few Adam steps refine it
    n_iter = {"glowip": 20, "likelihood": 20, "vi": 20} if args.quick else {"vi": 150}
    rows, figures = [], []
    for task, (op, noise) in demo_tasks(shape).items():
        Y = op.measure(X_test, noise_std=noise, random_state=0)
        shown = [(X_test, "truth", None),
                 (op.pinv(torch.as_tensor(Y, dtype=torch.float32)).numpy(), "A^+ y", None)]
        for method in DEMO_METHODS:
            t = time.time()
            solver = InverseSolver(prior, op, method=method, n_iter=n_iter.get(method),
                                   random_state=0)
            if method == "vi":
                X_hat, std = solver.predict(Y, return_std=True)
            else:
                X_hat = solver.predict(Y)
            rows.append((task, method, psnr(X_test, X_hat).mean(),
                         ssim(X_test, X_hat, shape).mean(), time.time() - t))
            print("      {:8s} {:11s} PSNR {:6.2f} dB  SSIM {:.3f}  ({:.1f} s)".format(*rows[-1]),
                  flush=True)
            if method != "pinv":
                shown.append((X_hat, "vi mean" if method == "vi" else method, None))
        shown.append((std, "vi std", std[:8].max()))
        figures.append(out / f"{task}.png")
        _save_grid(figures[-1], shown, shape)

    print("[3/3] exporting the decoder to ONNX ...", flush=True)
    onnx_path = to_onnx(prior, out / "decoder.onnx", part="decoder")
    err = check_onnx(onnx_path, prior)
    print(f"      onnxruntime vs PyTorch on 64 latents: max abs error {err:.1e}", flush=True)

    print(f"\n{'task':8s} {'method':11s} {'PSNR dB':>8s} {'SSIM':>6s} {'seconds':>8s}")
    for row in rows:
        print("{:8s} {:11s} {:8.2f} {:6.3f} {:8.1f}".format(*row))
    print(f"\nwrote to {out.resolve()} ({time.time() - t0:.0f} s in all):\n"
          f"  samples.png      16 prior samples\n"
          f"  {', '.join(f.name for f in figures)}\n"
          f"                   truth / A^+ y / glowip / likelihood / vi mean / vi std\n"
          f"  decoder.onnx     z (batch, 64) -> x (batch, 64); see exporters.onnx")
    if not err < ONNX_TOLERANCE:
        raise ValueError(f"ONNX parity failed: max abs error {err:.2e} > {ONNX_TOLERANCE}")


def _save_grid(path, rows, shape, n_cols=8):
    """One row of images per ``(X, title, vmax)``; ``vmax=None`` shows [0, 1] in gray, else
    values in [0, vmax] with a colour map (for standard deviations)."""
    import matplotlib.pyplot as plt
    c, h, w = shape
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(n_cols, 1.1 * len(rows)),
                             squeeze=False)
    for ax_row, (X, title, vmax) in zip(axes, rows):
        for k, ax in enumerate(ax_row):
            img = X[k].reshape(c, h, w).transpose(1, 2, 0).squeeze()
            if vmax is None:
                ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img, cmap="magma", vmin=0, vmax=vmax)
            ax.set_xticks([]), ax.set_yticks([])
        ax_row[0].set_ylabel(title, fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def fit(args):
    """Fit a FlowPrior on the rows of a data file and save it with joblib."""
    import joblib

    from . import FlowPrior
    X = _load_array(args.data)
    prior = FlowPrior(image_shape=args.image_shape and tuple(args.image_shape),
                      architecture=args.architecture,
                      data_range=args.data_range and tuple(args.data_range),
                      coupling=args.coupling, dequantize=args.dequantize,
                      max_epochs=args.max_epochs, random_state=args.random_state, verbose=1)
    prior.fit(X)
    joblib.dump(prior, args.model)
    print(f"fitted on {X.shape[0]} samples x {X.shape[1]} features; mean log-likelihood "
          f"{prior.score(X):.2f} nats; saved {args.model}")


def solve(args):
    """Reconstruct signals from measurements with a saved prior."""
    from . import InverseSolver
    from .methods import METHODS
    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; valid: {', '.join(sorted(METHODS))}")
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as err:
        raise ValueError(f"--params is not JSON: {err}") from None
    if not isinstance(params, dict):
        raise ValueError(f"--params must be a JSON object, got {args.params!r}")  # noqa: TRY004
    Y = _load_array(args.measurements)
    prior = _load_model(args.model)
    if not hasattr(prior, "flow_"):
        raise ValueError(f"{args.model} holds a {type(prior).__name__}, not a fitted prior")
    op = _operator(args.operator, prior.image_shape or prior.n_features_in_)
    shared = InverseSolver(prior, op).get_params(deep=False)
    solver = InverseSolver(prior, op, method=args.method, random_state=args.random_state,
                           **{k: v for k, v in params.items() if k in shared},
                           method_params={k: v for k, v in params.items() if k not in shared})
    if solver._method().needs_fit:
        solver.fit(Y)
    if args.std:
        X, std = solver.predict(Y, return_std=True)
        _save_array(args.std, std)
    else:
        X = solver.predict(Y)
    _save_array(args.output, X)
    print(f"reconstructed {len(X)} signals with {args.method}; saved {args.output}"
          + (f" and {args.std}" if args.std else ""))


def export(args):
    """Export part of a saved estimator to ONNX and check it against PyTorch."""
    from exporters import available_parts, check_onnx, to_onnx
    est = _load_model(args.model)
    try:
        parts = available_parts(est)
    except TypeError as err:
        raise ValueError(str(err)) from None
    if args.part not in parts:
        raise ValueError(f"{type(est).__name__} cannot export part {args.part!r}; "
                         f"available: {', '.join(parts)}")
    to_onnx(est, args.output, part=args.part)
    print(f"exported {args.part} to {args.output}; max abs error vs PyTorch "
          f"{check_onnx(args.output, est):.2e}")


def _parser():
    parser = argparse.ArgumentParser(prog="python -m flowsk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fit, solve and export on the embedded digits",
                       description=demo.__doc__)
    p.add_argument("--out", default="flowsk-out", help="folder for figures and ONNX "
                   "(default: flowsk-out)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run (poor quality)")
    p.set_defaults(func=demo)

    p = sub.add_parser("fit", help="fit a FlowPrior on .npy or CSV data, save with joblib",
                       description=fit.__doc__)
    p.add_argument("data", help="(n_samples, n_features) array: .npy, or CSV without header")
    p.add_argument("model", help="output .joblib file")
    p.add_argument("--image-shape", type=int, nargs=3, metavar=("C", "H", "W"))
    p.add_argument("--data-range", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--architecture", choices=("mlp", "glow", "realnvp", "chavez"),
                   help="default: glow with --image-shape, else mlp")
    p.add_argument("--coupling", default="affine",
                   choices=("affine", "additive", "spline", "robust-spline"))
    p.add_argument("--dequantize", type=float, default=0.0,
                   help="uniform noise width added to training batches (1/16 for digits)")
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--random-state", type=int, default=0)
    p.set_defaults(func=fit)

    p = sub.add_parser("solve", help="reconstruct signals from measurements",
                       description=solve.__doc__)
    p.add_argument("model", help=".joblib file written by 'fit'")
    p.add_argument("measurements", help="(n_obs, m) array: .npy or CSV")
    p.add_argument("output", help="reconstructions (n_obs, n_features): .npy or CSV")
    p.add_argument("--operator", required=True,
                   help="name[:JSON keyword arguments], e.g. 'inpainting:{\"box\": [2, 2, 6, "
                        "6]}' or 'compressedsensing:{\"n_measurements\": 16, \"random_state\": "
                        f"0}}'; names: {', '.join(_operators())}")
    p.add_argument("--method", default="glowip", help="e.g. pinv, glowip, likelihood, vi")
    p.add_argument("--params", default="{}",
                   help='hyperparameters as JSON, e.g. \'{"alpha": 0.05, "n_iter": 100}\'')
    p.add_argument("--std", help="also write the posterior std here (posterior methods)")
    p.add_argument("--random-state", type=int, default=0)
    p.set_defaults(func=solve)

    p = sub.add_parser("export", help="export a saved estimator to ONNX",
                       description=export.__doc__)
    p.add_argument("model", help=".joblib file")
    p.add_argument("output", help=".onnx file")
    p.add_argument("--part", default="decoder", help="decoder, encoder, log_prob, ...")
    p.set_defaults(func=export)
    return parser


def main(argv=None):
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
