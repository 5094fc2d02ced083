"""The registry of evidence topics: one module per topic, each with its claims, figures and notebook.

==============  ======================  ==================  ===========================
topic           claims                  figures             notebook
==============  ======================  ==================  ===========================
balance         C6, C7, C11             F1, F4, F5, F10     ``notebooks/01_balance.py``
smoothness      C4, C5, C8, C10, C12    F2, F3, F7, F9, F11 ``notebooks/02_smoothness.py``
equivalence     C1, C2, C3              F6                  ``notebooks/03_equivalence.py``
twins           C9                      F8                  ``notebooks/04_twins.py``
==============  ======================  ==================  ===========================

Topics longer than one readable file keep parts in sibling modules: balance's C11 (consistently
better than LoRA / MoELoRA) and F10 (forest plot of every paired comparison) in
:mod:`~analysis.topics.efficiency`; smoothness's C8/F7 in :mod:`~analysis.topics.smoothness_init`,
C10/F9 in :mod:`~analysis.topics.smoothness_topk` and C12/F11 in :mod:`~analysis.topics.smoothness_churn`.

``python -m analysis claims`` judges :data:`CLAIMS` (in id order) and ``python -m analysis
figures`` draws :data:`FIGURES`; both iterate over :data:`TOPICS`.
"""
from __future__ import annotations

from ..evidence import ClaimSpec, FigureSpec, Topic
from . import balance, equivalence, smoothness, twins

TOPICS: tuple[Topic, ...] = (balance.TOPIC, smoothness.TOPIC, equivalence.TOPIC, twins.TOPIC)


def _by_number(items):
    return tuple(sorted(items, key=lambda x: int(x.id[1:])))


CLAIMS: tuple[ClaimSpec, ...] = _by_number(c for t in TOPICS for c in t.claims)
FIGURES: tuple[FigureSpec, ...] = _by_number(f for t in TOPICS for f in t.figures)
CLAIM_IDS = tuple(c.id for c in CLAIMS)
FIGURE_IDS = tuple(f.id for f in FIGURES)


def claim_spec(claim_id: str) -> ClaimSpec:
    """The declaration of ``claim_id`` (``C1`` … ``C12``)."""
    for c in CLAIMS:
        if c.id == claim_id:
            return c
    raise KeyError(f"claim_id must be one of {CLAIM_IDS}, got {claim_id!r}")


def figure_spec(figure_id: str) -> FigureSpec:
    """The declaration of ``figure_id`` (``F1`` … ``F11``)."""
    for f in FIGURES:
        if f.id == figure_id:
            return f
    raise KeyError(f"figure_id must be one of {FIGURE_IDS}, got {figure_id!r}")


def topic_of(item_id: str) -> Topic:
    """The topic that declares claim or figure ``item_id``."""
    for t in TOPICS:
        if item_id in {c.id for c in t.claims} | {f.id for f in t.figures}:
            return t
    raise KeyError(f"no topic declares {item_id!r}; claims {CLAIM_IDS}, figures {FIGURE_IDS}")
