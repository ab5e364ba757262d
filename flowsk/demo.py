"""The demo that ``python -m flowsk demo`` runs: fit a prior on the embedded digits,
reconstruct corrupted held-out digits with several methods, export the decoder to ONNX.

Like the command line, this is an application on top of the library, so it may use
``exporters``.
"""
import time
from pathlib import Path

import numpy as np

DEMO_METHODS = ("pinv", "glowip", "likelihood", "vi")
ONNX_TOLERANCE = 1e-4


def demo_tasks(shape):
    """The five digits tasks of ``benchmarks/inverse.py``: name -> (operator, noise_std)."""
    from .operators import Blur, CompressedSensing, Denoising, Inpainting, SuperResolution
    return {"denoise": (Denoising(shape), 0.1),
            "inpaint": (Inpainting(shape, box=(2, 2, 6, 6)), 0.01),
            "cs16": (CompressedSensing(shape, 16, random_state=0), 0.01),
            "deblur": (Blur(shape, 3), 0.01),
            "sr2": (SuperResolution(shape, 2), 0.01)}


def demo(out="flowsk-out", quick=False):
    """Fit a prior on digits, reconstruct corrupted held-out digits, export the decoder.

    Writes ``samples.png``, one figure per task and ``decoder.onnx`` to ``out`` and prints a
    PSNR / SSIM table; ``quick`` is a smoke run (a few epochs and iterations).
    """
    import matplotlib
    matplotlib.use("Agg")
    import torch
    from sklearn.model_selection import train_test_split

    from exporters import check_onnx, to_onnx

    from . import FlowPrior, InverseSolver
    from .datasets import load_digit_images
    from .metrics import psnr, ssim
    from .prior import dequantize

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    X, shape = load_digit_images()
    X_train, X_test = train_test_split(X, test_size=0.25, random_state=0)
    X_test = X_test[:8 if quick else 32]
    print(f"[1/3] fitting a FlowPrior on {len(X_train)} digits (the bar shows the negative "
          "log-likelihood per digit of training / validation batches) ...", flush=True)
    prior = FlowPrior(data_range=(0, 1), dequantize=1 / 16, max_epochs=3 if quick else 60,
                      random_state=0, verbose=1).fit(X_train)
    # the measure the bar shows: the density of digits dequantized within their grey level
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        X_deq = dequantize(torch.as_tensor(X_test), 1 / 16, (0, 1)).numpy()
    print(f"      {len(prior.history_['train_loss'])} epochs ({time.time() - t0:.0f} s); "
          f"held-out log-likelihood {prior.score(X_deq):.1f} nats per dequantized digit",
          flush=True)
    samples = prior.sample(16, temperature=0.8, random_state=0)
    _save_grid(out / "samples.png", [(samples[:8], "samples T=0.8", None),
                                     (samples[8:], "", None)], shape)

    print(f"[2/3] reconstructing {len(X_test)} held-out digits with "
          f"{', '.join(DEMO_METHODS)} ...", flush=True)
    # vi starts from a Laplace approximation, so a few Adam steps refine it
    n_iter = {"glowip": 20, "likelihood": 20, "vi": 20} if quick else {"vi": 100}
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
    best = {}
    for task, method, value, _, _ in rows:
        if value > best.get(task, ("", -np.inf))[1]:
            best[task] = (method, value)
    print("\nbest per task: " + ", ".join(f"{t} {m} ({v:.1f} dB)" for t, (m, v) in best.items()))
    print(f"\nwrote to {out.resolve()} ({time.time() - t0:.0f} s in all). Look at:\n"
          f"  {', '.join(f.name for f in figures)}\n"
          "      rows: truth / A^+ y (the measurement) / glowip / likelihood / vi mean / vi std;\n"
          "      the std is vi's per-pixel uncertainty: high where the measurement says least\n"
          "  samples.png      16 prior samples at temperature 0.8\n"
          f"  decoder.onnx     z (batch, 64) -> x (batch, 64), runs in onnxruntime without torch\n"
          "Next: README.md 'Quickstart' (the same steps in Python), 'python -m flowsk fit "
          "--help' for your own data, examples/ (one script per paper), benchmarks/ (how the "
          "numbers in the README were measured).")
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
