"""flowsk command line: ``python -m flowsk {demo,fit,solve,export} --help``.

Models are flowsk model files (``model.flowsk``, see :mod:`flowsk.persistence`), safe to share;
a ``.joblib`` path is a pickle instead, which prints a warning, since loading a pickle runs
whatever code it holds. Bad input (a missing file, the wrong width, NaN, an unknown method or
operator, a damaged model file) prints one ``error: ...`` line on stderr and exits with
status 2.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np


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


def _is_pickle(path):
    return Path(path).suffix == ".joblib"


def _warn_pickle(path):
    print(f"warning: {path} is a pickle: loading one runs any code it holds, so load only "
          "pickles you trust, and share models as .flowsk files", file=sys.stderr)


def _save_model(estimator, path):
    """``path``: a flowsk model file, or a joblib pickle for a ``.joblib`` path."""
    if _is_pickle(path):
        import joblib
        _warn_pickle(path)
        joblib.dump(estimator, path)
    else:
        from . import save
        save(estimator, path)


def _load_model(path):
    if not Path(path).is_file():
        raise ValueError(f"{path} does not exist")
    if not _is_pickle(path):
        from . import load
        return load(path)
    import joblib
    _warn_pickle(path)
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


def run_demo(args):
    """Fit a prior on digits, reconstruct corrupted held-out digits, export the decoder."""
    from .demo import demo
    demo(args.out, quick=args.quick)


def fit(args):
    """Fit a FlowPrior on the rows of a data file and save it as a flowsk model file (or a
    joblib pickle, for a .joblib path)."""
    from . import FlowPrior
    X = _load_array(args.data)
    prior = FlowPrior(image_shape=args.image_shape and tuple(args.image_shape),
                      architecture=args.architecture,
                      data_range=args.data_range and tuple(args.data_range),
                      coupling=args.coupling, dequantize=args.dequantize,
                      max_epochs=args.max_epochs, random_state=args.random_state, verbose=1)
    prior.fit(X)
    _save_model(prior, args.model)
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
                       description=run_demo.__doc__)
    p.add_argument("--out", default="flowsk-out", help="folder for figures and ONNX "
                   "(default: flowsk-out)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run (poor quality)")
    p.set_defaults(func=run_demo)

    p = sub.add_parser("fit", help="fit a FlowPrior on .npy or CSV data and save it",
                       description=fit.__doc__)
    p.add_argument("data", help="(n_samples, n_features) array: .npy, or CSV without header")
    p.add_argument("model", help="output model file, e.g. model.flowsk (safe to share); a "
                                 ".joblib path writes a pickle")
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
    p.add_argument("model", help="model file written by 'fit' (.flowsk, or .joblib)")
    p.add_argument("measurements", help="(n_obs, m) array: .npy or CSV")
    p.add_argument("output", help="reconstructions (n_obs, n_features): .npy or CSV")
    p.add_argument("--operator", required=True,
                   help="name[:JSON keyword arguments], e.g. 'inpainting:{\"box\": [2, 2, 6, "
                        "6]}' or 'compressedsensing:{\"n_measurements\": 16, \"random_state\": "
                        f"0}}'; names: {', '.join(_operators())}")
    p.add_argument("--method", default="glowip", help="e.g. pinv, glowip, likelihood, vi")
    p.add_argument("--params", default="{}",
                   help='hyperparameters as JSON, e.g. \'{"alpha": 0.001, "n_iter": 100}\'')
    p.add_argument("--std", help="also write the posterior std here (posterior methods)")
    p.add_argument("--random-state", type=int, default=0)
    p.set_defaults(func=solve)

    p = sub.add_parser("export", help="export a saved estimator to ONNX",
                       description=export.__doc__)
    p.add_argument("model", help="model file: .flowsk (flowsk.save), or .joblib")
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
