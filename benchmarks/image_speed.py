"""Speed and memory at image size.

- **Training step** (forward, backward, optimizer step) at batch 64 for flowsk's ``glow``,
  ``realnvp`` and ``chavez`` at 1x16x16, 1x32x32 and 3x32x32, against normflows' Glow of the
  same levels, steps and width (FlowPrior's image defaults; parameter counts side by side).
  flowsk's step is the training loop's own (:func:`flowsk._training.train_step`: AdamW, fused,
  with gradient clipping), normflows' the one its examples use (Adam). Each time is the
  fastest of several repeats, each the mean of a few steps; the repeats cycle through all
  models of a size. Ratios are flowsk / normflows, of wall and of CPU seconds.
- **Ablation** at 1x32x32 (``glow``): each optimisation switched off in turn (conditioners
  channels-last, fused AdamW, ActNorm fused into the 1x1 convolution), in one cycle.
- **Profile**: ``torch.profiler`` of the ``glow`` step at 3x32x32 (share of self CPU time by
  op), and the time of the parts the issue names (LU weight, logit) measured alone.
- **Solver**: the iteration of ``glowip`` / ``map`` / ``likelihood`` at 1x32x32, batch 32,
  against the floor (one bare generator pass plus its backward), as ``benchmarks/speed.py``
  measures it; and the floor with the inverse 1x1 convolutions read from a cached buffer
  instead of solved from the weights.
- **Memory**: a subprocess fits a FlowPrior on a memory-mapped float32 ``.npy`` of 100,000
  3x32x32 images for a few hundred steps; its peak resident memory against the array's size
  plus 1.5 GB.
- ``--activation``: only the digits density of the ``glow`` prior with SiLU and with ReLU
  conditioners (two seeds), the price of the faster activation; writes
  results/image_speed-activation.json.
- ``--compile``: also ``torch.compile`` of the loss at 1x16x16 (compile seconds, step time).
- ``--device cuda``: the GPU table instead: training step at 3x32x32 and 3x64x64 and the
  ``map`` iteration at batch 32 / 256, flowsk ``glow`` against normflows' Glow, both L=3, K=8,
  width 256; writes results/image_speed-cuda.json.

Run on one core (``OMP_NUM_THREADS=1``). Writes results/image_speed.json.

    python benchmarks/image_speed.py [--quick] [--compile] [--device cpu|cuda]
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from _common import (
    RESULTS,
    markdown_table,
    metadata,
    normflows_glow,
    provenance,
    read_results,
    write_results,
)

from flowsk import FlowPrior
from flowsk._training import make_optimizer, param_groups, train_step
from flowsk.nn.base import Chain
from flowsk.nn.builders import build_flow
from flowsk.nn.linear import ActNormLinear, InvertibleLinear
from flowsk.nn.multiscale import Logit
from flowsk.nn.networks import CNN

NAME = "image_speed"
BATCH = 64
ARCHITECTURES = ("glow", "realnvp", "chavez")
SIZES = ((1, 16, 16), (1, 32, 32), (3, 32, 32))
MEMORY_N = 100_000
MEMORY_BUDGET_GB = 1.5
GPU_SIZES = ((3, 32, 32), (3, 64, 64))
GPU_CONFIG = {"n_levels": 3, "n_steps": 8, "hidden_features": 256}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def shape_name(shape):
    return "x".join(map(str, shape))


def default_config(shape):
    """FlowPrior's image defaults: levels, steps, width."""
    prior = FlowPrior(image_shape=shape)
    return {"n_levels": prior.n_levels, "n_steps": prior._setting("n_steps"),
            "hidden_features": prior._setting("hidden_features")}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# -- the models --------------------------------------------------------------------------------
def flowsk_flow(shape, architecture, config, device):
    """The flow a FlowPrior with ``data_range=(0, 1)`` builds, in training mode."""
    return build_flow(int(np.prod(shape)), image_shape=shape, architecture=architecture,
                      data_range=(0, 1), random_state=0, **config).to(device).train()


def _nll(flow, batch):
    return -flow.log_prob(batch).mean()


def flowsk_step(flow, x, optimizer=None):
    """flowsk's training step on ``x``: the loop's :func:`train_step` (loss checked every step
    on the CPU, every 16th on a GPU, as the loop does)."""
    optimizer = optimizer or make_optimizer(flow, 1e-3, 1e-4)
    params = [p for p in flow.parameters() if p.requires_grad]
    every = 1 if x.device.type == "cpu" else 16
    count = [0]

    def step():
        count[0] += 1
        loss = train_step(flow, _nll, x, optimizer, params, 10.0, check=count[0] % every == 0)
        if loss is None:
            raise FloatingPointError("flowsk's loss went non-finite")
    return step


def normflows_step(model, x):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        loss = -model.log_prob(x, None).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def time_steps(steps, repeats, per_timing, device):
    """Fastest wall and CPU seconds per call of each ``steps[name]()``: ``repeats`` timings of
    ``per_timing`` calls each, cycling through the names (after two warm-up calls each)."""
    for step in steps.values():
        step(), step()
    wall, cpu = {k: [] for k in steps}, {k: [] for k in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            for _ in range(per_timing):
                step()
            _sync(device)
            wall[name].append((time.perf_counter() - t) / per_timing)
            cpu[name].append((time.process_time() - c) / per_timing)
    return {k: min(v) for k, v in wall.items()}, {k: min(v) for k, v in cpu.items()}


def data(shape, device, n=BATCH, seed=0):
    rng = np.random.RandomState(seed)
    return torch.as_tensor(rng.uniform(0.02, 0.98, (n, int(np.prod(shape)))),
                           dtype=torch.float32, device=device)


# -- training step table -----------------------------------------------------------------------
def training_table(sizes, architectures, repeats, per_timing, device, config_of=default_config):
    rows = []
    for shape in sizes:
        config = config_of(shape)
        x = data(shape, device)
        flows = {a: flowsk_flow(shape, a, config, device) for a in architectures}
        reference = normflows_glow(shape, **config).to(device)
        steps = {a: flowsk_step(f, x) for a, f in flows.items()}
        steps["normflows"] = normflows_step(reference, x.view(-1, *shape))
        wall, cpu = time_steps(steps, repeats, per_timing, device)
        for a in architectures:
            rows.append({"shape": shape_name(shape), "model": a, **config,
                         "params": n_params(flows[a]), "normflows_params": n_params(reference),
                         "ms": 1e3 * wall[a], "cpu_ms": 1e3 * cpu[a],
                         "normflows_ms": 1e3 * wall["normflows"],
                         "normflows_cpu_ms": 1e3 * cpu["normflows"],
                         "ratio": wall[a] / wall["normflows"],
                         "cpu_ratio": cpu[a] / cpu["normflows"]})
            print(f"{shape_name(shape)} {a}: {1e3 * wall[a]:.1f} ms vs normflows "
                  f"{1e3 * wall['normflows']:.1f} ms, ratio {rows[-1]['ratio']:.2f} "
                  f"(CPU {rows[-1]['cpu_ratio']:.2f}); params {rows[-1]['params']} vs "
                  f"{rows[-1]['normflows_params']}", flush=True)
    return rows


# -- ablation: each optimisation off ------------------------------------------------------------
def _plain_cnn_forward(self, x, context=None):
    return self.net(x)


def _nchw_conditioners(flow):
    """The conditioners in the default NCHW layout."""
    for m in flow.modules():
        if isinstance(m, CNN):
            m.net.to(memory_format=torch.contiguous_format)
            m.forward = types.MethodType(_plain_cnn_forward, m)
    return flow


_OTHER_ACTIVATION = {torch.nn.SiLU: torch.nn.ReLU, torch.nn.ReLU: torch.nn.SiLU}


def _shipped_activation():
    return next(type(m) for m in CNN(1, 1, 1).net if type(m) in _OTHER_ACTIVATION).__name__


def _other_activation(flow):
    """The conditioners with SiLU and ReLU exchanged."""
    for m in flow.modules():
        if isinstance(m, CNN):
            for i, layer in enumerate(m.net):
                if type(layer) in _OTHER_ACTIVATION:
                    m.net[i] = _OTHER_ACTIVATION[type(layer)]()
    return flow


def _unfused(flow):
    """Each ActNormLinear replaced by its two layers, ActNorm then InvertibleLinear."""
    for m in flow.modules():
        if isinstance(m, Chain):
            m.layers = torch.nn.ModuleList(
                part for layer in m.layers
                for part in ((layer.norm, layer.mix) if isinstance(layer, ActNormLinear)
                             else (layer,)))
    return flow


def _foreach_adamw(flow):
    return torch.optim.AdamW(param_groups(flow, 1e-4), lr=1e-3, foreach=True)


def ablation(shape, repeats, per_timing, device):
    config = default_config(shape)
    x = data(shape, device)

    def variant(edit=lambda f: f, optimizer=None):
        flow = edit(flowsk_flow(shape, "glow", config, device))
        return flowsk_step(flow, x, optimizer(flow) if optimizer else None)

    shipped = _shipped_activation()
    other = "ReLU" if shipped == "SiLU" else "SiLU"
    steps = {
        "flowsk (as shipped)": variant(),
        "conditioners in NCHW": variant(_nchw_conditioners),
        "AdamW foreach, not fused": variant(optimizer=_foreach_adamw),
        "ActNorm and 1x1 conv as two layers": variant(_unfused),
        "all three (the earlier code)": variant(lambda f: _unfused(_nchw_conditioners(f)),
                                                _foreach_adamw),
        f"{other} conditioners, not {shipped}": variant(_other_activation),
        "normflows Glow": normflows_step(normflows_glow(shape, **config).to(device),
                                         x.view(-1, *shape)),
    }
    wall, cpu = time_steps(steps, repeats, per_timing, device)
    base = wall["flowsk (as shipped)"]
    rows = [{"variant": k, "ms": 1e3 * v, "cpu_ms": 1e3 * cpu[k], "vs_shipped": v / base}
            for k, v in wall.items()]
    for r in rows:
        print(f"ablation {shape_name(shape)}: {r['variant']}: {r['ms']:.1f} ms "
              f"({r['vs_shipped']:.2f}x)", flush=True)
    return {"shape": shape_name(shape), "model": "glow", **config, "rows": rows}


# -- profile -----------------------------------------------------------------------------------
def _seconds(fn, repeats=20):
    fn()
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def profile(shape, device, n_ops=12):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    config = default_config(shape)
    x = data(shape, device)
    flow = flowsk_flow(shape, "glow", config, device)
    step = flowsk_step(flow, x)
    for _ in range(3):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n_ops]
    ops = [{"op": e.key, "self_cpu_pct": 100 * e.self_cpu_time_total / total,
            "calls_per_step": e.count / 3} for e in top]
    step_s = _seconds(step, 5)

    linears = [m for m in flow.modules() if isinstance(m, InvertibleLinear)]

    def lu_weights():
        sum(layer.weight().sum() for layer in linears).backward()

    logit = next(m for m in flow.modules() if isinstance(m, Logit))
    x_grad = x.clone().requires_grad_(True)

    def logit_pass():
        z, logdet = logit(x_grad)
        (z.sum() + logdet.sum()).backward()

    parts = {"lu_weight_ms": 1e3 * _seconds(lu_weights), "logit_ms": 1e3 * _seconds(logit_pass),
             "step_ms": 1e3 * step_s}
    print(f"profile {shape_name(shape)} glow: " + ", ".join(
        f"{o['op']} {o['self_cpu_pct']:.1f} %" for o in ops[:6]) + "; " + ", ".join(
        f"{k} {v:.2f}" for k, v in parts.items()), flush=True)
    return {"shape": shape_name(shape), "model": "glow", **config, "top_ops": ops, **parts}


def compile_timing(shape, repeats, per_timing, device):
    """``torch.compile`` of the loss: compile seconds and the compiled step against eager."""
    config = default_config(shape)
    x = data(shape, device)
    eager = flowsk_flow(shape, "glow", config, device)
    compiled = flowsk_flow(shape, "glow", config, device)
    _nll(compiled, x).backward()  # ActNorm's initialisation, eagerly
    loss = torch.compile(_nll)
    optimizer = make_optimizer(compiled, 1e-3, 1e-4)
    params = list(compiled.parameters())
    t = time.perf_counter()
    train_step(compiled, loss, x, optimizer, params, 10.0)
    compile_s = time.perf_counter() - t
    steps = {"eager": flowsk_step(eager, x),
             "compiled": lambda: train_step(compiled, loss, x, optimizer, params, 10.0)}
    wall, _ = time_steps(steps, repeats, per_timing, device)
    out = {"shape": shape_name(shape), "compile_s": compile_s, "eager_ms": 1e3 * wall["eager"],
           "compiled_ms": 1e3 * wall["compiled"], "ratio": wall["compiled"] / wall["eager"]}
    print(f"torch.compile {shape_name(shape)}: compile {compile_s:.0f} s, step "
          f"{out['compiled_ms']:.1f} ms vs eager {out['eager_ms']:.1f} ms", flush=True)
    return out


# -- solver ------------------------------------------------------------------------------------
def fitted_prior(shape, device, n=640, **kw):
    """A FlowPrior with the image defaults, fitted one epoch (speed does not depend on
    training)."""
    X = data(shape, "cpu", n=n, seed=1).numpy()
    return FlowPrior(image_shape=shape, data_range=(0, 1), max_epochs=1, random_state=0,
                     device=device, **kw).fit(X), X


def _buffer_inverse(self):
    """``InvertibleLinear.inverse_matrix`` reading the cached buffer (what the ONNX export
    runs)."""
    return self.weight_inverse


def solver(shape, batch, n1, n2, repeats, device):
    from speed import floor_seconds, timings

    from flowsk.operators import RandomMask

    prior, X = fitted_prior(shape, device)
    prior.flow_.requires_grad_(False)
    op = RandomMask(shape, 0.5, random_state=0)
    Y = op.measure(X[:batch], noise_std=0.01, random_state=0)
    seconds = timings(prior, op, Y, ("glowip", "map", "likelihood"), n1, n2, repeats)
    fresh, cached = [], []
    for _ in range(repeats):
        fresh.append(floor_seconds(prior, batch, n2 - n1))
        InvertibleLinear.inverse_matrix, real = _buffer_inverse, InvertibleLinear.inverse_matrix
        try:
            cached.append(floor_seconds(prior, batch, n2 - n1))
        finally:
            InvertibleLinear.inverse_matrix = real
    out = {"shape": shape_name(shape), "batch": batch, "operator": "RandomMask(p=0.5)",
           "n_iter": [n1, n2], "ms_per_iteration": {k: 1e3 * v for k, v in seconds.items()},
           "over_floor": {k: v / seconds["floor"] for k, v in seconds.items() if k != "floor"},
           "floor_fresh_inverse_ms": 1e3 * min(fresh),
           "floor_cached_inverse_ms": 1e3 * min(cached)}
    print(f"solver {shape_name(shape)} batch {batch}: " + ", ".join(
        f"{k} {v:.1f} ms" for k, v in out["ms_per_iteration"].items()) + "; over floor "
        + ", ".join(f"{k} {v:.2f}" for k, v in out["over_floor"].items())
        + f"; floor with cached inverse {out['floor_cached_inverse_ms']:.1f} ms", flush=True)
    return out


# -- memory ------------------------------------------------------------------------------------
MEMORY_PRIOR = {"architecture": "glow", "n_levels": 2, "n_steps": 1, "hidden_features": 8,
                "batch_size": 256, "max_epochs": 1, "validation_fraction": 0.02}


def _rss_gb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def memory_child(path):
    """Fit on the memory map at ``path``; print a JSON line of memory and time."""
    baseline = _rss_gb()
    X = np.load(path, mmap_mode="r")
    shape = (3, 32, 32)
    prior = FlowPrior(image_shape=shape, data_range=(0, 1), random_state=0, device="cpu",
                      **MEMORY_PRIOR)
    t, c = time.perf_counter(), time.process_time()
    prior.fit(X)
    out = {"baseline_rss_gb": baseline,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "fit_s": time.perf_counter() - t, "fit_cpu_s": time.process_time() - c,
           "steps": int(np.ceil(len(X) * (1 - MEMORY_PRIOR["validation_fraction"])
                                / MEMORY_PRIOR["batch_size"]))}
    print(json.dumps(out))


def memory(n):
    """Write a float32 ``.npy`` of ``n`` 3x32x32 images and fit on it in a subprocess."""
    d = 3 * 32 * 32
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
        rng = np.random.RandomState(0)
        for start in range(0, n, 5000):
            stop = min(n, start + 5000)
            out[start:stop] = rng.uniform(0.02, 0.98, (stop - start, d))
        out.flush()
        del out
        array_gb = n * d * 4 / 2**30
        proc = subprocess.run([sys.executable, __file__, "--memory-child", str(path)],
                              capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    budget = array_gb + MEMORY_BUDGET_GB
    result.update({"n": n, "shape": "3x32x32", "array_gb": array_gb, "budget_gb": budget,
                   "within_budget": result["peak_rss_gb"] <= budget, "prior": MEMORY_PRIOR})
    print(f"memory: array {array_gb:.2f} GB, peak RSS {result['peak_rss_gb']:.2f} GB "
          f"(budget {budget:.2f} GB), {result['steps']} steps, fit {result['fit_s']:.0f} s",
          flush=True)
    return result


# -- GPU ---------------------------------------------------------------------------------------
def normflows_map_step(model, op, y, batch, device, sigma=0.1):
    """One ``map`` iteration in normflows' latent space (a list of per-level latents)."""
    z = [q.sample(batch).mul_(0.1).requires_grad_(True) for q in model.q0]
    optimizer = torch.optim.Adam(z, lr=0.05)

    def step():
        x, logdet = model.forward_and_log_det(z)
        log_px = sum(q.log_prob(zi) for q, zi in zip(model.q0, z)) - logdet
        r = op(x.reshape(batch, -1)) - y
        loss = ((r * r).sum(1) / (2 * sigma**2) - log_px).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def flowsk_map_step(prior, op, y, batch, sigma=0.1):
    """One iteration of flowsk's ``map`` loop (the objective of ``flowsk.methods.latent.MAP``
    and the best-iterate bookkeeping of ``LatentOptimization.optimize``)."""
    flow = prior.flow_
    z = (0.1 * torch.randn(batch, flow.latent_dim, device=y.device)).requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=0.05)
    best, best_z = torch.full((batch,), torch.inf, device=y.device), z.detach().clone()

    def step():
        nonlocal best, best_z
        x, log_px = flow.generate(z)
        r = op(x) - y
        objective = (r * r).sum(1) / (2 * sigma**2) - log_px
        with torch.no_grad():
            better = torch.isfinite(objective) & (objective < best)
            best = torch.where(better, objective, best)
            best_z = torch.where(better[:, None], z, best_z)
        optimizer.zero_grad(set_to_none=True)
        objective.sum().backward()
        optimizer.step()
    return step


def gpu_tables(device, sizes, config, batches, repeats, per_timing):
    from flowsk.operators import RandomMask

    train_rows = training_table(sizes, ("glow",), repeats, per_timing, device,
                                config_of=lambda shape: config)
    solver_rows = []
    for shape in sizes:
        prior, X = fitted_prior(shape, device, **config)
        prior.flow_.requires_grad_(False)
        reference = normflows_glow(shape, **config).to(device)
        reference(torch.as_tensor(X[:BATCH], device=device).view(-1, *shape))  # ActNorm init
        reference.requires_grad_(False)
        op = RandomMask(shape, 0.5, random_state=0).to(device)
        for batch in batches:
            y = op(torch.as_tensor(np.resize(X, (batch, X.shape[1])), device=device))
            steps = {"flowsk": flowsk_map_step(prior, op, y, batch),
                     "normflows": normflows_map_step(reference, op, y, batch, device)}
            wall, _ = time_steps(steps, repeats, per_timing, device)
            solver_rows.append({"shape": shape_name(shape), "batch": batch,
                                "flowsk_ms": 1e3 * wall["flowsk"],
                                "normflows_ms": 1e3 * wall["normflows"],
                                "ratio": wall["flowsk"] / wall["normflows"]})
            print(f"map iteration {shape_name(shape)} batch {batch}: flowsk "
                  f"{1e3 * wall['flowsk']:.1f} ms, normflows {1e3 * wall['normflows']:.1f} ms",
                  flush=True)
    return {"config": config, "training": train_rows, "map_iteration": solver_rows}


# -- activation ------------------------------------------------------------------------------
def activation_density(seeds=(0, 1)):
    """Digits (``benchmarks/density.py``'s split): test nats of the default ``glow`` image prior
    with the shipped conditioner activation and with the other one, and fit seconds."""
    from density import data

    import flowsk.nn.networks as networks

    Xtr, Xte = data()
    shipped = _shipped_activation()
    real_init = networks.CNN.__init__

    def other_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        _other_activation(self)

    rows = []
    for seed in seeds:
        for name, init in ((shipped, real_init),
                           ("ReLU" if shipped == "SiLU" else "SiLU", other_init)):
            networks.CNN.__init__ = init
            try:
                t, c = time.perf_counter(), time.process_time()
                prior = FlowPrior(data_range=(0, 1), image_shape=(1, 8, 8),
                                  random_state=seed).fit(Xtr)
                rows.append({"activation": name, "shipped": name == shipped, "seed": seed,
                             "test_nats": prior.score(Xte), "epochs": len(prior.history_[
                                 "val_loss"]), "fit_s": time.perf_counter() - t,
                             "fit_cpu_s": time.process_time() - c})
            finally:
                networks.CNN.__init__ = real_init
            print(f"activation {name}, seed {seed}: {rows[-1]['test_nats']:.2f} nats, "
                  f"fit {rows[-1]['fit_s']:.0f} s", flush=True)
    return {"rows": rows}


# -- tables ------------------------------------------------------------------------------------
def _f(v, digits=1):
    return f"{v:.{digits}f}"


def tables():
    r = read_results(NAME)
    prov = provenance(r["meta"])
    out = {}
    out["training"] = markdown_table(
        ["size", "flowsk model", "levels / steps / width", "params flowsk / normflows",
         "flowsk ms", "normflows Glow ms", "ratio (wall)", "ratio (CPU)"],
        [[row["shape"], f"`{row['model']}`",
          f"{row['n_levels']} / {row['n_steps']} / {row['hidden_features']}",
          f"{row['params']:,} / {row['normflows_params']:,}", _f(row["ms"]),
          _f(row["normflows_ms"]), _f(row["ratio"], 2), _f(row["cpu_ratio"], 2)]
         for row in r["training"]]) + "\n\n" + prov
    a = r["ablation"]
    out["ablation"] = markdown_table(
        [f"`glow` {a['shape']}, batch {BATCH}", "ms per step", "CPU ms", "vs shipped"],
        [[row["variant"], _f(row["ms"]), _f(row["cpu_ms"]), _f(row["vs_shipped"], 2)]
         for row in a["rows"]]) + "\n\n" + prov
    p = r["profile"]
    out["profile"] = markdown_table(
        [f"op (`glow` {p['shape']} step, {_f(p['step_ms'])} ms)", "self CPU %",
         "calls per step"],
        [[f"`{o['op']}`", _f(o["self_cpu_pct"]), _f(o["calls_per_step"], 0)]
         for o in p["top_ops"]]) + "\n\n" + prov
    s = r["solver"]
    names = [k for k in s["ms_per_iteration"] if k != "floor"]
    out["solver"] = markdown_table(
        ["size, batch", *[f"`{k}` ms" for k in names], "floor ms",
         *[f"`{k}` / floor" for k in names], "floor, cached inverse ms"],
        [[f"{s['shape']}, {s['batch']}", *[_f(s["ms_per_iteration"][k]) for k in names],
          _f(s["ms_per_iteration"]["floor"]), *[_f(s["over_floor"][k], 2) for k in names],
          _f(s["floor_cached_inverse_ms"])]]) + "\n\n" + prov
    m = r["memory"]
    out["memory"] = markdown_table(
        ["data", "array GB", "peak RSS GB", "budget GB", "RSS after imports GB", "steps",
         "fit s (CPU s)"],
        [[f"{m['n']:,} x {m['shape']} float32 memory map", _f(m["array_gb"], 2),
          _f(m["peak_rss_gb"], 2), _f(m["budget_gb"], 2), _f(m["baseline_rss_gb"], 2),
          m["steps"], f"{_f(m['fit_s'], 0)} ({_f(m['fit_cpu_s'], 0)})"]]) + "\n\n" + prov
    if (RESULTS / f"{NAME}-activation.json").exists():
        act = read_results(f"{NAME}-activation")
        out["activation"] = markdown_table(
            ["conditioner activation", "seed", "digits test nats", "epochs", "fit s (CPU s)"],
            [[row["activation"] + (" (shipped)" if row["shipped"] else ""), row["seed"],
              _f(row["test_nats"], 2), row["epochs"],
              f"{_f(row['fit_s'], 0)} ({_f(row['fit_cpu_s'], 0)})"] for row in act["rows"]]
        ) + "\n\n" + provenance(act["meta"])
    if (RESULTS / f"{NAME}-cuda.json").exists():
        g = read_results(f"{NAME}-cuda")
        c = g["config"]
        rows = [[row["shape"], "training step, batch 64", _f(row["ms"]),
                 _f(row["normflows_ms"]), _f(row["ratio"], 2)] for row in g["training"]]
        rows += [[row["shape"], f"`map` iteration, batch {row['batch']}", _f(row["flowsk_ms"]),
                  _f(row["normflows_ms"]), _f(row["ratio"], 2)] for row in g["map_iteration"]]
        out["gpu"] = markdown_table(
            ["size", f"`glow` L={c['n_levels']} K={c['n_steps']} width {c['hidden_features']}",
             "flowsk ms", "normflows ms", "ratio"], rows) + "\n\n" + provenance(g["meta"])
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu-table", action="store_true",
                        help="the GPU table on --device (implied by --device cuda)")
    parser.add_argument("--activation", action="store_true",
                        help="only the digits density of SiLU vs ReLU conditioners")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    device = torch.device(args.device)
    torch.manual_seed(0)
    meta = metadata(seed=0, device=args.device)
    repeats, per_timing = (2, 1) if args.quick else (7, 3)
    if args.activation:
        print(f"wrote {write_results(NAME + '-activation', activation_density(), meta)}")
        return None
    if device.type == "cuda" or args.gpu_table:
        sizes = ((3, 8, 8),) if args.quick else GPU_SIZES
        config = {"n_levels": 2, "n_steps": 2, "hidden_features": 16} if args.quick \
            else GPU_CONFIG
        payload = gpu_tables(device, sizes, config, (32, 256), repeats, 5 * per_timing)
        name = f"{NAME}-{device.type}{'-quick' if args.quick else ''}"
        print(f"wrote {write_results(name, payload, meta)}")
        return None
    sizes = ((1, 8, 8), (3, 8, 8)) if args.quick else SIZES
    payload = {"batch": BATCH, "repeats": repeats, "steps_per_timing": per_timing,
               "training": training_table(sizes, ARCHITECTURES, repeats, per_timing, device)}
    payload["ablation"] = ablation(sizes[-2], repeats, per_timing, device)
    payload["profile"] = profile(sizes[-1], device)
    payload["solver"] = solver(sizes[-2], 32, *((2, 4) if args.quick else (5, 25)), repeats,
                               device)
    if args.compile:
        payload["compile"] = compile_timing(sizes[0], repeats, per_timing, device)
    payload["memory"] = memory(2000 if args.quick else MEMORY_N)
    path = write_results(NAME + ("-quick" if args.quick else ""), payload, meta)
    print(f"wrote {path}")
    return None


if __name__ == "__main__":
    main()
