"""Variational posterior inference with composed flows: ``vi``, ``ambient-vi``, ``amortized-vi``.

Whang, Lindgren and Dimakis compose a *pre-generator* ``q(z)`` with the frozen prior
``G``; samples of the posterior are ``G(z)`` for ``z ~ q``. With Gaussian smoothing of
std ``sigma`` the per-observation objective is (their eq. 4)

    E_q[ beta * log q(z) - log N(z; 0, I) + ||A(G(z)) - y||^2 / (2 sigma^2) ],

minimised by Adam with the reparametrisation trick (``mc_samples`` draws per step; with
``path_gradient`` the entropy term uses the path-derivative estimator of Roeder et al.).
``beta = 1`` is the exact KL to the smoothed posterior; ``beta < 1`` down-weights the entropy
(a colder posterior, ``beta -> 0`` collapses to the MAP point).

- ``vi``: one pre-generator per observation, all trained together: every weight has a
  leading observation axis and the batch is one set of ``einsum``/``bmm`` calls. The
  pre-generator is an affine map ``z = m + L eps`` (``L`` lower-triangular with a positive
  diagonal, or diagonal with ``covariance="diag"``) followed by ``n_layers`` batched affine
  couplings (identity at initialisation). It starts (``init="laplace"``) from a Laplace
  approximation, so Adam only refines it (hence the small default ``learning_rate``; raise it
  with ``init="prior"``). ``covariance="full"`` stores ``d x d`` per observation: use
  ``"diag"`` for large latent spaces. A draw of ``q`` the generator cannot make (a latent in
  its tails where the prior overflows) is redrawn. The mode-seeking KL makes ``q`` narrower
  than the posterior; ``importance_samples=k > 0`` corrects it by sampling importance
  resampling: ``k`` draws of ``q`` per observation, weighted by ``p(z | y)^(1 / beta) / q(z)``
  (Pareto-smoothed, Vehtari et al.), ``n_samples`` of them drawn by weight. The weights' Pareto
  ``k`` (and the effective sample size) say whether that can work: above 0.7 (below 10) the
  resampled draws rest on a handful of ``q``'s draws and a warning says so (``q`` is too far
  from the posterior; draws of the generator's overflow region get no weight).
- ``ambient-vi``: the same objective with the pre-generator in data space
  (``x = q-flow(eps)``, ``-log p(x)`` from the prior's density; for a bounded ``data_range``
  in the space after the prior's logit layer), the paper's baseline. Its ``init="laplace"``
  is the latent Laplace approximation pushed through the generator (linearised at the MAP
  point, ``D`` backward passes); ``init="prior"`` a diagonal Gaussian fit to prior draws.
- ``amortized-vi``: a conditional flow ``q(z | y)`` trained once in ``fit``; after that,
  ``sample`` is one network pass. As in Hong, Park and Chun, the couplings see ``y`` through
  an encoder ``g(y)`` (a residual MLP of the standardised ``y``, the identity at
  initialisation); the mean and covariance of ``g`` over the training measurements are kept
  for :func:`flowsk.metrics.ood_score`.
"""
import math
import warnings

import numpy as np
import torch
from sklearn.covariance import EmpiricalCovariance
from tqdm.auto import tqdm

from .._training import train
from .._validation import check_int
from ..nn.base import Chain, standard_normal_log_prob
from ..nn.builders import build_flow
from ..nn.multiscale import Logit
from ..nn.networks import MLP
from .base import Method, redraw_nonfinite, sum_squares
from .laplace import batch_jacobian, covariance, laplace

#: Above this Pareto k of the importance weights (Vehtari et al.), resampling is unreliable.
PARETO_K_MAX = 0.7
#: Below this effective sample size of the weights, resampling is unreliable as well.
ESS_MIN = 10


def _clamp_scale(raw):
    """Smoothly bound log-scales of the couplings to (-3, 3)."""
    return 3.0 * torch.tanh(raw / 3.0)


class BatchedPreGenerator(torch.nn.Module):
    """``n`` independent flows on ``R^d``, one per observation, with batched weights.

    ``forward(eps (n, k, d)) -> (z (n, k, d), log q(z) (n, k))``.
    """

    def __init__(self, n, d, *, covariance="full", n_layers=2, hidden_features=32,
                 init_noise=None):
        super().__init__()
        if covariance not in ("full", "diag"):
            raise ValueError(f"covariance must be 'full' or 'diag', got {covariance!r}")
        self.d, self.full = d, covariance == "full"
        self.mean = torch.nn.Parameter(torch.zeros(n, d))
        self.log_diag = torch.nn.Parameter(torch.zeros(n, d))
        if self.full:
            self.lower = torch.nn.Parameter(torch.zeros(n, d, d))
            self.register_buffer("mask", torch.tril(torch.ones(d, d), -1))
        self.split = d // 2
        self.layers = torch.nn.ParameterList()
        if self.split == 0:
            n_layers = 0
        self.n_layers = n_layers
        d1, d2, h = self.split, d - self.split, hidden_features
        for _ in range(n_layers):
            w1 = init_noise(n, d1, h) / math.sqrt(d1)
            self.layers.extend([torch.nn.Parameter(w1), torch.nn.Parameter(torch.zeros(n, 1, h)),
                                torch.nn.Parameter(torch.zeros(n, h, 2 * d2)),
                                torch.nn.Parameter(torch.zeros(n, 1, 2 * d2))])

    def forward(self, eps):
        d = self.d
        log_q = standard_normal_log_prob(eps.reshape(-1, d)).view(eps.shape[:2])
        scale = self.log_diag.exp()
        if self.full:
            L = self.lower * self.mask + torch.diag_embed(scale)
            z = torch.einsum("nij,nkj->nki", L, eps)
        else:
            z = eps * scale[:, None]
        z = z + self.mean[:, None]
        log_q = log_q - self.log_diag.sum(1, keepdim=True)
        for i in range(self.n_layers):
            w1, b1, w2, b2 = self.layers[4 * i:4 * i + 4]
            if i % 2:
                z = z.flip(-1)
            z1, z2 = z[..., :self.split], z[..., self.split:]
            out = torch.bmm(torch.tanh(torch.bmm(z1, w1) + b1), w2) + b2
            s, t = out.chunk(2, -1)
            s = _clamp_scale(s)
            z = torch.cat([z1, z2 * s.exp() + t], -1)
            log_q = log_q - s.sum(-1)
            if i % 2:
                z = z.flip(-1)
        return z, log_q


    def log_prob(self, z, detach=True):
        """``log q(z)`` for ``z (n, k, d)`` by inverting the flow. With ``detach`` the weights
        are constants, so gradients reach only ``z``: the path-derivative ("sticking the
        landing") estimator, whose variance vanishes where ``q`` equals the target."""
        w = (lambda t: t.detach()) if detach else (lambda t: t)
        log_q = z.new_zeros(z.shape[:2])
        for i in reversed(range(self.n_layers)):
            w1, b1, w2, b2 = (w(t) for t in self.layers[4 * i:4 * i + 4])
            if i % 2:
                z = z.flip(-1)
            z1, z2 = z[..., :self.split], z[..., self.split:]
            s, t = (torch.bmm(torch.tanh(torch.bmm(z1, w1) + b1), w2) + b2).chunk(2, -1)
            s = _clamp_scale(s)
            z = torch.cat([z1, (z2 - t) * torch.exp(-s)], -1)
            log_q = log_q - s.sum(-1)
            if i % 2:
                z = z.flip(-1)
        log_diag = w(self.log_diag)
        centred = z - w(self.mean)[:, None]
        if self.full:
            L = w(self.lower) * self.mask + torch.diag_embed(log_diag.exp())
            eps = torch.linalg.solve_triangular(L, centred.transpose(1, 2),
                                                upper=False).transpose(1, 2)
        else:
            eps = centred * torch.exp(-log_diag)[:, None]
        log_q = log_q - log_diag.sum(1, keepdim=True)
        return log_q + standard_normal_log_prob(eps.reshape(-1, self.d)).view(eps.shape[:2])


def _start_at(q, mean, cov):
    """Set the affine part of ``q`` to ``N(mean (n, d), cov (n, d, d), float64)``; a diagonal
    ``q`` to the diagonal closest in ``KL(q || N)``, the inverse of the precision's diagonal."""
    with torch.no_grad():
        q.mean.copy_(mean)
        if q.full:
            L = torch.linalg.cholesky(cov).to(mean.dtype)
            q.log_diag.copy_(torch.diagonal(L, dim1=1, dim2=2).log())
            q.lower.copy_(L)
        else:
            precision = torch.diagonal(covariance(cov), dim1=1, dim2=2)
            q.log_diag.copy_(-0.5 * precision.log().to(mean.dtype))


class VI(Method):
    """Per-observation composed-flow VI in the prior's latent space."""

    posterior = True
    defaults = {"sigma": 0.1, "beta": 1.0, "n_iter": 1000, "learning_rate": 3e-3,
                "n_samples": 32, "mc_samples": 8, "covariance": "full", "n_layers": 2,
                "hidden_features": 32, "init": "laplace", "laplace_steps": 20,
                "path_gradient": True, "importance_samples": 0}

    def _dim(self, problem):
        return problem.flow.latent_dim

    def _negative_log_prior(self, problem, z):
        """``-log p(z)`` and the signal ``x`` for ``z (B, dim)``."""
        x = problem.flow.inverse(z)[0]
        return 0.5 * sum_squares(z), x

    def _log_joint(self, problem, z, Y):
        """``log p(z) + log p(y | z)`` up to a constant: ``z (n, k, dim) -> (n, k)``."""
        n, k, d = z.shape
        nlp, x = self._negative_log_prior(problem, z.reshape(n * k, d))
        fit = sum_squares(problem.operator(x).view(n, k, -1) - Y[:, None])
        return -nlp.view(n, k) - fit / (2 * problem.params["sigma"] ** 2)

    def _loss(self, problem, q, Y, k):
        """The negative ELBO per observation ``(n,)``, from ``k`` draws each."""
        p = problem.params
        z, log_q = q(problem.randn(len(Y), k, self._dim(problem)))
        if p["path_gradient"]:
            log_q = q.log_prob(z)
        return (p["beta"] * log_q - self._log_joint(problem, z, Y)).mean(1)

    def fit_q(self, problem, Y):
        p = problem.params
        for name in ("mc_samples", "n_layers", "hidden_features"):
            check_int(name, p[name], 0 if name == "n_layers" else 1)
        q = BatchedPreGenerator(len(Y), self._dim(problem), covariance=p["covariance"],
                                n_layers=p["n_layers"], hidden_features=p["hidden_features"],
                                init_noise=problem.randn).to(Y.device)
        self._init_q(problem, q, Y)
        opt = torch.optim.Adam(q.parameters(), lr=p["learning_rate"], foreach=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, p["n_iter"],
                                                           eta_min=0.05 * p["learning_rate"])
        for _ in tqdm(range(p["n_iter"]), desc=type(self).__name__, leave=False,
                      disable=problem.verbose <= 0):
            loss = self._loss(problem, q, Y, p["mc_samples"])
            opt.zero_grad(set_to_none=True)
            # an observation whose Monte Carlo draws left the flow's finite range skips this
            # step (its gradient is zeroed) instead of turning its pre-generator into NaN
            torch.where(torch.isfinite(loss), loss, 0.0).sum().backward()
            for param in q.parameters():
                param.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
            sched.step()
        return q.requires_grad_(False)

    def _init_q(self, problem, q, Y):
        """``init="prior"`` starts at ``q = N(0, I)``; ``init="laplace"`` at a Laplace
        approximation: a few Gauss-Newton steps on the latent MAP objective (each kept only
        where it lowers the objective), then the covariance ``beta * H^-1`` with the
        Gauss-Newton Hessian ``H = I + J^T J / sigma^2`` of ``J = d A(G(z)) / dz``. For a
        linear operator and an affine prior this is already the exact posterior; in general it
        spares the optimiser the slow shrinking of well-determined directions."""
        if self._check_init(problem.params) == "laplace":
            z, H = laplace(problem, Y, problem.params["laplace_steps"])
            _start_at(q, z, problem.params["beta"] * covariance(H))

    @staticmethod
    def _check_init(p):
        """``p["init"]``, after checking it and ``laplace_steps``."""
        if p["init"] not in ("laplace", "prior"):
            raise ValueError(f"init must be 'laplace' or 'prior', got {p['init']!r}")
        check_int("laplace_steps", p["laplace_steps"], 0)
        return p["init"]

    def _to_signal(self, problem, z):
        return problem.flow.decode(z)

    def sample(self, problem, Y, n_samples):
        check_int("importance_samples", problem.params["importance_samples"], 0)
        return self.draw(problem, self.fit_q(problem, Y), Y, n_samples)

    def draw(self, problem, q, Y, n_samples):
        """Posterior draws ``(n, n_samples, n_features)`` of a fitted pre-generator ``q``."""
        k = problem.params["importance_samples"]
        n, d = len(Y), self._dim(problem)
        with torch.no_grad():
            if k:
                z = self._resample(problem, q, Y, n_samples, k)
                return self._to_signal(problem, z.reshape(-1, d)).view(n, n_samples, -1)
            # q's tails may reach latents where the generator overflows: redraw those
            _, x = redraw_nonfinite(lambda: q(problem.randn(n, n_samples, d))[0].view(-1, d),
                                    lambda z: self._to_signal(problem, z))
            return x.view(n, n_samples, -1)

    def _resample(self, problem, q, Y, n_samples, k):
        """``n_samples`` of ``k`` draws of ``q`` per observation, resampled with the
        Pareto-smoothed weights ``p(z | y)^(1 / beta) / q(z)``: ``(n, n_samples, dim)``.
        Warns where the weights' Pareto ``k`` exceeds 0.7 or their effective sample size is
        under 10."""
        from arviz_stats.base import array_stats

        z, log_q = q(problem.randn(len(Y), k, self._dim(problem)))
        log_w = self._log_joint(problem, z, Y) / problem.params["beta"] - log_q
        log_w = log_w.double().cpu().numpy()
        finite = np.isfinite(log_w)  # draws the generator cannot make have no weight
        floor = np.where(finite, log_w, np.inf).min(1, keepdims=True) - 100
        log_w = np.where(finite, log_w, np.where(np.isfinite(floor), floor, 0.0))
        # arviz-stats takes log-likelihoods, whose negatives are the log weights
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # degenerate tails give NaN k
            smoothed, pareto_k = array_stats.psislw(-log_w, axis=-1)
        # a tail the Pareto fit cannot take (NaN k) keeps its raw weights, and counts as bad
        smoothed = np.where(np.isfinite(smoothed).all(1, keepdims=True), smoothed, log_w)
        weights = np.exp(smoothed - smoothed.max(1, keepdims=True))
        ess = weights.sum(1) ** 2 / (weights ** 2).sum(1)
        # the Pareto fit itself fails on extreme weights (one draw with all of it): the
        # effective sample size catches those
        bad = ~(pareto_k <= PARETO_K_MAX) | (ess < ESS_MIN)
        if bad.any():
            warnings.warn(f"{type(self).__name__.lower()}: importance weights unreliable "
                          f"(Pareto k > {PARETO_K_MAX} or effective sample size < {ESS_MIN}) "
                          f"for {int(bad.sum())} of {len(Y)} observations (largest k "
                          f"{np.nanmax(pareto_k):.2f}, smallest size {ess.min():.1f}); their "
                          "draws lean on few of q's: raise n_iter or use mala", RuntimeWarning,
                          stacklevel=7)
        weights = torch.as_tensor(weights, dtype=torch.float32, device=Y.device)
        index = torch.multinomial(weights, n_samples, replacement=True,
                                  generator=problem.generator)
        return torch.gather(z, 1, index[..., None].expand(-1, -1, z.shape[2]))


class AmbientVI(VI):
    """The same VI with the pre-generator acting in data space.

    For a prior with a ``data_range``, ``q`` lives in the unconstrained space after the prior's
    logit layer (a fixed bijection of the data's open box, which leaves the KL unchanged), so
    every draw is a valid signal; otherwise it acts on ``x`` directly."""

    defaults = {**VI.defaults, "learning_rate": 5e-3}

    def check_prior(self, prior):
        flow = prior.flow_
        if flow.latent_dim != flow.n_features or not hasattr(flow, "log_prob"):
            raise ValueError("ambient-vi needs a prior with a density in data space "
                             "(a bijective FlowPrior); use method='vi' for injective priors")

    def _dim(self, problem):
        return problem.flow.n_features

    @staticmethod
    def _split(flow):
        """``(logit layer or None, the flow's remaining layers)``."""
        layers = flow.body.layers
        if isinstance(layers[0], Logit):
            return layers[0], Chain(*layers[1:])
        return None, flow.body

    def _negative_log_prior(self, problem, u):
        logit, rest = self._split(problem.flow)
        z, logdet = rest(u)
        # the data fit sees the generator's unclipped signal, as the latent methods do
        return -(standard_normal_log_prob(z) + logdet), (u if logit is None
                                                         else logit.inverse(u)[0])

    def _init_q(self, problem, q, Y):
        """``init="laplace"``: the latent Laplace approximation ``N(z_map, beta H^-1)`` pushed
        through the generator up to its logit, ``u = F(z)``, linearised at ``z_map``: mean
        ``F(z_map)``, covariance ``beta J H^-1 J^T`` with ``J = dF/dz`` (``D`` backward
        passes; exact for an affine prior and a linear operator). ``init="prior"``: a diagonal
        Gaussian fit to prior samples of ``u``."""
        p = problem.params
        _, rest = self._split(problem.flow)
        if self._check_init(p) == "laplace":
            z, H = laplace(problem, Y, p["laplace_steps"])
            u, J = batch_jacobian(lambda z: rest.inverse(z)[0], z)
            J = J.double()
            _start_at(q, u, p["beta"] * J @ covariance(H) @ J.transpose(1, 2))
            return
        with torch.no_grad():
            u = rest.inverse(problem.randn(256, self._dim(problem)))[0]
            q.mean.copy_(u.mean(0).expand_as(q.mean))
            q.log_diag.copy_(torch.log(u.std(0) + 1e-3).expand_as(q.log_diag))

    def _to_signal(self, problem, u):
        logit, _ = self._split(problem.flow)
        return u if logit is None else problem.flow.clip(logit.inverse(u)[0])


class ResidualEncoder(torch.nn.Module):
    """``g(y) = y + MLP(y)``: ``(b, m) -> (b, m)``, the identity at initialisation."""

    def __init__(self, m, hidden_features):
        super().__init__()
        self.net = MLP(m, m, hidden_features, n_hidden=1)

    def forward(self, y):
        return y + self.net(y)


class AmortizedVI(Method):
    """One conditional pre-generator ``q(z | y)`` shared by all observations.

    ``fit(Y, X)`` trains it by maximum likelihood on pairs ``(z = G^{-1}(x), y)``: with
    ``X`` given, ``x = X`` and ``y = Y``; without, ``n_simulations`` pairs are simulated from
    the prior, ``y = A(x) + sigma * noise``. Minimising this expected forward KL over
    ``p(x, y)`` makes ``q(z | y)`` the posterior of the smoothed model. ``sample`` is then
    one pass of the conditional flow and the prior.

    The model is the conditional flow with an ``encoder`` (``y`` standardised by the buffers
    ``y_mean``, ``y_std`` -> ``m`` features that every coupling reads) and
    ``feature_covariance``, an :class:`~sklearn.covariance.EmpiricalCovariance` of the
    encoder's features of the training measurements.
    """

    posterior = True
    needs_fit = True
    defaults = {"sigma": 0.1, "n_samples": 32, "n_iter": 200, "learning_rate": 1e-3,
                "coupling": "robust-spline", "n_steps": 4, "hidden_features": 64,
                "n_simulations": 20000, "batch_size": 256}

    def fit(self, problem, Y, X=None):
        p, flow, op = problem.params, problem.flow, problem.operator
        device = problem.generator.device
        if flow.latent_dim != flow.n_features and X is not None:
            raise ValueError("amortized-vi with an injective prior trains on simulated pairs; "
                             "call fit(Y) without X")
        with torch.no_grad():
            if X is None:
                xs, ys = [], []
                for start in range(0, p["n_simulations"], 4096):
                    b = min(4096, p["n_simulations"] - start)
                    z = problem.randn(b, flow.latent_dim)
                    x = flow.inverse(z)[0]
                    xs.append(z)
                    ys.append(op(x) + p["sigma"] * problem.randn(b, op.output_dim))
                Z, Yt = torch.cat(xs), torch.cat(ys)
                finite = torch.isfinite(Yt).all(1)
                if not finite.all():  # the prior overflowed: learn from the pairs it can make
                    warnings.warn(f"amortized-vi: dropped {int((~finite).sum())} of {len(Yt)} "
                                  "simulated measurements that are not finite (the prior's "
                                  "generator overflows on those latents)", RuntimeWarning,
                                  stacklevel=4)
                    Z, Yt = Z[finite], Yt[finite]
            else:
                Xt = torch.as_tensor(np.asarray(X, np.float32), device=device)
                Z = torch.cat([flow(Xt[s:s + 4096])[0] for s in range(0, len(Xt), 4096)])
                Yt = torch.as_tensor(np.asarray(Y, np.float32), device=device)
        m = Yt.shape[1]
        seed = int(torch.randint(2**31 - 1, (1,), generator=problem.generator,
                                 device=device).item())
        d = flow.latent_dim

        def loss_fn(module, batch):
            return -module.log_prob(batch[:, :d], amortized_context(module, batch[:, d:])).mean()

        with torch.random.fork_rng(devices=[]):  # the caller's global generator is untouched
            torch.manual_seed(seed)
            model = amortized_model(d, m, p, seed).to(device)
            # standardise the context so that the encoder sees unit-scale inputs
            model.y_mean.copy_(Yt.mean(0))
            model.y_std.copy_(Yt.std(0) + 1e-6)
            train(model, loss_fn, torch.cat([Z, Yt], 1), max_epochs=p["n_iter"],
                  batch_size=p["batch_size"], learning_rate=p["learning_rate"],
                  rng=np.random.RandomState(seed), verbose=problem.verbose, desc="amortized-vi")
        model.requires_grad_(False).eval()
        with torch.no_grad():
            features = torch.cat([amortized_context(model, Yt[s:s + 4096])
                                  for s in range(0, len(Yt), 4096)])
        model.feature_covariance = EmpiricalCovariance().fit(features.cpu().double().numpy())
        return model

    def sample(self, problem, Y, n_samples):
        model, flow = problem.model.to(Y.device), problem.flow
        n, Y = len(Y), Y.repeat_interleave(n_samples, 0)
        with torch.no_grad():  # as for vi: draws the generator cannot make are redrawn
            _, x = redraw_nonfinite(lambda: problem.randn(n * n_samples, flow.latent_dim),
                                    lambda eps: amortized_draw(model, flow, Y, eps))
            return x.view(n, n_samples, -1)


def amortized_model(latent_dim, m, params, seed):
    """The untrained ``amortized-vi`` model for latents of ``latent_dim`` and measurements of
    width ``m``, with the ``coupling``, ``n_steps`` and ``hidden_features`` of ``params``:
    a conditional flow with an ``encoder`` and the buffers ``y_mean`` (zeros) and ``y_std``
    (ones). ``seed`` (int) seeds its random layers."""
    for name in ("n_steps", "hidden_features"):
        check_int(name, params[name], 1)
    model = build_flow(latent_dim, architecture="mlp", coupling=params["coupling"],
                       n_steps=params["n_steps"], hidden_features=params["hidden_features"],
                       context_features=m, random_state=seed)
    model.encoder = ResidualEncoder(m, params["hidden_features"])
    model.register_buffer("y_mean", torch.zeros(m))
    model.register_buffer("y_std", torch.ones(m))
    return model


def amortized_context(model, Y):
    """The encoder features ``g(y)`` a fitted ``amortized-vi`` model conditions on:
    ``Y (b, m) -> (b, k)``."""
    return model.encoder((Y - model.y_mean) / model.y_std)


def amortized_draw(model, flow, Y, eps):
    """Posterior draws of a fitted ``amortized-vi`` model: ``Y (b, m), eps (b, d) -> x (b, D)``.

    One pass of the encoder, the conditional pre-generator and the prior's generator; ``eps``
    is standard normal noise in the prior's latent space.
    """
    z = model.inverse(eps, amortized_context(model, Y))[0]
    return flow.decode(z)


METHODS = {"vi": VI, "ambient-vi": AmbientVI, "amortized-vi": AmortizedVI}
