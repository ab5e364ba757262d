"""flowsk on a Dask cluster: grid searches, reconstruction over Dask arrays, ONNX inference.

Needs the ``[dask]`` extra (dask, distributed, dask-ml). Importing this package does not import
torch, so its ONNX helpers also run on workers that have only NumPy, onnxruntime and dask;
the helpers that take an estimator work with the estimator's own torch code.

- :class:`DaskBackend`: joblib's ``"dask"`` backend with one fix, registered under that name
  when this package is imported: a task whose worker dies raises in the client (joblib's own
  backend then waits forever).
- :class:`TorchThreads`: a worker plugin that sets torch's threads in every task thread, so a
  worker runs no more torch threads than the cores it was given.
- :func:`share`: a stand-in for a fitted prior that dask ships to each worker once; grid
  searches under ``joblib.parallel_config(backend="dask")`` otherwise ship it with every task
  (each task gets its own clone of the solver, and the prior inside it).
- :func:`predict` and :func:`sample_posterior`: an ``InverseSolver`` over a Dask array of
  measurements, one chunk per task, the same numbers as the in-memory call (see
  ``flowsk.solver.BLOCK_SIZE`` for the seeding).
- :func:`onnx_map` and :func:`onnx_sample_posterior`: exported ONNX parts (``exporters``) run
  with onnxruntime over the chunks of a Dask array.
"""
from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import dask
import dask.array as da
import joblib
import numpy as np
from distributed import Client, Worker, WorkerPlugin, as_completed, get_client
from joblib._dask import DaskDistributedBackend
from numpy.typing import ArrayLike
from sklearn.base import clone
from sklearn.utils import check_random_state

if TYPE_CHECKING:  # for type checkers only: importing flowsk imports torch
    from flowsk import InverseSolver

__all__ = ["DaskBackend", "TorchThreads", "onnx_map", "onnx_sample_posterior", "predict",
           "sample_posterior", "share", "unshare"]

_Estimator = TypeVar("_Estimator")
#: onnxruntime execution providers: names or ``(name, options)`` pairs.
_Providers = Sequence[str | tuple[str, dict[str, Any]]]


# -- joblib ------------------------------------------------------------------------------------
class DaskBackend(DaskDistributedBackend):
    """joblib's dask backend, telling joblib the outcome of every task.

    joblib's own backend passes a task's outcome to joblib only when the task returns: when
    dask fails it instead (its worker died, ``KilledWorker``; its result was lost and
    recomputing it failed) it sets an error nobody reads, and ``Parallel`` (so
    ``GridSearchCV.fit``) waits forever. Here each outcome, result or error, goes to joblib
    as soon as it is known, one task not holding up another; joblib then raises the first
    error. Importing ``flowsk_dask`` registers this class as joblib's ``"dask"`` backend.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting_futures = as_completed([], loop=self.client.loop)
        self._deliveries = set()

    async def _collect(self):
        while self._continue:
            async for future in self.waiting_futures:
                task = asyncio.ensure_future(self._deliver(future))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)
            await asyncio.sleep(0.01)

    async def _deliver(self, future):
        cf_future, callback = self._results.pop(future), self._callbacks.pop(future)
        try:
            result = await self.client.gather(future, asynchronous=True)
        except BaseException as exc:  # joblib raises an exception it is given as the result
            cf_future.set_exception(exc)
            callback(exc)
        else:
            cf_future.set_result(result)
            callback(result)


joblib.register_parallel_backend("dask", DaskBackend)


# -- workers ------------------------------------------------------------------------------------
class TorchThreads(WorkerPlugin):
    """Give each task thread of a worker ``max(1, cores_per_worker // nthreads)`` torch threads.

    A worker with ``nthreads`` task threads runs up to ``nthreads`` tasks at once, so torch's
    own intra-op threads multiply: with ``cores_per_worker=None`` (one core per task thread,
    dask's convention) every task runs torch on one thread. OpenMP keeps the setting per
    thread, so ``setup`` applies it in each of the worker's task threads (waiting for running
    tasks to finish) and for threads started later. Workers without torch are left alone.
    Register it once per client: ``client.register_plugin(TorchThreads())``.
    """

    name = "flowsk-torch-threads"

    def __init__(self, cores_per_worker: int | None = None) -> None:
        if cores_per_worker is not None and not (
                isinstance(cores_per_worker, int) and cores_per_worker >= 1):
            raise ValueError(f"cores_per_worker must be a positive int or None, "
                             f"got {cores_per_worker!r}")
        self.cores_per_worker = cores_per_worker

    async def setup(self, worker: Worker) -> None:
        try:
            import torch
        except ImportError:
            return
        nthreads = worker.state.nthreads
        n = max(1, (self.cores_per_worker or nthreads) // nthreads)
        torch.set_num_threads(n)  # the default of threads that start later
        barrier = threading.Barrier(nthreads)

        def set_threads():  # one call per task thread: each waits until all have theirs
            torch.set_num_threads(n)
            barrier.wait()

        executor = worker.executors["default"]
        await asyncio.gather(*(asyncio.wrap_future(executor.submit(set_threads))
                               for _ in range(nthreads)))


#: On each worker: the estimators shared with it by :func:`share`, by key.
_SHARED = {}
#: In the process that called :func:`share`: its stand-ins, by key.
_STAND_INS = {}


class _Share(WorkerPlugin):
    """Puts one estimator into ``_SHARED`` of each worker, also of workers that join later."""

    def __init__(self, key, estimator):
        self.key = key
        self.estimator = estimator

    def setup(self, worker):
        _SHARED[self.key] = self.estimator

    def teardown(self, worker):
        _SHARED.pop(self.key, None)


class _Unresolved:
    """What a stand-in unpickles to where its estimator is unknown (a dask scheduler of its
    own process, a stand-in that was unshared): a key that pickles back to the stand-in."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __reduce__(self):
        return _shared, (self.key,)

    def __getattr__(self, name):
        raise AttributeError(
            f"{name!r}: this is a placeholder for the estimator shared as {self.key!r}, "
            "which is known only to the dask workers it was shared with and to the process "
            "that shared it (flowsk_dask.share); pickle the original estimator to save or "
            "send it")


def _shared(key):
    """What a stand-in unpickles to: on a worker its copy of the estimator, in the sharing
    process the stand-in itself, elsewhere an :class:`_Unresolved` key. (A scheduler unpickles
    and repickles every task, so the stand-in must stay small there.)"""
    if key in _SHARED:
        return _SHARED[key]
    return _STAND_INS[key] if key in _STAND_INS else _Unresolved(key)


def _reduce_stand_in(self):
    return _shared, (self._flowsk_key,)


def _clone_stand_in(self):
    return clone(self._flowsk_original)


def share(estimator: _Estimator, client: Client | None = None) -> _Estimator:
    """A stand-in for ``estimator`` that dask ships to each worker of ``client`` once.

    ``estimator`` (a fitted prior) goes to every worker, and to workers that join later, in a
    worker plugin. The stand-in is a shallow copy of ``estimator``, of a subclass that pickles
    to a short key; a worker unpickles the key to its own copy of ``estimator``. Use it where
    the estimator was: ``InverseSolver(share(prior), op)`` in a grid search under
    ``joblib.parallel_config(backend="dask")``. It unpickles to the estimator nowhere else
    (other processes, joblib's other backends, files): pickle the original to save it.
    :func:`unshare` frees the workers' copies. ``client``: None for the current client.
    """
    client = get_client() if client is None else client
    key = f"flowsk-shared-{uuid.uuid4().hex}"
    client.register_plugin(_Share(key, estimator), name=key)
    cls = type(estimator)
    stand_in_type = type(cls.__name__, (cls,), {
        "__module__": cls.__module__, "__doc__": cls.__doc__, "_flowsk_key": key,
        "_flowsk_original": estimator, "__reduce__": _reduce_stand_in,
        "__sklearn_clone__": _clone_stand_in})
    stand_in = object.__new__(stand_in_type)
    stand_in.__dict__.update(estimator.__dict__)
    _STAND_INS[key] = stand_in
    return stand_in


def unshare(stand_in: Any, client: Client | None = None) -> None:
    """Free the workers' copies of the estimator behind a :func:`share` stand-in."""
    client = get_client() if client is None else client
    client.unregister_worker_plugin(stand_in._flowsk_key)
    _STAND_INS.pop(stand_in._flowsk_key, None)


# -- InverseSolver over Dask arrays -------------------------------------------------------------
def _measurements(solver, Y):
    """``Y`` as a Dask array with one column chunk whose row chunks start at multiples of
    ``BLOCK_SIZE`` (rechunked to the multiple nearest its largest chunk where they do not)."""
    from flowsk.solver import BLOCK_SIZE

    Y = da.asarray(Y)
    m = solver.operator.output_dim
    if Y.ndim != 2 or Y.shape[1] != m:
        raise ValueError(f"Y must have shape (n_obs, {m}) for this operator, got {Y.shape}")
    rows = Y.chunks[0]
    if any(c % BLOCK_SIZE for c in rows[:-1]):
        Y = Y.rechunk({0: max(1, round(max(rows) / BLOCK_SIZE)) * BLOCK_SIZE})
    return Y.rechunk({1: -1}), BLOCK_SIZE


def _first_block(block_info, block_size):
    return block_info[0]["array-location"][0][0] // block_size


def _predict_chunk(y, solver, seed, return_std, block_size, block_info=None):
    out = solver._predict(y, return_std, seed, _first_block(block_info, block_size))
    return np.stack(out, 1) if return_std else out


def _sample_chunk(y, solver, seed, n_samples, block_size, block_info=None):
    return solver._sample_posterior(y, n_samples, seed, _first_block(block_info, block_size))


def _node(solver):
    """``solver`` as one graph node, so that each worker receives it once, after checking its
    method, prior and operator here (other errors come from the workers at compute time)."""
    solver._check_prior_operator(solver._method())
    return dask.delayed(solver, pure=False)


def predict(solver: InverseSolver, Y: da.Array | ArrayLike, return_std: bool = False
            ) -> da.Array | tuple[da.Array, da.Array]:
    """``solver.predict`` over a Dask array ``Y (n_obs, m)``: an ``(n_obs, n_features)`` Dask
    array (a pair, mean and std, with ``return_std``), one task per chunk.

    The numbers equal ``solver.predict(Y.compute(), return_std)`` for an int
    ``random_state`` (a ``RandomState`` advances by one draw, as there): chunks are rechunked
    to start at multiples of ``flowsk.solver.BLOCK_SIZE`` rows, and each row block keeps its
    seed. (``dask_ml.wrappers.ParallelPostFit`` cannot do this: it expects 1-D predictions.)
    """
    node = _node(solver)
    Y, block_size = _measurements(solver, Y)
    n_features = solver.prior.n_features_in_
    seed = solver._seed()
    if not return_std:
        return da.map_blocks(_predict_chunk, Y, node, seed, False, block_size,
                             chunks=(Y.chunks[0], (n_features,)), dtype=np.float64)
    both = da.map_blocks(_predict_chunk, Y, node, seed, True, block_size, new_axis=2,
                         chunks=(Y.chunks[0], (2,), (n_features,)), dtype=np.float64)
    return both[:, 0], both[:, 1]


def sample_posterior(solver: InverseSolver, Y: da.Array | ArrayLike,
                     n_samples: int = 32) -> da.Array:
    """``solver.sample_posterior`` over a Dask array ``Y (n_obs, m)``: a Dask array
    ``(n_obs, n_samples, n_features)``, equal to the in-memory call as for :func:`predict`."""
    node = _node(solver)
    Y, block_size = _measurements(solver, Y)
    seed = solver._seed()
    return da.map_blocks(_sample_chunk, Y, node, seed, n_samples, block_size, new_axis=2,
                         chunks=(Y.chunks[0], (n_samples,), (solver.prior.n_features_in_,)),
                         dtype=np.float64)


# -- ONNX parts over Dask arrays (no torch) -----------------------------------------------------
#: onnxruntime sessions of this process, by the token of their model's bytes.
_SESSIONS = {}


def _session(model, token, providers):
    import onnxruntime as ort

    if token not in _SESSIONS:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one core per task thread, as TorchThreads
        options.inter_op_num_threads = 1
        _SESSIONS[token] = ort.InferenceSession(model, options, providers=providers)
    return _SESSIONS[token]


def _model(path, providers):
    """The model's bytes as one graph node, its token, and a session here to read it."""
    model = Path(path).read_bytes()
    token = dask.base.tokenize(model)
    return dask.delayed(model, pure=True), token, _session(model, token, providers)


def _onnx_chunk(x, model, token, providers):
    session = _session(model, token, providers)
    return session.run(None, {session.get_inputs()[0].name: np.asarray(x, np.float32)})[0]


def onnx_map(path: str | os.PathLike, X: da.Array | ArrayLike,
             providers: _Providers | None = None) -> da.Array:
    """Run the one-input ONNX part at ``path`` (``decoder``, ``encoder``, ``projector`` or
    ``log_prob`` from ``exporters.to_onnx``) on each chunk of the Dask array ``X (n, k)``:
    a float32 Dask array ``(n, out)`` (``(n,)`` for ``log_prob``).

    The file is read here and its bytes reach each worker once; each worker process keeps
    one onnxruntime session per model (one thread per task). ``providers``: onnxruntime's,
    default CPU.
    """
    providers = providers or ["CPUExecutionProvider"]
    model, token, session = _model(path, providers)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ValueError(f"{path} has inputs {[i.name for i in inputs]}; onnx_map runs parts "
                         "with one input (onnx_sample_posterior runs posterior_sampler)")
    X = da.asarray(X)
    width = inputs[0].shape[1]
    if X.ndim != 2 or X.shape[1] != width:
        raise ValueError(f"X must have shape (n, {width}) for {path}, got {X.shape}")
    X = X.rechunk({1: -1})
    out_shape = outputs[0].shape[1:]
    chunks = (X.chunks[0], *((d,) for d in out_shape))
    return da.map_blocks(_onnx_chunk, X, model, token, providers, chunks=chunks,
                         drop_axis=[] if out_shape else [1], dtype=np.float32)


def _sampler_chunk(y, model, token, providers, seed, n_samples, latent_dim, block_info=None):
    session = _session(model, token, providers)
    first = block_info[0]["array-location"][0][0]
    noise = np.stack([np.random.default_rng([seed, first + i]).standard_normal(
        (n_samples, latent_dim), dtype=np.float32) for i in range(len(y))])
    x = session.run(None, {"y": np.repeat(np.asarray(y, np.float32), n_samples, 0),
                            "noise": noise.reshape(-1, latent_dim)})[0]
    return x.reshape(len(y), n_samples, -1)


def onnx_sample_posterior(path: str | os.PathLike, Y: da.Array | ArrayLike, n_samples: int = 32,
                          random_state: int | np.random.RandomState | None = None,
                          providers: _Providers | None = None) -> da.Array:
    """Posterior draws from an exported ``posterior_sampler`` over the chunks of a Dask array
    ``Y (n_obs, m)``: a float32 Dask array ``(n_obs, n_samples, n_features)``.

    Draw ``s`` of row ``i`` feeds the noise row ``s`` of
    ``np.random.default_rng([seed, i]).standard_normal((n_samples, latent_dim),
    dtype=np.float32)``, ``seed`` being one draw of ``randint(2**31 - 1)`` from
    ``check_random_state(random_state)``: the result does not depend on the chunks.
    """
    providers = providers or ["CPUExecutionProvider"]
    model, token, session = _model(path, providers)
    names = sorted(i.name for i in session.get_inputs())
    if names != ["noise", "y"]:
        raise ValueError(f"{path} has inputs {names}; onnx_sample_posterior runs the "
                         "posterior_sampler part (inputs y and noise)")
    shapes = {i.name: i.shape[1] for i in session.get_inputs()}
    if not (isinstance(n_samples, int) and n_samples >= 1):
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    Y = da.asarray(Y)
    if Y.ndim != 2 or Y.shape[1] != shapes["y"]:
        raise ValueError(f"Y must have shape (n_obs, {shapes['y']}) for {path}, got {Y.shape}")
    seed = int(check_random_state(random_state).randint(2**31 - 1))
    n_features = session.get_outputs()[0].shape[1]
    return da.map_blocks(_sampler_chunk, Y.rechunk({1: -1}), model, token, providers, seed,
                         n_samples, shapes["noise"], new_axis=2, dtype=np.float32,
                         chunks=(Y.chunks[0], (n_samples,), (n_features,)))
