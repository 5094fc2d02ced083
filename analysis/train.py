"""Training on real labelled text (claims C5–C7, C9, C11, C12; figures F1, F4, F5, F10, F11).

Tasks (``train.tasks``, :data:`analysis.data.TASKS`), each trained and scored on its own:
``sentiment`` (Rotten Tomatoes fresh/rotten) and ``topic`` (BBC, 5 topics, headline + first
paragraph).  A frozen all-MiniLM-L6-v2; only the top ``adapt_top_layers`` BERT layers carry adapters
and run during training (the frozen prefix's hidden states are computed once per task and cached —
this changes nothing in the math).  Every method trains a linear head on mean-pooled tokens.

**Common random numbers (CRN).**  For one seed every method draws *identical* A, C, B, W_r, head
init, dropout masks and batch order in every adapted layer: each tensor comes from its own generator
keyed by ``(seed, layer, tensor name)`` (:func:`crn_generator`), never from the global RNG, so
building one layer cannot shift another layer's draws.  T (official init) and W_g come from their
own keyed streams ``(seed, layer, "T")`` / ``(seed, layer, "W_g")``.  Methods at a different rank
(the C7 budgets) read the same streams, but their tensors have other shapes and are not equal.

Methods (``train.methods``): entries of the method registry (:mod:`analysis.methods`), which says
for each its adapter, how its router starts from the seed's draws (the scale-matched control and the
function-matched twin start from the reference's T of the same seed and layer, docs/method.md §3),
which tensors stay frozen and the weight of its balance loss.  The no-adapter baseline trains only
the head.

Rows (tidy; the cell adds ``task, method, seed``, C7 budget cells also ``budget``); every row has
``step, split, layer, domain ("all"), rank, metric, value`` — ``layer`` is ``"all"`` for
model-level metrics.  Splits:

* ``val`` (the whole validation split; the split C6 and F1 should use) at step 0 and at the last
  step: ``accuracy``, ``loss`` (mean cross-entropy, nats) and per routed layer ``gini``,
  ``gini_normalized``, ``load_entropy`` (normalised), ``token_entropy`` (mean per-token gate
  entropy / log E);
* ``test`` (every held-out test example) at the last step: the same metrics, plus
  ``trainable_parameters`` (adapters; head and tied tensors excluded/counted once),
  ``closed_form_parameters`` (the same count from :func:`talklora_min.budget.closed_form_parameters`), ``n_train``,
  ``n_test``, ``wall_seconds``;
* ``probe`` (a fixed set of ``n_probe`` validation examples, all their tokens) at every checkpoint
  (step 0, every ``eval_every`` steps, the last step): ``gini``, ``load_entropy`` per layer, and
  from the second checkpoint on ``churn`` = share of probe tokens whose top-1 expert changed since
  the previous checkpoint (C12, F11);
* ``weights`` at the last step, per routed layer: ``router_rel_change`` = ‖W_eff(end) − W_eff(0)‖_F
  / ‖W_eff(0)‖_F (W_eff = W_r(T⊗I), W_r or W_g), ``talk_rel_change`` = ‖ΔT‖_F/‖T(0)‖_F (TalkLoRA),
  ``router_norm`` (‖W_eff‖₂ at the end) and ``router_norm_init`` (at step 0);
* ``test`` with ``step = -1`` and the extra columns ``kind, eps, statistic``: the router Lipschitz
  sandwich of every trained router (``metric = lipschitz``, ``kind = lipschitz_input``) and the
  probe rows of :func:`~talklora_min.probes.perturbation_response` at ``FINAL_EPS``.

C7 budget cells (``train.budget_ranks``, sweep ``train_budget``): the reference method at rank r and
each other method of ``train.budget_methods`` at the rank whose exact trainable-parameter count is
closest to the reference's (:func:`matched_rank`); their rows: the ``test`` metrics, the counts and
``budget_gap`` (relative count gap to TalkLoRA), ``weights`` (no val/probe/router-probe rows).  The budget at ``train.rank`` is the main sweep (same-rank counts are within ±2 % there).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talklora_min import AdapterConfig, adapter_layers, auxiliary_loss, count_parameters, inject
from talklora_min.budget import closed_form_parameters
from talklora_min.io import save_adapter
from talklora_min.probes import (capture_layer_inputs, gini, load_entropy, perturbation_response,
                                 record_routing, routed_layers, router_lipschitz)

from . import methods as registry
from .data import TASKS, task_split
from .fast_linear import use_onednn_for_frozen_linears
from .crn import batch_order, crn_generator, crn_head, crn_uniform, crn_weights, official_talk, router_start  # noqa: F401
from .protocol import cosine_schedule, quarter_steps
from .models import PrefixCache, SentenceClassifier, base_qkv, compute_prefix, load_minilm, minilm_targets

FINAL_EPS = (0.01, 0.1)    # relative perturbation sizes probed on the trained routers
FINAL_KINDS = ("gaussian_input", "gaussian_block", "adversarial")   # each its own C5 comparison
ROUTER_PROBE_TOKENS = 256  # tokens per layer for the final Lipschitz / amplification probes


# ----------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=1)
def frozen_encoder():
    """MiniLM, loaded once per process (2 s each time otherwise), frozen, its linears on the oneDNN
    path (:mod:`~analysis.fast_linear`); :func:`build_model` deep-copies it, so the cached module itself
    is never modified afterwards."""
    encoder = load_minilm()[0].requires_grad_(False)
    use_onednn_for_frozen_linears(encoder)
    return encoder


def prefix_path(exp_dir: Path, cfg: dict, task: str, split: str) -> Path:
    """Where the prefix cache of ``split`` of ``task`` is saved (it depends on the adapted layers and length)."""
    return Path(exp_dir) / task / f"prefix_{split}_top{cfg['adapt_top_layers']}_len{cfg['max_length']}.safetensors"


def prefix_caches(cfg: dict, exp_dir: Path, task: str) -> dict[str, PrefixCache]:
    """Cached prefix hidden states per split of ``task`` (computed once, saved under
    ``exp_dir/<task>/prefix_*.safetensors``), each with ``base`` = the frozen query/key/value
    outputs of the first adapted layer (:func:`~analysis.models.base_qkv`, kept in memory per process)."""
    split = task_split(exp_dir, task, cfg["n_train"], cfg["n_val"], cfg["n_test"], cfg["split_seed"])
    caches, encoder = {}, None
    for name in ("train", "val", "test"):
        part = split[split["split"] == name]
        path = prefix_path(exp_dir, cfg, task, name)
        ids = [str(i) for i in part["id"]]
        if not (path.is_file() and PrefixCache.load(path).ids == ids):
            if encoder is None:
                encoder, tokenizer = load_minilm()
            clf = SentenceClassifier(encoder, num_labels=len(TASKS[task]), adapt_top=cfg["adapt_top_layers"])
            use_onednn_for_frozen_linears(clf.encoder)
            compute_prefix(clf, tokenizer, part["text"], part["id"], cfg["max_length"], cache_path=path)
        caches[name] = _prefix_with_base(*_file_key(path), cfg["adapt_top_layers"])
    return caches


def _file_key(path: Path) -> tuple[str, int, int]:
    """``(path, mtime_ns, size)``: the key of the per-process memos below (a rewritten file is read again)."""
    stat = Path(path).stat()
    return str(path), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=6)
def _prefix_with_base(path: str, mtime_ns: int, size: int, adapt_top: int) -> PrefixCache:
    """One saved prefix cache with its frozen q/k/v rows, memoised per process (key: :func:`_file_key`)."""
    cache = PrefixCache.load(path)
    encoder = frozen_encoder()
    layer = encoder.encoder.layer[len(encoder.encoder.layer) - adapt_top]
    cache.base = base_qkv(layer, cache.hidden)
    return cache


def split_labels(exp_dir: Path, cfg: dict, task: str) -> dict[str, Tensor]:
    """Labels per split of ``task``, aligned with the prefix caches."""
    split = task_split(exp_dir, task, cfg["n_train"], cfg["n_val"], cfg["n_test"], cfg["split_seed"])
    return {name: torch.tensor(part["label"].to_numpy()) for name, part in split.groupby("split")}


# ----------------------------------------------------------------------------- model
MINILM_DIMS = {"query": (384, 384), "key": (384, 384), "value": (384, 384),
               "up": (384, 1536), "down": (1536, 384)}


def method_parameters(method: str, rank: int, cfg: dict) -> int:
    """Closed-form trainable adapter parameters of ``method`` at ``rank`` in the adapted MiniLM layers
    (head excluded; :func:`talklora_min.budget.closed_form_parameters`; 0 without adapters)."""
    m = registry.method(method)
    if m.adapter is None:
        return 0
    kw = m.adapter_kwargs()
    shapes = [(t, *MINILM_DIMS[t]) for _ in range(cfg["adapt_top_layers"]) for t in cfg["targets"]]
    talk = {k: kw[f"talk_{k}"] for k in ("structure", "groups", "bandwidth", "rank") if f"talk_{k}" in kw}
    return closed_form_parameters(kw["kind"], rank, cfg["num_experts"], shapes,
                                  router_input=kw.get("router_input", "code"),
                                  **{f"talk_{k}": v for k, v in talk.items()})


def matched_rank(method: str, talk_rank: int, cfg: dict) -> tuple[int, int, int]:
    """``(rank, count, reference_count)``: the rank (a multiple of E for the MoE methods) whose exact
    trainable-parameter count is closest to the reference method's at ``talk_rank``."""
    target = method_parameters(registry.reference(), talk_rank, cfg)
    step = cfg["num_experts"] if registry.method(method).routed else 1
    rank = min(range(step, 4 * talk_rank + 1, step),
               key=lambda r: (abs(method_parameters(method, r, cfg) - target), r))
    return rank, method_parameters(method, rank, cfg), target


def method_rank(method: str, cfg: dict) -> int:
    """The rank a method trains with.  ``matched_budget = "same-rank"``: ``cfg["rank"]`` for all;
    ``"match-params"``: :func:`matched_rank` at ``cfg["rank"]``."""
    if cfg["matched_budget"] == "same-rank":
        return cfg["rank"]
    return matched_rank(method, cfg["rank"], cfg)[0]


def adapter_config(method: str, cfg: dict, num_layers: int, rank: int | None = None) -> AdapterConfig:
    m = registry.method(method)
    if m.adapter is None:
        raise ValueError(f"method {method!r} has no adapters")
    return AdapterConfig(rank=rank or method_rank(method, cfg), num_experts=cfg["num_experts"],
                         alpha=None if not cfg["alpha"] else cfg["alpha"], dropout=cfg["dropout"],
                         target_modules=[r"encoder\." + p for p in minilm_targets(num_layers, cfg["adapt_top_layers"], cfg["targets"])],
                         target_match="regex", **m.adapter_kwargs())


def build_model(method: str, seed: int, cfg: dict, encoder, num_labels: int = 2,
                rank: int | None = None) -> SentenceClassifier:
    """MiniLM classifier with adapters of ``method`` on a private copy of ``encoder``; every adapter
    tensor and the head drawn from the CRN streams of ``seed`` (:func:`crn_weights`).  The frozen
    encoder's own dropout is switched off (p = 0) so the only noise in training is the adapters'."""
    spec = registry.method(method)
    encoder = copy.deepcopy(encoder)
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    clf = SentenceClassifier(encoder, num_labels=num_labels, adapt_top=cfg["adapt_top_layers"])
    crn_head(clf.head, seed)
    if spec.adapter is not None:
        inject(clf, adapter_config(method, cfg, clf.num_layers, rank))
        for name, layer in adapter_layers(clf).items():
            layer.set_weights(**crn_weights(method, layer, seed, short_name(name)))
            for tensor in spec.frozen:                 # e.g. T kept at its init
                getattr(layer, tensor).requires_grad_(False)
    clf.head.requires_grad_(True)
    use_onednn_for_frozen_linears(clf)            # frozen base linears: same math, faster GEMM (fast_linear)
    return clf


def short_name(name: str) -> str:
    """``encoder.encoder.layer.4.attention.self.query`` -> ``L4.query``."""
    parts = name.split(".")
    i = parts.index("layer")
    leaf = {"intermediate": "up", "output": "down"}.get(parts[i + 2], parts[-1]) if parts[-1] == "dense" else parts[-1]
    return f"L{parts[i + 1]}.{leaf}"


def optimizer_for(model: nn.Module, name: str, lr: float, head_lr: float, weight_decay: float):
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    head = list(model.head.parameters())
    groups = [dict(params=head, lr=head_lr)] + ([dict(params=adapters, lr=lr)] if adapters else [])
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, weight_decay=0.0)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")


def train_step(model: SentenceClassifier, opt, cache: PrefixCache, labels: Tensor, index: Tensor,
               aux_weight: float = 0.0) -> float:
    """One optimiser step on the examples ``index``: cross-entropy plus ``aux_weight`` × the adapters'
    balance losses (when the method has one); returns the cross-entropy."""
    model.train()
    device = model.head.weight.device
    x, lengths, base = (None if t is None else t.to(device) for t in cache.packed(index))
    loss = F.cross_entropy(model.forward_packed(x, lengths, base), labels[index].to(device))
    aux = auxiliary_loss(model)
    total = loss + aux_weight * aux if torch.is_tensor(aux) and aux_weight else loss
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------- evaluation
def is_routed(model: nn.Module) -> bool:
    """Whether any adapter layer of ``model`` has a router (LoRA has none)."""
    return any(hasattr(m, "add_routing_hook") for m in adapter_layers(model).values())


@torch.no_grad()
def evaluate(model: SentenceClassifier, cache: PrefixCache, labels: Tensor, batch_size: int = 64,
             routing: bool = True) -> tuple[dict, dict[str, dict], Tensor, dict[str, Tensor]]:
    """On every example of ``cache``: model metrics ``{accuracy, loss}`` (loss = mean cross-entropy,
    nats), per-layer routing metrics, the logits (in ``cache`` order) and the gates ``(N_tokens, E)``
    of every token per layer (in a fixed order: examples sorted by length, the batches' padding is
    the least)."""
    model.eval()
    device = model.head.weight.device
    order = torch.argsort(cache.lengths, stable=True)
    logits = []
    routed = routing and is_routed(model)
    with (record_routing(model) if routed else contextlib.nullcontext()) as rec:
        for start in range(0, len(cache), batch_size):
            x, lengths, base = (None if t is None else t.to(device)
                                for t in cache.packed(order[start:start + batch_size]))
            logits.append(model.forward_packed(x, lengths, base).cpu())     # real tokens only: no mask
    logits = torch.empty_like(torch.cat(logits)).index_copy_(0, order, torch.cat(logits))
    labels = labels.cpu()
    metrics = {"accuracy": float((logits.argmax(-1) == labels).double().mean()),
               "loss": float(F.cross_entropy(logits.double(), labels))}
    layers, top1 = {}, {}
    if routed:
        for name in rec.layer_names:
            gates = rec.gates(name).double().cpu()
            E = gates.shape[-1]
            load = gates.sum(0)
            token_entropy = -(gates * gates.clamp_min(1e-300).log()).sum(-1).mean() / math.log(E)
            layers[short_name(name)] = {
                "gini": gini(load), "gini_normalized": gini(load, normalized=True),
                "load_entropy": load_entropy(load), "token_entropy": float(token_entropy)}
            top1[short_name(name)] = gates
    return metrics, layers, logits, top1


def eval_rows(step: int, split: str, metrics: dict, layers: dict, keep=None) -> list[dict]:
    rows = [dict(step=step, split=split, layer="all", domain="all", metric=k, value=v) for k, v in metrics.items()]
    for layer, values in layers.items():
        rows += [dict(step=step, split=split, layer=layer, domain="all", metric=m, value=v)
                 for m, v in values.items() if keep is None or m in keep]
    return rows


def effective_routers(model: nn.Module) -> dict[str, tuple[Tensor, Tensor | None]]:
    """``{short layer name: (W_eff, T or None)}`` (detached copies) of every routed layer:
    W_eff = W_r(T⊗I) (TalkLoRA), W_r (MoELoRA-code), W_g (MoELoRA-input)."""
    out = {}
    for name, layer in adapter_layers(model).items():
        if not hasattr(layer, "num_experts"):
            continue
        if hasattr(layer, "T"):
            out[short_name(name)] = (layer.effective_router().detach().clone(), layer.T.detach().clone())
        else:
            W = layer.W_r if layer.router_input == "code" else layer.W_g
            out[short_name(name)] = (W.detach().clone(), None)
    return out


def movement_rows(step: int, before: dict, after: dict) -> list[dict]:
    """Router movement (split ``weights``): ‖ΔW_eff‖_F/‖W_eff‖_F, ‖ΔT‖_F/‖T‖_F, ‖W_eff‖₂ at both ends."""
    rows = []
    for layer, (W0, T0) in before.items():
        W1, T1 = after[layer]
        values = {"router_rel_change": float((W1 - W0).norm() / W0.norm()),
                  "router_norm": float(torch.linalg.matrix_norm(W1.double(), ord=2)),
                  "router_norm_init": float(torch.linalg.matrix_norm(W0.double(), ord=2))}
        if T0 is not None:
            values["talk_rel_change"] = float((T1 - T0).norm() / T0.norm())
        rows += [dict(step=step, split="weights", layer=layer, domain="all", metric=k, value=v)
                 for k, v in values.items()]
    return rows


@torch.no_grad()
def certified_ratios(model: nn.Module) -> dict[str, float]:
    """Per adapted layer with a Talking Module: ``‖W_r (T ⊗ I_m)‖₂ / ‖W_r‖₂`` — the certified router
    bound w.r.t. the code relative to that of ``T = I`` with the same ``W_r`` (C13: ≤ 1 for any
    doubly-stochastic T)."""
    norm = lambda M: float(torch.linalg.matrix_norm(M.double(), ord=2))
    return {name: norm(layer.effective_router()) / norm(layer.W_r)
            for name, layer in adapter_layers(model).items() if hasattr(layer, "T")}


def probe_index(n: int, n_probe: int) -> Tensor:
    """``n_probe`` validation examples spread evenly over the (label-ordered) validation split."""
    return torch.linspace(0, n - 1, min(n_probe, n)).round().long().unique()


def layer_inputs(model: SentenceClassifier, cache: PrefixCache, max_tokens: int = 1024) -> dict[str, Tensor]:
    """The (non-padding) input tokens of every routed adapter layer on the first examples of ``cache``."""
    n, index = 0, []
    while n < max_tokens and len(index) < len(cache):
        index.append(len(index))
        n += int(cache.lengths[index[-1]])
    device = model.head.weight.device
    hidden, mask = (t.to(device) for t in cache.batch(index))
    model.eval()
    captured = capture_layer_inputs(routed_layers(model), lambda: model.forward_top(hidden, mask))
    return {name: torch.cat(xs)[mask.bool()][:max_tokens] for name, xs in captured.items()}


def router_rows(model: SentenceClassifier, cache: PrefixCache, seed: int, max_tokens: int = ROUTER_PROBE_TOKENS) -> list[dict]:
    """Lipschitz sandwich (w.r.t. x) and amplification of every trained router, ``split="test"``."""
    rows = []
    for name, x in layer_inputs(model, cache, max_tokens).items():
        layer = model.get_submodule(name)
        lip = router_lipschitz(layer, x, wrt="input", seed=seed)
        common = dict(step=-1, split="test", layer=short_name(name), domain="all")
        rows += [dict(common, kind="lipschitz_input", statistic=f, metric="lipschitz", value=getattr(lip, f))
                 for f in ("certified", "local_max", "empirical")]
        rows += [dict(common, kind=r["kind"], eps=r["eps"], statistic=r["statistic"], metric=r["metric"],
                      value=r["value"]) for r in perturbation_response(layer, x, list(FINAL_EPS),
                                                                        list(FINAL_KINDS), seed=seed)]
    return rows


@functools.lru_cache(maxsize=6)
def _frozen_features(path: str, mtime_ns: int, size: int, adapt_top: int) -> Tensor:
    """Mean-pooled top-layer states ``(N, H)`` of every example of one saved prefix cache under the
    frozen encoder (no adapters, dropout off), memoised per process — what the no-adapter baseline trains on."""
    cache = _prefix_with_base(path, mtime_ns, size, adapt_top)
    clf = SentenceClassifier(frozen_encoder(), num_labels=2, adapt_top=adapt_top).eval()
    with torch.no_grad():
        return torch.cat([clf.pooled_packed(*cache.packed(torch.arange(i, min(i + 256, len(cache)))))
                          for i in range(0, len(cache), 256)])


def head_only_cell(seed: int, cfg: dict, exp_dir: Path, task: str, device: str = "cpu", lr: float | None = None,
                   tuning: bool = False) -> list[dict]:
    """The no-adapter baseline: the frozen encoder's pooled states never change, so they are computed
    once per process (:func:`_frozen_features`) and only the linear head (CRN init, same batch order,
    AdamW at ``lr``, default ``head_lr``, cosine decay) trains on them — the same function as running
    the frozen top layer each step.  ``tuning``: validation rows only."""
    t0 = time.perf_counter()
    caches, labels = prefix_caches(cfg, exp_dir, task), split_labels(exp_dir, cfg, task)
    feats = {}
    for name in caches:
        feats[name] = _frozen_features(*_file_key(prefix_path(exp_dir, cfg, task, name)), cfg["adapt_top_layers"]).to(device)
    head = crn_head(nn.Linear(feats["train"].shape[1], len(TASKS[task])), seed).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg["head_lr"] if lr is None else lr,
                            weight_decay=cfg["weight_decay"])
    schedule = cosine_schedule(opt, cfg["steps"])
    quarter = min(quarter_steps(cfg["steps"]))

    def logits_of(split: str) -> Tensor:
        with torch.no_grad():
            return head(feats[split]).cpu()

    def metrics(split: str) -> dict:
        logits, y = logits_of(split), labels[split]
        return {"accuracy": float((logits.argmax(-1) == y).double().mean()),
                "loss": float(F.cross_entropy(logits.double(), y))}

    rows = eval_rows(0, "val", metrics("val"), {})
    for step, index in enumerate(batch_order(len(caches["train"]), cfg["batch_size"], cfg["steps"], seed), 1):
        loss = F.cross_entropy(head(feats["train"][index]), labels["train"][index].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step == quarter and quarter < cfg["steps"]:
            rows += eval_rows(step, "val", metrics("val"), {})
    last = cfg["steps"]
    rows += eval_rows(last, "val", metrics("val"), {})
    if not tuning:
        rows += eval_rows(last, "test", metrics("test"), {}) + example_rows(last, logits_of("test"), labels["test"])
        common = dict(step=last, split="test", layer="all", domain="all")
        rows += [dict(common, metric="trainable_parameters", value=0),
                 dict(common, metric="closed_form_parameters", value=0),
                 dict(common, metric="n_train", value=len(caches["train"])),
                 dict(common, metric="n_test", value=len(caches["test"]))]
    rows.append(dict(step=last, split="test", layer="all", domain="all", metric="wall_seconds",
                     value=time.perf_counter() - t0))
    return [dict(r, rank=0) for r in rows]


def churn_rows(step: int, previous: dict, current: dict, tie: float) -> list[dict]:
    """Routing churn between two checkpoints per layer (split ``probe``): ``churn`` = share of tokens
    whose top-1 expert changed among those whose top-2 gate gap exceeds ``tie`` at both checkpoints
    (near-ties flip on noise, not on dynamics), ``churn_all`` = the share among all tokens."""
    rows = []
    for layer, g1 in current.items():
        g0 = previous[layer]
        changed = g0.argmax(-1) != g1.argmax(-1)
        if g1.shape[-1] > 1:
            top0, top1 = g0.topk(2, dim=-1).values, g1.topk(2, dim=-1).values
            decided = ((top0[:, 0] - top0[:, 1]) > tie) & ((top1[:, 0] - top1[:, 1]) > tie)
        else:
            decided = torch.ones_like(changed)
        share = float(changed[decided].double().mean()) if decided.any() else 0.0
        rows += [dict(step=step, split="probe", layer=layer, domain="all", metric="churn", value=share),
                 dict(step=step, split="probe", layer=layer, domain="all", metric="churn_all",
                      value=float(changed.double().mean())),
                 dict(step=step, split="probe", layer=layer, domain="all", metric="decided_share",
                      value=float(decided.double().mean()))]
    return rows


def example_rows(step: int, logits: Tensor, labels: Tensor) -> list[dict]:
    """Per held-out example (column ``example``): ``example_loss`` (cross-entropy, nats) and
    ``example_correct`` (0/1) — for paired per-example tests where seed-level variance vanishes."""
    losses = F.cross_entropy(logits.double(), labels.cpu(), reduction="none")
    correct = (logits.argmax(-1) == labels.cpu()).double()
    return [dict(step=step, split="test", layer="all", domain="all", metric=m, example=i, value=float(v))
            for m, values in (("example_loss", losses), ("example_correct", correct))
            for i, v in enumerate(values.tolist())]


def train_cell(method: str, seed: int, cfg: dict, exp_dir: str, task: str = "sentiment",
               budget: int | None = None, device: str = "cpu", lr: float | None = None,
               tuning: bool = False) -> list[dict]:
    """One training run of ``method`` on ``task`` (see module docstring for the rows).  ``budget``:
    a C7 cell — the reference at rank ``budget`` and every other method at :func:`matched_rank`.
    ``lr``: the adapter learning rate (default ``cfg["lr"]``; the no-adapter baseline's head lr,
    default ``cfg["head_lr"]``), decayed with a cosine schedule.  ``tuning``: the lr-selection run —
    validation rows only (no test split, router probes or saved adapter)."""
    exp_dir = Path(exp_dir)
    spec = registry.method(method)
    if spec.adapter is None and budget is None:
        return head_only_cell(seed, cfg, exp_dir, task, device, lr=lr, tuning=tuning)
    t0 = time.perf_counter()
    encoder = frozen_encoder()
    caches = prefix_caches(cfg, exp_dir, task)
    labels = split_labels(exp_dir, cfg, task)
    rank, gap = method_rank(method, cfg), None
    if budget is not None:
        rank, count, target = ((budget, None, None) if method == registry.reference()
                               else matched_rank(method, budget, cfg))
        gap = 0.0 if count is None else count / target - 1
    model = build_model(method, seed, cfg, encoder, len(TASKS[task]), rank).to(device)
    opt = optimizer_for(model, "adamw", cfg["lr"] if lr is None else lr, cfg["head_lr"], cfg["weight_decay"])
    schedule = cosine_schedule(opt, cfg["steps"])
    probe_at = probe_index(len(caches["val"]), cfg["n_probe"])
    probe = caches["val"].select(probe_at)
    main = budget is None                  # budget cells: test metrics and counts only (C7)
    rows = eval_rows(0, "val", *evaluate(model, caches["val"], labels["val"])[:2]) if main else []
    start = effective_routers(model)

    def checkpoint(step: int, previous: dict | None) -> dict:
        _, layers, _, gates = evaluate(model, probe, labels["val"][probe_at])
        rows.extend(eval_rows(step, "probe", {}, layers, keep=("gini", "load_entropy")))
        if previous is not None:
            rows.extend(churn_rows(step, previous, gates, cfg["tie_threshold"]))
        return gates

    gates = checkpoint(0, None) if is_routed(model) and main else None
    quarter = min(quarter_steps(cfg["steps"]))
    torch.manual_seed(int(crn_generator(seed, "dropout").initial_seed()))    # CRN dropout masks
    for step, index in enumerate(batch_order(len(caches["train"]), cfg["batch_size"], cfg["steps"], seed), 1):
        train_step(model, opt, caches["train"], labels["train"], index, spec.aux_weight)
        schedule.step()
        if gates is not None and (step % cfg["eval_every"] == 0 or step == cfg["steps"]):
            gates = checkpoint(step, gates)
        if main and step == quarter and quarter < cfg["steps"]:       # the flattening check
            rows.extend(eval_rows(step, "val", evaluate(model, caches["val"], labels["val"], routing=False)[0], {}))
    last = cfg["steps"]
    if main:
        rows += eval_rows(last, "val", *evaluate(model, caches["val"], labels["val"])[:2])
    rows += movement_rows(last, start, effective_routers(model))
    rows += [dict(step=last, split="weights", layer=short_name(name), domain="all", metric="certified_ratio", value=v)
             for name, v in certified_ratios(model).items()]
    if not tuning:
        metrics, layers, logits, _ = evaluate(model, caches["test"], labels["test"])
        rows += eval_rows(last, "test", metrics, layers)
        if main:
            rows += example_rows(last, logits, labels["test"])
        common = dict(step=last, split="test", layer="all", domain="all")
        rows += [dict(common, metric="trainable_parameters",
                      value=count_parameters(model) - sum(p.numel() for p in model.head.parameters())),
                 dict(common, metric="closed_form_parameters", value=method_parameters(method, rank, cfg)),
                 dict(common, metric="n_train", value=len(caches["train"])),
                 dict(common, metric="n_test", value=len(caches["test"]))]
        if gap is not None:
            rows.append(dict(common, metric="budget_gap", value=gap))
        if is_routed(model) and main:
            rows += router_rows(model, caches["test"], seed)
        if spec.adapter is not None and main:
            save_adapter(model, exp_dir / "adapters" / f"{task}-{method}-seed{seed}",
                         adapter_config(method, cfg, model.num_layers, rank))
    rows.append(dict(step=last, split="test", layer="all", domain="all", metric="wall_seconds",
                     value=time.perf_counter() - t0))
    for r in rows:
        r["rank"] = 0 if spec.adapter is None else rank
    return rows


SWEEP_KEYS = ("tasks", "methods", "extra_methods", "seeds", "budget_ranks", "budget_methods", "budget_tasks",
              "tuning_seeds", "lr_grid", "head_lr_grid")


def cell_settings(cfg: dict) -> dict:
    """``cfg`` without the lists that only say which cells to run (:data:`SWEEP_KEYS`): the settings a
    cell depends on, hence its hash — adding a method or a seed leaves finished cells valid."""
    return {k: v for k, v in cfg.items() if k not in SWEEP_KEYS}


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False,
        device: str = "cpu"):
    """Run every (task, method, seed) cell of ``config.train`` not done yet (sweep ``train``; the
    ``extra_methods`` only on the first task), then
    the C7 budget cells (sweep ``train_budget``) when ``train.budget_ranks`` is set.  Returns the
    ``train`` sweep result.  (A config with a user ``[setting]``: ``python -m analysis train`` runs
    :func:`analysis.custom.run` instead.)"""
    from .results import Cell, run_sweep

    cfg = config.train.to_dict()
    exp_dir = Path(results_dir) / "train"
    exp_dir.mkdir(parents=True, exist_ok=True)
    for task in cfg["tasks"]:
        prefix_caches(cfg, exp_dir, task)          # once, in this process, before the cells fan out
    params = dict(cfg=cell_settings(cfg), exp_dir=str(exp_dir), device=device)
    runs = [(t, m) for i, t in enumerate(cfg["tasks"]) for m in cfg["methods"] + (cfg["extra_methods"] if i == 0 else [])]
    lrs = tuned_lrs(runs, cfg, params, results_dir=results_dir, workers=workers, executor=executor, force=force,
                    config=config)
    cells = [Cell(train_cell, dict(task=t, method=m, seed=s, lr=lrs[(t, m)]), params)
             for t, m in runs for s in cfg["seeds"]]
    result = run_sweep("train", cells, results_dir=results_dir, workers=workers, executor=executor,
                       force=force, config=config)
    budget = [Cell(train_cell, dict(task=t, method=m, seed=s, budget=r, lr=lrs[(t, m)]), params)
              for t in cfg["budget_tasks"] for r in cfg["budget_ranks"] for m in cfg["budget_methods"]
              for s in cfg["seeds"] if (t, m) in lrs]
    if budget:
        run_sweep("train_budget", budget, results_dir=results_dir, workers=workers, executor=executor,
                  force=force, config=config)
    return result


def tuned_lrs(runs, cfg: dict, params: dict, **sweep) -> dict[tuple[str, str], float]:
    """``{(task, method): lr}`` selected on the validation split (:mod:`analysis.protocol`): adapter
    methods over ``train.lr_grid``, the no-adapter baseline (its head) over ``train.head_lr_grid``."""
    from .protocol import run_tuning

    keys = [(dict(task=t, method=m), cfg["lr_grid"] if registry.method(m).adapter is not None else cfg["head_lr_grid"])
            for t, m in runs]
    return run_tuning("train", train_cell, keys, cfg["tuning_seeds"], params, **sweep)
