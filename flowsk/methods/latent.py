"""Latent-space optimisation: ``pinv``, ``csgm``, ``glowip``, ``map``, ``likelihood``.

Each minimises a per-observation objective over latents ``z (n, d)`` with Adam on the whole
batch at once (the objectives are summed, so observations stay independent):

- ``csgm`` (Bora et al.): ``||A G(z) - y||^2 + gamma ||z||^2``, random init, best of restarts;
- ``glowip`` (Asim et al.): the same objective from ``z = 0``;
- ``map`` (Whang et al.): ``||A G(z) - y||^2 / (2 sigma^2) - beta log p(G(z))``;
- ``likelihood`` (Chavez): ``||A G(z) - y||_1 + alpha (-log p(G(z)))``, where
  ``-log p(G(z)) = -log p_Z(z) + log|det J_G(z)|`` comes from one generator pass.
"""
import torch
from tqdm.auto import tqdm

from .base import Method, sum_squares


class Pinv(Method):
    """The baseline ``A^+ y``, clipped to the prior's data range."""

    def predict(self, problem, Y):
        X = problem.operator.pinv(Y)
        return X.clamp(*problem.data_range) if problem.data_range is not None else X


class LatentOptimization(Method):
    """Adam on ``z``; subclasses define ``objective(problem, x, log_px, z, y) -> (n,)`` and
    ``init``; ``n_restarts`` keeps, per observation, the restart with the best data fit."""

    needs_log_prob = False
    defaults = {"n_iter": 300, "learning_rate": 0.05, "init": "zeros", "init_std": 0.1,
                "n_restarts": 1}

    def objective(self, problem, x, log_px, z, y):
        raise NotImplementedError

    def _init(self, problem, shape):
        p = problem.params
        if p["init"] == "zeros":
            return torch.zeros(shape, device=problem.generator.device)
        if p["init"] == "normal":
            return p["init_std"] * problem.randn(*shape)
        raise ValueError(f"init must be 'zeros' or 'normal', got {p['init']!r}")

    def optimize(self, problem, Y):
        """Returns the optimised latents ``(n, d)`` for observations ``Y (n, m)``: per
        observation, the iterate with the lowest finite objective (an observation whose
        iterates leave the flow's finite range keeps its last good one)."""
        p, flow, op = problem.params, problem.flow, problem.operator
        n, restarts = len(Y), p["n_restarts"]
        Yr = Y.repeat(restarts, 1)
        z = self._init(problem, (n * restarts, flow.latent_dim)).requires_grad_(True)
        best_z, best = z.detach().clone(), torch.full((len(z),), torch.inf, device=z.device)
        opt = torch.optim.Adam([z], lr=p["learning_rate"])
        for _ in tqdm(range(p["n_iter"]), desc=type(self).__name__, leave=False,
                      disable=problem.verbose <= 0):
            if self.needs_log_prob:
                x, log_px = flow.generate(z)
            else:
                x, log_px = flow.inverse(z)[0], None
            objective = self.objective(problem, x, log_px, z, Yr)
            with torch.no_grad():
                better = torch.isfinite(objective) & (objective < best)
                best = torch.where(better, objective, best)
                best_z = torch.where(better[:, None], z, best_z)
            opt.zero_grad(set_to_none=True)
            objective.sum().backward()
            opt.step()
        z = best_z
        if restarts > 1:
            with torch.no_grad():
                fit = sum_squares(op(flow.inverse(z)[0]) - Yr).view(restarts, n)
                # a restart that never left the flow's non-finite range must not win (argmin
                # would pick its NaN)
                fit = torch.where(torch.isfinite(fit), fit, torch.inf)
                z = z.view(restarts, n, -1)[fit.argmin(0), torch.arange(n)]
        return z

    def predict(self, problem, Y):
        z = self.optimize(problem, Y)
        with torch.no_grad():
            return problem.flow.decode(z)


class CSGM(LatentOptimization):
    defaults = {**LatentOptimization.defaults, "gamma": 0.1, "init": "normal", "init_std": 1.0,
                "n_restarts": 3}

    def objective(self, problem, x, log_px, z, y):
        return sum_squares(problem.operator(x) - y) + problem.params["gamma"] * sum_squares(z)


class GlowIP(CSGM):
    defaults = {**CSGM.defaults, "gamma": 0.0, "init": "zeros", "n_restarts": 1}


class MAP(LatentOptimization):
    needs_log_prob = True
    defaults = {**LatentOptimization.defaults, "sigma": 0.1, "beta": 1.0, "init": "normal",
                "init_std": 0.1}

    def objective(self, problem, x, log_px, z, y):
        p = problem.params
        return sum_squares(problem.operator(x) - y) / (2 * p["sigma"] ** 2) - p["beta"] * log_px


class Likelihood(LatentOptimization):
    needs_log_prob = True
    # a small alpha: with a logit at the data end, -log p(G(z)) falls towards the bounds, and
    # a large alpha saturates pixels wherever the operator's L1 gradient is weak (sr2, deblur)
    defaults = {**LatentOptimization.defaults, "alpha": 0.001, "init": "normal", "init_std": 0.1}

    def objective(self, problem, x, log_px, z, y):
        return (problem.operator(x) - y).abs().sum(1) - problem.params["alpha"] * log_px


METHODS = {"pinv": Pinv, "csgm": CSGM, "glowip": GlowIP, "map": MAP, "likelihood": Likelihood}
