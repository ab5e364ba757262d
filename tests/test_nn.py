"""The invertible core: every layer and every named architecture.

References are independent of the code under test: round trips, the brute-force autograd
Jacobian's ``slogdet`` in float64, and closed forms.
"""
import math

import pytest
import torch

from flowsk.nn.autoregressive import MaskedAutoregressive
from flowsk.nn.base import Chain, Flow, standard_normal_log_prob, sum_per_sample
from flowsk.nn.builders import (
    ARCHITECTURES,
    IMAGE_ARCHITECTURES,
    build_flow,
    image_step,
    level_shapes,
)
from flowsk.nn.coupling import TRANSFORMS, Affine, Coupling, make_transform
from flowsk.nn.linear import ActNorm, ActNormLinear, InvertibleLinear, Permutation
from flowsk.nn.multiscale import Logit, Multiscale, Reshape, Squeeze
from flowsk.nn.networks import CNN, MLP

B = 3  # samples per batch in the layer tests
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
JAC_TOL = 1e-9  # float64 log-det vs the brute-force Jacobian
COUPLINGS = sorted(TRANSFORMS)


# -- helpers ---------------------------------------------------------------------------------
def perturb_(module, std=0.1, seed=1):
    """Add Gaussian noise to every parameter: a new flow is the identity (zero-initialised
    conditioners), which would hide errors in the transforms and their log-dets. ``std=0.1``
    moves every transform well away from the identity (see
    ``test_perturbation_makes_couplings_non_trivial``) while keeping the random flows about as
    well conditioned as trained ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module


def prepare(module, x_init, context=None, dtype=torch.float64, train=False, std=0.1):
    """Convert to ``dtype``, perturb every parameter, initialise ActNorm with one train-mode
    forward on ``x_init`` (so it normalises the perturbed network), then set the mode. Eval mode
    is set after the conversion, so the cached inverse of InvertibleLinear is computed at
    ``dtype``."""
    module.to(dtype)
    perturb_(module, std)
    module.train()
    with torch.no_grad():
        module(x_init.to(dtype), context)
    module.train(train)
    return module


def jacobian_logdet(fn, x, context=None):
    """``log|det d fn(x)_i / d x_i|`` per sample, from the autograd Jacobian.

    Row ``k`` of every sample's Jacobian is the gradient of ``sum_i fn(x)_i[k]``: the samples
    of a batch are independent, and a layer that mixed them would fail the comparison."""
    x = x.detach().clone().requires_grad_(True)
    n = x[0].numel()
    y = fn(x, context)[0].reshape(len(x), -1)
    assert y.shape[1] == n, "a bijection keeps the dimension"
    eye = torch.eye(n, dtype=y.dtype).unsqueeze(1).expand(n, len(x), n)
    (grads,) = torch.autograd.grad(y, x, eye, is_grads_batched=True)
    jac = grads.reshape(n, len(x), n).transpose(0, 1)  # (B, out, in)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert (sign != 0).all(), "singular Jacobian"
    return logabsdet


def gaussian(shape, scale=2.0, seed=0, dtype=torch.float64, n=B):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, *shape, generator=g, dtype=dtype)


def uniform(shape, lo, hi, seed=0, dtype=torch.float64, n=B):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, *shape, generator=g, dtype=dtype)


N_INIT = 32  # samples of the batch that initialises ActNorm


# -- the layer zoo -----------------------------------------------------------------------------
# Each case builds ``(module, draw, draw_context, train_mode)`` on fresh parameters, where
# ``draw(n, seed)`` gives ``n`` float64 inputs (``draw_context`` contexts, or None).
def G(shape, scale=2.0):
    return lambda n, seed: gaussian(shape, scale, seed, n=n)


def U(shape, lo, hi):
    return lambda n, seed: uniform(shape, lo, hi, seed, n=n)

def _coupling_vector(name, context_features=0):
    t = make_transform(name)
    return Coupling(2, MLP(2, 3 * t.n_params, 8, context_features=context_features), t)


def _coupling_image(name, channels=4, hw=4, kernel_size=3):
    t = make_transform(name)
    split = channels // 2
    return Coupling(split, CNN(split, (channels - split) * t.n_params, 8, kernel_size), t)


def _multiscale(architecture="glow", coupling="affine", shape=(2, 4, 4), n_levels=2):
    shapes = level_shapes(shape, n_levels)
    levels = [Chain(*image_step(architecture, s, coupling, 8)) for s in shapes]
    return Multiscale(levels, shapes)


LAYERS = {
    "actnorm-vector": lambda: (ActNorm(5), G((5,)), None, False),
    "actnorm-image": lambda: (ActNorm(3), G((3, 4, 4)), None, False),
    "invlinear-vector-train": lambda: (InvertibleLinear(5), G((5,)), None, True),
    "invlinear-vector-eval": lambda: (InvertibleLinear(5), G((5,)), None, False),
    "invlinear-image-train": lambda: (InvertibleLinear(3), G((3, 4, 4)), None, True),
    "invlinear-image-eval": lambda: (InvertibleLinear(3), G((3, 4, 4)), None, False),
    "actnorm-linear-vector-train": lambda: (ActNormLinear(5), G((5,)), None, True),
    "actnorm-linear-vector-eval": lambda: (ActNormLinear(5), G((5,)), None, False),
    "actnorm-linear-image-train": lambda: (ActNormLinear(3), G((3, 4, 4)), None, True),
    "actnorm-linear-image-eval": lambda: (ActNormLinear(3), G((3, 4, 4)), None, False),
    "perm-reverse": lambda: (Permutation.reverse(5), G((5,)), None, False),
    "perm-random": lambda: (
        Permutation(torch.randperm(5, generator=torch.Generator().manual_seed(3))), G((5,)),
        None, False),
    "perm-swap-vector": lambda: (Permutation.swap(5), G((5,)), None, False),
    "perm-swap-image": lambda: (Permutation.swap(4), G((4, 2, 2)), None, False),
    "squeeze": lambda: (Squeeze(), G((2, 4, 4)), None, False),
    "reshape": lambda: (Reshape((2, 3, 4)), G((24,)), None, False),
    "multiscale-glow": lambda: (_multiscale("glow"), G((2, 4, 4)), None, False),
    "multiscale-realnvp": lambda: (_multiscale("realnvp", "additive", (1, 4, 4)), G((1, 4, 4)),
                                   None, False),
    "multiscale-3-levels": lambda: (_multiscale("chavez", "spline", (1, 8, 8), 3),
                                    G((1, 8, 8)), None, False),
    "logit": lambda: (Logit((-1.0, 2.0)), U((5,), -1.0, 2.0), None, False),
    "logit-image": lambda: (Logit((0.0, 1.0), alpha=0.1), U((2, 3, 3), 0.0, 1.0), None,
                            False),
    "chain": lambda: (Chain(ActNorm(5), InvertibleLinear(5), _coupling_vector("affine"),
                            Permutation.reverse(5)), G((5,)), None, False),
}
for _name in COUPLINGS:
    LAYERS[f"coupling-vector-{_name}"] = (
        lambda n=_name: (_coupling_vector(n), G((5,)), None, False))
    LAYERS[f"coupling-conditional-{_name}"] = (
        lambda n=_name: (_coupling_vector(n, context_features=3), G((5,)),
                         G((3,)), False))
    LAYERS[f"coupling-image-{_name}"] = (
        lambda n=_name: (_coupling_image(n), G((4, 4, 4)), None, False))
    LAYERS[f"coupling-image-odd-{_name}"] = (
        lambda n=_name: (_coupling_image(n, channels=5, hw=3), G((5, 3, 3)), None, False))
    # Chavez's 1x1 coupling function: a 1x1-convolution conditioner on 1x1 maps
    LAYERS[f"coupling-1x1-{_name}"] = (
        lambda n=_name: (_coupling_image(n, channels=6, hw=1, kernel_size=1),
                         G((6, 1, 1)), None, False))


def _arch_cases():
    cases = {}
    for coupling in COUPLINGS:
        cases[f"mlp-{coupling}"] = {"n_features": 5, "architecture": "mlp", "coupling": coupling}
        for arch in IMAGE_ARCHITECTURES:
            cases[f"{arch}-{coupling}"] = {"n_features": 16, "image_shape": (1, 4, 4),
                                           "architecture": arch, "coupling": coupling}
    cases["mlp-range"] = {"n_features": 5, "architecture": "mlp", "data_range": (0.0, 1.0)}
    cases["mlp-one-feature"] = {"n_features": 1, "architecture": "mlp"}
    cases["mlp-context"] = {"n_features": 4, "architecture": "mlp", "context_features": 2,
                            "coupling": "spline"}
    cases["glow-3-levels-range"] = {"n_features": 64, "image_shape": (1, 8, 8),
                                    "architecture": "glow", "n_levels": 3,
                                    "data_range": (0.0, 1.0)}
    cases["chavez-color"] = {"n_features": 48, "image_shape": (3, 4, 4),
                             "architecture": "chavez", "coupling": "robust-spline"}
    return cases


ARCH_CASES = _arch_cases()


def make_arch(name):
    kw = dict(ARCH_CASES[name])
    n = kw.pop("n_features")
    kw.setdefault("n_steps", 2)
    flow = build_flow(n, hidden_features=8, random_state=0, **kw)
    draw = U((n,), *kw["data_range"]) if kw.get("data_range") else G((n,), 1.5)
    draw_context = G((kw["context_features"],)) if kw.get("context_features") else None
    return flow, draw, draw_context, False


def make_case(kind, name, dtype=torch.float64):
    """``(module, x, context)`` ready to test at ``dtype``: ``B`` test samples, drawn apart
    from the ``N_INIT`` samples that initialised ActNorm."""
    module, draw, draw_context, train = LAYERS[name]() if kind == "layer" else make_arch(name)
    x, x_init = draw(B, 0).to(dtype), draw(N_INIT, 100).to(dtype)
    context = context_init = None
    if draw_context is not None:
        context, context_init = draw_context(B, 1).to(dtype), draw_context(N_INIT, 101).to(dtype)
    prepare(module, x_init, context_init, dtype=dtype, train=train)
    return module, x, context


ALL_CASES = ([pytest.param("layer", n, id=f"layer-{n}") for n in LAYERS]
             + [pytest.param("arch", n, id=f"arch-{n}") for n in ARCH_CASES])


# -- round trips, dtypes, log-dets -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind, name", ALL_CASES)
def test_round_trip_and_dtype(kind, name, dtype):
    module, x, context = make_case(kind, name, dtype)
    with torch.no_grad():
        z, ld = module(x, context)
        x_back, ld_inv = module.inverse(z, context)
    for t in (z, ld, x_back, ld_inv):
        assert t.dtype == dtype
        assert torch.isfinite(t).all()
    assert ld.shape == ld_inv.shape == (B,)
    assert z.numel() == x.numel()
    torch.testing.assert_close(x_back, x, rtol=TOL[dtype], atol=TOL[dtype])
    # the inverse's log-det is that of the direction taken: the two cancel
    torch.testing.assert_close(ld + ld_inv, torch.zeros_like(ld), rtol=0,
                               atol=TOL[dtype] * max(1.0, ld.abs().max().item()))
    # and the round trip the other way, from latent codes of the base distribution
    with torch.no_grad():
        z2 = gaussian(z.shape[1:], scale=1.0, seed=11, dtype=dtype)
        x2, _ = module.inverse(z2, context)
        z2_back, _ = module(x2, context)
    # The logit's inverse is a bijection onto a box slightly wider than the data range, so this
    # holds for bounded flows too; in float32, logit(sigmoid(v)) near the box's edges keeps too
    # few digits for a deep flow's latent round trip, so bounded architectures check it in
    # float64 (the data-side round trip above covers float32).
    if dtype == torch.float64 or kind == "layer" or "data_range" not in ARCH_CASES[name]:
        torch.testing.assert_close(z2_back, z2, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("kind, name", ALL_CASES)
def test_forward_logdet_matches_jacobian(kind, name):
    module, x, context = make_case(kind, name)
    with torch.no_grad():
        _, ld = module(x, context)
    expected = jacobian_logdet(module, x, context)
    torch.testing.assert_close(ld, expected, rtol=JAC_TOL, atol=JAC_TOL)


@pytest.mark.parametrize("kind, name", ALL_CASES)
def test_inverse_logdet_matches_jacobian(kind, name):
    module, x, context = make_case(kind, name)
    with torch.no_grad():
        z, _ = module(x, context)  # a latent whose image is in the data domain
        _, ld = module.inverse(z, context)
    expected = jacobian_logdet(module.inverse, z, context)
    torch.testing.assert_close(ld, expected, rtol=JAC_TOL, atol=JAC_TOL)


def test_jacobian_reference_detects_wrong_logdet():
    """The reference is not vacuous: a layer whose log-det is off by a constant fails it."""
    layer, x, _ = make_case("layer", "actnorm-vector")
    with torch.no_grad():
        _, ld = layer(x)
    expected = jacobian_logdet(layer, x)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ld + 1e-6, expected, rtol=JAC_TOL, atol=JAC_TOL)


def test_perturbation_makes_couplings_non_trivial():
    """The log-det tests would be vacuous on identity couplings."""
    for name in COUPLINGS:
        layer, x, context = make_case("layer", f"coupling-vector-{name}")
        with torch.no_grad():
            z, ld = layer(x, context)
        assert (z - x).abs().max() > 1e-3
        if name != "additive":
            assert ld.abs().max() > 1e-3


# -- a new flow --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", COUPLINGS)
@pytest.mark.parametrize("shape", ["vector", "image", "1x1"])
def test_fresh_coupling_is_identity(name, shape):
    if shape == "vector":
        layer, x = _coupling_vector(name), gaussian((5,))
    elif shape == "image":
        layer, x = _coupling_image(name), gaussian((4, 4, 4))
    else:
        layer, x = _coupling_image(name, 6, 1, kernel_size=1), gaussian((6, 1, 1))
    layer.double()
    with torch.no_grad():
        z, ld = layer(x)
        x_back, ld_inv = layer.inverse(x)
    torch.testing.assert_close(z, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld, torch.zeros_like(ld), rtol=0, atol=1e-12)
    torch.testing.assert_close(ld_inv, torch.zeros_like(ld), rtol=0, atol=1e-12)


def test_affine_identity_offset_is_exact():
    """Zero parameters give scale exactly 1 in float64 (the offset is log(sigmoid(2)))."""
    x = gaussian((4,))
    z, log_scale = Affine()(x, torch.zeros(*x.shape, 2, dtype=torch.float64))
    assert log_scale.abs().max() < 1e-15
    torch.testing.assert_close(z, x, rtol=0, atol=1e-15)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_fresh_flow_is_orthogonal_and_its_couplings_identities(architecture, coupling):
    """Before ActNorm's initialisation and with zero-initialised conditioners, a new flow is a
    composition of rotations and permutations: orthogonal Jacobian, zero log-det."""
    image_shape = None if architecture == "mlp" else (1, 4, 4)
    flow = build_flow(16, image_shape=image_shape, architecture=architecture,
                      coupling=coupling, n_steps=2, hidden_features=8).double().eval()
    x = gaussian((16,))
    with torch.no_grad():
        _z, ld = flow(x)
    # the rotations are drawn in float32, so their log-dets are zero to float32 precision
    torch.testing.assert_close(ld, torch.zeros_like(ld), rtol=0, atol=1e-5)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[0])
    torch.testing.assert_close(jac @ jac.T, torch.eye(16, dtype=torch.float64), rtol=0,
                               atol=1e-5)
    couplings = [m for m in flow.modules() if isinstance(m, (Coupling, MaskedAutoregressive))]
    assert couplings
    for m in flow.modules():
        if isinstance(m, ActNorm):
            assert not bool(m.initialized)
    # every coupling is exactly the identity on its own input
    hooks_seen = []

    def hook(module, inputs, output):
        hooks_seen.append(module)
        torch.testing.assert_close(output[0], inputs[0], rtol=0, atol=1e-12)

    handles = [m.register_forward_hook(hook) for m in couplings]
    with torch.no_grad():
        flow(x)
    for h in handles:
        h.remove()
    assert len(hooks_seen) == len(couplings)


# -- Flow --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp-affine", "mlp-range", "glow-spline", "chavez-affine",
                                  "realnvp-robust-spline", "mlp-context"])
def test_generate_is_one_pass_log_prob(name):
    """``generate(z)`` returns ``log p(G(z))`` equal to ``log_prob(inverse(z))``."""
    flow, x, context = make_case("arch", name)
    with torch.no_grad():
        z = gaussian((flow.latent_dim,), scale=1.0, seed=3)
        x_gen, log_p = flow.generate(z, context)
        x_inv, _ = flow.inverse(z, context)
        expected = flow.log_prob(x_inv, context)
    torch.testing.assert_close(x_gen, x_inv, rtol=0, atol=0)
    torch.testing.assert_close(log_p, expected, rtol=1e-10, atol=1e-10)


def test_bounded_generator_is_consistent_beyond_the_data_range():
    """Latents whose signals leave ``data_range``: ``log p(G(z))`` from the generator pass still
    equals ``log_prob(G(z))``, the data-fit gradient does not vanish there, and ``decode``
    clips the signals into the range."""
    flow, _, _ = make_case("arch", "mlp-range")
    lo, hi = flow.data_range
    z = gaussian((flow.latent_dim,), scale=4.0, seed=5).requires_grad_(True)
    x_gen, log_p = flow.generate(z)
    outside = (x_gen < lo) | (x_gen > hi)
    assert outside.any()  # the test reaches the region a clamp would cut off
    with torch.no_grad():
        torch.testing.assert_close(log_p, flow.log_prob(x_gen), rtol=1e-10, atol=1e-10)
    grad, = torch.autograd.grad(x_gen[outside].sum(), z)
    assert (grad.abs().sum(1) > 0).all()
    with torch.no_grad():
        x_out = flow.decode(z)
    assert lo <= x_out.min() and x_out.max() <= hi
    torch.testing.assert_close(x_out, x_gen.detach().clamp(lo, hi), rtol=0, atol=0)


def test_log_prob_is_change_of_variables():
    flow, x, _ = make_case("arch", "glow-affine")
    with torch.no_grad():
        z, ld = flow(x)
        lp = flow.log_prob(x)
    normal = torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(lp, normal.log_prob(z).sum(1) + ld, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(standard_normal_log_prob(z), normal.log_prob(z).sum(1),
                               rtol=1e-12, atol=1e-12)


def test_flow_latent_is_flat():
    flow, x, _ = make_case("arch", "glow-3-levels-range")
    with torch.no_grad():
        z, _ = flow(x)
    assert isinstance(flow, Flow)
    assert z.shape == x.shape == (B, 64)
    assert flow.latent_dim == flow.n_features == 64


# -- ActNorm -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5,), (3, 4, 4)])
def test_actnorm_data_dependent_init(shape):
    layer = ActNorm(shape[0]).double()
    x = 3.0 + 2.0 * gaussian(shape) * torch.arange(1, shape[0] + 1, dtype=torch.float64).view(
        1, -1, *([1] * (len(shape) - 1)))
    x = torch.cat([x, gaussian(shape, seed=2)])  # 6 samples
    dims = [0] + list(range(2, x.dim()))
    z, _ = layer(x)  # train mode: initialises
    assert bool(layer.initialized)
    torch.testing.assert_close(z.mean(dims), torch.zeros(shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(z.std(dims, unbiased=False),
                               torch.ones(shape[0], dtype=torch.float64), rtol=0, atol=1e-5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(2 * x + 7)  # a second train-mode batch does not re-initialise
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


def test_actnorm_eval_mode_does_not_initialise():
    layer = ActNorm(3).eval()
    _z, ld = layer(gaussian((3,), dtype=torch.float32) + 5)
    assert not bool(layer.initialized)
    assert torch.equal(ld, torch.zeros(B))


def test_actnorm_state_is_saved():
    layer = ActNorm(4)
    layer(gaussian((4,), dtype=torch.float32))
    assert "initialized" in layer.state_dict()
    loaded = ActNorm(4)
    loaded.load_state_dict(layer.state_dict())
    assert bool(loaded.initialized)
    x = gaussian((4,), seed=4, dtype=torch.float32) * 10
    loaded.train()
    z_loaded, _ = loaded(x)
    z, _ = layer.eval()(x)
    torch.testing.assert_close(z_loaded, z, rtol=0, atol=0)


# -- ActNormLinear ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5,), (3, 4, 4)])
@pytest.mark.parametrize("train", [True, False])
def test_actnorm_linear_is_actnorm_then_linear(shape, train):
    """The fused layer equals its two parts applied in turn (perturbed weights, float64), in
    both directions, and its first training call starts the ActNorm part from the data."""
    layer = ActNormLinear(shape[0], torch.Generator().manual_seed(0)).double()
    x = 3.0 + 2.0 * gaussian(shape, n=N_INIT, seed=5)
    layer(x)  # train mode: the ActNorm part starts from x
    assert bool(layer.norm.initialized)
    dims = [0] + list(range(2, x.dim()))
    u, _ = layer.norm.eval()(x)
    torch.testing.assert_close(u.mean(dims), torch.zeros(shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-10)
    perturb_(layer, 0.3)
    layer.train(train)
    parts = Chain(layer.norm, layer.mix)
    x = gaussian(shape, seed=6)
    z, logdet = layer(x)
    z_parts, logdet_parts = parts(x)
    torch.testing.assert_close(z, z_parts, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_parts, rtol=0, atol=1e-12)
    x_back, logdet_back = layer.inverse(z)
    x_parts, logdet_back_parts = parts.inverse(z)
    torch.testing.assert_close(x_back, x_parts, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet_back, logdet_back_parts, rtol=0, atol=1e-12)


# -- InvertibleLinear --------------------------------------------------------------------------
def test_invertible_linear_starts_as_rotation():
    layer = InvertibleLinear(6, torch.Generator().manual_seed(0))
    w = layer.weight().detach()
    torch.testing.assert_close(w @ w.T, torch.eye(6), rtol=0, atol=1e-5)


@pytest.mark.parametrize("features", [2, 5, 8])
@pytest.mark.parametrize("architecture", ["mlp", "maf"])
def test_vector_flows_start_at_permutations_that_transform_every_feature(architecture,
                                                                          features):
    """Each step's linear layer starts at a permutation (every feature stays whole), and
    within every pair of steps each feature lands once in the transformed half, whatever
    the random permutations drawn."""
    flow = build_flow(features, architecture=architecture, n_steps=6, hidden_features=8)
    weights = [m.weight().detach() for m in flow.modules() if isinstance(m, InvertibleLinear)]
    assert len(weights) == 6
    holds = torch.arange(features)  # which input feature each position holds
    split = features // 2
    for k, w in enumerate(weights):
        assert torch.equal(w.abs().sum(0), torch.ones(features))
        assert torch.equal(w.abs().sum(1), torch.ones(features))
        assert torch.equal(w.sort(1).values[:, -1], torch.ones(features))
        holds = holds[w.argmax(1)]
        transformed = set(holds[split:].tolist())
        if k % 2 == 0:
            first = transformed
        elif architecture == "mlp":
            # a pair transforms every feature; with an odd count one feature twice
            assert first | transformed == set(range(features))
            assert len(first & transformed) == features % 2


def test_glow_starts_at_rotations():
    """glow's 1x1 convolutions start at random rotations (orthogonal, mixing every channel of
    a squeezed block), not at the permutations of the vector architectures."""
    flow = build_flow(64, image_shape=(1, 8, 8), architecture="glow", n_steps=2,
                      hidden_features=8)
    weights = [m.weight().detach().double() for m in flow.modules()
               if isinstance(m, InvertibleLinear)]
    assert [len(w) for w in weights] == [4, 4, 8, 8]
    for w in weights:
        torch.testing.assert_close(w @ w.T, torch.eye(len(w), dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        assert (w.abs() < 0.99).all(1).any()  # a row that mixes channels


def test_invertible_linear_rejects_a_bad_permutation():
    with pytest.raises(ValueError, match="permutation must order"):
        InvertibleLinear(4, permutation=[0, 1, 1, 2])


def test_invertible_linear_eval_uses_cached_inverse(monkeypatch):
    """Generation in eval mode reads the cached inverse: no matrix inverse in the exported
    path, and the cache equals the exact inverse of the current weights."""
    layer, x, _ = make_case("layer", "invlinear-image-eval")
    torch.testing.assert_close(layer.weight_inverse @ layer.weight().detach(),
                               torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)

    def no_inverse(*args, **kwargs):
        raise AssertionError("linalg.inv called in eval mode")

    monkeypatch.setattr(torch.linalg, "inv", no_inverse)
    with torch.no_grad():
        z, _ = layer(x)
        x_back, _ = layer.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("architecture", ["glow", "chavez", "realnvp", "mlp"])
def test_eval_generation_needs_no_matrix_inverse(architecture, monkeypatch):
    name = "mlp-affine" if architecture == "mlp" else f"{architecture}-affine"
    flow, _x, _ = make_case("arch", name)

    def no_inverse(*args, **kwargs):
        raise AssertionError("linalg.inv called in eval mode")

    monkeypatch.setattr(torch.linalg, "inv", no_inverse)
    with torch.no_grad():
        x_gen, _ = flow.inverse(gaussian((flow.latent_dim,), seed=9))
    assert torch.isfinite(x_gen).all()


def test_chavez_uses_no_invertible_linear_and_1x1_conditioners_on_1x1_maps():
    flow = build_flow(16, image_shape=(1, 4, 4), architecture="chavez", n_levels=2,
                      n_steps=2, hidden_features=8)
    assert not any(isinstance(m, InvertibleLinear) for m in flow.modules())
    multiscale = next(m for m in flow.modules() if isinstance(m, Multiscale))
    assert multiscale.shapes[-1] == (8, 1, 1)
    last = [m for m in multiscale.levels[-1].modules() if isinstance(m, torch.nn.Conv2d)]
    assert last and all(c.kernel_size == (1, 1) for c in last)
    assert any(isinstance(m, Permutation) for m in multiscale.levels[-1].modules())


# -- Permutation, Squeeze, Multiscale ------------------------------------------------------------
def test_permutations_are_what_they_say():
    x = torch.arange(6.0)[None]
    assert Permutation.reverse(6)(x)[0].tolist() == [[5, 4, 3, 2, 1, 0]]
    assert Permutation.swap(6)(x)[0].tolist() == [[3, 4, 5, 0, 1, 2]]
    p = Permutation(torch.randperm(6, generator=torch.Generator().manual_seed(0)))
    assert sorted(p(x)[0][0].tolist()) == list(range(6))
    assert p(x)[0].tolist() != x.tolist()


def test_squeeze_moves_2x2_blocks_to_channels():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    z, _ = Squeeze()(x)
    assert z.shape == (1, 4, 2, 2)
    # channel (i, j) holds the pixels at offset (i, j) of each 2x2 block
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(z[0, 2 * i + j], x[0, 0, i::2, j::2])


def test_multiscale_factors_out_half_the_channels():
    layer = _multiscale("realnvp", "additive", (1, 4, 4), 2).double().eval()
    x = gaussian((1, 4, 4))
    z, _ = layer(x)
    assert z.shape == (B, 16)
    # level 0 sees (4, 2, 2) and factors out its last 2 channels first (8 values)
    squeezed = Squeeze()(x)[0]
    after_level0 = layer.levels[0](squeezed)[0]
    torch.testing.assert_close(z[:, :8], after_level0[:, 2:].reshape(B, -1))


def test_level_shapes_rejects_odd_sizes():
    assert level_shapes((1, 8, 8), 3) == [(4, 4, 4), (8, 2, 2), (16, 1, 1)]
    with pytest.raises(ValueError, match="divisible"):
        level_shapes((1, 6, 6), 2)


# -- Logit -------------------------------------------------------------------------------------
def test_logit_bounds_are_finite_and_round_trip():
    layer = Logit((-1.0, 2.0))
    x = torch.tensor([[-1.0, 2.0, 0.5], [2.0, -1.0, -1.0]], dtype=torch.float64)
    z, ld = layer(x)
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    x_back, ld_inv = layer.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld + ld_inv, torch.zeros(2, dtype=torch.float64), rtol=0,
                               atol=1e-12)
    # the bounds map to logit(alpha) and logit(1 - alpha)
    a = layer.alpha
    torch.testing.assert_close(z[0, :2], torch.tensor([math.log(a / (1 - a)),
                                                       math.log((1 - a) / a)],
                                                      dtype=torch.float64))


def test_logit_inverse_maps_onto_the_open_box():
    layer = Logit((-1.0, 2.0))
    delta = layer.alpha * 3.0 / (1 - 2 * layer.alpha)
    z = torch.tensor([[-1e3, -20.0, 0.0, 20.0, 1e3]], dtype=torch.float64)
    x, _ld = layer.inverse(z)
    assert (x[0, 1:] > x[0, :-1]).all()  # strictly increasing: no clamp flattens it
    assert -1.0 - delta <= x.min() and x.max() <= 2.0 + delta
    assert x[0, 1] < -1.0 and x[0, 3] > 2.0
    z32 = torch.tensor([[-1e30, 1e30, float("inf"), -float("inf")]])
    x32, _ = layer.inverse(z32)
    torch.testing.assert_close(x32, torch.tensor([[-1 - delta, 2 + delta, 2 + delta,
                                                   -1 - delta]]))


def test_logit_log_density_of_uniform():
    """A closed form: x ~ U[lo, hi] pushed through the logit layer has density
    ``log p(z) = log(sigmoid'(z)) - log c``; check the log-det against it."""
    lo, hi, a = 0.0, 4.0, 0.05
    layer = Logit((lo, hi), alpha=a)
    x = uniform((1,), lo, hi)
    z, ld = layer(x)
    u = a + (1 - 2 * a) * (x - lo) / (hi - lo)
    expected = torch.log((1 - 2 * a) / (hi - lo) / (u * (1 - u))).sum(1)
    torch.testing.assert_close(ld, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, torch.logit(u), rtol=1e-12, atol=1e-12)


def test_sum_per_sample():
    t = torch.arange(24.0).reshape(2, 3, 4)
    assert sum_per_sample(t).tolist() == [t[0].sum().item(), t[1].sum().item()]


def test_make_transform_rejects_unknown():
    with pytest.raises(ValueError, match="coupling must be one of"):
        make_transform("nope")


def test_build_flow_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="architecture must be one of"):
        build_flow(4, architecture="nope")


def test_affine_scale_is_glows_sigmoid_soft_clamped():
    """``log_scale = 3 tanh(log(sigmoid(s + 2) / sigmoid(2)) / 3)``."""
    s = torch.linspace(-5, 5, 11, dtype=torch.float64)
    params = torch.stack([s, torch.zeros_like(s)], -1)
    _, log_scale = Affine()(torch.zeros_like(s), params)
    glow = torch.log(torch.sigmoid(s + 2) / torch.sigmoid(torch.tensor(2.0, dtype=torch.float64)))
    torch.testing.assert_close(log_scale, 3.0 * torch.tanh(glow / 3.0), rtol=1e-14, atol=1e-14)
