"""Closed-form trainable-parameter counts of the three adapter kinds (docs/method.md §1, claim C7).

Per adapted linear ``d_in -> d_out`` with total rank ``r``, ``E`` experts and ``m = r / E``:

* LoRA:      ``A r·d_in + B d_out·r``
* MoELoRA:   ``A r·d_in + C E·m² + B d_out·r`` plus the router, ``W_r E·r`` (code) or ``W_g E·d_in`` (input)
* TalkLoRA:  MoELoRA-code plus the Talking Module's free parameters (:func:`talk_parameters`)

With ``shared_B`` the expert ``B`` is one tensor per projection type (the official layout ties it
across layers), so it is counted once per type.  Pure arithmetic: experiments record it next to the
measured count (:func:`talklora_min.count_parameters`) so a report can compare the two without
building a model.
"""
from __future__ import annotations

from typing import Iterable

KINDS = ("lora", "moelora", "talklora")


def talk_parameters(num_experts: int, structure: str = "full", *, groups: int = 1, bandwidth: int = 1,
                    rank: int = 1) -> int:
    """Free parameters of the Talking Module ``T (E, E)`` under each communication structure:
    full ``E²``; broadcast ``1`` (the scalar α); doubly-stochastic ``E² + 1`` (the logits Θ and the
    mixing weight α of ``α I + (1 − α) Sinkhorn(exp Θ)``);
    block ``E²/groups``; banded ``E·min(2b + 1, E)``; low-rank ``2·E·k`` (U and V)."""
    E = int(num_experts)
    if structure == "full":
        return E * E
    if structure == "doubly-stochastic":
        return E * E + 1
    if structure == "broadcast":
        return 1
    if structure == "block":
        if groups < 1 or E % groups:
            raise ValueError(f"groups must divide num_experts ({E}), got {groups!r}")
        return E * E // groups
    if structure == "banded":
        if bandwidth < 0:
            raise ValueError(f"bandwidth must be >= 0, got {bandwidth!r}")
        return E * min(2 * bandwidth + 1, E)
    if structure == "low-rank":
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank!r}")
        return 2 * E * rank
    raise ValueError("structure must be one of ('full', 'broadcast', 'doubly-stochastic', 'block', "
                     f"'banded', 'low-rank'), got {structure!r}")


def closed_form_parameters(kind: str, rank: int, num_experts: int, shapes: Iterable[tuple[str, int, int]], *,
                           router_input: str = "code", talk_structure: str = "full", talk_groups: int = 1,
                           talk_bandwidth: int = 1, talk_rank: int = 1, shared_B: bool = False) -> int:
    """Trainable adapter parameters of ``kind`` over the adapted modules ``shapes`` — an iterable of
    ``(projection_type, d_in, d_out)``, one per adapted module — see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    r, E = int(rank), int(num_experts)
    if r < 1 or E < 1 or (kind != "lora" and r % E):
        raise ValueError(f"rank ({rank!r}) must be a positive integer (a multiple of num_experts "
                         f"({num_experts!r}) for kind {kind!r})")
    m = r // E
    total, B_types = 0, set()
    for ptype, d_in, d_out in shapes:
        per = r * d_in
        if kind != "lora":
            per += E * m * m + (E * d_in if router_input == "input" else E * r)
        if kind == "talklora":
            per += talk_parameters(E, talk_structure, groups=talk_groups, bandwidth=talk_bandwidth,
                                   rank=talk_rank)
        if not shared_B or ptype not in B_types:
            per += d_out * r
            B_types.add(ptype)
        total += per
    return total
