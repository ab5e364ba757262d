"""The command line ``python -m flowsk``: fit, solve, export, help and input errors."""
import os
import subprocess
import sys

import joblib
import numpy as np
import pytest

from flowsk import FlowPrior
from flowsk.__main__ import main
from flowsk.datasets import load_digit_images
from flowsk.operators import CompressedSensing, Inpainting

SHAPE = (1, 8, 8)
INPAINT = 'inpainting:{"box": [2, 2, 6, 6]}'


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Training data (.npy and CSV), a prior fitted through the CLI, and measurements."""
    path = tmp_path_factory.mktemp("cli")
    X = load_digit_images()[0]
    np.save(path / "X.npy", X[:200])
    np.savetxt(path / "X.csv", X[:200], delimiter=",")
    model = path / "prior.joblib"
    assert main(["fit", str(path / "X.npy"), str(model), "--image-shape", "1", "8", "8",
                 "--data-range", "0", "1", "--architecture", "mlp", "--max-epochs", "2"]) == 0
    X_test = X[1700:1706]
    Y = Inpainting(SHAPE, box=(2, 2, 6, 6)).measure(X_test, noise_std=0.01, random_state=0)
    np.save(path / "Y.npy", Y)
    return {"dir": path, "model": model, "X_test": X_test, "Y": Y}


def test_fit_saves_a_fitted_prior(files):
    prior = joblib.load(files["model"])
    assert isinstance(prior, FlowPrior)
    assert prior.n_features_in_ == 64 and tuple(prior.image_shape) == SHAPE
    assert len(prior.history_["train_loss"]) <= 2


def test_fit_reads_csv(files, capsys):
    out = files["dir"] / "csv.joblib"
    assert main(["fit", str(files["dir"] / "X.csv"), str(out), "--architecture", "mlp",
                 "--max-epochs", "1", "--data-range", "0", "1"]) == 0
    assert joblib.load(out).n_features_in_ == 64
    assert "fitted on 200 samples x 64 features" in capsys.readouterr().out


def test_solve_writes_reconstructions(files):
    out = files["dir"] / "X_hat.csv"
    assert main(["solve", str(files["model"]), str(files["dir"] / "Y.npy"), str(out),
                 "--operator", INPAINT, "--method", "glowip",
                 "--params", '{"n_iter": 5, "gamma": 0.01}']) == 0
    X_hat = np.loadtxt(out, delimiter=",", ndmin=2)
    assert X_hat.shape == (6, 64)
    assert np.all((X_hat >= 0) & (X_hat <= 1))
    observed = np.ones((8, 8), bool)
    observed[2:6, 2:6] = False
    # the observed pixels are fitted better than the prior mean would be
    assert np.abs(X_hat[:, observed.ravel()] - files["Y"]).mean() < 0.3


def test_solve_writes_posterior_std(files):
    out, std = files["dir"] / "vi.npy", files["dir"] / "vi_std.npy"
    assert main(["solve", str(files["model"]), str(files["dir"] / "Y.npy"), str(out),
                 "--operator", INPAINT, "--method", "vi", "--std", str(std),
                 "--params", '{"n_iter": 3, "n_samples": 4, "laplace_steps": 0}']) == 0
    assert np.load(out).shape == np.load(std).shape == (6, 64)
    assert np.all(np.load(std) >= 0) and np.load(std).max() > 0


def test_solve_operator_arguments(files):
    Y = CompressedSensing(SHAPE, 16, random_state=3).measure(files["X_test"])
    np.save(files["dir"] / "Ycs.npy", Y)
    out = files["dir"] / "cs.npy"
    assert main(["solve", str(files["model"]), str(files["dir"] / "Ycs.npy"), str(out),
                 "--operator", 'compressedsensing:{"n_measurements": 16, "random_state": 3}',
                 "--method", "pinv"]) == 0
    assert np.load(out).shape == (6, 64)


def test_export_decoder(files, capsys):
    out = files["dir"] / "decoder.onnx"
    assert main(["export", str(files["model"]), str(out)]) == 0
    assert out.stat().st_size > 0
    error = float(capsys.readouterr().out.rsplit(" ", 1)[1])
    assert error < 1e-4


@pytest.mark.parametrize("command", ["demo", "fit", "solve", "export"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"python -m flowsk {command}" in capsys.readouterr().out


def _bad_inputs(d):
    """(argv, words the one-line message must contain) for each kind of bad input."""
    model, Y = str(d / "prior.joblib"), str(d / "Y.npy")
    out = str(d / "never.npy")
    np.save(d / "nan.npy", np.full((3, 48), np.nan))
    np.save(d / "wide.npy", np.zeros((3, 10)))
    X_nan = np.load(d / "X.npy")
    X_nan[0, 0] = np.nan
    np.savetxt(d / "nan.csv", X_nan, delimiter=",")
    (d / "junk.joblib").write_text("not a model")
    return {
        "missing data": (["fit", str(d / "none.npy"), out], "does not exist"),
        "NaN data": (["fit", str(d / "nan.csv"), out], "NaN"),
        "wrong image shape": (["fit", str(d / "X.npy"), out, "--image-shape", "1", "4", "4"],
                              "64 features"),
        "missing model": (["solve", str(d / "none.joblib"), Y, out, "--operator", INPAINT],
                          "does not exist"),
        "not a model": (["solve", str(d / "junk.joblib"), Y, out, "--operator", INPAINT],
                        "not a model"),
        "unknown method": (["solve", model, Y, out, "--operator", INPAINT, "--method", "magic"],
                           "unknown method"),
        "unknown operator": (["solve", model, Y, out, "--operator", "warp"],
                             "unknown operator"),
        "bad operator arguments": (["solve", model, Y, out, "--operator",
                                    'inpainting:{"boxx": 1}'], "inpainting"),
        "wrong width": (["solve", model, str(d / "wide.npy"), out, "--operator", INPAINT],
                        "10 columns"),
        "NaN measurements": (["solve", model, str(d / "nan.npy"), out, "--operator", INPAINT],
                             "NaN"),
        "bad params": (["solve", model, Y, out, "--operator", INPAINT, "--params", "{n_iter"],
                       "JSON"),
        "unused hyperparameter": (["solve", model, Y, out, "--operator", INPAINT, "--method",
                                   "pinv", "--params", '{"alpha": 1}'], "alpha"),
        "unknown part": (["export", model, str(d / "x.onnx"), "--part", "brain"], "brain"),
    }


@pytest.mark.parametrize("case", ["missing data", "NaN data", "wrong image shape",
                                  "missing model", "not a model", "unknown method",
                                  "unknown operator", "bad operator arguments", "wrong width",
                                  "NaN measurements", "bad params", "unused hyperparameter",
                                  "unknown part"])
def test_bad_input_is_one_line_and_exit_2(files, case, capsys):
    argv, words = _bad_inputs(files["dir"])[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err
    assert not (files["dir"] / "never.npy").exists()


def test_end_to_end_subprocess(files):
    """The real entry point: exit status 0 and a file on success, 2 and one line on error."""
    d = files["dir"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "flowsk", "solve", str(files["model"]), str(d / "Y.npy")]
    ok = subprocess.run(base + [str(d / "sub.npy"), "--operator", INPAINT, "--method",
                                "likelihood", "--params", '{"n_iter": 3}'],
                        check=False, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert np.load(d / "sub.npy").shape == (6, 64)
    bad = subprocess.run(base + [str(d / "sub2.npy"), "--operator", "warp"],
                         check=False, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown operator") and "Traceback" not in bad.stderr
