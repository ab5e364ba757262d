"""Markov chain Monte Carlo in the prior's latent space: ``langevin``, ``mala``, ``hmc``,
``pl-mcmc``.

All sample the smoothed latent posterior

    log p(z | y) = log N(z; 0, I) - ||A(G(z)) - y||^2 / (2 sigma^2) + const

with ``n_chains`` chains per observation, all observations and chains advanced together as one
batch. Chains run ``burn_in`` steps, then keep every ``thin``-th state; ``sample`` returns ``G``
of the kept states.

Preconditioning. With ``preconditioner="laplace"`` (the default) each observation's posterior
is first approximated by ``N(z_map, H^-1)`` (:mod:`.laplace`; at most ``laplace_steps``
damped Gauss-Newton steps), and the chains run in whitened coordinates ``w``,
``z = z_map + L w`` with ``L L^T = H^-1``: a constant change of variables, so every sampler
stays exact, while the directions that the measurements pin down and those they leave free
mix at one rate (without it the step must be small against the stiffest direction,
``~sigma^2``, and the free directions barely move).
``preconditioner="identity"`` runs on ``z`` itself and stores no ``d x d`` matrix, and forms no
Jacobian (for large latent spaces: the Laplace approximation costs ``m`` backward passes per
Gauss-Newton step, on ``n_chains`` times the rows for the default start).

Starts (``start``; None: ``"perturbed-map"``):

- ``"perturbed-map"``: perturb-and-MAP points (Papandreou and Yuille 2011),
  ``argmin_z ||z - xi||^2 / 2 + ||A(G(z)) - y - sigma eta||^2 / (2 sigma^2)`` for
  ``xi, eta ~ N(0, I)`` drawn per chain, from ``z = xi``: with the Laplace preconditioner by at
  most ``laplace_steps`` damped Gauss-Newton steps (as the MAP point, so converged), with
  ``"identity"`` by ``start_iter`` Adam steps (the optimisation of ``map``, learning rate 0.05;
  no Jacobian, less converged). These are draws of the exact posterior for an affine generator
  and a linear operator, and near it otherwise, where chains from prior draws would take
  thousands of steps of size ``~sigma^2`` to arrive and chains from the Laplace approximation
  stay too narrow where the posterior is curved;
- ``"laplace"``: ``w ~ N(0, I)``, draws of the Laplace approximation (the linearised
  perturb-and-MAP points: no optimisation per chain);
- ``"prior"``: prior draws.

Starts where the log-posterior is not finite (the generator overflows) are redrawn from the
prior, ten times at most (then ``w = 0``); a step into that region is rejected.

Step sizes. ``step_size=None`` derives the first step from ``lambda``, the largest eigenvalue
of the (whitened) Gauss-Newton Hessian ``I + J^T J / sigma^2`` at each chain's start (power
iteration; about 1 with the Laplace preconditioner, ``||A||^2 ||dG/dz||^2 / sigma^2`` without).

- ``langevin``: unadjusted Langevin, ``w <- w + eps grad + sqrt(2 eps) noise``, with
  ``eps = 0.1 / lambda``. Without an accept/reject step its stationary law is biased: for a
  Gaussian of curvature ``lambda`` the variance is inflated by ``1 / (1 - eps lambda / 2)``,
  about 5 % here.
- ``mala``: the same proposal with a Metropolis-Hastings correction, so it targets the
  posterior exactly. Each chain's ``eps`` starts at ``1.36 d^(-1/3) / lambda`` and is adapted
  during burn-in by dual averaging (Hoffman and Gelman 2014, algorithm 5) to an acceptance rate
  of ``target_accept`` (0.574, optimal for MALA, Roberts and Rosenthal 1998), then fixed.
- ``hmc``: Hamiltonian Monte Carlo, ``n_leapfrog`` leapfrog steps per proposal, step adapted
  the same way to 0.8; each transition scales each chain's step by a uniform factor in
  [0.8, 1.2] (Neal 2011, 5.4.2.2: a trajectory of fixed length can resonate with a direction
  of the posterior and end near its start). Where the measurements pin the signal to a thin
  curved set of latents (few measurements, small ``sigma``) its long trajectories mix where
  the diffusive ``mala`` crawls, at several times ``mala``'s cost per draw (the calibration
  benchmark measures both).
- ``pl-mcmc``: random-walk Metropolis-Hastings, ``w + step_size * noise`` (the baseline of
  Cannella et al.), step adapted the same way to 0.234 from ``2.38 / sqrt(d lambda)``.

``target_accept=None`` keeps a given ``step_size`` fixed.

Draws of one chain are correlated, and correlated draws make credible intervals too narrow
(simulation-based calibration sees it); the defaults (16 chains per observation, 200 burn-in
steps, every 5th state kept) trade that against cost: more chains, or a larger ``thin``, give
draws closer to independent.
"""
import dataclasses
import math

import torch
from tqdm.auto import tqdm

from .._validation import check_choice, check_int
from .base import Method, redraw_nonfinite, sum_squares
from .laplace import covariance_factor, laplace
from .latent import LatentOptimization

#: where chains start; see the module docstring
STARTS = ("laplace", "perturbed-map", "prior")


class _Target:
    """The log-posterior of one batch of chains in whitened coordinates ``w (B, d)``:
    ``z = z0 + L w`` per observation (``L`` None: ``z = w``; ``z0`` None: no shift);
    ``B = n * n_chains``. ``beta``
    (a number or ``(B,)``) tempers the data term: ``log N(z; 0, I) + beta log p(y | z)``."""

    def __init__(self, problem, Y, n_chains, z0=None, L=None, beta=1.0):
        self.problem, self.Y, self.c = problem, Y, n_chains
        self.y = Y.repeat_interleave(n_chains, 0)
        self.z0, self.L, self.beta = z0, L, beta

    def z(self, w):
        if self.L is None:
            return w
        n, d = len(self.Y), w.shape[1]
        z = w.view(n, self.c, d) @ self.L.transpose(1, 2)
        return (z if self.z0 is None else self.z0[:, None] + z).reshape(-1, d)

    def w(self, z):
        """The inverse of :meth:`z`: ``(B, d) -> (B, d)``."""
        if self.L is None:
            return z
        n, d = len(self.Y), z.shape[1]
        z = z.view(n, self.c, d) - (0 if self.z0 is None else self.z0[:, None])
        w = torch.linalg.solve_triangular(self.L, z.transpose(1, 2), upper=False)
        return w.transpose(1, 2).reshape(-1, d)

    def residual(self, w):
        return self.problem.operator(self.problem.flow.inverse(self.z(w))[0]) - self.y

    def log_likelihood(self, w):
        """``(B, d) -> (B,)``, ``-||A(G(z)) - y||^2 / (2 sigma^2)``."""
        return -sum_squares(self.residual(w)) / (2 * self.problem.params["sigma"] ** 2)

    def log_p(self, w):
        """``(B, d) -> (B,)``, the unnormalised log-posterior."""
        return -0.5 * sum_squares(self.z(w)) + self.beta * self.log_likelihood(w)

    def log_p_and_grad(self, w):
        """``(log p (B,), grad (B, d))``; ``log p`` is ``-inf`` where either is not finite."""
        w = w.detach().requires_grad_(True)
        log_p = self.log_p(w)
        grad, = torch.autograd.grad(log_p.sum(), w)
        finite = torch.isfinite(log_p) & torch.isfinite(grad).all(1)
        return (torch.where(finite, log_p, -torch.inf).detach(),
                torch.where(finite[:, None], grad, 0.0))

    def curvature(self, w, n_iter=20):
        """Largest eigenvalue of ``I + J^T J / sigma^2`` per chain, ``J = d residual / dw``, by
        power iteration (``J v`` by double backward): ``(B, d) -> (B,)``."""
        w = w.detach().requires_grad_(True)
        r = self.residual(w)
        u = torch.zeros_like(r, requires_grad=True)
        jt_u, = torch.autograd.grad(r, w, u, create_graph=True)
        v = torch.nn.functional.normalize(self.problem.randn(*w.shape), dim=1)
        top = torch.zeros(len(w), device=w.device)
        for _ in range(n_iter):
            jv, = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            jtjv, = torch.autograd.grad(r, w, jv, retain_graph=True)
            top = (v * jtjv).sum(1)
            v = torch.nn.functional.normalize(jtjv, dim=1)
        lam = (1 + top.detach() / self.problem.params["sigma"] ** 2).clamp(min=1)
        finite = torch.isfinite(lam)  # a start without a finite curvature takes the largest
        return torch.where(finite, lam, lam[finite].max() if finite.any() else 1.0)


class _DualAveraging:
    """Per-chain step adaptation towards an acceptance rate (Hoffman and Gelman 2014, alg. 5,
    with their gamma = 0.05, t0 = 10, kappa = 0.75)."""

    def __init__(self, step, target):
        self.mu, self.target = torch.log(10 * step), target
        self.h = torch.zeros_like(step)
        self.log_mean = torch.zeros_like(step)
        self.t = 0

    def update(self, accept_prob):
        """The next step ``(B,)`` after a step accepted with probability ``accept_prob``."""
        self.t += 1
        eta = 1 / (self.t + 10)
        self.h = (1 - eta) * self.h + eta * (self.target - accept_prob)
        log_step = self.mu - math.sqrt(self.t) / 0.05 * self.h
        weight = self.t ** -0.75
        self.log_mean = weight * log_step + (1 - weight) * self.log_mean
        return log_step.exp()

    def final(self):
        return self.log_mean.exp()


class _PerturbedMAP(LatentOptimization):
    """``||z - xi||^2 / 2 + ||A(G(z)) - y||^2 / (2 sigma^2)`` from ``z = xi``."""

    def __init__(self, xi):
        self.xi = xi

    def _init(self, problem, shape):
        return self.xi.clone()

    def objective(self, problem, x, log_px, z, y):
        return (0.5 * sum_squares(z - self.xi)
                + sum_squares(problem.operator(x) - y) / (2 * problem.params["sigma"] ** 2))


def perturbed_map(problem, Y, n_chains, n_iter, newton_steps=None):
    """Perturb-and-MAP latents ``(n * n_chains, d)``, the chains of one observation together:
    at most ``newton_steps`` damped Gauss-Newton steps (:func:`.laplace.laplace`), or, with
    None, ``n_iter`` Adam steps."""
    sigma = problem.params["sigma"]
    xi = problem.randn(len(Y) * n_chains, problem.flow.latent_dim)
    y = Y.repeat_interleave(n_chains, 0)
    y = y + sigma * problem.randn(*y.shape)
    if newton_steps is not None:
        return laplace(problem, y, newton_steps, anchor=xi)[0]
    params = {"sigma": sigma, "n_iter": n_iter, "learning_rate": 0.05, "n_restarts": 1}
    with torch.enable_grad():
        return _PerturbedMAP(xi).optimize(dataclasses.replace(problem, params=params), y)


class LatentMCMC(Method):
    posterior = True
    defaults = {"sigma": 0.1, "n_samples": 32, "step_size": None, "burn_in": 200, "thin": 5,
                "n_chains": 16, "preconditioner": "laplace", "laplace_steps": 20,
                "start": None, "start_iter": 500, "target_accept": None}

    def initial_step(self, d, curvature):
        """The default first step ``(B,)`` for latent dimension ``d``."""
        raise NotImplementedError

    def step(self, target, w, state, step):
        """Advance the chains ``w (B, d)`` by one transition with per-chain ``step (B,)``;
        ``state`` carries what the kernel caches. Returns ``(w, acceptance probability (B,)
        or None)``."""
        raise NotImplementedError

    def _check(self, p):
        check_int("burn_in", p["burn_in"], 0)
        check_int("thin", p["thin"], 1)
        check_int("n_chains", p["n_chains"], 1)
        check_int("laplace_steps", p["laplace_steps"], 0)
        check_choice("preconditioner", p["preconditioner"], ("laplace", "identity"))
        check_int("start_iter", p["start_iter"], 1)
        if p["start"] is not None:
            check_choice("start", p["start"], STARTS)
            if p["start"] == "laplace" and p["preconditioner"] != "laplace":
                raise ValueError("start='laplace' needs preconditioner='laplace'")
        step = p["step_size"]
        if step is not None and not (isinstance(step, (int, float)) and math.isfinite(step)
                                     and step > 0):
            raise ValueError(f"step_size must be > 0 or None, got {step!r}")
        target = p["target_accept"]
        if target is not None and not (isinstance(target, float) and 0 < target < 1):
            raise ValueError(f"target_accept must be in (0, 1) or None, got {target!r}")

    def sample(self, problem, Y, n_samples):
        p = problem.params
        self._check(p)
        n, d, c = len(Y), problem.flow.latent_dim, p["n_chains"]
        if p["preconditioner"] == "laplace":
            z0, H = laplace(problem, Y, p["laplace_steps"])
            target = _Target(problem, Y, c, z0, covariance_factor(H, z0.dtype))
        else:
            target = _Target(problem, Y, c)
        start = p["start"] or "perturbed-map"
        newton = p["laplace_steps"] if p["preconditioner"] == "laplace" else None
        first = ([perturbed_map(problem, Y, c, p["start_iter"], newton)]
                 if start == "perturbed-map" else [])

        def draw():  # perturb-and-MAP points first, prior draws to replace non-finite ones
            if start == "laplace":
                return problem.randn(n * c, d)
            return target.w(first.pop() if first else problem.randn(n * c, d))

        with torch.no_grad():
            w, log_p = redraw_nonfinite(draw, target.log_p)
        w = torch.where(torch.isfinite(log_p)[:, None], w, 0.0)
        if p["step_size"] is None:
            step = self.initial_step(d, target.curvature(w))
        else:
            step = torch.full((n * c,), float(p["step_size"]), device=w.device)
        adapt = (_DualAveraging(step, p["target_accept"])
                 if p["target_accept"] is not None and p["burn_in"] > 0 else None)
        per_chain = -(-n_samples // c)
        state, kept = {}, []
        total = p["burn_in"] + per_chain * p["thin"]
        for t in tqdm(range(1, total + 1), desc=type(self).__name__, leave=False,
                      disable=problem.verbose <= 0):
            w, accept_prob = self.step(target, w, state, step)
            if adapt is not None and t <= p["burn_in"]:
                step = adapt.update(accept_prob) if t < p["burn_in"] else adapt.final()
            if t > p["burn_in"] and (t - p["burn_in"]) % p["thin"] == 0:
                kept.append(w)
        W = torch.stack(kept, 1)  # (n * c, per_chain, d), chains of one observation together
        with torch.no_grad():
            Z = torch.stack([target.z(W[:, k]) for k in range(per_chain)], 1)
            Z = Z.view(n, c * per_chain, d)[:, :n_samples]
            return problem.flow.decode(Z.reshape(-1, d)).view(n, n_samples, -1)


def _metropolis(problem, w, state, proposal, log_alpha, new_state):
    """Accept ``proposal`` with probability ``exp(log_alpha)`` per chain; ``new_state`` holds
    the proposal's cached values (same keys as ``state``). Returns ``(w, accept prob)``."""
    log_alpha = torch.where(torch.isfinite(log_alpha), log_alpha, -torch.inf)
    u = torch.rand(len(w), generator=problem.generator, device=w.device)
    accept = torch.log(u) < log_alpha
    for key, value in new_state.items():
        mask = accept.view(-1, *[1] * (value.dim() - 1))
        state[key] = torch.where(mask, value, state[key])
    return torch.where(accept[:, None], proposal, w), log_alpha.clamp(max=0).exp()


class Langevin(LatentMCMC):
    def initial_step(self, d, curvature):
        return 0.1 / curvature

    def step(self, target, w, state, step):
        if "grad" not in state:
            state["grad"] = target.log_p_and_grad(w)[1]
        eps = step[:, None]
        proposal = w + eps * state["grad"] + torch.sqrt(2 * eps) * target.problem.randn(*w.shape)
        log_p, grad = target.log_p_and_grad(proposal)
        finite = torch.isfinite(log_p)
        state["grad"] = torch.where(finite[:, None], grad, state["grad"])
        return torch.where(finite[:, None], proposal, w), None


class MALA(LatentMCMC):
    defaults = {**LatentMCMC.defaults, "target_accept": 0.574}

    def initial_step(self, d, curvature):
        return 1.36 * d ** (-1 / 3) / curvature

    def step(self, target, w, state, step):
        if "log_p" not in state:
            state["log_p"], state["grad"] = target.log_p_and_grad(w)
        eps = step[:, None]
        noise = target.problem.randn(*w.shape)
        proposal = w + eps * state["grad"] + torch.sqrt(2 * eps) * noise
        log_p, grad = target.log_p_and_grad(proposal)
        back = w - proposal - eps * grad  # the reverse move's drift-corrected displacement
        log_q_ratio = 0.5 * sum_squares(noise) - sum_squares(back) / (4 * step)
        return _metropolis(target.problem, w, state, proposal,
                           log_p - state["log_p"] + log_q_ratio, {"log_p": log_p, "grad": grad})


class HMC(LatentMCMC):
    defaults = {**LatentMCMC.defaults, "target_accept": 0.8, "burn_in": 100, "thin": 1,
                "n_leapfrog": 20}

    def initial_step(self, d, curvature):
        return d ** (-1 / 4) / torch.sqrt(curvature)

    def _check(self, p):
        super()._check(p)
        check_int("n_leapfrog", p["n_leapfrog"], 1)

    def step(self, target, w, state, step):
        if "log_p" not in state:
            state["log_p"], state["grad"] = target.log_p_and_grad(w)
        jitter = torch.rand(len(w), generator=target.problem.generator, device=w.device)
        eps = (step * (0.8 + 0.4 * jitter))[:, None]
        momentum = target.problem.randn(*w.shape)
        q, m, grad = w, momentum + 0.5 * eps * state["grad"], None
        n_leapfrog = target.problem.params["n_leapfrog"]
        for i in range(n_leapfrog):
            q = q + eps * m
            log_p, grad = target.log_p_and_grad(q)
            m = m + (eps if i < n_leapfrog - 1 else 0.5 * eps) * grad
        log_alpha = (log_p - 0.5 * sum_squares(m)) - (state["log_p"] - 0.5 * sum_squares(momentum))
        return _metropolis(target.problem, w, state, q, log_alpha, {"log_p": log_p, "grad": grad})


class PLMCMC(LatentMCMC):
    defaults = {**LatentMCMC.defaults, "target_accept": 0.234, "burn_in": 2000, "thin": 20,
                "n_chains": 4}

    def initial_step(self, d, curvature):
        return 2.38 / torch.sqrt(d * curvature)

    @torch.no_grad()
    def step(self, target, w, state, step):
        if "log_p" not in state:
            state["log_p"] = target.log_p(w)
        proposal = w + step[:, None] * target.problem.randn(*w.shape)
        log_p = target.log_p(proposal)
        return _metropolis(target.problem, w, state, proposal, log_p - state["log_p"],
                           {"log_p": log_p})


METHODS = {"langevin": Langevin, "mala": MALA, "hmc": HMC, "pl-mcmc": PLMCMC}
