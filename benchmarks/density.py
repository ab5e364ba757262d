"""Density benchmark on digits (issue protocol).

X = (pixels + U[0, 1)) / 17, train_test_split(test_size=0.25, random_state=0); test mean
log-likelihood in nats per image (in that (0, 1) space), fit seconds (wall) and CPU seconds
(all threads; the honest measure when other work shares the machine). Also times generation
of ``glow`` vs ``chavez`` at equal depth. Prints a table; writes results/density.json.

    python benchmarks/density.py [--quick]
"""
import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import train_test_split

from flowsk import FlowPrior

ALPHA = 0.05  # the logit squeeze FlowPrior uses for data_range, applied to zuko's flows too


def data():
    rng = np.random.RandomState(0)
    X = (load_digits().data + rng.uniform(size=(1797, 64))) / 17
    return train_test_split(X, test_size=0.25, random_state=0)


def timed(fit):
    """``(test nats, wall seconds, CPU seconds)`` of ``fit() -> test nats``."""
    t, c = time.time(), time.process_time()
    score = fit()
    return score, time.time() - t, time.process_time() - c


def run_flowprior(Xtr, Xte, **kw):
    return timed(lambda: FlowPrior(data_range=(0, 1), random_state=0, **kw).fit(Xtr)
                 .score(Xte))


def run_gmm(Xtr, Xte):
    return timed(lambda: GaussianMixture(5, covariance_type="full", random_state=0).fit(Xtr)
                 .score(Xte))


def _logit(X):
    u = ALPHA + (1 - 2 * ALPHA) * X
    z = np.log(u) - np.log1p(-u)
    logdet = (math.log(1 - 2 * ALPHA) - np.log(u) - np.log1p(-u)).sum(1)
    return torch.tensor(z, dtype=torch.float32), torch.tensor(logdet, dtype=torch.float32)


def run_zuko(Xtr, Xte, name, max_epochs=200, patience=15):
    return timed(lambda: _fit_zuko(Xtr, Xte, name, max_epochs, patience))


def _fit_zuko(Xtr, Xte, name, max_epochs, patience):
    import zuko
    torch.manual_seed(0)
    tr, va = train_test_split(Xtr, test_size=0.1, random_state=0)
    (ztr, ldtr), (zva, ldva), (zte, ldte) = _logit(tr), _logit(va), _logit(Xte)
    flow = getattr(zuko.flows, name)(features=64, transforms=5, hidden_features=(128, 128))
    opt = torch.optim.Adam(flow.parameters(), 1e-3)
    best, best_state, stale = np.inf, None, 0
    for _ in range(max_epochs):
        for idx in torch.randperm(len(ztr)).split(64):
            loss = -(flow().log_prob(ztr[idx]) + ldtr[idx]).mean()
            opt.zero_grad(), loss.backward(), opt.step()
        with torch.no_grad():
            val = -(flow().log_prob(zva) + ldva).mean().item()
        if val < best:
            best, stale = val, 0
            best_state = {k: v.clone() for k, v in flow.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    flow.load_state_dict(best_state)
    with torch.no_grad():
        return (flow().log_prob(zte) + ldte).mean().item()


def generation_ms(architecture, device="cpu", batch=128, repeats=20):
    prior = FlowPrior(image_shape=(1, 8, 8), architecture=architecture, n_levels=3, n_steps=4,
                      max_epochs=1, device=device, random_state=0)
    prior.fit(np.random.RandomState(0).uniform(size=(256, 64)))
    z = torch.randn(batch, 64, device=prior.device_)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            t = time.perf_counter()
            prior.flow_.inverse(z)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times[3:]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    Xtr, Xte = data()
    epochs = {"max_epochs": 3} if args.quick else {}
    rows = {}
    rows["FlowPrior defaults"] = run_flowprior(Xtr, Xte, **epochs)
    rows["FlowPrior image_shape=(1,8,8)"] = run_flowprior(Xtr, Xte, image_shape=(1, 8, 8),
                                                          **epochs)
    for coupling in ("affine", "additive", "spline", "robust-spline"):
        rows[f"FlowPrior coupling={coupling}"] = run_flowprior(Xtr, Xte, coupling=coupling,
                                                               **epochs)
    rows["GaussianMixture(5, full)"] = run_gmm(Xtr, Xte)
    try:
        for name in ("RealNVP", "NSF"):
            rows[f"zuko {name}"] = run_zuko(Xtr, Xte, name, max_epochs=3 if args.quick else 200)
    except ImportError:
        print("zuko not installed: skipping its rows")
    gen = {arch: generation_ms(arch) for arch in ("glow", "chavez")}
    print(f"{'model':34s} {'test nats':>10s} {'fit s':>7s} {'CPU s':>7s}")
    for name, (ll, sec, cpu) in rows.items():
        print(f"{name:34s} {ll:10.2f} {sec:7.1f} {cpu:7.1f}")
    print("generation, batch 128, CPU, 3 levels x 4 steps: "
          + ", ".join(f"{a} {ms:.2f} ms" for a, ms in gen.items()))
    out = {"machine": f"{platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} threads",
           "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
           "rows": {k: {"test_nats": v[0], "fit_seconds": v[1], "fit_cpu_seconds": v[2]}
                    for k, v in rows.items()},
           "generation_ms_batch128_cpu": gen}
    path = Path(__file__).parent / "results" / "density.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
