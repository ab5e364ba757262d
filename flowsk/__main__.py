"""Command line: ``python -m flowsk {demo,fit,solve,export} --help``."""
import argparse
import json
import sys
import time
from pathlib import Path

import joblib
import numpy as np


def _load_array(path):
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if path.suffix == ".npy":
        return np.load(path)
    return np.loadtxt(path, delimiter=",", ndmin=2)


def _save_array(path, A):
    path = Path(path)
    if path.suffix == ".npy":
        np.save(path, A)
    else:
        np.savetxt(path, A, delimiter=",")


def _operator(spec, image_shape):
    """``name[:json-kwargs]``, e.g. ``inpainting:{"box": [2, 2, 6, 6]}``."""
    from . import operators
    name, _, kwargs = spec.partition(":")
    classes = {"denoising": operators.Denoising, "blur": operators.Blur,
               "inpainting": operators.Inpainting, "colorization": operators.Colorization,
               "superresolution": operators.SuperResolution,
               "compressedsensing": operators.CompressedSensing}
    if name not in classes:
        raise ValueError(f"unknown operator {name!r}; valid: {', '.join(classes)}")
    kwargs = json.loads(kwargs) if kwargs else {}
    if name == "compressedsensing":
        return classes[name](int(np.prod(image_shape)), **kwargs)
    return classes[name](image_shape, **kwargs)


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
    import matplotlib.pyplot as plt
    from sklearn.model_selection import train_test_split

    from . import FlowPrior, InverseSolver
    from .datasets import load_digit_images
    from .metrics import psnr, ssim

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    X, shape = load_digit_images()
    X_train, X_test = train_test_split(X, test_size=0.25, random_state=0)
    n_test = 16 if args.quick else 100
    X_test = X_test[:n_test]
    t0 = time.time()
    print(f"[1/3] fitting FlowPrior on {len(X_train)} digits ...", flush=True)
    prior = FlowPrior(data_range=(0, 1), dequantize=1 / 16, random_state=0,
                      max_epochs=5 if args.quick else 200, verbose=1).fit(X_train)
    print(f"      held-out log-likelihood {prior.score(X_test):.1f} nats "
          f"({time.time() - t0:.0f} s)", flush=True)
    samples = prior.sample(16, temperature=0.8, random_state=0)
    _grid(plt, [samples], ["samples (T=0.8)"], shape, out / "samples.png")

    print("[2/3] reconstructing held-out digits ...", flush=True)
    n_iter = 30 if args.quick else 300
    methods = {"pinv": {}, "glowip": {"n_iter": n_iter}, "likelihood": {"n_iter": n_iter}}
    rows = []
    for task, (op, noise) in demo_tasks(shape).items():
        Y = op.measure(X_test, noise_std=noise, random_state=0)
        recon = {}
        for name, kw in methods.items():
            recon[name] = InverseSolver(prior, op, method=name, random_state=0,
                                        **kw).predict(Y)
            rows.append((task, name, psnr(X_test, recon[name]).mean(),
                         ssim(X_test, recon[name], shape).mean()))
            print(f"      {task:8s} {name:11s} PSNR {rows[-1][2]:6.2f} dB  "
                  f"SSIM {rows[-1][3]:.3f}", flush=True)
        shown = np.clip(op.pinv(_torch(Y)).numpy(), 0, 1)
        _grid(plt, [X_test[:8], shown[:8]] + [r[:8] for r in recon.values()],
              ["truth", "A^+ y"] + list(recon), shape, out / f"{task}.png")

    print("[3/3] exporting the decoder to ONNX ...", flush=True)
    from exporters import check_onnx, to_onnx
    to_onnx(prior, out / "decoder.onnx", part="decoder")
    err = check_onnx(out / "decoder.onnx", prior)
    print(f"      onnxruntime vs PyTorch: max abs error {err:.2e}")
    print(f"\n{'task':8s} {'method':11s} {'PSNR':>7s} {'SSIM':>6s}")
    for task, name, p, s in rows:
        print(f"{task:8s} {name:11s} {p:7.2f} {s:6.3f}")
    print(f"\nfigures and decoder.onnx are in {out.resolve()} ({time.time() - t0:.0f} s)")


def _torch(Y):
    import torch
    return torch.as_tensor(Y, dtype=torch.float32)


def _grid(plt, rows, titles, shape, path):
    c, h, w = shape
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(len(rows[0]), len(rows) * 1.1),
                             squeeze=False)
    for r, (row, title) in enumerate(zip(rows, titles)):
        for k, ax in enumerate(axes[r]):
            img = row[k].reshape(c, h, w).transpose(1, 2, 0)
            ax.imshow(img.squeeze(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel(title, fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def fit(args):
    from . import FlowPrior
    X = _load_array(args.data)
    shape = tuple(args.image_shape) if args.image_shape else None
    data_range = tuple(args.data_range) if args.data_range else None
    prior = FlowPrior(image_shape=shape, data_range=data_range, coupling=args.coupling,
                      max_epochs=args.max_epochs, random_state=args.random_state,
                      verbose=1).fit(X)
    joblib.dump(prior, args.model)
    print(f"fitted on {X.shape}; mean log-likelihood {prior.score(X):.2f} nats; "
          f"saved {args.model}")


def solve(args):
    from . import InverseSolver
    prior = joblib.load(args.model)
    shape = prior.image_shape or (prior.n_features_in_,)
    solver = InverseSolver(prior, _operator(args.operator, shape), method=args.method,
                           random_state=args.random_state)
    Y = _load_array(args.measurements)
    if args.std:
        X, std = solver.predict(Y, return_std=True)
        _save_array(args.std, std)
    else:
        X = solver.predict(Y)
    _save_array(args.output, X)
    print(f"reconstructed {len(X)} signals with {args.method}; saved {args.output}")


def export(args):
    from exporters import check_onnx, to_onnx
    est = joblib.load(args.model)
    to_onnx(est, args.output, part=args.part)
    print(f"exported {args.part} to {args.output}; max abs error vs PyTorch "
          f"{check_onnx(args.output, est):.2e}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m flowsk", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fit, solve and export on the embedded digits")
    p.add_argument("--out", default="flowsk-out", help="folder for figures and ONNX")
    p.add_argument("--quick", action="store_true", help="a fast smoke run")
    p.set_defaults(func=demo)
    p = sub.add_parser("fit", help="fit a FlowPrior on .npy or CSV data, save with joblib")
    p.add_argument("data"), p.add_argument("model")
    p.add_argument("--image-shape", type=int, nargs=3, metavar=("C", "H", "W"))
    p.add_argument("--data-range", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--coupling", default="affine")
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--random-state", type=int, default=0)
    p.set_defaults(func=fit)
    p = sub.add_parser("solve", help="reconstruct signals from measurements")
    p.add_argument("model"), p.add_argument("measurements"), p.add_argument("output")
    p.add_argument("--operator", required=True,
                   help='name[:json kwargs], e.g. \'inpainting:{"box": [2, 2, 6, 6]}\'')
    p.add_argument("--method", default="glowip")
    p.add_argument("--std", help="also write the posterior std here (posterior methods)")
    p.add_argument("--random-state", type=int, default=0)
    p.set_defaults(func=solve)
    p = sub.add_parser("export", help="export a fitted estimator to ONNX")
    p.add_argument("model"), p.add_argument("output")
    p.add_argument("--part", default="decoder")
    p.set_defaults(func=export)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
