"""Function-matched twin runs (claim C9, figure F8).

docs/method.md §3: a linear Talking Module is absorbed by the router, ``W' = W_r (T ⊗ I_m)``, so TalkLoRA and
MoELoRA-code compute the same family of functions.  Any difference in training must come from the
parameterisation and the optimiser.  Per (task, optimizer, seed) one cell builds the arms of
``twins.models`` — method-registry entries tagged ``twin-arm`` (:mod:`analysis.methods`: the
reference, its function-matched twin, the reference with T frozen, T = I with the absorbed router) —
from the seed's common random numbers (:func:`analysis.train.build_model`), which compute the SAME
function at step 0 (asserted), and trains them on the same batches, in the same order, with the
same dropout masks.

Optimisers: AdamW at ``twins.lr_adamw`` (official 3e-4, weight decay ``twins.weight_decay``) and
plain SGD at ``twins.lr_sgd`` (head: ``twins.head_lr_sgd``).  With B = 0 at init the router gets no
gradient until B has grown, so a too small SGD lr leaves the routers where they started: the
``router_rel_change`` rows (‖W_eff(end) − W_eff(0)‖_F/‖W_eff(0)‖_F per layer) say whether an arm moved.

Rows (the cell adds ``task, optimizer, seed``): ``step, split, model, layer, metric, value``.
``split = "probe"`` at every checkpoint (step 0, every ``eval_every``, the last step) on the fixed
probe set of ``train.n_probe`` validation examples: ``logit_maxabs_diff`` / ``logit_meanabs_diff``
of each arm to the reference, per-layer ``gini`` and ``load_entropy``, ``router_norm`` (‖W_eff‖₂),
``talk_norm`` (‖T‖₂), ``lipschitz_certified`` / ``lipschitz_local_max`` (w.r.t. the code h), and
``accuracy``/``loss`` at every checkpoint but the last.  ``split = "val"`` at step 0 and the last
step on the whole validation split: per-layer ``gini`` and ``load_entropy`` (C6 against the twin).
``split = "test"`` at the last step on every
test example: ``accuracy``, ``loss`` (mean cross-entropy, nats).  ``split = "weights"`` at the last
step: ``router_rel_change`` and ``talk_rel_change`` per layer.

A run whose training loss or trainable parameters become non-finite (plain SGD at a large lr can
diverge) ends there: ``split = "train"``, ``metric = "diverged"`` at that step, 1 for each arm that
diverged and 0 for the others, and no test rows; the report leaves that seed out and says so.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from talklora_min import adapter_layers
from talklora_min.probes import certified_lipschitz, local_lipschitz

from . import methods as registry
from .data import TASKS
from .train import (batch_order, build_model, cell_settings, crn_generator, effective_routers, evaluate,
                    frozen_encoder, layer_inputs, movement_rows, optimizer_for, prefix_caches, probe_index,
                    short_name, split_labels, train_step)

MATCH_ATOL = 1e-5      # float32: the models agree at step 0 to this absolute tolerance


def build_twins(seed: int, cfg: dict, encoder, models, num_labels: int = 2) -> dict:
    """The function-matched arms ``models`` of a seed (registry names tagged ``twin-arm``; the
    reference is always built), in registry order."""
    arms = registry.tagged("twin-arm")
    registry.check_names(models, "twins.models", arms)
    wanted = {registry.reference(), *models}
    return {name: build_model(name, seed, cfg, encoder, num_labels) for name in arms if name in wanted}


@torch.no_grad()
def router_state_rows(step: int, model_name: str, model, inputs: dict) -> list[dict]:
    rows = []
    for name, layer in adapter_layers(model).items():
        W = layer.effective_router()
        values = {"router_norm": float(torch.linalg.matrix_norm(W, ord=2)),
                  "lipschitz_certified": certified_lipschitz(layer, wrt="code"),
                  "lipschitz_local_max": float(local_lipschitz(layer, inputs[name], wrt="code").max())}
        if hasattr(layer, "T"):
            values["talk_norm"] = float(torch.linalg.matrix_norm(layer.T, ord=2))
        rows += [dict(step=step, split="probe", model=model_name, layer=short_name(name), metric=k, value=v)
                 for k, v in values.items()]
    return rows


def finite_after_step(loss: float, model) -> bool:
    """Whether a training step left ``model`` finite: its training loss and every trainable parameter."""
    return math.isfinite(loss) and all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def twins_cell(optimizer: str, seed: int, cfg: dict, twins: dict, exp_dir: str, task: str = "sentiment",
               device: str = "cpu") -> list[dict]:
    exp_dir = Path(exp_dir)
    encoder = frozen_encoder()
    caches = prefix_caches(cfg, exp_dir, task)
    labels = split_labels(exp_dir, cfg, task)
    models = {k: m.to(device) for k, m in
              build_twins(seed, cfg, encoder, twins["models"], len(TASKS[task])).items()}
    lr = twins["lr_adamw"] if optimizer == "adamw" else twins["lr_sgd"]
    head_lr = cfg["head_lr"] if optimizer == "adamw" else twins["head_lr_sgd"]
    opts = {k: optimizer_for(m, optimizer, lr, head_lr, twins["weight_decay"]) for k, m in models.items()}
    at = probe_index(len(caches["val"]), cfg["n_probe"])
    probe, probe_labels = caches["val"].select(at), labels["val"][at]
    x, lengths, base = (t.to(device) for t in probe.packed(torch.arange(len(probe))))
    start = {k: effective_routers(m) for k, m in models.items()}

    def measure(step: int, last: bool) -> list[dict]:
        rows = []
        with torch.no_grad():
            for m in models.values():
                m.eval()
            ref = models[registry.reference()].forward_packed(x, lengths, base)
            for name, m in models.items():
                diff = (m.forward_packed(x, lengths, base) - ref).abs()
                rows += [dict(step=step, split="probe", model=name, layer="all", metric="logit_maxabs_diff",
                              value=float(diff.max())),
                         dict(step=step, split="probe", model=name, layer="all", metric="logit_meanabs_diff",
                              value=float(diff.mean()))]
        for name, m in models.items():
            metrics, layers, _, _ = evaluate(m, probe, probe_labels)
            if not last:
                rows += [dict(step=step, split="probe", model=name, layer="all", metric=k, value=v)
                         for k, v in metrics.items()]
            for layer, values in layers.items():
                rows += [dict(step=step, split="probe", model=name, layer=layer, metric=k, value=values[k])
                         for k in ("gini", "load_entropy")]
            rows += router_state_rows(step, name, m, layer_inputs(m, probe, 256))
        return rows

    def validation(step: int) -> list[dict]:         # C6 against the twin: the whole validation split
        rows = []
        for name, m in models.items():
            for layer, values in evaluate(m, caches["val"], labels["val"])[1].items():
                rows += [dict(step=step, split="val", model=name, layer=layer, metric=k, value=values[k])
                         for k in ("gini", "load_entropy")]
        return rows

    rows = measure(0, twins["steps"] == 0) + validation(0)
    gap = max(r["value"] for r in rows if r["metric"] == "logit_maxabs_diff")
    if gap > MATCH_ATOL:
        raise AssertionError(f"twins differ at step 0 by {gap:.3g} > {MATCH_ATOL} (seed {seed})")
    dropout_seed = int(crn_generator(seed, "dropout").initial_seed())
    rng = {k: torch.Generator().manual_seed(dropout_seed) for k in models}
    for step, index in enumerate(batch_order(len(caches["train"]), cfg["batch_size"], twins["steps"], seed), 1):
        losses = {}
        for name, m in models.items():
            # the same dropout masks for every model: each keeps its own copy of the dropout stream
            torch.set_rng_state(rng[name].get_state())
            losses[name] = train_step(m, opts[name], caches["train"], labels["train"], index)
            rng[name].set_state(torch.get_rng_state())
        diverged = [name for name, m in models.items() if not finite_after_step(losses[name], m)]
        if diverged:        # an outcome, not an error: recorded, the cell ends (no test rows)
            rows += [dict(step=step, split="train", model=name, layer="all", metric="diverged",
                          value=float(name in diverged)) for name in models]
            break
        if step % twins["eval_every"] == 0 or step == twins["steps"]:
            rows += measure(step, step == twins["steps"])
    else:
        last = twins["steps"]
        rows += validation(last)
        for name, m in models.items():
            metrics = evaluate(m, caches["test"], labels["test"], routing=False)[0]
            rows += [dict(step=last, split="test", model=name, layer="all", metric=k, value=v)
                     for k, v in metrics.items()]
            rows += [dict(r, model=name) for r in movement_rows(last, start[name], effective_routers(m))
                     if r["metric"] in ("router_rel_change", "talk_rel_change")]
    return [{k: v for k, v in r.items() if k != "domain"} for r in rows]


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False,
        device: str = "cpu"):
    """Run every (task, optimizer, seed) twin cell of ``config.twins`` not done yet."""
    from .results import Cell, run_sweep

    cfg, twins = config.train.to_dict(), config.twins.to_dict()
    exp_dir = Path(results_dir) / "train"           # the same splits and prefix caches as training
    exp_dir.mkdir(parents=True, exist_ok=True)
    for task in twins["tasks"]:
        prefix_caches(cfg, exp_dir, task)
    cells = [Cell(twins_cell, dict(task=t, optimizer=o, seed=s),
                  dict(cfg=cell_settings(cfg), twins=twins, exp_dir=str(exp_dir), device=device))
             for t in twins["tasks"] for o in twins["optimizers"] for s in twins["seeds"]]
    return run_sweep("twins", cells, results_dir=results_dir, workers=workers, executor=executor,
                     force=force, config=config)
