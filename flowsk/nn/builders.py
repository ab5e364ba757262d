"""Named flow architectures.

- ``mlp``: flat vectors; steps of ActNorm, invertible linear (LU, starting at a permutation,
  see :func:`step_orders`) and an MLP coupling.
- ``glow``: images; multiscale, steps of ActNorm, invertible 1x1 conv (LU, starting at a
  random rotation, see :data:`LINEAR_START`) and a CNN coupling.
- ``realnvp``: images; multiscale, steps of a CNN coupling and a channel reversal.
- ``chavez``: images; multiscale, steps of ActNorm, a channel swap and a CNN coupling whose
  conditioner uses 1x1 convolutions on 1x1 maps: no layer needs a matrix inverse.
- ``maf``: flat vectors, for density estimation; steps of ActNorm, invertible linear (LU,
  starting at a permutation) and a masked autoregressive transform. Generating (the
  inverse) takes one network pass per feature, so it is slow to sample and not for the
  latent-space solvers.

Where ActNorm precedes an invertible linear layer the two are one fused layer,
:class:`~flowsk.nn.linear.ActNormLinear`.
"""
import torch

from .autoregressive import MaskedAutoregressive
from .base import Chain, Flow
from .coupling import Coupling, make_transform
from .linear import ActNorm, ActNormLinear, Permutation
from .multiscale import Logit, Multiscale, Reshape
from .networks import CNN, MLP

ARCHITECTURES = ("mlp", "glow", "realnvp", "chavez", "maf")
IMAGE_ARCHITECTURES = ("glow", "realnvp", "chavez")
# where the invertible linear layers start (benchmarks/density.py and images.py measure both):
# on a vector a random rotation mixes every feature with all others before the first coupling,
# which hides each feature's own marginal (on digits a spline mlp scores 12 nats less); on
# images glow's 1x1 convolution mixes only the pixels of one squeezed 2x2 block, and on photo
# patches the rotation (Glow's choice) scores 0.12-0.13 test bits per dimension better with
# affine couplings (a tie with splines)
# (realnvp and chavez have no invertible linear layers)
LINEAR_START = {"mlp": "permutation", "maf": "permutation", "glow": "rotation"}


def step_orders(features, n_steps, generator=None):
    """The permutations ``(features,)`` that the invertible linear layers of ``n_steps`` steps
    start at: a random one at even steps, at odd steps the swap that brings the features the
    previous coupling transformed (the second half) to the front. So every feature is
    transformed once in every pair of steps, and the pairs split the features differently."""
    swap = torch.roll(torch.arange(features), -(features // 2))
    return [torch.randperm(features, generator=generator) if k % 2 == 0 else swap
            for k in range(n_steps)]


def linear_orders(architecture, features, n_steps, generator=None):
    """The starts of ``architecture``'s ``n_steps`` invertible linear layers on ``features``:
    the permutations of :func:`step_orders`, or ``None`` (a random rotation) for each."""
    if LINEAR_START.get(architecture) == "permutation":
        return step_orders(features, n_steps, generator)
    return [None] * n_steps


def vector_step(features, coupling, hidden_features, context_features=0, generator=None,
                coupling_options=None, order=None):
    """One ``mlp`` step on ``(B, features)``; its linear layer starts at the permutation
    ``order`` (None: a random rotation)."""
    layers = [ActNormLinear(features, generator, order)]
    split = features // 2
    if split:  # a single feature has nothing to condition on: the step is affine
        transform = make_transform(coupling, **(coupling_options or {}))
        net = MLP(split, (features - split) * transform.n_params, hidden_features,
                  context_features=context_features)
        layers.append(Coupling(split, net, transform))
    return layers


def autoregressive_step(features, coupling, hidden_features, generator=None,
                        coupling_options=None, order=None):
    """One ``maf`` step on ``(B, features)``; its linear layer starts at ``order``."""
    transform = make_transform(coupling, **(coupling_options or {}))
    return [ActNormLinear(features, generator, order),
            MaskedAutoregressive(features, transform, hidden_features)]


def image_step(architecture, shape, coupling, hidden_features, generator=None,
               coupling_options=None, order=None):
    """One step of an image architecture on ``(B, *shape)``; ``glow``'s 1x1 convolution
    starts at the channel permutation ``order`` (None: a random rotation)."""
    c, h, _ = shape
    transform = make_transform(coupling, **(coupling_options or {}))
    split = c // 2
    kernel = 1 if h == 1 else 3
    coupling_layer = Coupling(
        split, CNN(split, (c - split) * transform.n_params, hidden_features, kernel), transform)
    if architecture == "glow":
        return [ActNormLinear(c, generator, order), coupling_layer]
    if architecture == "realnvp":
        return [coupling_layer, Permutation.reverse(c)]
    return [ActNorm(c), Permutation.swap(c), coupling_layer]


def level_shapes(image_shape, n_levels):
    """Shapes ``(C, H, W)`` seen by each level of a multiscale flow."""
    c, h, w = image_shape
    shapes = []
    for _ in range(n_levels):
        if h % 2 or w % 2:
            raise ValueError(f"image_shape {tuple(image_shape)} cannot be squeezed {n_levels} "
                             f"times: height and width must be divisible by 2**n_levels")
        c, h, w = 4 * c, h // 2, w // 2
        shapes.append((c, h, w))
        c = c // 2
    return shapes


def build_flow(n_features, *, image_shape=None, architecture="mlp", coupling="affine",
               coupling_options=None, n_levels=2, n_steps=4, hidden_features=64,
               data_range=None, context_features=0, random_state=0):
    """A :class:`Flow` on flat ``(B, n_features)`` data.

    ``coupling_options`` (a dict: ``n_bins``, ``bound``, ``affine``) go to
    :func:`~flowsk.nn.coupling.make_transform`. ``random_state`` (int) seeds the random
    rotations and permutations; network weights come from torch's global generator, which
    the caller seeds.
    """
    generator = torch.Generator().manual_seed(int(random_state))
    layers = [Logit(data_range)] if data_range is not None else []
    if architecture == "mlp":
        for order in linear_orders("mlp", n_features, n_steps, generator):
            layers += vector_step(n_features, coupling, hidden_features, context_features,
                                  generator, coupling_options, order)
    elif architecture == "maf":
        if context_features:
            raise ValueError("conditional flows need architecture='mlp'")
        for order in linear_orders("maf", n_features, n_steps, generator):
            layers += autoregressive_step(n_features, coupling, hidden_features, generator,
                                          coupling_options, order)
    elif architecture in IMAGE_ARCHITECTURES:
        if context_features:
            raise ValueError("conditional flows need architecture='mlp'")
        shapes = level_shapes(image_shape, n_levels)
        levels = [Chain(*[layer for order in linear_orders(architecture, s[0], n_steps,
                                                           generator)
                          for layer in image_step(architecture, s, coupling, hidden_features,
                                                  generator, coupling_options, order)])
                  for s in shapes]
        layers += [Reshape(image_shape), Multiscale(levels, shapes)]
    else:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    return Flow(Chain(*layers), n_features, data_range)
