"""Function-matched twin runs (claim C9, figure F8).

SPEC §3: a linear Talking Module is absorbed by the router, ``W' = W_r (T ⊗ I_m)``, so TalkLoRA and
MoELoRA-code compute the same family of functions.  Any difference in training must come from the
parameterisation and the optimiser.  Per (optimizer, seed) one cell builds four models that compute
the SAME function at step 0 (asserted) and trains them on the same batches in the same order:

* ``talklora``           TalkLoRA, official init (A, C, B, T, W_r trained)
* ``moelora-twin``       MoELoRA-code with the absorbed router ``W' = W_r (T ⊗ I)`` (A, C, B, W' trained)
* ``talklora-frozen-T``  TalkLoRA with T frozen at its init
* ``talklora-identity``  TalkLoRA with ``T = I`` and ``W_r = W'`` (function-matched identity init)

Adapter dropout is 0 here, so the only differences between the runs are the parameterisation
and the optimiser (AdamW with the official lr 3e-4 / weight decay 0.01, or plain SGD).
Rows (the cell adds ``optimizer, seed``): ``step, model, layer, metric, value`` — measured on a
fixed held-out batch of ``HELD_OUT`` validation examples: distances ``logit_maxabs_diff`` /
``logit_meanabs_diff`` of each model to ``talklora``, accuracy, loss, per-layer Gini, normalised load entropy, certified and max-local router
Lipschitz constants (w.r.t. the code h), ``talk_norm`` (‖T‖₂) and ``router_norm`` (‖W_eff‖₂).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from talklora_min import adapter_layers
from talklora_min.probes import certified_lipschitz, local_lipschitz

from .models import load_minilm
from .train import (batch_order, build_model, evaluate, layer_inputs, optimizer_for, prefix_caches,
                    short_name, split_targets, train_step)

MODELS = ("talklora", "moelora-twin", "talklora-frozen-T", "talklora-identity")
MATCH_ATOL = 1e-5      # float32: the four models agree at step 0 to this absolute tolerance
HELD_OUT = 140         # examples of the validation split used for every measurement along training



def build_twins(seed: int, cfg: dict, encoder, talk_init: str = "official") -> dict:
    """The four function-matched models of a seed (see module docstring)."""
    cfg = {**cfg, "dropout": 0.0}
    talk = build_model("talklora-official" if talk_init == "official" else "talklora-identity", seed, cfg, encoder)
    if talk_init not in ("official", "identity"):
        for layer in adapter_layers(talk).values():
            layer.talk_init = talk_init
            layer._reset_talk()
    twin = build_model("moelora-code", seed, cfg, encoder)
    frozen = build_model("talklora-official", seed, cfg, encoder)
    ident = build_model("talklora-identity", seed, cfg, encoder)
    with torch.no_grad():
        for name, src in adapter_layers(talk).items():
            w = src.get_weights()
            shared = {k: w[k] for k in ("A", "C", "B")}
            absorbed = src.effective_router().detach().clone()
            twin.get_submodule(name).set_weights(**shared, W_r=absorbed)
            frozen.get_submodule(name).set_weights(**w)
            frozen.get_submodule(name).T.requires_grad_(False)
            ident.get_submodule(name).set_weights(**shared, T=torch.eye(src.num_experts), W_r=absorbed)
        for m in (twin, frozen, ident):
            m.head.load_state_dict(talk.head.state_dict())
    return dict(zip(MODELS, (talk, twin, frozen, ident)))


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
        rows += [dict(step=step, model=model_name, layer=short_name(name), metric=k, value=v)
                 for k, v in values.items()]
    return rows


def twins_cell(optimizer: str, seed: int, cfg: dict, twins: dict, exp_dir: str) -> list[dict]:
    exp_dir = Path(exp_dir)
    encoder, _ = load_minilm()
    caches = prefix_caches(cfg, exp_dir)
    targets = split_targets(exp_dir, cfg)
    models = build_twins(seed, cfg, encoder, twins["talk_init"])
    lr = twins["lr_adamw"] if optimizer == "adamw" else twins["lr_sgd"]
    opts = {k: optimizer_for(m, optimizer, lr, cfg["head_lr"] if optimizer == "adamw" else lr,
                             twins["weight_decay"]) for k, m in models.items()}
    # a fixed held-out batch spread evenly over the (label-ordered) validation split
    held_out = torch.linspace(0, len(caches["val"]) - 1, min(HELD_OUT, len(caches["val"]))).round().long()
    val = caches["val"].select(held_out)
    val_targets = tuple(t[held_out] for t in targets["val"])
    hidden, mask = val.batch(torch.arange(len(val)))

    def measure(step: int) -> list[dict]:
        rows = []
        with torch.no_grad():
            for m in models.values():
                m.eval()
            ref = models["talklora"].forward_top(hidden, mask)
            for name, m in models.items():
                diff = (m.forward_top(hidden, mask) - ref).abs()
                rows += [dict(step=step, model=name, layer="all", metric="logit_maxabs_diff", value=float(diff.max())),
                         dict(step=step, model=name, layer="all", metric="logit_meanabs_diff", value=float(diff.mean()))]
        for name, m in models.items():
            metrics, layers, _ = evaluate(m, val, *val_targets)
            rows += [dict(step=step, model=name, layer="all", metric=k, value=v)
                     for k, v in metrics.items() if k in ("accuracy", "loss")]
            for layer, values in layers.items():
                rows += [dict(step=step, model=name, layer=layer, metric=k, value=values[k])
                         for k in ("gini", "load_entropy")]
            rows += router_state_rows(step, name, m, layer_inputs(m, val, 256))
        return rows

    rows = measure(0)
    gap = max(r["value"] for r in rows if r["metric"] == "logit_maxabs_diff")
    if gap > MATCH_ATOL:
        raise AssertionError(f"twins differ at step 0 by {gap:.3g} > {MATCH_ATOL} (seed {seed})")
    labels = targets["train"][0]
    for step, index in enumerate(batch_order(len(caches["train"]), cfg["batch_size"], twins["steps"], seed), 1):
        for name, m in models.items():
            train_step(m, opts[name], caches["train"], labels, index)
        if step % twins["eval_every"] == 0 or step == twins["steps"]:
            rows += measure(step)
    return rows


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False, device: str = "cpu"):
    """Run every (optimizer, seed) twin cell of ``config.twins`` not done yet."""
    from .results import Cell, run_sweep

    cfg, twins = config.train.to_dict(), config.twins.to_dict()
    exp_dir = Path(results_dir) / "train"           # the same split and prefix cache as training
    exp_dir.mkdir(parents=True, exist_ok=True)
    prefix_caches(cfg, exp_dir)
    cells = [Cell(twins_cell, dict(optimizer=o, seed=s), dict(cfg=cfg, twins=twins, exp_dir=str(exp_dir)))
             for o in twins["optimizers"] for s in twins["seeds"]]
    return run_sweep("twins", cells, results_dir=results_dir, workers=workers, executor=executor,
                     force=force, config=config)
