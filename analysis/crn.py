"""Common random numbers (docs/method.md §5, training protocol): the keyed random streams every runner
draws from, so that for one seed every method gets the same A, C, B, W_r, T, head init and batch
order in every adapted layer.

Each tensor comes from its own generator keyed by ``(seed, layer, tensor name)`` (:func:`crn_generator`),
never from the global RNG, so building one layer cannot shift another layer's draws.  A method's
router starts from these draws according to its ``router_init`` (:func:`router_start`): the
scale-matched, centred-map-matched and function-matched controls are built from the reference's T of
the same seed and layer.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from talklora_min.layers import absorbed_router, parse_talk_init, talk_matrix

from . import methods as registry


def crn_generator(seed: int, *keys) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *keys)`` by SHA-256: one independent stream per key,
    e.g. ``crn_generator(3, "L5.query", "A")``.  Same key, same stream, in any process."""
    digest = hashlib.sha256("|".join(str(k) for k in (seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def crn_uniform(shape, bound: float, seed: int, *keys) -> Tensor:
    """``U(±bound)`` of ``shape`` (float32) from the stream :func:`crn_generator` ``(seed, *keys)``."""
    return torch.empty(*shape).uniform_(-bound, bound, generator=crn_generator(seed, *keys))


@torch.no_grad()
def crn_head(head: nn.Linear, seed: int) -> nn.Linear:
    """The classifier head's CRN init, in place: weight and bias ``U(±1/√in)`` from the streams
    ``(seed, "head", "weight" | "bias")`` — the same head for every method of a seed."""
    bound = head.in_features ** -0.5
    head.weight.copy_(crn_uniform(tuple(head.weight.shape), bound, seed, "head", "weight"))
    head.bias.copy_(crn_uniform(tuple(head.bias.shape), bound, seed, "head", "bias"))
    return head


def official_talk(num_experts: int, seed: int, layer: str) -> Tensor:
    """The seed's official ``T ~ U(±1/√E)`` of ``layer``, from its own stream ``(seed, layer, "T")``."""
    return talk_matrix(num_experts, "official", generator=crn_generator(seed, layer, "T"))


def crn_weights(method: str, layer: nn.Module, seed: int, name: str) -> dict[str, Tensor]:
    """The CRN initial tensors of one adapter layer (``name`` its short name, e.g. ``L5.query``).

    Official init (docs/method.md §1) drawn from keyed streams: A U(±1/√d_in), C U(±1/√m),
    W_r U(±1/√r), W_g U(±1/√d_in), B = 0; a full T official (its own stream) or as ``talk_init``
    gives it; other communication structures start at their identity point (low-rank's random V from
    the stream ``(seed, name, "talk")``).  The method's
    ``router_init`` (:data:`analysis.methods.ROUTER_INITS`): ``scale-matched`` W_r · ‖W_r(T⊗I)‖₂/‖W_r‖₂,
    ``function-matched`` W_r(T⊗I) (T the official T of the same seed and layer)."""
    d_in, r = layer.in_features, layer.rank
    w = {"A": crn_uniform((r, d_in), d_in ** -0.5, seed, name, "A"), "B": torch.zeros_like(layer.B)}
    if not hasattr(layer, "num_experts"):
        return w
    E, m = layer.num_experts, layer.expert_rank
    w["C"] = crn_uniform((E, m, m), m ** -0.5, seed, name, "C")
    if layer.router_input == "input":
        w["W_g"] = crn_uniform((E, d_in), d_in ** -0.5, seed, name, "W_g")
        return w
    W_r = crn_uniform((E, r), r ** -0.5, seed, name, "W_r")
    if hasattr(layer, "T") and getattr(layer, "talk_structure", "full") == "full":
        w["T"] = official_talk(E, seed, name) if layer.talk_init == "official" else layer.T.detach().clone()
    elif getattr(layer, "talk_structure", None) == "low-rank" and parse_talk_init(layer.talk_init) == "identity":
        # low-rank's start I + U Vᵀ (U = 0) has a random V: from its own stream, never the global RNG
        w["talk_V"] = crn_uniform(tuple(layer.talk_V.shape), E ** -0.5, seed, name, "talk")
    w["W_r"] = router_start(registry.method(method).router_init, W_r, official_talk(E, seed, name), m, w["A"])
    return w


def router_start(init: str, W_r: Tensor, T: Tensor, m: int, A: Tensor) -> Tensor:
    """A code router's initial ``W_r`` under a method's ``router_init`` (:data:`analysis.methods.ROUTER_INITS`),
    from the seed's draws ``W_r``, the reference's official ``T`` and ``A``, with ``W_eff = W_r (T ⊗ I_m)``:
    ``crn`` W_r; ``function-matched`` W_eff; ``scale-matched`` W_r · ‖W_eff‖₂ / ‖W_r‖₂;
    ``centred-matched`` W_r · ‖P W_eff A‖₂ / ‖P W_r A‖₂ with ``P = I − J/E`` (softmax ignores a common
    shift of the logits, so the centred map w.r.t. the input is what sets the router's sensitivity)."""
    if init == "crn":
        return W_r
    W_eff = absorbed_router(W_r, T, m)
    if init == "function-matched":
        return W_eff
    norm = lambda M: torch.linalg.matrix_norm(M.double(), ord=2)
    if init == "scale-matched":
        return W_r * (norm(W_eff) / norm(W_r)).to(W_r.dtype)
    if init == "centred-matched":
        E = W_r.shape[0]
        P = torch.eye(E, dtype=torch.float64) - 1.0 / E
        return W_r * (norm(P @ W_eff.double() @ A.double()) / norm(P @ W_r.double() @ A.double())).to(W_r.dtype)
    raise ValueError(f"router_init must be one of {list(registry.ROUTER_INITS)}, got {init!r}")


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Seeded mini-batch indices, epoch by epoch, the same for every method of a seed (CRN)."""
    g = crn_generator(seed, "batches")
    out, perm = [], torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(perm) < batch_size:
            perm = torch.cat([perm, torch.randperm(n, generator=g)])
        out.append(perm[:batch_size])
        perm = perm[batch_size:]
    return out
