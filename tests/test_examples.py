"""Every ``examples/*.py`` and ``python -m flowsk demo`` run in quick mode and write figures;
each example's ``metrics.json`` holds the numbers it printed, and they must make sense even
after the quick run's short training."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowsk.demo import demo_tasks

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
EXPECTED = {
    "demo": ["samples.png", *(f"{task}.png" for task in demo_tasks((1, 8, 8))),
             "decoder.onnx"],
    "glowip_compressed_sensing": ["psnr_vs_m.png", "reconstructions.png"],
    "chavez_solver": ["denoising.png", "deblurring.png", "inpainting.png", "colorization.png",
                      "table1.txt"],
    "composed_flows_uq": ["posterior.png", "sigma.png"],
    "grid_search_pipeline": ["grid_search.png"],
    "deploy_onnx": ["decoder.onnx", "samples.png"],
}


def _glowip(m):
    at = m["m"].index(32)
    digits = m["psnr"]["digits (in distribution)"]
    assert digits["glowip"][at] > digits["pinv"][at] + 1
    assert digits["csgm"][at] > digits["pinv"][at] + 1


def _chavez(m):
    # the quick run's 2-epoch prior cannot beat a 26 dB noisy measurement; where the operator
    # loses information it must, and the paper's solver beats csgm everywhere
    for task in ("deblurring", "inpainting", "colorization"):
        assert m[f"likelihood/{task}"]["psnr"] > m[f"measurement/{task}"]["psnr"] + 1, task
    for task in ("denoising", "deblurring", "inpainting", "colorization"):
        assert m[f"likelihood/{task}"]["psnr"] > m[f"csgm/{task}"]["psnr"], task


def _composed(m):
    for row in m:  # the mean of the draws beats one draw; the hole is the uncertain part
        assert row["psnr_mean"] > row["psnr_single_draw"]
        assert row["std_hole"] > 2 * row["std_observed"]


def _deploy(m):
    assert m["decoder_error"] < 1e-4 and m["samples_difference"] < 1e-4
    assert m["sampler_error"] < 1e-4
    assert abs(m["psnr_onnx_mean"] - m["psnr_predict"]) < 0.5  # Monte Carlo error only
    assert m["psnr_predict"] > m["psnr_pinv"] + 1


def _grid(m):
    for name in ("likelihood", "glowip", "map"):
        assert m[name]["test_psnr"] > m["pinv"]["test_psnr"] + 1, name


def _robust(m):
    for coupling in ("affine", "robust-spline"):  # ood_score flags the shifted measurements
        assert (m[f"{coupling}/shifted y"]["ood_median"]
                > 2 * m[f"{coupling}/in-distribution y"]["ood_median"])
    assert m["robust-spline/shifted y"]["inf_rate"] == 0


def _trumpet(m):
    assert m["relative_error_mean"] < 0.5
    for method in ("iflow", "iflow-l", "csgm"):
        assert m[f"psnr_{method}"] > m["psnr_pinv"] + 1, method


CHECKS = {"glowip_compressed_sensing": _glowip, "chavez_solver": _chavez,
          "composed_flows_uq": _composed, "deploy_onnx": _deploy,
          "grid_search_pipeline": _grid, "robust_splines": _robust,
          "trumpet_injective": _trumpet}
COMMANDS = {path.stem: [sys.executable, str(path)] for path in EXAMPLES}
COMMANDS["demo"] = [sys.executable, "-m", "flowsk", "demo"]


def test_examples_found():
    assert set(CHECKS) | {"demo"} == set(COMMANDS)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_docstring_says_how_to_run(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and f"python examples/{path.name} [--quick] [--out DIR]" in doc


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_quick_run_writes_figures(name, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(COMMANDS[name] + ["--quick", "--out", str(out)], cwd=tmp_path,
                         env=env, check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    pngs = list(out.glob("*.png"))
    assert pngs, f"{name} wrote no PNG figure to --out"
    for path in pngs + [out / f for f in EXPECTED.get(name, [])]:
        assert path.is_file() and path.stat().st_size > 0, f"{path.name} missing or empty"
    assert list(tmp_path.iterdir()) == [out], "output written outside --out"
    if name != "demo":
        CHECKS[name](json.loads((out / "metrics.json").read_text()))
