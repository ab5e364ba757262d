"""Solver speed: iterations per second, the single-pass log-det, and the distance to the floor.

For the digits prior of ``benchmarks/inverse.py`` (architecture and size as FlowPrior's
defaults; training does not change the speed, so it is fitted for one epoch) on the ``cs16``
task, at batch 32 and 256:

- iterations per second of ``glowip``, ``map`` and ``likelihood``: the time of
  ``predict`` with ``n_iter=N2`` minus that with ``n_iter=N1``, over ``N2 - N1`` (set-up
  costs cancel);
- ``map`` as implemented (``log p(G(z))`` from the generator pass) against a naive ``map``
  that generates ``x = G(z)`` and then evaluates ``log p(x)`` with a second, forward pass;
- the floor: one bare generator pass plus its backward (``G(z).sum().backward()``), timed in
  the same run; the ratio of a ``map`` iteration to it (target <= 1.2).

Runs on CPU, and on CUDA when available (``--device cuda``). Writes results/speed.json.

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
from flowsk.__main__ import demo_tasks
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


def seconds_per_iteration(prior, op, method, Y, n1, n2, repeats):
    """Median over ``repeats`` of ``(t(n2) - t(n1)) / (n2 - n1)`` for ``predict``."""
    def run(n_iter):
        solver = InverseSolver(prior, op, method=method, n_iter=n_iter, random_state=0)
        _sync(prior.device_)
        t = time.perf_counter()
        solver.predict(Y)
        _sync(prior.device_)
        return time.perf_counter() - t

    run(n1)  # warm-up
    return float(np.median([(run(n2) - run(n1)) / (n2 - n1) for _ in range(repeats)]))


def floor_seconds(prior, batch, n, repeats):
    """One bare generator pass and its backward, median over ``repeats`` of ``n`` passes."""
    flow = prior.flow_
    z = torch.zeros(batch, flow.latent_dim, device=prior.device_, requires_grad=True)
    times = []
    for _ in range(repeats + 1):
        _sync(prior.device_)
        t = time.perf_counter()
        for _ in range(n):
            flow.inverse(z)[0].sum().backward()
        _sync(prior.device_)
        times.append((time.perf_counter() - t) / n)
    return float(np.median(times[1:]))


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
    n1, n2, repeats = (2, 6, 2) if args.quick else (5, 25, 3)
    rows = {}
    for batch in (32, 256):
        X = np.resize(X_test, (batch, X_test.shape[1]))
        Y = op.measure(X, noise_std=noise, random_state=0)
        row = {m: seconds_per_iteration(prior, op, m, Y, n1, n2, repeats)
               for m in ("glowip", "map", "map-naive", "likelihood")}
        row["floor"] = floor_seconds(prior, batch, n2, repeats)
        rows[batch] = row
        print(f"batch {batch}: " + ", ".join(f"{k} {1 / v:.0f} it/s" for k, v in row.items())
              + f"; map/naive {row['map'] / row['map-naive']:.2f}, "
                f"map/floor {row['map'] / row['floor']:.2f}", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "device": args.device,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"
                      if args.device == "cpu" else torch.cuda.get_device_name(),
           "architecture": "glow (1, 8, 8)" if args.image else "mlp",
           "seconds_per_iteration": rows,
           "map_over_floor": {b: r["map"] / r["floor"] for b, r in rows.items()},
           "map_over_naive": {b: r["map"] / r["map-naive"] for b, r in rows.items()}}
    name = f"speed-{args.device}{'-image' if args.image else ''}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
