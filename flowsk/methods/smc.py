"""Tempered sequential Monte Carlo in the prior's latent space: ``smc``.

``n_particles`` particles per observation (default: ``n_samples``, at least 128) move from the
prior to the posterior through the tempered targets

    log p_beta(z | y) = log N(z; 0, I) - beta ||A(G(z)) - y||^2 / (2 sigma^2),

``0 = beta_0 < beta_1 < ... < beta_T = 1`` (Del Moral, Doucet and Jasra 2006). Each stage

1. picks the next ``beta`` per observation by bisection, so that the effective sample size of
   the reweighted particles (weights ``p(y | z)^(beta' - beta)``) is ``ess_fraction`` of the
   particles: the schedule adapts to how far each observation's posterior lies from the
   prior;
2. resamples the particles by those weights (systematic resampling);
3. moves every particle by ``n_moves`` transitions of an exact MCMC kernel that leaves
   ``p_beta`` invariant (``kernel="hmc"`` with ``n_leapfrog`` leapfrog steps, or ``"mala"``,
   the transitions of :mod:`.mcmc`).

Unlike the chains of :mod:`.mcmc`, which start near the MAP point, the particles start as
prior draws: where the posterior has several modes, or the measurements pin the signal to a
thin curved set of latents, the particles reach them through the tempering rather than through
the chains' mixing, and the ``n_samples`` draws are separate particles, not correlated states
of a few chains. Prior draws where the likelihood is not finite (the generator overflows) are
redrawn, ten times at most; those left have zero weight and the first resampling drops them.

Preconditioning. With ``preconditioner="laplace"`` the Gauss-Newton Hessian ``H`` of the
untempered posterior at its MAP point (:mod:`.laplace`) gives each stage the coordinates
``z = L w``, ``L L^T = (I + beta (H - I))^-1``: the tempered posterior's curvature, so the
moves' step stays near one whatever ``beta``. ``"identity"`` moves ``z`` itself. Each
observation's step starts at the kernel's default for unit curvature and after every move is
multiplied by ``exp(2 (acceptance - target))``, the mean acceptance over its particles and the
kernel's target rate (0.8 for ``hmc``, 0.574 for ``mala``); the step carries over from stage
to stage.

Cost: about ``T * n_moves * n_leapfrog`` gradient evaluations per particle (one per move for
``mala``) over ``T`` stages; ``T`` grows with what the measurements tell about the signal
(small ``sigma``, many measurements).
"""
import torch
from tqdm.auto import tqdm

from .._validation import check_choice, check_int
from .base import Method, redraw_nonfinite
from .laplace import covariance_factor, laplace
from .mcmc import HMC, MALA, _Target

KERNELS = {"hmc": (HMC, 0.8), "mala": (MALA, 0.574)}
MAX_STAGES = 1000


def tempered(step, log_lik):
    """Log-weights ``step (n,) * log_lik (n, N)``; ``-inf`` where ``log_lik`` is not finite
    (a likelihood of zero stays zero at every temperature)."""
    return torch.where(torch.isfinite(log_lik), step[:, None] * log_lik, -torch.inf)


def effective_sample_size(log_w):
    """``(n, N) -> (n,)``, ``(sum w)^2 / sum w^2`` of each row's weights ``exp(log_w)``."""
    w = torch.exp(log_w - log_w.max(1, keepdim=True).values)
    return w.sum(1) ** 2 / (w * w).sum(1)


def next_beta(beta, log_lik, ess_fraction, n_bisect=50):
    """The largest ``beta' <= 1`` per observation at which the weights
    ``exp((beta' - beta) log_lik)`` keep an effective sample size of at least ``ess_fraction``
    of the particles: ``beta (n,), log_lik (n, N) -> (n,)`` (``beta`` itself where none
    does: the stage then only drops the particles of zero likelihood)."""
    target = ess_fraction * log_lik.shape[1]
    lo, hi = torch.zeros_like(beta), 1 - beta
    enough = effective_sample_size(tempered(hi, log_lik)) >= target
    for _ in range(n_bisect):
        mid = (lo + hi) / 2
        ok = effective_sample_size(tempered(mid, log_lik)) >= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(enough, 1.0, beta + lo)


def systematic_resample(log_w, generator):
    """Indices ``(n, N)`` into each row's particles, drawn with probabilities ``exp(log_w)``
    normalised per row (systematic resampling: one uniform per row)."""
    n, N = log_w.shape
    cdf = torch.softmax(log_w, 1).cumsum(1)
    cdf[:, -1] = 1.0
    u = (torch.rand(n, 1, generator=generator, device=log_w.device)
         + torch.arange(N, device=log_w.device)) / N
    return torch.searchsorted(cdf, u).clamp(max=N - 1)


def _pick(z, idx):
    """Rows ``idx (n, k)`` of each observation's particles ``z (n, N, d)``: ``(n, k, d)``."""
    return z.gather(1, idx[..., None].expand(-1, -1, z.shape[2]))


class TemperedSMC(Method):
    posterior = True
    defaults = {"sigma": 0.1, "n_samples": 32, "n_particles": None, "n_moves": 10,
                "ess_fraction": 0.5, "kernel": "hmc", "n_leapfrog": 5,
                "preconditioner": "laplace", "laplace_steps": 20}

    @staticmethod
    def _check(p, n_samples):
        """Check the settings ``p``; returns the number of particles per observation."""
        N = p["n_particles"]
        if N is None:
            N = max(128, n_samples)
        check_int("n_particles", N, 2)
        check_int("n_moves", p["n_moves"], 1)
        check_int("n_leapfrog", p["n_leapfrog"], 1)
        check_int("laplace_steps", p["laplace_steps"], 0)
        check_choice("kernel", p["kernel"], tuple(KERNELS))
        check_choice("preconditioner", p["preconditioner"], ("laplace", "identity"))
        frac = p["ess_fraction"]
        if not (isinstance(frac, float) and 0 < frac < 1):
            raise ValueError(f"ess_fraction must be a float in (0, 1), got {frac!r}")
        if n_samples > N:
            raise ValueError(f"n_samples ({n_samples}) must be at most n_particles ({N}): "
                             f"each draw is one particle")
        return N

    def sample(self, problem, Y, n_samples):
        p = problem.params
        N = self._check(p, n_samples)
        n, d = len(Y), problem.flow.latent_dim
        H = laplace(problem, Y, p["laplace_steps"])[1] if p["preconditioner"] == "laplace" \
            else None
        kernel, target_accept = KERNELS[p["kernel"]]
        kernel = kernel()
        prior = _Target(problem, Y, N)
        with torch.no_grad():
            z, log_lik = redraw_nonfinite(lambda: problem.randn(n * N, d),
                                          prior.log_likelihood)
        found = torch.isfinite(log_lik).view(n, N).any(1)
        if not found.all():
            raise FloatingPointError(f"smc: no prior draw with a finite likelihood was found "
                                     f"for {int((~found).sum())} of {n} observations")
        beta = torch.zeros(n, device=Y.device)
        step = kernel.initial_step(d, torch.ones(n, device=Y.device))
        progress = tqdm(desc="TemperedSMC stages", leave=False, disable=problem.verbose <= 0)
        stage = 0
        while bool((beta < 1).any()):
            if stage == MAX_STAGES:
                raise RuntimeError(f"smc: beta reached only {beta.min().item():.3g} after "
                                   f"{MAX_STAGES} stages")
            stage += 1
            progress.update()
            new_beta = next_beta(beta, log_lik.view(n, N), p["ess_fraction"])
            idx = systematic_resample(tempered(new_beta - beta, log_lik.view(n, N)),
                                      problem.generator)
            z = _pick(z.view(n, N, d), idx).view(n * N, d)
            beta = new_beta
            z, log_lik, step = self._move(problem, Y, z, beta, H, kernel, target_accept, step)
        progress.close()
        keep = torch.stack([torch.randperm(N, generator=problem.generator,
                                           device=Y.device)[:n_samples] for _ in range(n)])
        z = _pick(z.view(n, N, d), keep)
        with torch.no_grad():
            return problem.flow.decode(z.reshape(-1, d)).view(n, n_samples, -1)

    @staticmethod
    def _move(problem, Y, z, beta, H, kernel, target_accept, step):
        """``n_moves`` transitions of ``kernel`` at ``beta (n,)`` on the particles ``z (n N, d)``;
        returns the moved particles, their log-likelihoods and the adapted steps ``(n,)``."""
        n, (B, d) = len(Y), z.shape
        N = B // n
        if H is None:
            target, w = _Target(problem, Y, N, beta=beta.repeat_interleave(N)), z
        else:
            eye = torch.eye(d, dtype=H.dtype, device=H.device)
            L = covariance_factor(eye + beta[:, None, None].double() * (H - eye), z.dtype)
            target = _Target(problem, Y, N, L=L, beta=beta.repeat_interleave(N))
            w = torch.linalg.solve_triangular(L, z.view(n, N, d).transpose(1, 2),
                                              upper=False).transpose(1, 2).reshape(B, d)
        state = {}
        for _ in range(problem.params["n_moves"]):
            w, accept = kernel.step(target, w, state, step.repeat_interleave(N))
            step = step * torch.exp(2 * (accept.view(n, N).mean(1) - target_accept))
        with torch.no_grad():
            return target.z(w), target.log_likelihood(w), step


METHODS = {"smc": TemperedSMC}
