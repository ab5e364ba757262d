"""What every benchmark shares: where results live, the metadata each result file records,
and the Markdown helpers the README tables are rendered with (``benchmarks/report.py``).

A benchmark script writes ``results/NAME.json`` with :func:`write_results` (its payload plus a
``meta`` block: date, machine, threads, load, seed, versions, command line) and defines
``tables() -> {table_name: markdown}`` rendered from that file alone. The README holds each
table between ``<!-- table MODULE/TABLE_NAME -->`` and ``<!-- /table -->``; ``report.py``
rewrites those blocks and the test suite fails when one differs from its JSON. Optional
packages (zuko, normflows, bm3d, dask) are imported inside functions, so ``tables()`` works
with the test extra alone.
"""
import datetime
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch

import flowsk
import flowsk.nn.builders

RESULTS = Path(__file__).resolve().parent / "results"


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=RESULTS.parent, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=RESULTS.parent,
                               timeout=10, check=True).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def training_code(*extra):
    """A digest of the sources a fitted model depends on (``flowsk/nn``, ``flowsk/prior.py``,
    ``flowsk/_training.py`` and ``extra`` paths under ``flowsk/``): cached models store it and
    are refitted when it changes, since a change of an initialisation leaves the estimator's
    parameters equal."""
    package = Path(flowsk.__file__).parent
    files = sorted(package.glob("nn/*.py")) + [package / name
                                               for name in ("prior.py", "_training.py", *extra)]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def metadata(seed, device="cpu", **extra):
    """The ``meta`` block of a result file: call it when the benchmark starts."""
    cuda = device != "cpu" and torch.cuda.is_available()
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "load_average_start": round(os.getloadavg()[0], 2),
        "seed": seed,
        "flowsk_version": flowsk.__version__,
        "torch_version": torch.__version__,
        "commit": _git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **extra,
    }


def write_results(name, payload, meta):
    """Write ``results/NAME.json`` = ``payload`` plus ``meta`` (with the end-of-run load)."""
    meta = {**meta, "load_average_end": round(os.getloadavg()[0], 2)}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, **payload}, indent=1) + "\n")
    return path


def update_results(name, update, meta):
    """Read, change and write ``results/NAME.json`` under a file lock, so that processes
    running parts of one benchmark at once keep each other's rows: ``update(payload) ->
    payload`` gets the file's payload (without its ``meta``; ``{}`` when there is no file),
    and the new payload is written with ``meta``. Returns the path."""
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f".{name}.tmp", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = read_results(name) if (RESULTS / f"{name}.json").exists() else {}
        old.pop("meta", None)
        return write_results(name, update(old), meta)


def read_results(name):
    """The JSON of ``results/NAME.json``."""
    return json.loads((RESULTS / f"{name}.json").read_text())


def markdown_table(header, rows):
    """A Markdown table from a header row and rows of cells (already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(meta):
    """One line naming when and where a result was measured."""
    load = (f"load {meta['load_average_start']}→{meta['load_average_end']}"
            if "load_average_end" in meta else "")
    parts = [f"measured {meta['date']}", meta["machine"],
             f"device {meta['device']}" if meta.get("device", "cpu") != "cpu" else "CPU",
             f"{meta['torch_threads']} torch threads", load, f"seed {meta['seed']}",
             f"flowsk {meta['flowsk_version']}", f"torch {meta['torch_version']}",
             f"`{meta['command']}`"]
    return "<sub>" + ", ".join(p for p in parts if p) + "</sub>"


def edge_flag(value, grid):
    """``value`` formatted, with " (edge)" when it is the first or last value of ``grid`` (a
    hyperparameter search that may want a wider grid)."""
    grid = list(grid)
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text + (" (edge)" if len(grid) > 1 and value in (grid[0], grid[-1]) else "")


def normflows_glow(shape, n_levels, n_steps, hidden_features, learned_base=False, logit=True):
    """normflows' multiscale Glow on ``shape`` (C, H, W), its examples' construction: per level
    ``n_steps`` GlowBlocks of width ``hidden_features`` and a squeeze. ``learned_base``: its
    ``GlowBase`` (learned per-level mean and scale) instead of fixed standard normals;
    ``logit``: the logit (alpha 0.05) flowsk's ``data_range=(0, 1)`` puts at the data end."""
    import normflows as nf

    C, H, W = shape
    q0, merges, flows = [], [], []
    for i in range(n_levels):
        level = [nf.flows.GlowBlock(C * 2 ** (n_levels + 1 - i), hidden_features,
                                    split_mode="channel", scale=True) for _ in range(n_steps)]
        flows.append(level + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            s = 2 ** (n_levels - i)
            latent = (C * s, H // s, W // s)
        else:
            s = 2 ** n_levels
            latent = (C * 2 * s, H // s, W // s)
        q0.append(nf.distributions.GlowBase(latent) if learned_base
                  else nf.distributions.DiagGaussian(latent, trainable=False))
    transform = nf.transforms.Logit(alpha=0.05) if logit else None
    return nf.MultiscaleFlow(q0, flows, merges, transform=transform, class_cond=False)


def linear_start(start):
    """A context in which every architecture's invertible linear layers start at ``start``
    ("permutation" or "rotation"; None: their defaults, ``flowsk.nn.builders.LINEAR_START``),
    for ablations."""
    starts = flowsk.nn.builders.LINEAR_START
    return mock.patch.dict(starts, {} if start is None else dict.fromkeys(starts, start))


def sbc_scores(solver, n_simulations, n_draws, seed=0):
    """Simulation-based calibration of ``solver`` (:func:`flowsk.diagnostics.sbc_ranks` with
    ``misfit=True``): its pixel ranks ``(n_simulations, D)`` and scores: coverage of the rank
    intervals per level, the p-values of pixel-rank and misfit-rank uniformity, the misfit's
    mean fractional rank."""
    from flowsk.diagnostics import LEVELS, rank_coverage, rank_uniformity, sbc_ranks
    R = sbc_ranks(solver, n_simulations, n_draws, misfit=True, random_state=seed)
    R, misfit = R[:, :-1], R[:, -1:]
    return R, {"coverage": dict(zip(map(str, LEVELS), rank_coverage(R, n_draws))),
               "p_uniform": rank_uniformity(R, n_draws),
               "p_misfit": rank_uniformity(misfit, n_draws),
               "misfit_rank_mean": float(misfit.mean() / n_draws)}
