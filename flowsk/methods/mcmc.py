"""Markov chain Monte Carlo in the prior's latent space: ``langevin`` and ``pl-mcmc``.

Both sample the smoothed latent posterior

    log p(z | y) = log N(z; 0, I) - ||A(G(z)) - y||^2 / (2 sigma^2) + const

with ``n_chains`` chains per observation, all observations and chains advanced together as
one batch. Chains start from prior draws, run ``burn_in`` steps, then keep every ``thin``-th
state; ``sample`` returns ``G`` of the kept states. Chains never leave the region where the
log-posterior is finite: a start outside it is redrawn, a step into it is rejected (a flow
whose generator overflows there gives it no mass anyway).

- ``langevin``: unadjusted Langevin, ``z <- z + step_size * grad log p(z | y)
  + sqrt(2 step_size) * noise``. It has no accept/reject step, so ``step_size`` (default
  ``0.1 sigma^2``) must be small against the posterior's smallest latent variance (its
  stationary variance is inflated by about ``1 / (1 - step_size / (2 s^2))`` for a Gaussian
  of std ``s``).
- ``pl-mcmc``: random-walk Metropolis-Hastings with Gaussian proposals of std ``step_size``
  on the same density (the slow baseline of Cannella et al.); exact at stationarity.
"""
import math

import torch
from tqdm.auto import tqdm

from .._validation import check_int
from .base import Method, redraw_nonfinite


class LatentMCMC(Method):
    posterior = True
    defaults = {"sigma": 0.1, "n_samples": 32, "step_size": None, "burn_in": 500, "thin": 5,
                "n_chains": 4}

    def log_posterior(self, problem, z, y):
        """``(B, d), (B, m) -> (B,)`` unnormalised smoothed log-posterior."""
        r = problem.operator(problem.flow.inverse(z)[0]) - y
        return -0.5 * (z * z).sum(1) - (r * r).sum(1) / (2 * problem.params["sigma"] ** 2)

    def step(self, problem, z, y, state):
        raise NotImplementedError

    @torch.no_grad()
    def _start(self, problem, y, d):
        """Prior draws ``(B, d)``, redrawn where the log-posterior is not finite (chains
        still outside after ten redraws start at the prior's mode ``z = 0``)."""
        z, log_p = redraw_nonfinite(lambda: problem.randn(len(y), d),
                                    lambda z: self.log_posterior(problem, z, y))
        return torch.where(torch.isfinite(log_p)[:, None], z, torch.zeros_like(z))

    def sample(self, problem, Y, n_samples):
        p = problem.params
        step_size = p["step_size"]
        if step_size is None:  # langevin: stable against the likelihood's curvature 1 / sigma^2
            step_size = 0.1 * p["sigma"] ** 2
        if not (isinstance(step_size, (int, float)) and math.isfinite(step_size)
                and step_size > 0):
            raise ValueError(f"step_size must be > 0, got {step_size!r}")
        check_int("burn_in", p["burn_in"], 0)
        check_int("thin", p["thin"], 1)
        check_int("n_chains", p["n_chains"], 1)
        n, d, c = len(Y), problem.flow.latent_dim, p["n_chains"]
        per_chain = -(-n_samples // c)
        y = Y.repeat_interleave(c, 0)
        z = self._start(problem, y, d)
        state = {"step_size": step_size}
        kept = []
        total = p["burn_in"] + per_chain * p["thin"]
        for t in tqdm(range(1, total + 1), desc=type(self).__name__, leave=False,
                      disable=problem.verbose <= 0):
            z = self.step(problem, z, y, state)
            if t > p["burn_in"] and (t - p["burn_in"]) % p["thin"] == 0:
                kept.append(z)
        Z = torch.stack(kept, 1).view(n, c * per_chain, d)[:, :n_samples]
        with torch.no_grad():
            return problem.flow.decode(Z.reshape(-1, d)).view(n, n_samples, -1)


class Langevin(LatentMCMC):
    def _gradient(self, problem, z, y):
        """``(finite (B,), grad log p(z | y) (B, d))`` at ``z (B, d)``."""
        z = z.detach().requires_grad_(True)
        log_p = self.log_posterior(problem, z, y)
        grad, = torch.autograd.grad(log_p.sum(), z)
        return torch.isfinite(log_p) & torch.isfinite(grad).all(1), grad

    def step(self, problem, z, y, state):
        eps = state["step_size"]
        if "grad" not in state:
            state["grad"] = self._gradient(problem, z, y)[1]
        proposal = z + eps * state["grad"] + math.sqrt(2 * eps) * problem.randn(*z.shape)
        finite, grad = self._gradient(problem, proposal, y)
        state["grad"] = torch.where(finite[:, None], grad, state["grad"])
        return torch.where(finite[:, None], proposal, z)


class PLMCMC(LatentMCMC):
    defaults = {**LatentMCMC.defaults, "step_size": 0.05, "burn_in": 2000, "thin": 20}

    @torch.no_grad()
    def step(self, problem, z, y, state):
        if "log_p" not in state:
            state["log_p"] = self.log_posterior(problem, z, y)
        proposal = z + state["step_size"] * problem.randn(*z.shape)
        log_p = self.log_posterior(problem, proposal, y)
        u = torch.rand(len(z), generator=problem.generator, device=z.device)
        accept = torch.isfinite(log_p) & (torch.log(u) < log_p - state["log_p"])
        state["log_p"] = torch.where(accept, log_p, state["log_p"])
        return torch.where(accept[:, None], proposal, z)


METHODS = {"langevin": Langevin, "pl-mcmc": PLMCMC}
