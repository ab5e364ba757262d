"""The Laplace approximation of the smoothed latent posterior, shared by ``vi`` (its start) and
the MCMC methods (their starts and preconditioner).

For ``log p(z | y) = -||z||^2 / 2 - ||A(G(z)) - y||^2 / (2 sigma^2) + const``:
Levenberg-Marquardt steps towards the MAP point from ``z = 0`` (Gauss-Newton steps damped per
observation: a step that does not lower the objective is rejected and the damping raised
tenfold, an accepted one lowers it tenfold; without damping a rejected step would be proposed
again unchanged and the search would stall far from the mode), then the Gauss-Newton Hessian
``H = I + J^T J / sigma^2`` of ``J = d A(G(z)) / dz`` there, formed in float64: in float32
the rounding of ``J^T J / sigma^2`` outweighs the ``I`` once the noise is small, and ``H`` is
then not positive definite. For a linear operator and an affine prior, ``N(z_map, H^-1)`` is
the exact posterior.
"""
import torch

from .base import sum_squares


def map_objective(problem, z, Y, anchor=0.0):
    """``||z - anchor||^2 / 2 + ||A(G(z)) - y||^2 / (2 sigma^2)`` (``-log p(z | y)`` up to a
    constant for ``anchor = 0``): ``(n, d), (n, m) -> (n,)``."""
    r = problem.operator(problem.flow.inverse(z)[0]) - Y
    return 0.5 * sum_squares(z - anchor) + sum_squares(r) / (2 * problem.params["sigma"] ** 2)


def batch_jacobian(f, z):
    """``f(z) (n, m)`` and its Jacobian ``(n, m, d)`` for a row-wise ``f`` of ``z (n, d)``, one
    backward pass per output (the rows are independent, so the batch shares each pass)."""
    z = z.detach().requires_grad_(True)
    out = f(z)
    rows = [torch.autograd.grad(out[:, i].sum(), z, retain_graph=True)[0]
            for i in range(out.shape[1])]
    return out.detach(), torch.stack(rows, 1)


def residual_jacobian(problem, z, Y):
    """``r = A(G(z)) - y (n, m)`` and its Jacobian ``(n, m, d)``."""
    return batch_jacobian(lambda z: problem.operator(problem.flow.inverse(z)[0]) - Y, z)


def laplace(problem, Y, steps, tol=1e-3, anchor=None):
    """``(z_map (n, d), H (n, d, d), float64)`` for observations ``Y (n, m)``, after at most
    ``steps`` damped Gauss-Newton steps from ``z = 0``; the steps stop early once no
    observation's objective falls by more than ``tol`` nats in a step while its damping is
    still usable. ``anchor (n, d)`` replaces the prior term by ``||z - anchor||^2 / 2`` and
    starts there (the perturb-and-MAP problem of :mod:`.mcmc`)."""
    inv_var = 1.0 / problem.params["sigma"] ** 2
    z = (torch.zeros(len(Y), problem.flow.latent_dim, device=Y.device) if anchor is None
         else anchor.clone())
    anchor = 0.0 if anchor is None else anchor
    with torch.no_grad():
        best = map_objective(problem, z, Y, anchor)
    eye = torch.eye(z.shape[1], dtype=torch.float64, device=z.device)
    damping, done = torch.zeros(len(Y), dtype=torch.float64, device=Y.device), False
    for step in range(steps + 1):
        r, J = residual_jacobian(problem, z, Y)
        J, r = J.double(), r.double()
        H = eye + inv_var * J.transpose(1, 2) @ J
        if step == steps or done:
            return z, H
        g = (z - anchor).double() + inv_var * (J.transpose(1, 2) @ r[..., None])[..., 0]
        step_z = torch.linalg.solve(H + damping[:, None, None] * eye, g[..., None])[..., 0]
        trial_z = z - step_z.to(z.dtype)
        with torch.no_grad():
            trial = map_objective(problem, trial_z, Y, anchor)
        better = torch.isfinite(trial) & (trial < best)
        active = torch.where(better, best - trial > tol, damping < 1e6)
        z = torch.where(better[:, None], trial_z, z)
        best = torch.where(better, trial, best)
        damping = torch.where(better, damping / 10, (10 * damping).clamp(min=1.0))
        done = not active.any()


def covariance(H):
    """``H^-1`` of positive definite ``H (n, d, d)``, by its Cholesky factor."""
    return torch.cholesky_inverse(torch.linalg.cholesky(H))


def covariance_factor(H, dtype):
    """Lower-triangular ``L`` with ``L L^T = H^-1``: ``(n, d, d) -> (n, d, d)`` (computed in
    ``H``'s float64, returned in ``dtype``)."""
    return torch.linalg.cholesky(covariance(H)).to(dtype)
