"""An injective flow prior (TRUMPET, Kothari et al.) on digits and projected-gradient solvers.

``InjectiveFlowPrior(latent_dim=32)`` is fitted on digits: its generator ``G`` maps a
32-dimensional latent onto a 32-dimensional manifold in the 64-pixel space, and
``project(x) = G(G^+(x))`` is a fast projection onto it. The script shows held-out digits next
to their projections (with the relative error ``||x - G(G^+(x))|| / ||x||``), samples, and
the reconstructions of centre-inpainted digits by ``iflow`` (projected gradient on the data
fit), ``iflow-l`` (the same plus ``beta * -log p(x)``) and ``csgm`` (latent optimisation).

Writes ``projections.png``, ``samples.png``, ``inpainting.png`` and ``metrics.json`` (the
printed numbers)::

    python examples/trumpet_injective.py [--quick] [--out DIR]
"""
import argparse
import json
from pathlib import Path

import matplotlib
from sklearn.model_selection import train_test_split

from flowsk import InjectiveFlowPrior, InverseSolver
from flowsk.datasets import load_digit_images
from flowsk.metrics import psnr
from flowsk.operators import Inpainting

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def image_grid(rows, path, title=None):
    """Rows of flat 8x8 images ``{label: (k, 64)}`` as one figure."""
    k = len(next(iter(rows.values())))
    fig, axes = plt.subplots(len(rows), k, figsize=(k, 1.1 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for j in range(k):
            axes[r, j].imshow(images[j].reshape(8, 8), cmap="gray", vmin=0, vmax=1)
            axes[r, j].set_xticks([]), axes[r, j].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--out", default="example_output/trumpet_injective")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    X, shape = load_digit_images()
    X_train, X_test = train_test_split(X, test_size=0.25, random_state=0)
    if args.quick:
        X_train, X_test = X_train[:600], X_test[:8]
    else:
        X_test = X_test[:100]
    prior = InjectiveFlowPrior(image_shape=shape, latent_dim=32, data_range=(0, 1),
                               max_epochs=10 if args.quick else 40, random_state=0,
                               verbose=1).fit(X_train)
    err = prior.reconstruction_error(X_test)
    metrics = {"relative_error_mean": float(err.mean())}
    print(f"relative reconstruction error ||x - G(G^+(x))|| / ||x||: mean {err.mean():.3f}")
    image_grid({"digit": X_test[:8], "G(G^+(x))": prior.project(X_test[:8])},
               out / "projections.png", f"projection onto the range, mean relative error "
                                        f"{err.mean():.3f}")
    image_grid({f"T={t}": prior.sample(8, temperature=t, random_state=0) for t in (0.7, 1.0)},
               out / "samples.png", "samples G(z), z ~ N(0, T^2 I)")

    op = Inpainting(shape, box=(2, 2, 6, 6))
    Y = op.measure(X_test, noise_std=0.01, random_state=0)
    n_iter = {"n_iter": 50} if args.quick else {}
    solvers = {"pinv": dict(method="pinv"),
               "iflow": dict(method="iflow", **n_iter),
               "iflow-l": dict(method="iflow-l", beta=1e-3, **n_iter),
               "csgm": dict(method="csgm", gamma=0.01, **n_iter)}
    rows = {"truth": X_test[:8]}
    for name, params in solvers.items():
        R = InverseSolver(prior, op, random_state=0, **params).predict(Y)
        rows[name] = R[:8]
        metrics[f"psnr_{name}"] = float(psnr(X_test, R).mean())
        print(f"inpainting  {name:8s} PSNR {metrics[f'psnr_{name}']:6.2f} dB")
    image_grid(rows, out / "inpainting.png", "centre 4x4 box missing, noise 0.01")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"wrote projections.png, samples.png, inpainting.png and metrics.json to "
          f"{out.resolve()}")


if __name__ == "__main__":
    main()
