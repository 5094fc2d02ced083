"""The planted-teacher setting (docs/method.md §7): synthetic, seconds per run, where routing provably
matters.

A frozen random base ``W0 (d_out, d_in)``; inputs from a mixture of ``K`` Gaussian clusters
(``x = μ_c + σ ε``, the means at distance ``separation`` from the origin in random directions); the
teacher adds the update of the input's cluster,

    y(x) = W0 x + ΔW_c(x) x,      ΔW_k = scale · U_k V_kᵀ / √(d_in · q),  U_k (d_out, q), V_k (d_in, q),

with ``q = teacher_rank``.  With ``E = K`` experts of rank ``m = q`` a MoE adapter that routes every
cluster to its own expert represents the teacher exactly; a single linear map (LoRA of any rank)
cannot, because the update changes with the cluster.  Every method regresses the teacher's output
(mean squared error per output coordinate) with the same frozen base; the data are fixed by
``data_seed`` (one task), the seeds vary the adapter draws and the batch order (common random
numbers, :func:`analysis.train.crn_weights`).

Rows (the cell adds ``method, seed`` — and ``lr`` in the tuning sweep): ``step, split, layer,
metric, value``.  ``val`` at step 0, at every checkpoint, at 3/4 of the run and at the end:
``loss``, and at the end the routing metrics below; ``test`` at the
end: ``loss``, ``trainable_parameters``, ``closed_form_parameters`` and per routed layer ``gini``,
``load_entropy``, ``token_entropy`` (mean per-token gate entropy / log E), ``cluster_mi`` (mutual
information between cluster and top-1 expert / log K), ``certified_ratio`` (‖W_eff‖₂ / ‖W_r‖₂: the
certified router bound w.r.t. the code relative to T = I with the same W_r), ``router_rel_change``;
``probe`` at every checkpoint: ``churn`` (share of probe points whose top-1 expert changed since the
previous checkpoint, among those whose top-2 gate gap exceeded ``tie_threshold`` at both) and
``churn_all``; ``amplification`` at the end: the routing quotient (median over test points) of
:func:`talklora_min.probes.perturbation_response` for every kind at ``amplification_eps``.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talklora_min import AdapterConfig, adapter_layers, auxiliary_loss, count_parameters, inject
from talklora_min.budget import closed_form_parameters
from talklora_min.probes import gini, load_entropy, perturbation_response

from . import methods as registry
from .protocol import cosine_schedule, quarter_steps
from .crn import batch_order, crn_generator, crn_weights

LAYER = "planted"             # the adapted layer's key in the CRN streams and the rows
KINDS = ("gaussian_input", "gaussian_block", "adversarial")


# ----------------------------------------------------------------------------- the task
def make_task(cfg: dict) -> dict[str, Tensor]:
    """The fixed task of ``cfg["data_seed"]``: base ``W0``, cluster means, updates ``ΔW`` and the
    splits ``x_<split>``, ``c_<split>`` (cluster ids), ``y_<split>`` (teacher outputs)."""
    g = torch.Generator().manual_seed(int(cfg["data_seed"]))
    d_in, d_out, K, q = cfg["d_in"], cfg["d_out"], cfg["clusters"], cfg["teacher_rank"]
    W0 = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    means = F.normalize(torch.randn(K, d_in, generator=g), dim=-1) * cfg["separation"]
    U, V = torch.randn(K, d_out, q, generator=g), torch.randn(K, d_in, q, generator=g)
    delta = cfg["scale"] * U @ V.transpose(1, 2) / math.sqrt(d_in * q)
    task = {"W0": W0, "means": means, "delta": delta}
    for split in ("train", "val", "test"):
        n = cfg[f"n_{split}"]
        c = torch.randint(K, (n,), generator=g)
        x = means[c] + cfg["noise"] * torch.randn(n, d_in, generator=g)
        task[f"x_{split}"], task[f"c_{split}"] = x, c
        task[f"y_{split}"] = x @ W0.T + torch.einsum("nod,nd->no", delta[c], x)
    return task


class Student(nn.Module):
    """The frozen base ``W0`` as ``self.proj`` (an ``nn.Linear`` the adapters wrap)."""

    def __init__(self, W0: Tensor):
        super().__init__()
        self.proj = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(W0)
        self.proj.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def build(method: str, seed: int, cfg: dict, W0: Tensor) -> Student:
    spec = registry.method(method)
    net = Student(W0)
    if spec.adapter is not None:
        inject(net, AdapterConfig(rank=cfg["rank"], num_experts=cfg["num_experts"], target_modules=["proj"],
                                  **spec.adapter_kwargs()))
        layer = net.proj
        layer.set_weights(**crn_weights(method, layer, seed, LAYER))
        for tensor in spec.frozen:
            getattr(layer, tensor).requires_grad_(False)
    return net


def method_parameters(method: str, cfg: dict, rank: int | None = None) -> int:
    """Closed-form trainable parameters of ``method`` at ``rank`` (default ``cfg["rank"]``)."""
    spec = registry.method(method)
    if spec.adapter is None:
        return 0
    kw = spec.adapter_kwargs()
    talk = {k: kw[k] for k in ("talk_structure", "talk_groups", "talk_bandwidth", "talk_rank") if k in kw}
    return closed_form_parameters(kw["kind"], rank or cfg["rank"], cfg["num_experts"],
                                  [("proj", cfg["d_in"], cfg["d_out"])], router_input=kw.get("router_input", "code"),
                                  **talk)


def matched_rank(method: str, reference_rank: int, cfg: dict) -> tuple[int, float]:
    """``(rank, gap)``: the rank (a multiple of E for routed methods) whose closed-form count is
    closest to the reference method's at ``reference_rank``, and the relative count gap."""
    target = method_parameters(registry.reference(), cfg, reference_rank)
    step = cfg["num_experts"] if registry.method(method).routed else 1
    rank = min(range(step, 4 * reference_rank + 1, step),
               key=lambda r: (abs(method_parameters(method, cfg, r) - target), r))
    return rank, method_parameters(method, cfg, rank) / target - 1


# ----------------------------------------------------------------------------- measurements
def mse(net: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float(F.mse_loss(net.eval()(x), y))


def gates_of(layer, x: Tensor) -> Tensor:
    with torch.no_grad():
        return layer.gates(x).double()


def routing_metrics(layer, x: Tensor, clusters: Tensor, K: int) -> dict[str, float]:
    """Load balance, per-token entropy and cluster recovery of a routed layer on ``x``."""
    g = gates_of(layer, x)
    E = g.shape[-1]
    load = g.sum(0)
    top1 = g.argmax(-1)
    joint = torch.zeros(K, E, dtype=torch.float64)
    joint.index_put_((clusters, top1), torch.ones(len(top1), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / outer[nz]).log()).sum()) / math.log(K)
    entropy = float((-(g * g.clamp_min(1e-300).log()).sum(-1)).mean() / math.log(E))
    return {"gini": gini(load), "load_entropy": load_entropy(load), "token_entropy": entropy, "cluster_mi": mi}


def churn(previous: Tensor, current: Tensor, tie: float) -> tuple[float, float]:
    """``(churn among decided points, churn among all)``: the share whose top-1 expert changed; a point
    is decided when its top-2 gate gap exceeds ``tie`` at both checkpoints (with E = 1 every point is)."""
    changed = previous.argmax(-1) != current.argmax(-1)
    if previous.shape[-1] < 2:
        return 0.0, 0.0
    def gap(g):
        top = g.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    decided = (gap(previous) > tie) & (gap(current) > tie)
    share = float(changed[decided].double().mean()) if decided.any() else 0.0
    return share, float(changed.double().mean())


def planted_cell(method: str, seed: int, cfg: dict, lr: float | None = None, tuning: bool = False,
                 budget: int | None = None) -> list[dict]:
    """One run of ``method`` (rows: module docstring).  ``lr``: the adapter learning rate (the tuned
    one in the evaluation sweep).  ``tuning``: validation rows only (the lr-selection sweep).
    ``budget``: a C7 cell — the reference at rank ``budget``, every other method at its matched rank
    (:func:`matched_rank`; rows add ``budget_gap``)."""
    t0 = time.perf_counter()
    gap = None
    if budget is not None:
        rank, gap = (budget, 0.0) if method == registry.reference() else matched_rank(method, budget, cfg)
        cfg = dict(cfg, rank=rank)
    task = make_task(cfg)
    net = build(method, seed, cfg, task["W0"])
    spec = registry.method(method)
    layer = net.proj if spec.adapter is not None else None
    routed = spec.routed
    x_val, y_val = task["x_val"], task["y_val"]
    probe = x_val[:cfg["n_probe"]]
    rows = [dict(step=0, split="val", layer="all", metric="loss", value=mse(net, x_val, y_val))]
    previous = gates_of(layer, probe) if routed else None
    if routed:                  # step 0: the difference-in-differences of C6 removes the start's gap
        rows += [dict(step=0, split="val", layer=LAYER, metric=k, value=v)
                 for k, v in routing_metrics(layer, x_val, task["c_val"], cfg["clusters"]).items()]
    W_start = layer.effective_router().detach().clone() if routed else None
    if spec.adapter is not None:
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr,
                                weight_decay=cfg["weight_decay"])
        schedule = cosine_schedule(opt, cfg["steps"])
        check = quarter_steps(cfg["steps"])
        x_tr, y_tr = task["x_train"], task["y_train"]
        for step, index in enumerate(batch_order(len(x_tr), cfg["batch_size"], cfg["steps"], seed), 1):
            net.train()
            loss = F.mse_loss(net(x_tr[index]), y_tr[index])
            aux = auxiliary_loss(net) if spec.aux_weight else 0.0
            opt.zero_grad(set_to_none=True)
            (loss + spec.aux_weight * aux if torch.is_tensor(aux) else loss).backward()
            opt.step()
            schedule.step()
            if step % cfg["eval_every"] == 0 or step in check:
                rows.append(dict(step=step, split="val", layer="all", metric="loss", value=mse(net, x_val, y_val)))
            if previous is not None and (step % cfg["eval_every"] == 0 or step == cfg["steps"]):
                current = gates_of(layer, probe)
                decided, every = churn(previous, current, cfg["tie_threshold"])
                rows += [dict(step=step, split="probe", layer=LAYER, metric="churn", value=decided),
                         dict(step=step, split="probe", layer=LAYER, metric="churn_all", value=every)]
                previous = current
    else:
        rows.append(dict(step=cfg["steps"], split="val", layer="all", metric="loss", value=rows[0]["value"]))
    last = cfg["steps"]
    if routed:                  # the margins of the balance claims are read off the tuning runs' values
        rows += [dict(step=last, split="val", layer=LAYER, metric=k, value=v)
                 for k, v in routing_metrics(layer, x_val, task["c_val"], cfg["clusters"]).items()]
    if tuning:
        return rows
    common = dict(step=last, split="test")
    rows += [dict(common, layer="all", metric="loss", value=mse(net, task["x_test"], task["y_test"])),
             dict(common, layer="all", metric="trainable_parameters", value=count_parameters(net)),
             dict(common, layer="all", metric="closed_form_parameters", value=method_parameters(method, cfg))]
    if gap is not None:
        rows.append(dict(common, layer="all", metric="budget_gap", value=gap))
    if routed and budget is None:
        x_test = task["x_test"]
        values = routing_metrics(layer, x_test, task["c_test"], cfg["clusters"])
        W_end = layer.effective_router().detach()
        values["router_rel_change"] = float((W_end - W_start).norm() / W_start.norm())
        if layer.router_input == "code":
            values["certified_ratio"] = float(torch.linalg.matrix_norm(W_end.double(), ord=2)
                                              / torch.linalg.matrix_norm(layer.W_r.detach().double(), ord=2))
        rows += [dict(common, layer=LAYER, metric=k, value=v) for k, v in values.items()]
        probe_x = x_test[:cfg["amplification_tokens"]]
        for r in perturbation_response(layer, probe_x, list(cfg["amplification_eps"]), list(KINDS), seed=seed,
                                       pgd_steps=cfg["adversarial_steps"]):
            if r["metric"] == "routing_quotient" and r["statistic"] == "median":
                rows.append(dict(step=last, split="amplification", layer=LAYER, metric=f"quotient_{r['kind']}",
                                 eps=r["eps"], value=r["value"]))
    rows.append(dict(common, layer="all", metric="wall_seconds", value=time.perf_counter() - t0))
    return rows


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False,
        device: str = "cpu"):
    """The tuning sweep (``planted_tuning``: every method × lr of ``planted.lr_grid`` × tuning seed),
    then the evaluation sweep (``planted``: every method × seed at its selected lr)."""
    from .protocol import run_tuning
    from .results import Cell, run_sweep

    cfg = config.planted.to_dict()
    settings = {k: v for k, v in cfg.items()
                if k not in ("methods", "seeds", "tuning_seeds", "lr_grid", "budget_ranks", "budget_methods")}
    trained = [m for m in cfg["methods"] if registry.method(m).adapter is not None]
    lrs = run_tuning("planted", planted_cell, [(dict(method=m), cfg["lr_grid"]) for m in trained],
                     cfg["tuning_seeds"], dict(cfg=settings), results_dir=results_dir, workers=workers,
                     executor=executor, force=force, config=config, by=("method",))
    cells = [Cell(planted_cell, dict(method=m, seed=s, lr=lrs.get((m,), 0.0)), dict(cfg=settings))
             for m in cfg["methods"] for s in cfg["seeds"]]
    result = run_sweep("planted", cells, results_dir=results_dir, workers=workers, executor=executor,
                       force=force, config=config)
    budget = [Cell(planted_cell, dict(method=m, seed=s, budget=r, lr=lrs[(m,)]), dict(cfg=settings))
              for r in cfg["budget_ranks"] for m in cfg["budget_methods"] for s in cfg["seeds"] if (m,) in lrs]
    if budget:
        run_sweep("planted_budget", budget, results_dir=results_dir, workers=workers, executor=executor,
                  force=force, config=config)
    return result
