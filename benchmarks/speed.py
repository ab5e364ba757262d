"""Solver speed: iterations per second, the single-pass log-det, and the distance to the floor.

For the digits prior of ``benchmarks/inverse.py`` (architecture and size as FlowPrior's
defaults; training does not change the speed, so it is fitted for one epoch) on the ``cs16``
task, at batch 32 and 256:

- iterations per second of ``glowip``, ``map`` and ``likelihood``: the time of
  ``predict`` with ``n_iter=N2`` minus that with ``n_iter=N1``, over ``N2 - N1`` (set-up
  costs cancel);
- ``map`` as implemented (``log p(G(z))`` from the generator pass) against a naive ``map``
  that generates ``x = G(z)`` and then evaluates ``log p(x)`` with a second, forward pass;
- the floor: one bare generator pass plus its backward (``G(z).sum().backward()``); the ratio
  of a ``map`` iteration to it (target <= 1.2);
- seconds of ``predict`` on 500 observations with each latent method's defaults (required:
  under a minute on 2 cores).

Every time is the fastest of several repeats, which cycle through all methods.

Runs on CPU, and on CUDA when available (``--device cuda``). Writes
results/speed-<device>[-image].json.

    python benchmarks/speed.py [--quick] [--device cpu|cuda] [--image]
"""
import argparse
import json
import platform
import time

import numpy as np
import torch
from inverse import RESULTS, digits_split

from flowsk import FlowPrior, InverseSolver
from flowsk.demo import demo_tasks
from flowsk.methods import METHODS
from flowsk.methods.latent import MAP


class NaiveMAP(MAP):
    """``map`` with ``log p(x)`` from a second pass: ``x = G(z)``, then ``log p(x)`` via
    ``G^{-1}`` -- what a flow library without a generator log-det forces."""

    needs_log_prob = False

    def objective(self, problem, x, log_px, z, y):
        return super().objective(problem, x, problem.flow.log_prob(x), z, y)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def solver_seconds(prior, op, method, Y, n_iter):
    """Wall seconds of ``predict`` with ``n_iter`` iterations."""
    solver = InverseSolver(prior, op, method=method, n_iter=n_iter, random_state=0)
    _sync(prior.device_)
    t = time.perf_counter()
    solver.predict(Y)
    _sync(prior.device_)
    return time.perf_counter() - t


def floor_seconds(prior, batch, n):
    """Seconds of one bare generator pass and its backward, averaged over ``n`` passes."""
    z = torch.zeros(batch, prior.flow_.latent_dim, device=prior.device_, requires_grad=True)
    _sync(prior.device_)
    t = time.perf_counter()
    for _ in range(n):
        prior.flow_.inverse(z)[0].sum().backward()
    _sync(prior.device_)
    return (time.perf_counter() - t) / n


def timings(prior, op, Y, methods, n1, n2, repeats):
    """Seconds per iteration per method (and of the "floor"): ``(t(n2) - t(n1)) / (n2 - n1)``
    so that set-up costs cancel, each ``t`` the fastest of ``repeats`` runs (interference from
    the rest of the machine only ever adds time). Repeats cycle through all methods, so a
    slow spell of the machine cannot favour one of them."""
    runs = {m: {n1: [], n2: []} for m in methods}
    floor = []
    for m in methods:  # warm-up
        solver_seconds(prior, op, m, Y, n1)
    for _ in range(repeats):
        for m in methods:
            for n in (n1, n2):
                runs[m][n].append(solver_seconds(prior, op, m, Y, n))
        floor.append(floor_seconds(prior, len(Y), n2 - n1))
    seconds = {m: (min(r[n2]) - min(r[n1])) / (n2 - n1) for m, r in runs.items()}
    seconds["floor"] = min(floor)
    return seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image", action="store_true",
                        help="the glow image prior (image_shape=(1, 8, 8)) instead of mlp")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    METHODS["map-naive"] = NaiveMAP
    X_fit, _, X_test, shape = digits_split()
    prior = FlowPrior(data_range=(0, 1), image_shape=shape if args.image else None,
                      max_epochs=1, random_state=0, device=args.device).fit(X_fit)
    prior.flow_.requires_grad_(False)
    op, noise = demo_tasks(shape)["cs16"]
    n1, n2, repeats = (2, 6, 2) if args.quick else (10, 110, 7)
    rows = {}
    for batch in (32, 256):
        X = np.resize(X_test, (batch, X_test.shape[1]))
        Y = op.measure(X, noise_std=noise, random_state=0)
        row = rows[batch] = timings(
            prior, op, Y, ("glowip", "map", "map-naive", "likelihood"), n1, n2, repeats)
        print(f"batch {batch}: " + ", ".join(f"{k} {1 / v:.0f} it/s" for k, v in row.items())
              + f"; map/naive {row['map'] / row['map-naive']:.2f}, "
                f"map/floor {row['map'] / row['floor']:.2f}", flush=True)
    Y = op.measure(np.resize(X_test, (500, X_test.shape[1])), noise_std=noise, random_state=0)
    predict_500 = {m: solver_seconds(prior, op, m, Y, None)
                   for m in ("csgm", "glowip", "map", "likelihood")}
    print("predict on 500 observations, defaults: "
          + ", ".join(f"{m} {t:.1f} s" for m, t in predict_500.items()), flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "device": args.device,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"
                      if args.device == "cpu" else torch.cuda.get_device_name(),
           "architecture": "glow (1, 8, 8)" if args.image else "mlp",
           "repeats": repeats, "seconds_per_iteration": rows,
           "map_over_floor": {b: r["map"] / r["floor"] for b, r in rows.items()},
           "map_over_naive": {b: r["map"] / r["map-naive"] for b, r in rows.items()},
           "predict_500_seconds": predict_500}
    name = f"speed-{args.device}{'-image' if args.image else ''}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
