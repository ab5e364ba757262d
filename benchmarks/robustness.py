"""Robustness benchmark: exploding inverses and OOD scores (Hong, Park and Chun).

Part 1, their 2-D toy: x uniform on [-1, 1]^2, y = [[0.7, 0.3], [0.3, 0.7]] x + N(0, 0.01^2).
For each coupling (affine, robust-spline) a FlowPrior of x and an amortized-vi conditional flow
q(z | y) are fitted; 10 posterior draws are taken for in-distribution y and for y shifted by
[0.8, -0.8]. Reported: %Inf (observations with a non-finite draw), the share of draws outside
[-1, 1]^2 (non-finite ones included), the largest finite |x|, the median OOD score of the
encoder features g(y), and the variance of the features after each layer of the sampling pass
(conditional flow from eps to z, then the prior from z to x).

Part 2, digits: an mlp FlowPrior per coupling (4 steps, 8 epochs); %Inf and the share of
samples far outside [0, 1] (beyond [-1, 2]) for latents at temperature 1, 2, 4; and held-out
digits, photo patches
(flowsk.datasets.load_image_patches) and uniform noise pushed through transform /
inverse_transform: median OOD score of the latent codes, %Inf of the round trip, and its
largest error.

Prints the tables and writes results/robustness.json.

    python benchmarks/robustness.py [--quick]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from flowsk import FlowPrior, InverseSolver
from flowsk.datasets import MIXING, load_digit_images, load_image_patches, make_mixing_toy
from flowsk.methods.variational import amortized_context
from flowsk.metrics import inf_rate, ood_score
from flowsk.operators import MatrixOperator

SHIFT = (0.8, -0.8)


def layer_variances(solver, Y, n_draws, seed=0):
    """Mean per-feature variance after each layer of the sampling pass ``eps -> z -> x``, over
    the finite rows of ``n_draws`` draws per row of ``Y``: list of ``(layer name, variance)``."""
    model, flow = solver.model_, solver.prior.flow_
    y = torch.as_tensor(np.repeat(Y, n_draws, 0), dtype=torch.float32)
    h = torch.randn(len(y), flow.latent_dim, generator=torch.Generator().manual_seed(seed))
    out, counts = [("eps", h)], {}
    with torch.no_grad():
        context = amortized_context(model, y)
        stages = [(layer, context, "q") for layer in reversed(model.body.layers)]
        stages += [(layer, None, "G") for layer in reversed(flow.body.layers)]
        for layer, ctx, part in stages:
            h = layer.inverse(h, ctx)[0]
            name = type(layer).__name__
            counts[part, name] = counts.get((part, name), 0) + 1
            out.append((f"{part}.{name}{counts[part, name]}", h))
    variances = []
    for name, h in out:
        h = h.double().numpy()
        finite = np.isfinite(h).all(1)
        with np.errstate(over="ignore", invalid="ignore"):
            v = float(h[finite].var(0).mean()) if finite.any() else float("nan")
        variances.append((name, v))
    return variances


def toy(quick):
    n_train, epochs, hidden = (1000, 10, 32) if quick else (4000, 30, 64)
    X, Y = make_mixing_toy(n_train, random_state=0)
    X_in, Y_in = make_mixing_toy(500, random_state=1)
    _, Y_ood = make_mixing_toy(500, shift=SHIFT, random_state=1)
    results = {}
    for coupling in ("affine", "robust-spline"):
        start = time.perf_counter()
        prior = FlowPrior(coupling=coupling, n_steps=4, hidden_features=hidden,
                          max_epochs=epochs, batch_size=128, random_state=0).fit(X)
        solver = InverseSolver(
            prior, MatrixOperator(MIXING), method="amortized-vi", sigma=0.01, random_state=0,
            on_nonfinite="warn", method_params=dict(coupling=coupling, n_steps=4,
                                                    hidden_features=hidden, n_iter=epochs,
                                                    batch_size=128)).fit(Y, X)
        row = {"fit_seconds": time.perf_counter() - start}
        for name, Yq in (("in", Y_in), ("shifted", Y_ood)):
            with np.errstate(invalid="ignore"):
                S = solver.sample_posterior(Yq, 10)
            finite = np.isfinite(S).all(-1)
            row[name] = {
                "inf_rate": inf_rate(solver, Yq),
                "outside_box": float(np.mean(~finite | (np.abs(S) > 1).any(-1))),
                "max_abs_finite": float(np.abs(S[finite]).max()),
                "ood_score_median": float(np.median(ood_score(solver, Yq))),
                "mse_to_truth": float(np.mean((S.mean(1) - X_in) ** 2))
                if finite.all() else None,
                "layer_variance": layer_variances(solver, Yq, 10),
            }
        results[coupling] = row
    return results


def digits(quick):
    X, _ = load_digit_images()
    X_train, X_test = train_test_split(X, test_size=0.25, random_state=0)
    n_ood = 200 if quick else 500
    patches, _ = load_image_patches(8, n_patches=n_ood, random_state=0)
    inputs = {"digits": X_test[:n_ood], "patches": patches,
              "noise": np.random.RandomState(0).uniform(0, 1, (n_ood, 64))}
    couplings = ("affine", "robust-spline") if quick else (
        "affine", "additive", "spline", "robust-spline")
    results = {}
    for coupling in couplings:
        start = time.perf_counter()
        prior = FlowPrior(architecture="mlp", coupling=coupling, n_steps=4, hidden_features=64,
                          dequantize=1 / 16, max_epochs=1 if quick else 8, random_state=0,
                          on_nonfinite="warn").fit(X_train)
        row = {"fit_seconds": time.perf_counter() - start, "test_nll": -prior.score(X_test),
               "temperature": {}, "inputs": {}}
        for t in (1, 2, 4):
            with np.errstate(invalid="ignore"):
                S = prior.sample(1000, temperature=t, random_state=0)
            row["temperature"][t] = {
                "inf_rate": inf_rate(prior, n_draws=1000, temperature=t, random_state=0),
                "far_outside": float(np.mean(~np.isfinite(S).all(1)
                                             | ((S < -1) | (S > 2)).any(1)))}
        for name, D in inputs.items():
            Z = prior.transform(D)
            with np.errstate(invalid="ignore"):
                R = prior.inverse_transform(np.nan_to_num(Z, nan=0.0, posinf=0.0, neginf=0.0))
            err = np.abs(R - D).max(1)
            row["inputs"][name] = {"ood_score_median": float(np.median(ood_score(prior, D))),
                                   "inf_rate": inf_rate(prior, D),
                                   "max_round_trip_error": float(np.nanmax(err))}
        results[coupling] = row
    return results


def fmt(v):
    return "nan" if v is None or not np.isfinite(v) else (
        f"{v:.3g}" if abs(v) < 1e4 else f"{v:.1e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the networks are tiny: threads cost more than they save
    start = time.perf_counter()
    results = {"toy": toy(args.quick)}
    print("2-D toy (10 draws per y, 500 y)")
    print(f"{'coupling':14s} {'y':8s} {'%Inf':>6s} {'%outside':>9s} {'max|x|':>9s} "
          f"{'OOD score':>9s} {'MSE':>7s}")
    for coupling, row in results["toy"].items():
        for name in ("in", "shifted"):
            r = row[name]
            print(f"{coupling:14s} {name:8s} {100 * r['inf_rate']:6.1f} "
                  f"{100 * r['outside_box']:9.1f} {fmt(r['max_abs_finite']):>9s} "
                  f"{fmt(r['ood_score_median']):>9s} {fmt(r['mse_to_truth']):>7s}")
    print("\nfeature variance per layer of the sampling pass (in / shifted)")
    for coupling, row in results["toy"].items():
        print(coupling)
        for (layer, v_in), (_, v_ood) in zip(row["in"]["layer_variance"],
                                             row["shifted"]["layer_variance"]):
            print(f"  {layer:22s} {fmt(v_in):>9s} {fmt(v_ood):>9s}")

    results["digits"] = digits(args.quick)
    print("\ndigits: samples at temperature T (1000 each)")
    print(f"{'coupling':14s} {'NLL':>7s} " + " ".join(
        f"{'%Inf T' + str(t):>8s} {'%far T' + str(t):>8s}" for t in (1, 2, 4)))
    for coupling, row in results["digits"].items():
        cells = " ".join(f"{100 * row['temperature'][t]['inf_rate']:8.1f} "
                         f"{100 * row['temperature'][t]['far_outside']:8.1f}" for t in (1, 2, 4))
        print(f"{coupling:14s} {row['test_nll']:7.1f} {cells}")
    print("\ndigits: inputs through transform / inverse_transform")
    print(f"{'coupling':14s} {'input':8s} {'OOD score':>9s} {'%Inf':>6s} {'max err':>9s}")
    for coupling, row in results["digits"].items():
        for name, r in row["inputs"].items():
            print(f"{coupling:14s} {name:8s} {fmt(r['ood_score_median']):>9s} "
                  f"{100 * r['inf_rate']:6.1f} {fmt(r['max_round_trip_error']):>9s}")
    results["seconds"] = time.perf_counter() - start
    results["quick"] = args.quick
    print(f"\ntotal {results['seconds']:.0f} s")
    out = Path(__file__).parent / "results" / ("robustness_quick.json" if args.quick
                                               else "robustness.json")
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
