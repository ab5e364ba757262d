"""Conditioner networks.

Each ends in a zero-initialised layer, so a new coupling is the identity.
"""
import torch
from torch import nn


def _zero_(layer):
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class MLP(nn.Module):
    """``(B, in_features) [+ context (B, context_features)] -> (B, out_features)``."""

    def __init__(self, in_features, out_features, hidden_features=64, n_hidden=2,
                 context_features=0):
        super().__init__()
        layers, width = [], in_features + context_features
        for _ in range(n_hidden):
            layers += [nn.Linear(width, hidden_features), nn.SiLU()]
            width = hidden_features
        layers.append(_zero_(nn.Linear(width, out_features)))
        self.net = nn.Sequential(*layers)

    def forward(self, x, context=None):
        if context is not None:
            x = torch.cat([x, context], 1)
        return self.net(x)


class CNN(nn.Module):
    """``(B, in_channels, H, W) -> (B, out_channels, H, W)``: conv, 1x1 conv, zero conv.

    ``kernel_size=1`` gives Chavez's 1x1 coupling function for 1x1 feature maps. Runs in the
    channels-last memory layout (the output too), in which oneDNN's convolutions with few
    channels run fastest on CPUs (``benchmarks/image_speed.py``).
    """

    def __init__(self, in_channels, out_channels, hidden_channels=64, kernel_size=3):
        super().__init__()
        pad = kernel_size // 2
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=pad), nn.SiLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1), nn.SiLU(),
            _zero_(nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad)),
        ).to(memory_format=torch.channels_last)

    def forward(self, x, context=None):
        return self.net(x.contiguous(memory_format=torch.channels_last))
