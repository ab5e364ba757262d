"""flowsk on a dask.distributed cluster: grid searches, Dask arrays of measurements, ONNX parts.

One ``LocalCluster`` of two worker processes (one thread each) serves the module; the test that
kills workers starts its own. Every test has a timeout, so a hang fails instead of blocking.
"""
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

_REASON = "needs the [dask] extra: pip install '.[dask]'"
distributed = pytest.importorskip("distributed", reason=_REASON)
da = pytest.importorskip("dask.array", reason=_REASON)
pytest.importorskip("dask_ml", reason=_REASON)

import dask  # noqa: E402
import joblib  # noqa: E402
import torch  # noqa: E402
from distributed.scheduler import KilledWorker  # noqa: E402
from sklearn.base import BaseEstimator, TransformerMixin, clone  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import FunctionTransformer  # noqa: E402

import flowsk_dask  # noqa: E402
from flowsk import FlowPrior, InverseSolver  # noqa: E402
from flowsk.datasets import load_digit_images  # noqa: E402
from flowsk.methods.variational import amortized_draw  # noqa: E402
from flowsk.operators import Inpainting  # noqa: E402
from flowsk.solver import BLOCK_SIZE  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: vi settings that keep a few thousand observations quick and still draw random numbers
VI = dict(method="vi", n_iter=2, n_samples=3, init="prior", method_params={"mc_samples": 2})


def _cluster(**config):
    with dask.config.set(config):
        return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                        dashboard_address=None)


@pytest.fixture(scope="module")
def client():
    with _cluster() as cluster, distributed.Client(cluster) as client:
        client.register_plugin(flowsk_dask.TorchThreads())
        yield client


@pytest.fixture(scope="module")
def problem():
    """A small digits prior, an inpainting operator and measurements filling 3 row blocks (the
    third repeats the first 50 rows of the first)."""
    X, shape = load_digit_images()
    prior = FlowPrior(architecture="mlp", n_steps=2, hidden_features=16, data_range=(0, 1),
                      dequantize=1 / 16, max_epochs=2, device="cpu", random_state=0).fit(X[:300])
    op = Inpainting(shape, box=(2, 2, 6, 6))
    Y = op.measure(X[np.resize(np.arange(len(X)), 2 * BLOCK_SIZE)], noise_std=0.05,
                   random_state=0)
    return prior, op, X, np.concatenate([Y, Y[:50]])


def _on_each_worker(client, fn, *args):
    """``fn(*args)`` run as a task (in the task thread) on each worker, in address order."""
    return client.gather([client.submit(fn, *args, workers=[w], pure=False)
                          for w in sorted(client.scheduler_info()["workers"])])


# -- InverseSolver over Dask arrays -------------------------------------------------------------
def test_dask_arrays_give_the_in_memory_numbers(client, problem):
    prior, op, _, Y = problem
    glowip = InverseSolver(prior, op, method="glowip", n_iter=5, random_state=0)
    vi = InverseSolver(prior, op, random_state=0, **VI)
    unaligned = da.from_array(Y, chunks=(700, 16))  # rechunked to whole row blocks
    two_blocks = da.from_array(Y, chunks=(2 * BLOCK_SIZE, Y.shape[1]))  # chunk 0 holds 2 blocks
    assert flowsk_dask.predict(glowip, unaligned).chunks == ((1024, 1024, 50), (64,))
    with distributed.get_task_stream(client) as stream:
        results = dask.compute(
            flowsk_dask.predict(glowip, unaligned),
            flowsk_dask.predict(vi, unaligned, return_std=True),
            flowsk_dask.predict(vi, two_blocks, return_std=True),
            flowsk_dask.sample_posterior(vi, two_blocks, n_samples=2))
    x, (mean, std), (mean2, std2), draws = results
    workers = {t["worker"] for t in stream.data if "_chunk" in str(t["key"])}
    assert workers and workers <= set(client.scheduler_info()["workers"])

    np.testing.assert_array_equal(x, glowip.predict(Y))
    ref_mean, ref_std = vi.predict(Y, return_std=True)
    for m, s in ((mean, std), (mean2, std2)):
        np.testing.assert_array_equal(m, ref_mean)
        np.testing.assert_array_equal(s, ref_std)
    np.testing.assert_array_equal(draws, vi.sample_posterior(Y, 2))
    # the blocks have seeds of their own: equal rows get different draws in different blocks
    assert not np.allclose(mean[:50], mean[2 * BLOCK_SIZE:])


def test_dask_ml_parallel_post_fit_transforms_but_cannot_reconstruct(client, problem):
    """``ParallelPostFit`` runs a prior's ``transform`` chunk-wise, but declares 1-D output
    for ``predict``, which reconstructions ``(n, n_features)`` do not fit: hence
    ``flowsk_dask.predict``."""
    from dask_ml.wrappers import ParallelPostFit

    prior, op, X, Y = problem
    Z = ParallelPostFit(prior).transform(da.from_array(X[:300], chunks=(100, 64)))
    np.testing.assert_array_equal(Z.compute(), prior.transform(X[:300]))
    X_hat = ParallelPostFit(InverseSolver(prior, op, n_iter=2)).predict(
        da.from_array(Y[:40], chunks=(20, 48)))
    assert X_hat.shape == (40,)
    with pytest.raises(ValueError, match="broadcast"):
        X_hat.compute()


def test_dask_array_errors(client, problem):
    prior, op, _, Y = problem
    solver = InverseSolver(prior, op, method="glowip", n_iter=2)
    with pytest.raises(ValueError, match=r"shape \(n_obs, 48\)"):
        flowsk_dask.predict(solver, da.zeros((10, 5)))
    with pytest.raises(ValueError, match="unknown method"):
        flowsk_dask.predict(clone(solver).set_params(method="nope"), da.from_array(Y[:5]))
    bad = Y[:20].copy()
    bad[15, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):  # found by the worker that holds the chunk
        flowsk_dask.predict(solver, da.from_array(bad, chunks=(10, 48))).compute()
    with pytest.raises(ValueError, match="point estimate"):
        dask.compute(*flowsk_dask.predict(solver, da.from_array(Y[:5]), return_std=True))
    amortized = InverseSolver(prior, op, method="amortized-vi")
    with pytest.raises(Exception, match="call fit before predict"):
        flowsk_dask.sample_posterior(amortized, da.from_array(Y[:5]), 2).compute()


def test_a_prior_fitted_on_a_gpu_is_solved_on_cpu_workers(client, problem):
    """A fitted prior pickles with CPU tensors; a worker without CUDA takes it as a CPU model.
    The first case simulates a GPU-fitted prior (its ``device_`` says CUDA) where none is."""
    prior, op, _, Y = problem
    Y = da.from_array(Y[:40], chunks=20)
    ref = InverseSolver(prior, op, method="glowip", n_iter=5).predict(Y.compute())
    gpu_prior = pickle.loads(pickle.dumps(prior))
    gpu_prior.device_ = torch.device("cuda")
    got = flowsk_dask.predict(InverseSolver(gpu_prior, op, method="glowip", n_iter=5), Y)
    np.testing.assert_array_equal(got.compute(), ref)
    if torch.cuda.is_available():  # a real one: CUDA tensors never reach the pickle
        cuda_prior = clone(prior).set_params(device="cuda").fit(load_digit_images()[0][:300])
        assert cuda_prior.device_.type == "cuda"
        state = pickle.loads(pickle.dumps(cuda_prior.__getstate__()))
        assert all(t.device.type == "cpu" for t in state["flow_"].state_dict().values())


# -- grid searches ------------------------------------------------------------------------------
def _start_counting():
    """From now on, count the flow priors unpickled in this process."""
    from flowsk.prior import BaseFlowEstimator as cls

    if "_counted_setstate" not in vars(cls):
        original = cls.__setstate__

        def counted_setstate(self, state):
            cls._unpickled += 1
            original(self, state)

        cls.__setstate__ = cls._counted_setstate = counted_setstate
    cls._unpickled = 0


def _unpickled():
    from flowsk.prior import BaseFlowEstimator

    return BaseFlowEstimator._unpickled


def test_grid_search_over_a_pipeline_matches_n_jobs_1_and_shares_the_prior(client, problem):
    prior, op, X, _ = problem
    Xs = X[300:340]
    Y = op.measure(Xs, noise_std=0.05, random_state=1)
    clip = FunctionTransformer(np.clip, kw_args={"a_min": 0.0, "a_max": 1.0})

    def search(p):
        pipe = Pipeline([("clip", clip), ("solve", InverseSolver(p, op, method="glowip",
                                                                 n_iter=20, random_state=0))])
        return GridSearchCV(pipe, {"solve__gamma": [0.0, 0.3, 3.0]}, cv=2)

    serial = search(prior).set_params(n_jobs=1).fit(Y, Xs)
    scores = serial.cv_results_["mean_test_score"]
    assert len(set(scores)) == 3  # the grid matters

    client.run(_start_counting)
    with joblib.parallel_config(backend="dask"):
        plain = search(prior).fit(Y, Xs)
    # joblib's dask backend ships the prior inside every task (each task has its own clone)
    assert sum(client.run(_unpickled).values()) >= 2

    stand_in = flowsk_dask.share(prior, client)
    try:
        assert isinstance(stand_in, FlowPrior) and type(clone(stand_in)) is FlowPrior
        assert len(pickle.dumps(stand_in)) < 300 < 100_000 < len(pickle.dumps(prior))
        assert pickle.loads(pickle.dumps(stand_in)) is stand_in  # in this process
        client.run(_start_counting)
        with joblib.parallel_config(backend="dask"):
            shared = search(stand_in).fit(Y, Xs)
        assert sum(client.run(_unpickled).values()) == 0  # each worker has its copy already
    finally:
        flowsk_dask.unshare(stand_in, client)
    for result in (plain, shared):
        assert result.best_params_ == serial.best_params_
        np.testing.assert_array_equal(result.cv_results_["mean_test_score"], scores)
    with pytest.raises(AttributeError, match="placeholder for the estimator shared"):
        _ = pickle.loads(pickle.dumps(stand_in)).flow_


def test_grid_search_over_prior_settings_matches_n_jobs_1(client, problem):
    X = problem[2][:200]
    base = FlowPrior(architecture="mlp", n_steps=1, data_range=(0, 1), dequantize=1 / 16,
                     max_epochs=2, device="cpu", random_state=0)
    grid = {"hidden_features": [4, 16]}
    serial = GridSearchCV(base, grid, cv=2, n_jobs=1).fit(X)
    with joblib.parallel_config(backend="dask"):
        dist = GridSearchCV(base, grid, cv=2).fit(X)
    scores = serial.cv_results_["mean_test_score"]
    assert scores[0] != scores[1]
    np.testing.assert_array_equal(dist.cv_results_["mean_test_score"], scores)
    assert dist.best_params_ == serial.best_params_


MAIN_SCRIPT = """
import sys

import joblib
import numpy as np
import torch
from distributed import Client
from sklearn.model_selection import GridSearchCV

import flowsk_dask
from flowsk import InverseSolver
from flowsk.operators import FunctionOperator, Operator


class EveryOther(Operator):
    '''Defined in __main__: workers can only get it by value.'''

    def __init__(self):
        super().__init__((64,), 32)

    def forward(self, x):
        return x[:, ::2]


address, prior_path = sys.argv[1:]
prior = joblib.load(prior_path)
X = prior.sample(20, random_state=0)
client = Client(address)
# the scheduler runs in another process, where the stand-in's prior is unknown
shared = flowsk_dask.share(prior, client)
for op in (EveryOther(), FunctionOperator(lambda x: 0.5 * x, 64)):
    Y = op.measure(X, noise_std=0.05, random_state=0)
    grid = {"gamma": [0.0, 1.0]}
    serial = GridSearchCV(InverseSolver(prior, op, n_iter=10, random_state=0), grid, cv=2)
    serial = serial.fit(Y, X).cv_results_["mean_test_score"]
    for p in (prior, shared):
        with joblib.parallel_config(backend="dask"):
            dist = GridSearchCV(InverseSolver(p, op, n_iter=10, random_state=0), grid, cv=2)
            dist = dist.fit(Y, X).cv_results_["mean_test_score"]
        assert serial[0] != serial[1] and np.array_equal(dist, serial), (serial, dist)
flowsk_dask.unshare(shared, client)
client.close()
print("ok")
"""


def test_a_script_with_its_own_classes_and_a_stand_in(client, problem, tmp_path):
    """Classes defined in `__main__` and lambdas reach the workers (by value); a stand-in
    passes a scheduler in another process, where its prior is unknown."""
    (tmp_path / "search.py").write_text(MAIN_SCRIPT)
    joblib.dump(problem[0], tmp_path / "prior.joblib")
    out = subprocess.run([sys.executable, str(tmp_path / "search.py"), client.scheduler.address,
                          str(tmp_path / "prior.joblib")], capture_output=True, text=True,
                         timeout=240, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_a_worker_error_reaches_the_client(client, problem):
    prior, op, X, _ = problem
    Y = op.measure(X[:20], noise_std=0.05, random_state=0)
    search = GridSearchCV(InverseSolver(prior, op, n_iter=2), {"gamma": [0.0, -1.0]}, cv=2,
                          error_score="raise")
    with joblib.parallel_config(backend="dask"), pytest.raises(ValueError,
                                                               match="gamma must be >= 0"):
        search.fit(Y, X[:20])


class _Sleep(TransformerMixin, BaseEstimator):
    """Passes ``Y`` through; its ``fit`` touches the file ``started`` (if given), then sleeps
    ``seconds`` or, with ``die``, ends the process it runs in (a worker that crashes or is
    killed)."""

    def __init__(self, seconds=0.0, die=False, started=None):
        self.seconds = seconds
        self.die = die
        self.started = started

    def fit(self, Y, X=None):
        if self.started is not None:
            open(self.started, "a").close()
        if self.die:
            os._exit(1)
        time.sleep(self.seconds)
        return self

    def transform(self, Y):
        return Y


def test_a_dying_cluster_raises_instead_of_hanging(problem, tmp_path):
    prior, op, X, _ = problem
    Y = op.measure(X[:20], noise_std=0.05, random_state=0)
    pipe = Pipeline([("sleep", _Sleep()), ("solve", InverseSolver(prior, op, n_iter=2))])
    # a task whose worker dies: with no retries allowed, the search fails at once
    with _cluster(**{"distributed.scheduler.allowed-failures": 0}) as cluster, \
            distributed.Client(cluster, set_as_default=False) as c:
        with joblib.parallel_config(backend="dask", client=c), pytest.raises(KilledWorker):
            GridSearchCV(pipe, {"sleep__die": [False, True]}, cv=2).fit(Y, X[:20])
        # the whole cluster going away mid-search, once a worker has begun a task (with both
        # workers back: on one worker with one thread joblib would run the search here)
        c.wait_for_workers(2, timeout=120)
        started = tmp_path / "started"
        closer = threading.Thread(target=_close_once_started, args=(cluster, started))
        closer.start()
        try:
            with joblib.parallel_config(backend="dask", client=c), \
                    pytest.raises((CancelledError, KilledWorker)):  # workers or scheduler first
                GridSearchCV(pipe, {"sleep__seconds": [1.0] * 20, "sleep__started": [started]},
                             cv=2).fit(Y, X[:20])
        finally:
            closer.join()


def _close_once_started(cluster, started, timeout=120.0):
    """Close ``cluster`` as soon as the file ``started`` exists (or after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    cluster.close()


# -- worker settings ----------------------------------------------------------------------------
def test_torch_threads_plugin_sets_every_task_thread(client):
    _on_each_worker(client, torch.set_num_threads, 3)
    assert _on_each_worker(client, torch.get_num_threads) == [3, 3]
    client.register_plugin(flowsk_dask.TorchThreads())  # 1 task thread: 1 torch thread
    assert _on_each_worker(client, torch.get_num_threads) == [1, 1]
    client.register_plugin(flowsk_dask.TorchThreads(cores_per_worker=2))
    assert _on_each_worker(client, torch.get_num_threads) == [2, 2]
    client.register_plugin(flowsk_dask.TorchThreads())
    assert _on_each_worker(client, torch.get_num_threads) == [1, 1]
    with pytest.raises(ValueError, match="cores_per_worker"):
        flowsk_dask.TorchThreads(cores_per_worker=0)


# -- ONNX parts on the workers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_files(problem, tmp_path_factory):
    from exporters import to_onnx

    prior, op, _, Y = problem
    solver = InverseSolver(prior, op, method="amortized-vi", sigma=0.05, device="cpu",
                           method_params={"n_iter": 2, "n_simulations": 500, "n_steps": 1,
                                          "hidden_features": 8}, random_state=0).fit(Y[:10])
    d = tmp_path_factory.mktemp("onnx")
    return (solver, str(to_onnx(prior, d / "decoder.onnx", part="decoder")),
            str(to_onnx(solver, d / "sampler.onnx", part="posterior_sampler")))


def _documented_noise(seed_from, n_rows, n_samples, latent_dim):
    seed = np.random.RandomState(seed_from).randint(2**31 - 1)
    return np.concatenate([np.random.default_rng([seed, i]).standard_normal(
        (n_samples, latent_dim), dtype=np.float32) for i in range(n_rows)])


def test_onnx_parts_run_over_dask_arrays(client, problem, onnx_files):
    prior, op, X, Y = problem
    solver, decoder, sampler = onnx_files
    Z = prior.transform(X[:300])
    x = flowsk_dask.onnx_map(decoder, da.from_array(Z, chunks=(70, 64)))
    assert x.dtype == np.float32 and x.chunks[0] == (70, 70, 70, 70, 20)
    np.testing.assert_allclose(x.compute(), prior.inverse_transform(Z), atol=1e-5)

    draws = flowsk_dask.onnx_sample_posterior(sampler, da.from_array(Y[:30], chunks=(7, 48)),
                                              n_samples=5, random_state=0).compute()
    eps = _documented_noise(0, 30, 5, 64)
    with torch.no_grad():
        ref = amortized_draw(solver.model_, prior.flow_,
                             torch.as_tensor(np.repeat(Y[:30], 5, 0), dtype=torch.float32),
                             torch.as_tensor(eps)).numpy().reshape(30, 5, 64)
    np.testing.assert_allclose(draws, ref, atol=1e-5)
    one_chunk = flowsk_dask.onnx_sample_posterior(sampler, Y[:30], n_samples=5, random_state=0)
    np.testing.assert_allclose(one_chunk.compute(), draws, atol=1e-6)

    with pytest.raises(ValueError, match="onnx_sample_posterior runs"):
        flowsk_dask.onnx_map(sampler, da.from_array(Y[:5]))
    with pytest.raises(ValueError, match="posterior_sampler part"):
        flowsk_dask.onnx_sample_posterior(decoder, da.from_array(Z[:5]))
    with pytest.raises(ValueError, match=r"shape \(n, 64\)"):
        flowsk_dask.onnx_map(decoder, da.from_array(Y[:5]))


WITHOUT_TORCH = """
import sys


class NoTorch:  # a machine without torch: importing it fails
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError(f"no module named {name!r} here")


sys.meta_path.insert(0, NoTorch())
import dask
import dask.array as da
import numpy as np

import flowsk_dask

decoder, sampler, Z, Y, out = sys.argv[1:]
with dask.config.set(scheduler="sync"):
    x = flowsk_dask.onnx_map(decoder, da.from_array(np.load(Z), chunks=(50, 64))).compute()
    s = flowsk_dask.onnx_sample_posterior(sampler, da.from_array(np.load(Y), chunks=(4, 48)),
                                          n_samples=3, random_state=0).compute()
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "flowsk", "exporters")]
np.savez(out, x=x, s=s)
"""


def test_onnx_worker_functions_need_no_torch(client, problem, onnx_files, tmp_path):
    prior, op, X, Y = problem
    _, decoder, sampler = onnx_files
    Z = prior.transform(X[:120])
    np.save(tmp_path / "Z.npy", Z)
    np.save(tmp_path / "Y.npy", Y[:10])
    (tmp_path / "run.py").write_text(textwrap.dedent(WITHOUT_TORCH))
    out = subprocess.run([sys.executable, str(tmp_path / "run.py"), decoder, sampler,
                          str(tmp_path / "Z.npy"), str(tmp_path / "Y.npy"),
                          str(tmp_path / "out.npz")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(got["x"], prior.inverse_transform(Z), atol=1e-5)
    on_workers = flowsk_dask.onnx_sample_posterior(sampler, da.from_array(Y[:10], chunks=5),
                                                   n_samples=3, random_state=0)
    np.testing.assert_allclose(got["s"], on_workers.compute(), atol=1e-6)
