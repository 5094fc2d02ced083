"""Shared test helpers (imported by the probe tests)."""
import math

import torch
from torch import nn

from talklora_min import MoELoRALinear, TalkLoRALinear


def make_layer(kind, d=12, r=8, E=4, seed=0, scale=1.0, dtype=torch.float64, top_k=None, d_out=10):
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(d, d_out).to(dtype)
    if kind == "talklora":
        layer = TalkLoRALinear(base, r, E, top_k=top_k)
    else:
        layer = MoELoRALinear(base, r, E, router_input=kind.split("-")[1], top_k=top_k)
    w = {n: torch.randn(t.shape, generator=gen, dtype=dtype) / math.sqrt(t.shape[-1])
         for n, t in layer.get_weights().items()}
    w["W_g" if kind == "moelora-input" else "W_r"] *= scale
    layer.set_weights(**w)
    return layer


def tokens(n, d, seed, dtype=torch.float64, scale=1.0):
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
