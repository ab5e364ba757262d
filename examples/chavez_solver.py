"""Generative flows as a general-purpose inverse-problem solver (Chávez), on colour patches.

A prior with Chávez's architecture (``architecture="chavez"``: ActNorm, channel swaps and
couplings with 1x1 conditioners, no matrix inverse; here with Hong et al.'s robust spline
coupling, whose inverse cannot explode on the solvers' latents) is fitted on 8x8 colour
patches of the bundled photographs. One prior then solves four tasks on held-out patches:
denoising (noise std 0.05), 3x3 deblurring, centre inpainting (a 4x4 hole) and colorization
(channel mean).
Chávez's ``likelihood`` solver (``||A G(z) - y||_1 + alpha (-log p(G(z)))``) is compared with
``csgm``, ``glowip`` and, for denoising, ``map``, with the hyperparameters the paper reports
(alpha 0.02, 0.02, 0.002, 0.02; CSGM gamma 0.1 for denoising, else 0.01; GlowIP gamma 0.1 for
denoising, else 0). The printed table follows the paper's Table 1 (mean PSNR / SSIM); the
numbers are not the paper's (32x32 CelebA there, 8x8 photo patches here).

Writes ``table1.txt`` and one figure per task (``denoising.png``, ``deblurring.png``,
``inpainting.png``, ``colorization.png``: truth, measurement, reconstructions)::

    python examples/chavez_solver.py [--quick] [--out DIR]
"""
import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np
import torch

from flowsk import FlowPrior, InverseSolver
from flowsk.datasets import load_image_patches
from flowsk.metrics import psnr, ssim
from flowsk.operators import Blur, Colorization, Denoising, Inpainting

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METHODS = ("csgm", "glowip", "map", "likelihood")


def tasks(shape):
    """name -> (operator, noise std, {method: hyperparameters})."""
    return {
        "denoising": (Denoising(shape), 0.05,
                      {"csgm": {"gamma": 0.1}, "glowip": {"gamma": 0.1},
                       "map": {"sigma": 0.05, "beta": 0.5}, "likelihood": {"alpha": 0.02}}),
        "deblurring": (Blur(shape, 3), 0.01,
                       {"csgm": {"gamma": 0.01}, "glowip": {"gamma": 0.0},
                        "likelihood": {"alpha": 0.02}}),
        "inpainting": (Inpainting(shape, box=(2, 2, 6, 6)), 0.01,
                       {"csgm": {"gamma": 0.01}, "glowip": {"gamma": 0.0},
                        "likelihood": {"alpha": 0.002}}),
        "colorization": (Colorization(shape), 0.01,
                         {"csgm": {"gamma": 0.01}, "glowip": {"gamma": 0.0},
                          "likelihood": {"alpha": 0.02}}),
    }


def show(path, shape, rows):
    """Save a grid: one row of colour images per ``(title, X)``."""
    k = 8
    fig, axes = plt.subplots(len(rows), k, figsize=(k, 1.1 * len(rows)), squeeze=False)
    for ax_row, (title, X) in zip(axes, rows):
        for j, ax in enumerate(ax_row):
            ax.imshow(np.clip(X[j].reshape(shape).transpose(1, 2, 0), 0, 1))
            ax.set_xticks([]), ax.set_yticks([])
        ax_row[0].set_ylabel(title, fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--out", default="example_output/chavez_solver")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    n_train, n_test = (400, 8) if args.quick else (3000, 64)
    X, shape = load_image_patches(8, n_patches=n_train + n_test, color=True, random_state=0)
    X_train, X_test = X[:n_train], X[n_train:]
    prior = FlowPrior(image_shape=shape, architecture="chavez", coupling="robust-spline",
                      data_range=(0, 1), dequantize=1 / 256, n_steps=2 if args.quick else 4,
                      hidden_features=32 if args.quick else 64,
                      max_epochs=2 if args.quick else 30, random_state=0,
                      verbose=1).fit(X_train)
    print(f"prior: {len(prior.history_['train_loss'])} epochs, held-out log-likelihood "
          f"{prior.score(X_test):.1f} nats per patch", flush=True)
    n_iter = 20 if args.quick else 300

    table = {}
    for task, (op, noise, params) in tasks(shape).items():
        Y = op.measure(X_test, noise_std=noise, random_state=0)
        measured = op.pinv(torch.as_tensor(Y, dtype=torch.float32)).numpy()
        rows = [("truth", X_test), ("measurement", measured)]
        table["measurement", task] = (psnr(X_test, np.clip(measured, 0, 1)).mean(),
                                      ssim(X_test, np.clip(measured, 0, 1), shape).mean())
        for method, kw in params.items():
            R = InverseSolver(prior, op, method=method, n_iter=n_iter, random_state=0,
                              **kw).predict(Y)
            table[method, task] = (psnr(X_test, R).mean(), ssim(X_test, R, shape).mean())
            rows.append((method, R))
            print(f"{task:12s} {method:10s} PSNR {table[method, task][0]:6.2f}  "
                  f"SSIM {table[method, task][1]:.3f}", flush=True)
        show(out / f"{task}.png", shape, rows)

    names = list(tasks(shape))
    lines = [f"Average PSNR (dB) and SSIM over {n_test} held-out 8x8 colour patches",
             f"{'Method':18s}" + "".join(f"{t:>18s}" for t in names),
             f"{'':18s}" + "".join(f"{'PSNR':>11s}{'SSIM':>7s}" for _ in names)]
    for method in METHODS:
        cells = [table.get((method, t)) for t in names]
        label = "Ours (likelihood)" if method == "likelihood" else method
        lines.append(f"{label:18s}" + "".join(
            f"{c[0]:11.2f}{c[1]:7.3f}" if c else f"{'-':>11s}{'-':>7s}" for c in cells))
    text = "\n".join(lines)
    print("\n" + text)
    (out / "table1.txt").write_text(text + "\n")
    (out / "metrics.json").write_text(json.dumps(
        {f"{method}/{task}": {"psnr": float(v[0]), "ssim": float(v[1])}
         for (method, task), v in table.items()}, indent=1))
    print(f"wrote table1.txt, metrics.json and {', '.join(f'{t}.png' for t in names)} to "
          f"{out.resolve()}")


if __name__ == "__main__":
    main()
