"""Loop-by-loop re-implementations used as oracles in tests and as baselines in benchmarks.

:class:`OfficialTalkLoRALinear` mirrors the official TalkLoRA module (docs/method.md §2): its
``state_dict()`` below a wrapped linear ``<path>`` holds exactly ::

    <path>.weight, <path>.bias                      W0 (d_out, d_in), b (d_out,)
    <path>.lora_A.default.weight                    A   (r, d_in)
    <path>.lora_A_experts.default.{e}.weight        C_e (m, m)
    <path>.lora_A_talk.default.weight               T   (E, E), row = output expert
    <path>.lora_A_route.default.weight              W_r (E, r)
    <path>.lora_B.default.{e}.weight                B_e (d_out, m)

Forward (eval mode, ``s = 1``), one Python iteration per expert::

    h = A x;  h_e = chunk(h, E)[e];  h~_e = Σ_e' T[e, e'] h_e';  g = softmax(W_r [h~_1; …; h~_E])
    y = W0 x + b + Σ_e g_e B_e C_e h_e
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _experts(n: int, d_in: int, d_out: int, **kw) -> nn.ModuleDict:
    return nn.ModuleDict({"default": nn.ModuleList(nn.Linear(d_in, d_out, bias=False, **kw) for _ in range(n))})


class OfficialTalkLoRALinear(nn.Module):
    """The official TalkLoRA linear; the base ``weight``/``bias`` sit at the wrapper level."""

    def __init__(self, base: nn.Linear, rank: int, num_experts: int, dropout: float = 0.0):
        super().__init__()
        E, m = num_experts, rank // num_experts
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.weight, self.bias = base.weight, base.bias      # same Parameters as the base linear
        self.in_features, self.out_features, self.num_experts = base.in_features, base.out_features, E
        self.lora_dropout = nn.ModuleDict({"default": nn.Dropout(dropout)})
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, rank, bias=False, **kw)})
        self.lora_A_experts = _experts(E, m, m, **kw)
        self.lora_A_talk = nn.ModuleDict({"default": nn.Linear(E, E, bias=False, **kw)})
        self.lora_A_route = nn.ModuleDict({"default": nn.Linear(rank, E, bias=False, **kw)})
        self.lora_B = _experts(E, m, base.out_features, **kw)

    def forward(self, x: Tensor) -> Tensor:
        drop = self.lora_dropout["default"]
        blocks = torch.chunk(self.lora_A["default"](drop(x)), self.num_experts, dim=-1)
        talk = self.lora_A_talk["default"].weight
        mixed = [sum(talk[e, f] * blocks[f] for f in range(self.num_experts)) for e in range(self.num_experts)]
        gates = drop(torch.softmax(self.lora_A_route["default"](torch.cat(mixed, -1)), -1))
        out = 0
        for e in range(self.num_experts):
            expert = self.lora_B["default"][e](self.lora_A_experts["default"][e](blocks[e]))
            out = out + gates[..., e:e + 1] * expert
        return F.linear(x, self.weight, self.bias) + drop(out)


def wrap_official(model: nn.Module, targets, rank: int, num_experts: int) -> nn.Module:
    """Replace (in place) every ``nn.Linear`` whose name ends with a target by the official layer."""
    names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, OfficialTalkLoRALinear(getattr(owner, child), rank, num_experts))
    return model


class LoopMoELoRALinear(nn.Module):
    """MoELoRA with a code router, ``y = W0 x + b + s Σ_e g_e B_e C_e h_e``, ``g = softmax(W_r h)``,
    one Python iteration per expert (benchmark baseline for the batched ``MoELoRALinear``).
    Parameters have the shapes of docs/method.md §8: ``A (r, d_in)``, ``C (E, m, m)``, ``B (E, d_out, m)``, ``W_r (E, r)``."""

    def __init__(self, base: nn.Linear, rank: int, num_experts: int, alpha=None):
        super().__init__()
        E, m, w = num_experts, rank // num_experts, base.weight
        self.base, self.num_experts = base, E
        self.scaling = 1.0 if alpha is None else alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features, dtype=w.dtype) / base.in_features ** 0.5)
        self.C = nn.Parameter(torch.randn(E, m, m, dtype=w.dtype) / m ** 0.5)
        self.B = nn.Parameter(torch.zeros(E, base.out_features, m, dtype=w.dtype))
        self.W_r = nn.Parameter(torch.randn(E, rank, dtype=w.dtype) / rank ** 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.A)
        gates = torch.softmax(F.linear(h, self.W_r), -1)
        out = 0
        for e, h_e in enumerate(torch.chunk(h, self.num_experts, -1)):
            out = out + gates[..., e:e + 1] * F.linear(F.linear(h_e, self.C[e]), self.B[e])
        return self.base(x) + self.scaling * out


@torch.no_grad()
def formula_output(layer: nn.Module, x: Tensor) -> Tensor:
    """A MoELoRA / TalkLoRA layer's eval output computed term by term from the formulas of
    docs/method.md §1, independently of the layer's own (fused) forward, one Python iteration per
    expert: ``h = A x``; for TalkLoRA ``h~_e = Σ_e' T[e, e'] h_e'`` (the Talking Module mixes the
    blocks, it is not folded into the router); ``g = softmax(W_r h~)`` (``W_g x`` for an input
    router); ``y = base(x) + s Σ_e g_e B_e C_e h_e``.  Dense routing only (the maps of §3 are stated
    for it).  The oracle the equivalence residuals of claims C1–C3 are measured against."""
    if getattr(layer, "top_k", None) is not None:
        raise ValueError("formula_output covers dense routing only (top_k=None)")
    E, m = layer.num_experts, layer.expert_rank
    h = F.linear(x, layer.A)
    blocks = [h[..., e * m:(e + 1) * m] for e in range(E)]
    if layer.router_input == "input":
        logits = F.linear(x, layer.W_g)
    else:
        if hasattr(layer, "talk_matrix"):
            T = layer.talk_matrix()
            blocks_mixed = [sum(T[e, f] * blocks[f] for f in range(E)) for e in range(E)]
        else:
            blocks_mixed = blocks
        logits = F.linear(torch.cat(blocks_mixed, -1), layer.W_r)
    gates = torch.softmax(logits, -1)
    out = layer.base(x)
    for e in range(E):
        expert = F.linear(F.linear(blocks[e], layer.C[e]), layer.B[e])
        out = out + layer.scaling * gates[..., e:e + 1] * expert
    return out
