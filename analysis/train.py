"""Training on real labelled text (claims C6, C7; figures F1, F4, F5).

Task: 7-way classification of Rotten Tomatoes snippets (fresh/rotten) and BBC headlines (5 topics)
with a frozen all-MiniLM-L6-v2; only the top ``adapt_top_layers`` BERT layers carry adapters and
run during training (the frozen prefix's hidden states are computed once and cached — this changes
nothing in the math).  Every method trains the same linear head on mean-pooled tokens, from the same
seeded head init, on the same batches in the same order (seeded by ``seed``).

Methods (``train.methods``): ``lora``, ``moelora-code``, ``moelora-input``, ``talklora-official``,
``talklora-identity`` (+ the LoRA-Mixer style routers ``topk-entropy`` and ``switch``).

Rows (tidy, one per measurement; the cell adds ``method, seed``):
``step, split, layer, domain, metric, value`` — ``layer`` is ``"all"`` for model-level metrics,
``domain`` is ``"all"``, ``"movie"`` or ``"news"``.  Per evaluation step: accuracy, loss, and per
adapted layer the soft-load Gini, the normalised load entropy, the mean per-token gate entropy
and the mutual information (bits) between the example's domain and the token's top-1 expert.
At the end (``split="test"``): accuracy per domain, trainable parameters (tied tensors once) and,
with ``step = -1`` and the extra columns ``kind, eps, statistic``, the router Lipschitz sandwich of
every trained router (``metric = lipschitz``, ``kind = lipschitz_input``, ``statistic`` = certified /
local_max / empirical, w.r.t. the layer input x) and the probe rows of
:func:`~talklora_min.probes.perturbation_response` at ``FINAL_EPS`` (same metric names as there).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talklora_min import AdapterConfig, adapter_layers, auxiliary_loss, count_parameters, inject
from talklora_min.io import save_adapter
from talklora_min.probes import (capture_layer_inputs, gini, load_entropy, perturbation_response,
                                 record_routing, routed_layers, router_lipschitz)

from .data import DOMAINS, experiment_split
from .models import PrefixCache, SentenceClassifier, compute_prefix, load_minilm, minilm_targets

METHODS = {
    "lora": dict(kind="lora"),
    "moelora-code": dict(kind="moelora", router_input="code"),
    "moelora-input": dict(kind="moelora", router_input="input"),
    "talklora-official": dict(kind="talklora", talk_init="official"),
    "talklora-identity": dict(kind="talklora", talk_init="identity"),
    "topk-entropy": dict(kind="moelora", router_input="code", top_k=2, balance_loss="entropy"),
    "switch": dict(kind="moelora", router_input="code", balance_loss="switch"),
}
AUX_WEIGHT = 0.01          # weight of a balance loss in the objective (LoRA-Mixer / Switch scale)
FINAL_EPS = (0.01, 0.1)    # relative perturbation sizes probed on the trained routers
FINAL_KINDS = ("gaussian_input", "adversarial")


# ----------------------------------------------------------------------------- data
def prefix_caches(cfg: dict, exp_dir: Path) -> dict[str, PrefixCache]:
    """Cached prefix hidden states per split (computed once, saved under ``exp_dir/prefix_*.safetensors``)."""
    split = experiment_split(exp_dir, cfg["n_train"], cfg["n_val"], cfg["n_test"], cfg["split_seed"])
    caches, encoder = {}, None
    for name in ("train", "val", "test"):
        part = split[split["split"] == name]
        path = exp_dir / f"prefix_{name}_top{cfg['adapt_top_layers']}_len{cfg['max_length']}.safetensors"
        if path.is_file() and PrefixCache.load(path).ids == [str(i) for i in part["id"]]:
            caches[name] = PrefixCache.load(path)
            continue
        if encoder is None:
            encoder, tokenizer = load_minilm()
        clf = SentenceClassifier(encoder, adapt_top=cfg["adapt_top_layers"])
        caches[name] = compute_prefix(clf, tokenizer, part["text"], part["id"], cfg["max_length"], cache_path=path)
    return caches


def split_targets(exp_dir: Path, cfg: dict) -> dict[str, tuple[Tensor, Tensor]]:
    """(labels, domains) per split, aligned with the prefix caches."""
    split = experiment_split(exp_dir, cfg["n_train"], cfg["n_val"], cfg["n_test"], cfg["split_seed"])
    return {name: (torch.tensor(part["label"].to_numpy()), torch.tensor(part["domain"].to_numpy()))
            for name, part in split.groupby("split")}


# ----------------------------------------------------------------------------- model
MINILM_DIMS = {"query": (384, 384), "key": (384, 384), "value": (384, 384),
               "up": (384, 1536), "down": (1536, 384)}


def closed_form_parameters(method: str, rank: int, num_experts: int, layers: int, targets,
                           dims: dict = MINILM_DIMS, shared_B: bool = False) -> int:
    """Trainable adapter parameters (head excluded).  Per adapted layer: A r·d_in + C E·m² +
    B d_out·r + T E² + W_r E·r (MoELoRA-input: W_g E·d_in instead of W_r; LoRA: A and B only).
    ``shared_B``: one B per projection type across layers (official layout)."""
    r, E = rank, num_experts
    m = r // E
    total = 0
    for t in targets:
        d_in, d_out = dims[t]
        if method == "lora":
            per, b = r * d_in, d_out * r
        else:
            per, b = r * d_in + E * m * m, d_out * r
            per += E * d_in if method == "moelora-input" else E * r
            if method.startswith("talklora"):
                per += E * E
        total += layers * per + (b if shared_B else layers * b)
    return total


def method_rank(method: str, cfg: dict) -> int:
    """The rank a method trains with.  ``matched_budget = "same-rank"``: ``cfg["rank"]`` for all;
    ``"match-params"``: the rank (a multiple of E for the MoE methods) whose trainable-parameter
    count is closest to talklora-official's at ``cfg["rank"]``."""
    if cfg["matched_budget"] == "same-rank":
        return cfg["rank"]
    E, layers, targets = cfg["num_experts"], cfg["adapt_top_layers"], cfg["targets"]
    target = closed_form_parameters("talklora-official", cfg["rank"], E, layers, targets)
    step = 1 if method == "lora" else E
    return min(range(step, 4 * cfg["rank"] + 1, step),
               key=lambda r: abs(closed_form_parameters(method, r, E, layers, targets) - target))


def adapter_config(method: str, cfg: dict, num_layers: int) -> AdapterConfig:
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    return AdapterConfig(rank=method_rank(method, cfg), num_experts=cfg["num_experts"],
                         alpha=None if not cfg["alpha"] else cfg["alpha"], dropout=cfg["dropout"],
                         target_modules=[r"encoder\." + p for p in minilm_targets(num_layers, cfg["adapt_top_layers"], cfg["targets"])],
                         target_match="regex", **METHODS[method])


def build_model(method: str, seed: int, cfg: dict, encoder) -> SentenceClassifier:
    """MiniLM classifier with adapters of ``method`` on a private copy of ``encoder``; adapter init
    and head init seeded by ``seed``.  The frozen encoder's own dropout is switched off (p = 0) so
    the only noise in training is the adapters' dropout."""
    encoder = copy.deepcopy(encoder)
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    clf = SentenceClassifier(encoder, adapt_top=cfg["adapt_top_layers"], seed=seed)
    torch.manual_seed(seed)
    inject(clf, adapter_config(method, cfg, clf.num_layers))
    clf.head.requires_grad_(True)
    return clf


def short_name(name: str) -> str:
    """``encoder.encoder.layer.4.attention.self.query`` -> ``L4.query``."""
    parts = name.split(".")
    i = parts.index("layer")
    leaf = {"intermediate": "up", "output": "down"}.get(parts[i + 2], parts[-1]) if parts[-1] == "dense" else parts[-1]
    return f"L{parts[i + 1]}.{leaf}"


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Seeded mini-batch indices, epoch by epoch, the same for every method of a seed."""
    g = torch.Generator().manual_seed(10_000 + seed)
    out, perm = [], torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(perm) < batch_size:
            perm = torch.cat([perm, torch.randperm(n, generator=g)])
        out.append(perm[:batch_size])
        perm = perm[batch_size:]
    return out


def optimizer_for(model: nn.Module, name: str, lr: float, head_lr: float, weight_decay: float):
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    head = list(model.head.parameters())
    groups = [dict(params=adapters, lr=lr), dict(params=head, lr=head_lr)]
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, weight_decay=0.0)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")


def train_step(model: SentenceClassifier, opt, cache: PrefixCache, labels: Tensor, index: Tensor) -> float:
    model.train()
    hidden, mask = cache.batch(index)
    loss = F.cross_entropy(model.forward_top(hidden, mask), labels[index])
    aux = auxiliary_loss(model)
    total = loss + AUX_WEIGHT * aux if torch.is_tensor(aux) else loss
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------- evaluation
def is_routed(model: nn.Module) -> bool:
    """Whether any adapter layer of ``model`` has a router (LoRA has none)."""
    return any(hasattr(m, "add_routing_hook") for m in adapter_layers(model).values())


def mutual_information_bits(domain: Tensor, expert: Tensor, num_experts: int) -> float:
    """``I(D; Z) = Σ p(d,z) log2 p(d,z) / (p(d) p(z))`` over tokens (plug-in estimate)."""
    joint = torch.zeros(len(DOMAINS), num_experts, dtype=torch.float64)
    joint.index_put_((domain.long(), expert.long()), torch.ones(len(domain), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / outer[nz]).log2()).sum())


@torch.no_grad()
def evaluate(model: SentenceClassifier, cache: PrefixCache, labels: Tensor, domains: Tensor,
             batch_size: int = 128, routing: bool = True) -> tuple[dict, dict[str, dict], Tensor]:
    """Model metrics ``{accuracy, loss, accuracy_<domain>}``, per-layer routing metrics, and logits."""
    model.eval()
    logits, token_domain = [], []
    routed = routing and is_routed(model)
    with (record_routing(model) if routed else contextlib.nullcontext()) as rec:
        for start in range(0, len(cache), batch_size):
            index = torch.arange(start, min(start + batch_size, len(cache)))
            hidden, mask = cache.batch(index)
            if routed:
                rec.set_mask(mask)
            logits.append(model.forward_top(hidden, mask))
            token_domain.append(domains[index].unsqueeze(1).expand_as(mask)[mask.bool()])
    logits = torch.cat(logits)
    correct = logits.argmax(-1) == labels
    metrics = {"accuracy": float(correct.double().mean()), "loss": float(F.cross_entropy(logits, labels))}
    for d, name in enumerate(DOMAINS):
        metrics[f"accuracy_{name}"] = float(correct[domains == d].double().mean())
    layers = {}
    if routed:
        token_domain = torch.cat(token_domain)
        for name in rec.layer_names:
            gates = rec.gates(name).double()
            E = gates.shape[-1]
            load = gates.sum(0)
            token_entropy = -(gates * gates.clamp_min(1e-300).log()).sum(-1).mean() / math.log(E)
            layers[short_name(name)] = {
                "gini": gini(load), "gini_normalized": gini(load, normalized=True),
                "load_entropy": load_entropy(load), "token_entropy": float(token_entropy),
                "domain_expert_mi_bits": mutual_information_bits(token_domain, rec.top1(name), E),
            }
    return metrics, layers, logits


def eval_rows(step: int, split: str, metrics: dict, layers: dict) -> list[dict]:
    rows = []
    for key, value in metrics.items():
        metric, _, domain = key.partition("_")
        rows.append(dict(step=step, split=split, layer="all", domain=domain or "all", metric=metric, value=value))
    for layer, values in layers.items():
        rows += [dict(step=step, split=split, layer=layer, domain="all", metric=m, value=v) for m, v in values.items()]
    return rows


def layer_inputs(model: SentenceClassifier, cache: PrefixCache, max_tokens: int = 1024) -> dict[str, Tensor]:
    """The (non-padding) input tokens of every routed adapter layer on the first examples of ``cache``."""
    n, index = 0, []
    while n < max_tokens and len(index) < len(cache):
        index.append(len(index))
        n += int(cache.lengths[index[-1]])
    hidden, mask = cache.batch(index)
    model.eval()
    captured = capture_layer_inputs(routed_layers(model), lambda: model.forward_top(hidden, mask))
    return {name: torch.cat(xs)[mask.bool()][:max_tokens] for name, xs in captured.items()}


def router_rows(model: SentenceClassifier, cache: PrefixCache, seed: int, max_tokens: int = 512) -> list[dict]:
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


def train_cell(method: str, seed: int, cfg: dict, exp_dir: str) -> list[dict]:
    """One training run: returns tidy rows (see module docstring); saves the adapter."""
    exp_dir = Path(exp_dir)
    encoder, _ = load_minilm()
    caches = prefix_caches(cfg, exp_dir)
    targets = split_targets(exp_dir, cfg)
    model = build_model(method, seed, cfg, encoder)
    opt = optimizer_for(model, "adamw", cfg["lr"], cfg["head_lr"], cfg["weight_decay"])
    rows, t0 = [], time.perf_counter()
    labels = targets["train"][0]
    rows += eval_rows(0, "val", *evaluate(model, caches["val"], *targets["val"])[:2])
    for step, index in enumerate(batch_order(len(caches["train"]), cfg["batch_size"], cfg["steps"], seed), 1):
        train_step(model, opt, caches["train"], labels, index)
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            rows += eval_rows(step, "val", *evaluate(model, caches["val"], *targets["val"])[:2])
    metrics, layers, _ = evaluate(model, caches["test"], *targets["test"])
    rows += eval_rows(cfg["steps"], "test", metrics, layers)
    rows.append(dict(step=cfg["steps"], split="test", layer="all", domain="all", metric="trainable_parameters",
                     value=count_parameters(model) - sum(p.numel() for p in model.head.parameters())))
    if is_routed(model):
        rows += router_rows(model, caches["test"], seed)
    rows.append(dict(step=cfg["steps"], split="test", layer="all", domain="all", metric="wall_seconds",
                     value=time.perf_counter() - t0))
    save_adapter(model, exp_dir / "adapters" / f"{method}-seed{seed}",
                 adapter_config(method, cfg, model.num_layers))
    return rows


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False, device: str = "cpu"):
    """Run every (method, seed) cell of ``config.train`` not done yet; returns the sweep result."""
    from .results import Cell, run_sweep

    cfg = config.train.to_dict()
    exp_dir = Path(results_dir) / "train"
    exp_dir.mkdir(parents=True, exist_ok=True)
    prefix_caches(cfg, exp_dir)          # once, in this process, before the cells fan out
    cells = [Cell(train_cell, dict(method=m, seed=s), dict(cfg=cfg, exp_dir=str(exp_dir)))
             for m in cfg["methods"] for s in cfg["seeds"]]
    return run_sweep("train", cells, results_dir=results_dir, workers=workers, executor=executor,
                     force=force, config=config)
