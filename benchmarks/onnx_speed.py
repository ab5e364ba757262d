"""Decoder speed: onnxruntime vs PyTorch eager, on digits FlowPriors.

Two priors are fitted on 512 of the embedded digits (speed does not depend on training, so
one epoch by default): the default architecture for vector data (``mlp``) and for
``image_shape=(1, 8, 8)`` (``glow``), both with ``data_range=(0, 1)``. Their decoders (z -> x)
are exported with ``exporters.to_onnx`` and timed

- at batch 1: latency, the median of many calls;
- at batch 256: throughput, samples per second from the median call.

Each call takes a NumPy array and returns one (``torch.from_numpy`` / ``.numpy()`` for
PyTorch), and the two runtimes alternate in rounds, so both see the same machine load. On the
CPU both get the same thread count (``torch.set_num_threads`` and onnxruntime's
``intra_op_num_threads``, its threads not spinning between calls): 2 by default, then 1 for
comparison (a loaded machine can stall multi-threaded eager PyTorch, whose many tiny ops each
enter its thread pool). Target: onnxruntime at
most 0.5x PyTorch's batch-1 latency on the CPU.

    python benchmarks/onnx_speed.py [--threads 2 1] [--max-epochs 1]
    python benchmarks/onnx_speed.py --device cuda   # PyTorch CUDA vs CUDAExecutionProvider

Writes ``benchmarks/results/onnx_speed-<device>.json`` (a file per device, so CPU and CUDA
runs are kept side by side) and prints its table.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import markdown_table, metadata, provenance, read_results, write_results

from exporters import check_onnx, to_onnx
from exporters.onnx import FlowDecoder, _cpu_copy
from flowsk import FlowPrior
from flowsk.datasets import load_digit_images

TARGET = 0.5
MODELS = {"mlp (vector, 64)": None, "glow (image, 1x8x8)": (1, 8, 8)}


def fit_priors(max_epochs, n_train=512):
    """Default-architecture priors, fitted briefly (one thread: quick on a loaded machine)."""
    X, _ = load_digit_images()
    X = X[np.random.RandomState(0).permutation(len(X))[:n_train]]
    priors = {}
    torch.set_num_threads(1)
    for name, image_shape in MODELS.items():
        t = time.time()
        priors[name] = FlowPrior(image_shape=image_shape, data_range=(0, 1),
                                 max_epochs=max_epochs, random_state=0,
                                 device="cpu").fit(X)
        print(f"fitted {name} in {time.time() - t:.1f} s "
              f"({sum(p.numel() for p in priors[name].flow_.parameters())} parameters)",
              flush=True)
    return priors


def interleaved(fns, n_calls, rounds=10, warmup=5, max_seconds=60.0):
    """Median seconds per call of each function, alternating them in ``rounds`` rounds.

    Makes ``n_calls`` calls of each, or fewer (``rounds`` at least) when that would take more
    than about ``max_seconds`` by the warm-up's pace. Returns ``({name: median}, calls)``.
    """
    slowest = 0.0
    for fn in fns.values():
        t = time.perf_counter()
        for _ in range(warmup):
            fn()
        slowest = max(slowest, (time.perf_counter() - t) / warmup)
    affordable = int(max_seconds / (len(fns) * max(slowest, 1e-9)))
    per_round = max(1, min(n_calls, affordable) // rounds)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}, rounds * per_round


def ort_session(path, device, threads):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if device == "cpu":
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # no spin-waiting between calls, so onnxruntime's idle threads never take CPU time
        # from the PyTorch calls that alternate with its own
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
    else:
        providers = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"onnxruntime fell back to {session.get_providers()}")
    return session, providers


def bench_model(name, prior, path, device, threads, n_latency, n_throughput):
    session, providers = ort_session(path, device, threads)
    module = _cpu_copy(FlowDecoder(prior.flow_)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rng = np.random.RandomState(0)
    row = {"model": name, "device": device, "threads": threads if device == "cpu" else None}
    for batch, n_calls, key in ((1, n_latency, "b1"), (256, n_throughput, "b256")):
        z = rng.standard_normal((batch, prior.flow_.latent_dim)).astype(np.float32)

        def run_torch(z=z):
            with torch.inference_mode():
                out = module(torch.from_numpy(z).to(device)).cpu().numpy()
            sync()
            return out

        def run_ort(z=z):
            return session.run(["x"], {"z": z})[0]

        med, row[f"calls_{key}"] = interleaved({"torch": run_torch, "onnxruntime": run_ort},
                                               n_calls)
        row[f"torch_{key}_ms"] = 1e3 * med["torch"]
        row[f"ort_{key}_ms"] = 1e3 * med["onnxruntime"]
        row[f"max_abs_error_{key}"] = float(np.abs(run_torch() - run_ort()).max())
        if batch > 1:
            row["torch_b256_samples_per_s"] = batch / med["torch"]
            row["ort_b256_samples_per_s"] = batch / med["onnxruntime"]
    row["ratio_b1"] = row["ort_b1_ms"] / row["torch_b1_ms"]
    row["ratio_b256"] = row["ort_b256_ms"] / row["torch_b256_ms"]
    row["check_onnx_max_abs_error"] = check_onnx(path, prior, n_samples=64, providers=providers)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                        help="CPU thread counts, the same for both runtimes (default: 2 1)")
    parser.add_argument("--max-epochs", type=int, default=1)
    parser.add_argument("--n-latency", type=int, default=400, help="batch-1 calls per runtime")
    parser.add_argument("--n-throughput", type=int, default=40,
                        help="batch-256 calls per runtime")
    args = parser.parse_args(argv)
    import onnxruntime as ort
    if args.device == "cuda":
        missing = [what for what, ok in (
            ("PyTorch CUDA", torch.cuda.is_available()),
            ("onnxruntime CUDAExecutionProvider",
             "CUDAExecutionProvider" in ort.get_available_providers())) if not ok]
        if missing:
            print(f"skipped: no {' and no '.join(missing)} on this machine")
            return 0
    threads = " and ".join(map(str, args.threads)) if args.device == "cpu" else None
    meta = metadata(seed=0, device=args.device, torch_threads=threads or torch.get_num_threads(),
                    onnxruntime_version=ort.__version__)
    priors = fit_priors(args.max_epochs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, prior in priors.items():
            path = to_onnx(prior, Path(tmp) / "decoder.onnx", part="decoder")
            for threads in (args.threads if args.device == "cpu" else [None]):
                if threads is not None:
                    torch.set_num_threads(threads)
                rows.append(bench_model(name, prior, path, args.device, threads,
                                        args.n_latency, args.n_throughput))
                print(f"timed {name}, threads={threads}", flush=True)
    out = {"device": args.device, "rows": rows, "max_epochs": args.max_epochs,
           "n_latency": args.n_latency, "n_throughput": args.n_throughput, "target": TARGET}
    print(f"wrote {write_results(f'onnx_speed-{args.device}', out, meta)}\n")
    print(tables()[args.device])
    return 0


def _scientific(v):
    """``7.2e-7``: two significant digits, the exponent without padding."""
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _devices():
    """The devices with a results file, CPU first."""
    return [d for d in ("cpu", "cuda")
            if (Path(__file__).resolve().parent / "results" / f"onnx_speed-{d}.json").exists()]


def tables():
    """One table per device measured: batch-1 latency and batch-256 throughput of both
    runtimes, their ratio (onnxruntime / PyTorch time), the export's error and, on the CPU, the
    batch-1 target."""
    out = {}
    for device in _devices():
        r = read_results(f"onnx_speed-{device}")
        rows = [[f"`{row['model'].split()[0]}` {row['model'].split(' ', 1)[1]}",
                 row["threads"] or "–", f"{row['torch_b1_ms']:.2f}", f"{row['ort_b1_ms']:.2f}",
                 f"{row['ratio_b1']:.2g}", f"{row['torch_b256_samples_per_s']:,.0f}",
                 f"{row['ort_b256_samples_per_s']:,.0f}", f"{row['ratio_b256']:.2g}",
                 _scientific(row["check_onnx_max_abs_error"])] for row in r["rows"]]
        table = markdown_table(
            ["prior", "threads", "PyTorch batch-1 ms", "onnxruntime batch-1 ms", "ratio",
             "PyTorch batch-256 samples/s", "onnxruntime batch-256 samples/s", "ratio",
             "`check_onnx` max abs error"], rows)
        ratios = [row["ratio_b1"] for row in r["rows"]]
        lines = [table, ""]
        if device == "cpu":
            verdict = "met" if max(ratios) <= r["target"] else "missed"
            lines += [f"Batch-1 ratio {min(ratios):.2g}–{max(ratios):.2g}; target ≤ "
                      f"{r['target']}: {verdict}.", ""]
        meta = r["meta"]
        lines.append(provenance(meta).replace(
            "</sub>", f", onnxruntime {meta['onnxruntime_version']}</sub>"))
        out[device] = "\n".join(lines)
    return out


if __name__ == "__main__":
    sys.exit(main())
