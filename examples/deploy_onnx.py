"""Deploying a trained flow with ONNX: export with flowsk, run with NumPy and onnxruntime only.

A flow prior is fitted on digits and its generator exported with ``exporters.to_onnx``. The
function ``onnx_samples`` below is all a deployment needs (``numpy``, ``onnxruntime``,
``json``): it reads the latent size and image shape from the file's metadata and draws
samples, which match ``prior.sample`` with the same seed to float32 precision. When the
exporter offers a ``posterior_sampler`` for an ``amortized-vi`` solver (inputs ``y`` and
standard normal ``noise``), that network is exported too and used to inpaint held-out digits
with uncertainty, again with NumPy and onnxruntime alone.

Writes ``decoder.onnx``, ``samples.png`` (PyTorch and onnxruntime samples, and their
difference) and, with the posterior sampler, ``posterior_sampler.onnx`` and
``posterior.png``::

    python examples/deploy_onnx.py [--quick] [--out DIR]
"""
import argparse
import json
import time
from pathlib import Path

import matplotlib
import numpy as np
import onnxruntime as ort
from sklearn.model_selection import train_test_split

from exporters import available_parts, check_onnx, to_onnx
from flowsk import FlowPrior, InverseSolver
from flowsk.datasets import load_digit_images
from flowsk.metrics import psnr
from flowsk.operators import Inpainting

matplotlib.use("Agg")
import matplotlib.pyplot as plt


# -- deployment side: numpy + onnxruntime only -------------------------------------------------
def load(path):
    """An onnxruntime session and the file's metadata (JSON values decoded)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    return session, {k: json.loads(v) for k, v in meta.items()}


def onnx_samples(path, n_samples, temperature=1.0, seed=0):
    """``n_samples`` images ``(n, C, H, W)`` from an exported decoder."""
    session, meta = load(path)
    z = temperature * np.random.RandomState(seed).standard_normal((n_samples, meta["latent_dim"]))
    x = session.run(["x"], {"z": z.astype(np.float32)})[0]
    return x.reshape(n_samples, *meta["image_shape"])


def onnx_posterior(path, Y, n_samples=64, seed=0):
    """Posterior mean and std ``(n_obs, n_features)`` from an exported posterior sampler."""
    session, meta = load(path)
    noise = np.random.RandomState(seed).standard_normal((len(Y) * n_samples,
                                                          meta["latent_dim"]))
    y = np.repeat(np.asarray(Y, np.float32), n_samples, axis=0)
    x = session.run(["x"], {"y": y, "noise": noise.astype(np.float32)})[0]
    x = x.reshape(len(Y), n_samples, -1)
    return x.mean(1), x.std(1)


# -- training side -----------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--out", default="example_output/deploy_onnx")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    X, shape = load_digit_images()
    X_train, X_test = train_test_split(X, test_size=0.25, random_state=0)
    prior = FlowPrior(image_shape=shape, architecture="mlp", data_range=(0, 1),
                      dequantize=1 / 16, max_epochs=5 if args.quick else 200,
                      random_state=0, verbose=1).fit(X_train)

    path = to_onnx(prior, out / "decoder.onnx", part="decoder")
    metrics = {"decoder_error": check_onnx(path, prior)}
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB); parity check "
          f"(exporters.check_onnx): max abs error {metrics['decoder_error']:.1e}")
    ref = prior.sample(16, temperature=0.8, random_state=0)
    got = onnx_samples(path, 16, temperature=0.8, seed=0).reshape(16, -1)
    metrics["samples_difference"] = float(np.abs(got - ref).max())
    print(f"onnxruntime samples vs prior.sample(16, temperature=0.8, random_state=0): "
          f"max abs difference {metrics['samples_difference']:.1e}")
    n = 4096
    t = time.perf_counter()
    onnx_samples(path, n)
    t_onnx = time.perf_counter() - t
    t = time.perf_counter()
    prior.sample(n, random_state=0)
    print(f"{n} samples: onnxruntime {t_onnx:.2f} s, PyTorch {time.perf_counter() - t:.2f} s")

    fig, axes = plt.subplots(3, 8, figsize=(8, 3.3))
    for j in range(8):
        for ax, img, cmap, vmax in zip(axes[:, j], [ref[j], got[j], np.abs(got[j] - ref[j])],
                                       ["gray", "gray", "magma"], [1, 1, 1e-5]):
            ax.imshow(img.reshape(8, 8), cmap=cmap, vmin=0, vmax=vmax)
            ax.set_xticks([]), ax.set_yticks([])
    for ax, label in zip(axes[:, 0], ["PyTorch", "onnxruntime", "|diff| (0-1e-5)"]):
        ax.set_ylabel(label, fontsize=7)
    fig.savefig(out / "samples.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote decoder.onnx and samples.png to {out.resolve()}")

    op = Inpainting(shape, box=(2, 2, 6, 6))
    solver = InverseSolver(prior, op, method="amortized-vi", n_iter=3 if args.quick else 200,
                           random_state=0)
    try:
        parts = available_parts(solver)
    except TypeError:  # this version of the exporter has no InverseSolver parts
        parts = []
    if "posterior_sampler" not in parts:
        print("this exporter has no posterior_sampler part; skipped the amortized-vi export")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return
    solver.fit(op.measure(X_train, noise_std=0.01, random_state=0), X_train)
    path = to_onnx(solver, out / "posterior_sampler.onnx", part="posterior_sampler")
    metrics["sampler_error"] = check_onnx(path, solver)
    print(f"exported {path}; parity check: max abs error {metrics['sampler_error']:.1e}")
    X_test = X_test[:8 if args.quick else 100]
    Y = op.measure(X_test, noise_std=0.01, random_state=1)
    mean, std = onnx_posterior(path, Y)
    metrics["psnr_onnx_mean"] = float(psnr(X_test, mean).mean())
    metrics["psnr_predict"] = float(psnr(X_test, solver.predict(Y)).mean())
    metrics["psnr_pinv"] = float(psnr(X_test, InverseSolver(prior, op, method="pinv")
                                      .predict(Y)).mean())
    print(f"amortized-vi inpainting of {len(Y)} digits: PSNR of the onnxruntime posterior "
          f"mean {metrics['psnr_onnx_mean']:.2f} dB, of PyTorch's predict "
          f"{metrics['psnr_predict']:.2f} dB (pinv {metrics['psnr_pinv']:.2f} dB)")
    fig, axes = plt.subplots(3, 8, figsize=(8, 3.3))
    for j in range(8):
        for ax, img, cmap, vmax in zip(axes[:, j], [X_test[j], mean[j], std[j]],
                                       ["gray", "gray", "magma"], [1, 1, std[:8].max()]):
            ax.imshow(img.reshape(8, 8), cmap=cmap, vmin=0, vmax=vmax)
            ax.set_xticks([]), ax.set_yticks([])
    for ax, label in zip(axes[:, 0], ["truth", "posterior mean", "posterior std"]):
        ax.set_ylabel(label, fontsize=7)
    fig.savefig(out / "posterior.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"wrote posterior_sampler.onnx, posterior.png and metrics.json to {out.resolve()}")


if __name__ == "__main__":
    main()
