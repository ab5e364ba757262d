"""Every ``examples/*.py`` and ``python -m flowsk demo`` run in quick mode and write figures."""
import ast
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
COMMANDS = {path.stem: [sys.executable, str(path)] for path in EXAMPLES}
COMMANDS["demo"] = [sys.executable, "-m", "flowsk", "demo"]


def test_examples_found():
    assert {"glowip_compressed_sensing", "chavez_solver", "composed_flows_uq",
            "grid_search_pipeline", "deploy_onnx"} <= set(COMMANDS)


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
