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

Prints the tables and writes results/robustness.json (results/robustness_quick.json with
``--quick``).

    python benchmarks/robustness.py [--quick]
"""
import argparse
import time

import numpy as np
import torch
from _common import markdown_table, metadata, provenance, read_results, write_results
from sklearn.model_selection import train_test_split

from flowsk import FlowPrior, InverseSolver
from flowsk.datasets import MIXING, load_digit_images, load_image_patches, make_mixing_toy
from flowsk.methods.variational import amortized_context
from flowsk.metrics import inf_rate, ood_score
from flowsk.operators import MatrixOperator

SHIFT = (0.8, -0.8)
N_DRAWS = 10
TEMPERATURES = (1, 2, 4)


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
    n_conditions = 500
    X, Y = make_mixing_toy(n_train, random_state=0)
    X_in, Y_in = make_mixing_toy(n_conditions, random_state=1)
    _, Y_ood = make_mixing_toy(n_conditions, shift=SHIFT, random_state=1)
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
                S = solver.sample_posterior(Yq, N_DRAWS)
            finite = np.isfinite(S).all(-1)
            row[name] = {
                "inf_rate": inf_rate(solver, Yq, n_draws=N_DRAWS),
                "outside_box": float(np.mean(~finite | (np.abs(S) > 1).any(-1))),
                "max_abs_finite": float(np.abs(S[finite]).max()),
                "ood_score_median": float(np.median(ood_score(solver, Yq))),
                "mse_to_truth": float(np.mean((S.mean(1) - X_in) ** 2))
                if finite.all() else None,
                "layer_variance": layer_variances(solver, Yq, N_DRAWS),
            }
        results[coupling] = row
    return {"protocol": {"n_train": n_train, "epochs": epochs, "hidden_features": hidden,
                         "n_conditions": n_conditions, "n_draws": N_DRAWS, "shift": list(SHIFT)},
            "couplings": results}


def digits(quick):
    X, _ = load_digit_images()
    X_train, X_test = train_test_split(X, test_size=0.25, random_state=0)
    n_ood, n_samples, epochs = (200, 1000, 1) if quick else (500, 1000, 8)
    patches, _ = load_image_patches(8, n_patches=n_ood, random_state=0)
    inputs = {"digits": X_test[:n_ood], "patches": patches,
              "noise": np.random.RandomState(0).uniform(0, 1, (n_ood, 64))}
    couplings = ("affine", "robust-spline") if quick else (
        "affine", "additive", "spline", "robust-spline")
    results = {}
    for coupling in couplings:
        start = time.perf_counter()
        prior = FlowPrior(architecture="mlp", coupling=coupling, n_steps=4, hidden_features=64,
                          dequantize=1 / 16, max_epochs=epochs, random_state=0,
                          on_nonfinite="warn").fit(X_train)
        row = {"fit_seconds": time.perf_counter() - start, "test_nll": -prior.score(X_test),
               "temperature": {}, "inputs": {}}
        for t in TEMPERATURES:
            with np.errstate(invalid="ignore"):
                S = prior.sample(n_samples, temperature=t, random_state=0)
            row["temperature"][t] = {
                "inf_rate": inf_rate(prior, n_draws=n_samples, temperature=t, random_state=0),
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
    return {"protocol": {"epochs": epochs, "n_samples": n_samples, "n_inputs": n_ood},
            "couplings": results}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the networks are tiny: threads cost more than they save
    meta = metadata(seed=0, quick=args.quick)
    start = time.perf_counter()
    results = {"toy": toy(args.quick), "digits": digits(args.quick),
               "seconds": time.perf_counter() - start}
    name = "robustness_quick" if args.quick else "robustness"
    print(f"wrote {write_results(name, results, meta)}\n")
    for table in tables(name).values():
        print(table + "\n")


def _number(v):
    """3 significant digits (whole numbers from 1000 on, powers of ten beyond a million);
    "overflow" for a non-finite value, "–" for none."""
    if v is None:
        return "–"
    if not np.isfinite(v):
        return "overflow"
    if 999.5 <= abs(v) < 1e6:
        return f"{v:.0f}"
    if 1e-3 <= abs(v) < 999.5 or v == 0:
        return f"{v:.3g}"
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _percent(share):
    return f"{100 * share:.4g} %"


def tables(name="robustness"):
    """The toy table (``toy``), the digits samples by temperature (``temperature``) and the
    digits inputs' round trips (``inputs``), from ``results/NAME.json``."""
    r = read_results(name)
    toy, dig = r["toy"], r["digits"]
    p = toy["protocol"]
    rows = []
    for coupling, row in toy["couplings"].items():
        for condition in ("in", "shifted"):
            c = row[condition]
            rows.append([coupling, condition, _percent(c["inf_rate"]),
                         _percent(c["outside_box"]), _number(c["max_abs_finite"]),
                         _number(np.nanmax([v for _, v in c["layer_variance"]])),
                         _number(c["ood_score_median"]), _number(c["mse_to_truth"])])
    toy_table = markdown_table(
        ["coupling", "condition", "%Inf", "draws outside [−1, 1]²", "max \\|x\\|",
         "max feature variance", "median `ood_score`", "MSE of the draws' mean"], rows)
    toy_note = (f"<sub>{p['n_draws']} draws for each of {p['n_conditions']} conditions, in "
                f"distribution and shifted by {p['shift']}; priors "
                f"and conditional flows fitted for {p['epochs']} epochs on {p['n_train']} "
                f"pairs; max feature variance: the largest over the layers of the sampling "
                f"pass</sub>")
    q, dig = dig["protocol"], dig["couplings"]
    couplings = list(dig)
    temps = list(dig[couplings[0]]["temperature"])
    temp_table = markdown_table(
        ["coupling", "test log-likelihood, nats"]
        + [f"T = {t}: %Inf / far outside" for t in temps],
        [[c, f"{-dig[c]['test_nll']:.1f}"]
         + [f"{_percent(dig[c]['temperature'][t]['inf_rate'])} / "
            f"{_percent(dig[c]['temperature'][t]['far_outside'])}" for t in temps]
         for c in couplings])
    temp_note = (f"<sub>{q['n_samples']} samples per temperature, priors fitted for "
                 f"{q['epochs']} epochs; far outside: a pixel beyond [−1, 2]</sub>")
    names = list(dig[couplings[0]]["inputs"])
    input_table = markdown_table(
        ["coupling"] + [f"{n}: median `ood_score` / %Inf / max round-trip error"
                        for n in names],
        [[c] + [f"{_number(i['ood_score_median'])} / {_percent(i['inf_rate'])} / "
                f"{_number(i['max_round_trip_error'])}"
                for i in (dig[c]["inputs"][n] for n in names)] for c in couplings])
    input_note = f"<sub>{q['n_inputs']} inputs of each kind</sub>"
    return {"toy": f"{toy_table}\n\n{toy_note}",
            "temperature": f"{temp_table}\n\n{temp_note}",
            "inputs": f"{input_table}\n\n{input_note}\n\n{provenance(r['meta'])}"}


if __name__ == "__main__":
    main()
