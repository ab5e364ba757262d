"""Density benchmark on digits: flowsk's priors against zuko's and normflows' flows.

Data: the pixels ``P`` (0..16) of scikit-learn's digits, ``X = (P + U[0, 1)) / 17`` with ``U``
drawn once from ``RandomState(0)``, ``train_test_split(test_size=0.25, random_state=0)``. The
score is the test mean log-likelihood of ``X`` in nats per image. Every model trains on the
same thing: the training pixels at ``(P + 0.5) / 17`` with fresh uniform noise of width 1/17 in
every batch (``FlowPrior(dequantize=1/17)``), which is the distribution the test rows are
drawn from; the same logit at the data end (``Logit``, alpha 0.05); and the same training loop
(``flowsk._training.train``: AdamW, batch 64, a 10 % validation split, early stopping after 15
epochs without improvement, at most 200 epochs). Each model runs for every seed (3 by default),
seeds outermost so that the models' timings alternate; fit seconds are wall and CPU (process)
seconds.

``--select NAME ...`` instead fits the named candidates of ``SELECTION`` on 80 % of the training
split and scores them on the other 20 % (never the test split): how FlowPrior's per-coupling
defaults were chosen. Records accumulate in results/density_select.json.

    python benchmarks/density.py [--quick] [--seeds 0 1 2] [--models NAME ...]
    python benchmarks/density.py --select NAME ... | --select all
"""
import argparse
import contextlib
import functools
import time
from unittest import mock

import numpy as np
import torch
from _common import (
    linear_start,
    markdown_table,
    metadata,
    provenance,
    read_results,
    write_results,
)
from sklearn.datasets import load_digits
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import train_test_split

import flowsk._training
from flowsk import FlowPrior
from flowsk._training import train
from flowsk.nn.multiscale import Logit
from flowsk.prior import dequantize

WIDTH = 1 / 17  # one grey level
SHAPE = (1, 8, 8)
MAX_EPOCHS, PATIENCE = 200, 15


def digits(select=False):
    """``(train rows (n, 64) at the centres of their levels, evaluation rows)``: the test split,
    or with ``select`` the last 20 % of the training split."""
    pixels = load_digits().data
    X = (pixels + np.random.RandomState(0).uniform(size=pixels.shape)) / 17
    P_train, _, X_train, X_eval = train_test_split(pixels, X, test_size=0.25, random_state=0)
    if select:
        P_train, _, _, X_eval = train_test_split(P_train, X_train, test_size=0.2,
                                                 random_state=1)
    return (P_train + 0.5) / 17, X_eval


@contextlib.contextmanager
def adam_l2():
    """flowsk's previous optimizer: Adam with L2 ``weight_decay`` on every parameter (biases,
    ActNorm and LU factors included) instead of AdamW on the layer weights."""
    def adam(groups, lr, **options):
        decay = max(group["weight_decay"] for group in groups)
        return torch.optim.Adam([p for g in groups for p in g["params"]], lr=lr,
                                weight_decay=decay, **options)

    with mock.patch.object(flowsk._training.torch.optim, "AdamW", adam):
        yield


def fit_flowprior(train_rows, eval_rows, seed, max_epochs, optimizer="adamw",
                  start=None, **params):
    prior = FlowPrior(data_range=(0, 1), dequantize=WIDTH, max_epochs=max_epochs,
                      n_iter_no_change=PATIENCE, random_state=seed, device="cpu", **params)
    with contextlib.ExitStack() as stack:
        if optimizer == "adam-l2":
            stack.enter_context(adam_l2())
        stack.enter_context(linear_start(start))
        prior.fit(train_rows)
    return prior.score(eval_rows), len(prior.history_["val_loss"]), _n_params(prior.flow_)


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


class LogitDensity(torch.nn.Module):
    """A peer's flow on the real line behind flowsk's logit: ``log_prob (B, 64) -> (B,)`` of
    data in [0, 1]; ``log_prob_of(model, z)`` is the peer's own log-density."""

    def __init__(self, model, log_prob_of):
        super().__init__()
        self.model, self.log_prob_of, self.logit = model, log_prob_of, Logit((0.0, 1.0))

    def log_prob(self, x):
        z, logdet = self.logit(x)
        return self.log_prob_of(self.model, z) + logdet


def fit_peer(make, train_rows, eval_rows, seed, max_epochs, learning_rate=1e-3,
             weight_decay=1e-4):
    """Fit a peer's flow (``make() -> LogitDensity``) with flowsk's training loop."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        density = make()
        history, _ = train(density, lambda m, b: -m.log_prob(dequantize(b, WIDTH, (0, 1))).mean(),
              train_rows, max_epochs=max_epochs, batch_size=64, learning_rate=learning_rate,
              weight_decay=weight_decay, n_iter_no_change=PATIENCE,
              rng=np.random.RandomState(seed))
    with torch.no_grad():
        score = density.log_prob(torch.as_tensor(eval_rows, dtype=torch.float32)).mean().item()
    return score, len(history["val_loss"]), _n_params(density)


def zuko_flow(name, **kwargs):
    def make():
        import zuko

        flow = getattr(zuko.flows, name)(64, hidden_features=(128, 128), **kwargs)
        return LogitDensity(flow, lambda f, z: f().log_prob(z))
    return make


def normflows_glow(levels=2, steps=4, hidden=32):
    """normflows' multiscale Glow on 1x8x8 (affine couplings, LU 1x1 convolutions, ActNorm),
    the size of flowsk's ``glow`` default, with its learned diagonal-Gaussian bases."""
    def make():
        import normflows as nf

        flows, merges, bases = [], [], []
        for i in range(levels):
            channels = SHAPE[0] * 2 ** (levels + 1 - i)
            flows.append([nf.flows.GlowBlock(channels, hidden, split_mode="channel", scale=True)
                          for _ in range(steps)] + [nf.flows.Squeeze()])
            if i > 0:
                merges.append(nf.flows.Merge())
                side = SHAPE[1] // 2 ** (levels - i)
                bases.append(nf.distributions.DiagGaussian(
                    (SHAPE[0] * 2 ** (levels - i), side, side)))
            else:
                side = SHAPE[1] // 2 ** levels
                bases.append(nf.distributions.DiagGaussian(
                    (SHAPE[0] * 2 ** (levels + 1), side, side)))
        model = nf.MultiscaleFlow(bases, flows, merges)
        return LogitDensity(model, lambda m, z: m.log_prob(z.reshape(-1, *SHAPE), None))
    return make


def fit_gmm(train_rows, eval_rows, seed, max_epochs):
    rng = np.random.RandomState(seed)
    noisy = train_rows + WIDTH * (rng.uniform(size=train_rows.shape) - 0.5)
    gmm = GaussianMixture(5, covariance_type="full", random_state=seed).fit(noisy)
    return gmm.score(eval_rows), None, None


# name -> (what the README calls it, fit(train_rows, eval_rows, seed, max_epochs))
def _flowprior(**params):
    return lambda tr, ev, seed, epochs: fit_flowprior(tr, ev, seed, epochs, **params)


def _peer(make, **params):
    return lambda tr, ev, seed, epochs: fit_peer(make, tr, ev, seed, epochs, **params)


MODELS = {
    "default": ("`FlowPrior(data_range=(0, 1), dequantize=1/17)` defaults (`mlp`, affine)",
                _flowprior()),
    "adam-l2": ("same, Adam with L2 decay 1e-3 on every parameter (the previous optimizer)",
                _flowprior(optimizer="adam-l2", weight_decay=1e-3)),
    "mlp-spline": ("`coupling=\"spline\"`", _flowprior(coupling="spline")),
    "glow": ("`image_shape=(1, 8, 8)` (`glow`, affine)", _flowprior(image_shape=SHAPE)),
    "glow-spline": ("`image_shape=(1, 8, 8), coupling=\"spline\"`",
                    _flowprior(image_shape=SHAPE, coupling="spline")),
    "maf-spline": ("`architecture=\"maf\", coupling=\"spline\"`",
                   _flowprior(architecture="maf", coupling="spline")),
    "gmm": ("`GaussianMixture(5, \"full\")`", fit_gmm),
    "zuko-realnvp": ("zuko `RealNVP(transforms=5)`", _peer(zuko_flow("RealNVP", transforms=5))),
    "zuko-nsf-coupling": ("zuko `NSF(passes=2, transforms=5)`",
                          _peer(zuko_flow("NSF", passes=2, transforms=5))),
    "zuko-nsf": ("zuko `NSF(transforms=5)` (autoregressive)",
                 _peer(zuko_flow("NSF", transforms=5))),
    "normflows-glow": ("normflows Glow (2 levels x 4 steps, 32 channels)",
                       _peer(normflows_glow())),
}

PEERS = ("gmm", "zuko-realnvp", "zuko-nsf-coupling", "zuko-nsf", "normflows-glow")

# candidates for FlowPrior's per-coupling defaults, scored on the validation split
SELECTION = {}


def _select(name, **params):
    SELECTION[name] = params


_select("mlp-affine-wd1e-3", coupling="affine", weight_decay=1e-3)
_select("mlp-affine-wd1", coupling="affine", weight_decay=1.0)
_select("mlp-spline-64x8-b5-wd1", coupling="spline", hidden_features=64, n_steps=8, bound=5.0,
        spline_affine=False, weight_decay=1.0)
_select("mlp-spline-128x4-b5-wd1", coupling="spline", hidden_features=128, n_steps=4,
        bound=5.0, spline_affine=False, weight_decay=1.0)
_select("mlp-spline-64x8-b5-affine-wd1", coupling="spline", hidden_features=64, n_steps=8,
        bound=5.0, spline_affine=True, weight_decay=1.0)
_select("mlp-affine-wd1-rotation", coupling="affine", weight_decay=1.0, start="rotation")
_select("mlp-spline-64x8-b5-wd1-rotation", coupling="spline", hidden_features=64, n_steps=8,
        bound=5.0, spline_affine=False, weight_decay=1.0, start="rotation")
_select("glow-spline-32x4-b5", image_shape=SHAPE, coupling="spline", hidden_features=32,
        n_steps=4, bound=5.0, spline_affine=False)
_select("glow-spline-32x4-b5-permutation", image_shape=SHAPE, coupling="spline",
        hidden_features=32, n_steps=4, bound=5.0, spline_affine=False, start="permutation")


def generation_ms(architecture, batch=128, repeats=20):
    """Median milliseconds of one generator pass (3 levels x 4 steps, batch 128)."""
    prior = FlowPrior(image_shape=SHAPE, architecture=architecture, n_levels=3, n_steps=4,
                      max_epochs=1, device="cpu", random_state=0)
    prior.fit(np.random.RandomState(0).uniform(size=(256, 64)))
    z = torch.randn(batch, 64)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            t = time.perf_counter()
            prior.flow_.inverse(z)
            times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times[3:]))


def timed(fit, *args):
    t, c = time.perf_counter(), time.process_time()
    score, epochs, n_params = fit(*args)
    return {"test_nats": score, "fit_seconds": time.perf_counter() - t,
            "fit_cpu_seconds": time.process_time() - c, "epochs": epochs, "params": n_params}


def run_benchmark(args):
    meta = metadata(seed=list(args.seeds), quick=args.quick)
    train_rows, test_rows = digits()
    epochs = 2 if args.quick else MAX_EPOCHS
    names = args.models or list(MODELS)
    runs = {name: [] for name in names}
    for seed in args.seeds:
        for name in names:
            runs[name].append({"seed": seed, **timed(MODELS[name][1], train_rows, test_rows,
                                                     seed, epochs)})
            print(name, seed, {k: v for k, v in runs[name][-1].items() if k != "seed"},
                  flush=True)
    payload = {"protocol": {"n_train": len(train_rows), "n_test": len(test_rows),
                            "dequantize": WIDTH, "max_epochs": epochs, "patience": PATIENCE},
               "rows": {name: {"label": MODELS[name][0], "flowsk": name not in PEERS,
                               "runs": runs[name]} for name in names},
               "generation_ms": {a: generation_ms(a) for a in ("glow", "chavez")}}
    print(f"wrote {write_results(args.part or 'density', payload, meta)}")


def merge(parts):
    """Join the runs of ``--part`` files (seeds run side by side, one per core, or a seed
    added to an earlier merge: ``--merge density PART``) into results/density.json; a later
    part's run replaces an earlier run of the same row and seed (a row rerun); the meta
    block of each run is kept under ``parts``."""
    results = [read_results(part) for part in parts]
    merged = {**results[0],
              "parts": [m for res in results for m in res.get("parts", [res["meta"]])]}
    for res in results[1:]:
        for name, row in res["rows"].items():
            seeds = {r["seed"] for r in row["runs"]}
            merged["rows"][name]["runs"] = [r for r in merged["rows"][name]["runs"]
                                            if r["seed"] not in seeds] + row["runs"]
    for row in merged["rows"].values():
        row["runs"].sort(key=lambda r: r["seed"])
    meta = {**merged.pop("meta"), "seed": sorted(s for r in results for s in r["meta"]["seed"]),
            "command": " + ".join(r["meta"]["command"] for r in results),
            "load_average_start": max(r["meta"]["load_average_start"] for r in results)}
    print(f"wrote {write_results('density', merged, meta)}")


def run_selection(args):
    names = list(SELECTION) if args.select == ["all"] else args.select
    meta = metadata(seed=0, quick=args.quick)
    train_rows, val_rows = digits(select=True)
    for name in names:
        params = dict(SELECTION[name])
        result = timed(functools.partial(fit_flowprior, **params), train_rows, val_rows, 0,
                       2 if args.quick else MAX_EPOCHS)
        record = {"settings": {k: list(v) if isinstance(v, tuple) else v
                               for k, v in params.items()},
                  "val_nats": result.pop("test_nats"), **result, "date": meta["date"],
                  "commit": meta["commit"]}
        print(name, record, flush=True)
        try:  # read just before writing: selections may run side by side
            records = read_results("density_select")["candidates"]
        except FileNotFoundError:
            records = {}
        records[name] = record
        payload = {"protocol": {"n_fit": len(train_rows), "n_val": len(val_rows)},
                   "candidates": {k: records[k] for k in SELECTION if k in records}}
        print(f"wrote {write_results('density_select', payload, meta)}")


def _mean_std(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(np.mean(values), fmt)} ± {format(np.std(values, ddof=1), fmt)}"


def tables():
    """The README's density tables, from results/density.json and density_select.json."""
    out = {}
    res = read_results("density")
    best = max((n for n, row in res["rows"].items() if row["flowsk"]),
               key=lambda n: np.mean([r["test_nats"] for r in res["rows"][n]["runs"]]))
    body = []
    for name, row in res["rows"].items():
        runs = row["runs"]
        nats = _mean_std([r["test_nats"] for r in runs], ".2f")
        body.append([row["label"], f"**{nats}**" if name == best else nats,
                     _mean_std([r["fit_seconds"] for r in runs], ".1f"),
                     _mean_std([r["fit_cpu_seconds"] for r in runs], ".1f"),
                     _mean_std([r["epochs"] for r in runs], ".0f"),
                     f"{runs[0]['params']:,}" if runs[0]["params"] else "–"])
    seeds = ", ".join(str(s) for s in res["meta"]["seed"])
    gen = res["generation_ms"]
    out["results"] = (markdown_table(["model", "test nats", "fit s", "CPU s", "epochs",
                                      "parameters"], body)
                      + f"\n\nMean ± std over seeds {seeds}; best flowsk prior in bold. "
                      f"Generation at equal depth (3 levels x 4 steps, batch 128, CPU): "
                      f"`glow` {gen['glow']:.1f} ms, `chavez` {gen['chavez']:.1f} ms.\n"
                      + provenance(res["meta"]))
    out["selection"] = _selection_table(read_results("density_select"))
    return out


def _selection_table(sel):
    body = [[name, ", ".join(f"{k}={v}" for k, v in rec["settings"].items()),
             f"{rec['val_nats']:.2f}", f"{rec['fit_cpu_seconds']:.0f}", str(rec["epochs"])]
            for name, rec in sel["candidates"].items()]
    return (markdown_table(["candidate", "settings", "validation nats", "CPU s", "epochs"], body)
            + "\n\n" + provenance(sel["meta"]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", choices=list(MODELS))
    parser.add_argument("--select", nargs="+", choices=[*SELECTION, "all"])
    parser.add_argument("--part", help="write results/PART.json, for --merge")
    parser.add_argument("--merge", nargs="+", metavar="PART")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge)
    elif args.select:
        run_selection(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
