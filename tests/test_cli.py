"""The command line ``python -m flowsk``: fit, solve, export, both model formats, help and input
errors."""
import os
import subprocess
import sys

import joblib
import numpy as np
import pytest

import flowsk
from flowsk import FlowPrior, InverseSolver
from flowsk.__main__ import main
from flowsk.datasets import load_digit_images
from flowsk.operators import CompressedSensing, Inpainting

SHAPE = (1, 8, 8)
INPAINT = 'inpainting:{"box": [2, 2, 6, 6]}'
FIT = ["--image-shape", "1", "8", "8", "--data-range", "0", "1", "--architecture", "mlp",
       "--max-epochs", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Training data (.npy and CSV), a prior fitted through the CLI in the flowsk format and
    the same fit as a joblib pickle, and measurements."""
    path = tmp_path_factory.mktemp("cli")
    X = load_digit_images()[0]
    np.save(path / "X.npy", X[:200])
    np.savetxt(path / "X.csv", X[:200], delimiter=",")
    model, pickled = path / "prior.flowsk", path / "prior.joblib"
    assert main(["fit", str(path / "X.npy"), str(model)] + FIT) == 0
    assert main(["fit", str(path / "X.npy"), str(pickled)] + FIT) == 0
    X_test = X[1700:1706]
    Y = Inpainting(SHAPE, box=(2, 2, 6, 6)).measure(X_test, noise_std=0.01, random_state=0)
    np.save(path / "Y.npy", Y)
    return {"dir": path, "model": model, "joblib": pickled, "X_test": X_test, "Y": Y}


def test_fit_saves_a_fitted_prior(files):
    prior = flowsk.load(files["model"])
    assert isinstance(prior, FlowPrior)
    assert prior.n_features_in_ == 64 and tuple(prior.image_shape) == SHAPE
    assert len(prior.history_["train_loss"]) <= 2


def test_fit_to_joblib_warns_and_saves_the_same_prior(files, capsys):
    out = files["dir"] / "again.joblib"
    assert main(["fit", str(files["dir"] / "X.npy"), str(out)] + FIT) == 0
    err = capsys.readouterr().err  # the progress bar, then the warning
    assert f"warning: {out} is a pickle" in err and "runs any code" in err
    X = files["X_test"]
    np.testing.assert_array_equal(joblib.load(out).score_samples(X),
                                  flowsk.load(files["model"]).score_samples(X))


def test_fit_reads_csv(files, capsys):
    out = files["dir"] / "csv.flowsk"
    assert main(["fit", str(files["dir"] / "X.csv"), str(out), "--architecture", "mlp",
                 "--max-epochs", "1", "--data-range", "0", "1"]) == 0
    assert flowsk.load(out).n_features_in_ == 64
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
    # the observed pixels are fitted better than by the prior mean, and better than by G(0),
    # where glowip starts
    prior = flowsk.load(files["model"])
    prior_mean = prior.sample(2000, random_state=0).mean(0)
    start = prior.inverse_transform(np.zeros((1, 64)))[0]

    def error(X):
        return np.abs(X[..., observed.ravel()] - files["Y"]).mean()

    assert error(X_hat) < min(error(prior_mean), error(start))


def test_solve_reads_joblib_with_a_warning(files, capsys):
    args = [str(files["dir"] / "Y.npy"), "--operator", INPAINT, "--method", "glowip",
            "--params", '{"n_iter": 5, "gamma": 0.01}']
    out_safe, out_pickle = files["dir"] / "safe.npy", files["dir"] / "pickle.npy"
    assert main(["solve", str(files["model"]), args[0], str(out_safe)] + args[1:]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["solve", str(files["joblib"]), args[0], str(out_pickle)] + args[1:]) == 0
    assert capsys.readouterr().err.startswith(f"warning: {files['joblib']} is a pickle")
    np.testing.assert_array_equal(np.load(out_pickle), np.load(out_safe))


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


@pytest.mark.parametrize("fmt", ["model", "joblib"])
def test_export_decoder(files, fmt, capsys):
    out = files["dir"] / f"decoder-{fmt}.onnx"
    assert main(["export", str(files[fmt]), str(out)]) == 0
    assert out.stat().st_size > 0
    captured = capsys.readouterr()
    assert float(captured.out.rsplit(" ", 1)[1]) < 1e-4
    assert ("is a pickle" in captured.err) == (fmt == "joblib")


def test_export_a_saved_amortized_solver(files, capsys):
    prior = flowsk.load(files["model"])
    operator = Inpainting(SHAPE, box=(2, 2, 6, 6))
    solver = InverseSolver(prior, operator, method="amortized-vi", random_state=0,
                           method_params={"coupling": "affine", "n_iter": 2,
                                          "n_simulations": 500, "n_steps": 2,
                                          "hidden_features": 16}).fit(files["Y"])
    model, out = files["dir"] / "solver.flowsk", files["dir"] / "sampler.onnx"
    flowsk.save(solver, model)
    assert main(["export", str(model), str(out), "--part", "posterior_sampler"]) == 0
    assert float(capsys.readouterr().out.rsplit(" ", 1)[1]) < 1e-4


@pytest.mark.parametrize("command", ["demo", "fit", "solve", "export"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"python -m flowsk {command}" in capsys.readouterr().out


def _bad_inputs(d):
    """(argv, words the one-line message must contain) for each kind of bad input."""
    model, Y = str(d / "prior.flowsk"), str(d / "Y.npy")
    out = str(d / "never.npy")
    np.save(d / "nan.npy", np.full((3, 48), np.nan))
    np.save(d / "wide.npy", np.zeros((3, 10)))
    X_nan = np.load(d / "X.npy")
    X_nan[0, 0] = np.nan
    np.savetxt(d / "nan.csv", X_nan, delimiter=",")
    (d / "junk.flowsk").write_text("not a model")
    joblib.dump({"not": "a model"}, d / "pickle.flowsk")
    return {
        "missing data": (["fit", str(d / "none.npy"), out], "does not exist"),
        "NaN data": (["fit", str(d / "nan.csv"), out], "NaN"),
        "wrong image shape": (["fit", str(d / "X.npy"), out, "--image-shape", "1", "4", "4"],
                              "64 features"),
        "missing model": (["solve", str(d / "none.flowsk"), Y, out, "--operator", INPAINT],
                          "does not exist"),
        "not a model": (["solve", str(d / "junk.flowsk"), Y, out, "--operator", INPAINT],
                        "not a complete flowsk model file"),
        "a pickle named .flowsk": (["export", str(d / "pickle.flowsk"), str(d / "x.onnx")],
                                   "is a pickle"),
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
                                  "missing model", "not a model", "a pickle named .flowsk",
                                  "unknown method",
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


def test_a_bad_joblib_file_warns_then_fails(files, capsys):
    junk = files["dir"] / "junk.joblib"
    junk.write_text("not a model")
    out = files["dir"] / "never.npy"
    assert main(["solve", str(junk), str(files["dir"] / "Y.npy"), str(out), "--operator",
                 INPAINT]) == 2
    warning, error = capsys.readouterr().err.splitlines()
    assert warning.startswith("warning: ") and "pickle" in warning
    assert error.startswith("error: ") and "not a model" in error
    assert not out.exists()


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
