"""Exploding inverses on Hong, Park and Chun's 2-D toy: affine vs robust-spline couplings.

x is uniform on [-1, 1]^2 and y = [[0.7, 0.3], [0.3, 0.7]] x + N(0, 0.01^2). For each coupling a
FlowPrior of x and an amortized-vi conditional flow q(z | y) are fitted, then posterior draws
are taken for in-distribution measurements and for measurements shifted by [0.8, -0.8]. The
figure shows the training data and both sets of draws, draws outside [-1, 1]^2 put on the edges
(as pixel values are clipped), with the share outside, %Inf and the median OOD score in each
title. Writes robust_splines.png and metrics.json (those numbers).

    python examples/robust_splines.py [--quick] [--out DIR]
    (default DIR: example_output/robust_splines)
"""
import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from flowsk import FlowPrior, InverseSolver
from flowsk.datasets import MIXING, make_mixing_toy
from flowsk.metrics import inf_rate, ood_score
from flowsk.operators import MatrixOperator


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run")
    parser.add_argument("--out", default="example_output/robust_splines")
    args = parser.parse_args()
    plt.switch_backend("Agg")
    torch.set_num_threads(1)  # the networks are tiny: threads cost more than they save
    n_train, epochs, hidden = (500, 5, 32) if args.quick else (4000, 30, 64)
    X, Y = make_mixing_toy(n_train, random_state=0)
    _, Y_in = make_mixing_toy(100, random_state=1)
    _, Y_ood = make_mixing_toy(100, shift=(0.8, -0.8), random_state=1)

    metrics = {}
    fig, axes = plt.subplots(3, 2, figsize=(7, 10), sharex=True, sharey=True)
    for col, coupling in enumerate(("affine", "robust-spline")):
        prior = FlowPrior(coupling=coupling, n_steps=4, hidden_features=hidden,
                          max_epochs=epochs, batch_size=128, random_state=0).fit(X)
        solver = InverseSolver(
            prior, MatrixOperator(MIXING), method="amortized-vi", sigma=0.01, random_state=0,
            on_nonfinite="warn", method_params=dict(coupling=coupling, n_steps=4,
                                                    hidden_features=hidden, n_iter=epochs,
                                                    batch_size=128)).fit(Y, X)
        axes[0, col].scatter(*X[:2000].T, s=2, c="gray")
        axes[0, col].set_title(f"training x ({coupling})")
        for row, (name, Yq) in enumerate((("in-distribution y", Y_in),
                                          ("shifted y", Y_ood)), start=1):
            with np.errstate(invalid="ignore"):
                S = solver.sample_posterior(Yq, 20).reshape(-1, 2)
            finite = np.isfinite(S).all(1)
            outside = ~finite | (np.abs(S) > 1).any(1)
            shown = np.clip(np.nan_to_num(S[finite]), -1, 1)
            m = metrics[f"{coupling}/{name}"] = {
                "outside": float(outside.mean()), "inf_rate": inf_rate(solver, Yq),
                "ood_median": float(np.median(ood_score(solver, Yq)))}
            ax = axes[row, col]
            ax.scatter(*shown.T, s=2, c=np.where(outside[finite], "tab:red", "tab:blue"))
            ax.set_title(f"{name}: {100 * m['outside']:.0f}% outside, "
                         f"%Inf {100 * m['inf_rate']:.0f}\n"
                         f"median OOD score {m['ood_median']:.2g}", fontsize=9)
    for ax in axes.ravel():
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
        ax.set_aspect("equal")
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "robust_splines.png", dpi=120)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"wrote {out / 'robust_splines.png'} and {out / 'metrics.json'}")


if __name__ == "__main__":
    main()
