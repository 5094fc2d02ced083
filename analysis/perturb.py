"""Perturbation sweeps (claims C5, C8, C10, the equivalence checks C1–C3; figures F2, F3, F6, F7, F9).

Cells (one per key; each returns tidy rows, ``experiment`` = the cell kind):

* ``synthetic_cell(E, r, talk, seed)`` — one TalkLoRA layer ``d_in -> d_out`` whose A, C, B, W_r
  depend only on (E, r, seed), so the talk settings differ in ``T`` alone (``talk = identity`` is
  exactly MoELoRA-code, SPEC §3).  B is drawn ``N(0, 1/m)`` (B = 0 at init would make every
  adapter-output quotient 0).  Tokens ``x ~ N(0, I)``.  Rows: the probe rows of
  :func:`talklora_min.probes.perturbation_response` for every kind × ε, the Lipschitz sandwich
  (``metric = lipschitz``, ``statistic`` = certified / local_max / empirical, w.r.t. code and input)
  and ``talk_norm`` = ‖T‖₂.
* ``router_cell(router, seed)`` — dense softmax vs hard–soft top-k (LoRA-Mixer) on the same
  MoELoRA-code weights: top-1 flip rate and top-k *set* flip rate vs ε, routing quotient, the local
  Lipschitz constant away from ties, and the certified bound, which for top-k with k < E does not
  exist (the gates jump across ties): its row says ``certified_exists = 0`` and carries no number.
* ``talk_norm_cell(E, seed)`` — Monte Carlo of ‖T‖₂ under the official init ``U(±1/√E)`` and of
  the ratio of certified bounds (official T vs T = I with the same W_r) — claim C8.
* ``equivalence_cell(seed)`` — residuals of the SPEC §3 maps on random configurations (C1–C3).
* ``real_model_cell(model, talk, seed)`` — official-layout TalkLoRA injected into a real
  pretrained model (MiniLM or SmolLM2), probed on the hidden states of real sentences.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from talklora_min import AdapterConfig, MoELoRALinear, TalkLoRALinear, adapter_layers, inject, talk_matrix
from talklora_min import reparam
from talklora_min.probes import local_lipschitz, perturbation_response, router_lipschitz

KIND_NAMES = {"gaussian": "gaussian_input", "block": "gaussian_block", "adversarial": "adversarial"}
ROUTERS = {"dense": None, "top2": 2, "top1": 1}


def _uniform(shape, bound, g, dtype):
    return (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * bound


def synthetic_layer(E: int, r: int, talk: str, seed: int, d_in: int, d_out: int,
                    dtype=torch.float64, top_k: int | None = None) -> TalkLoRALinear:
    """A TalkLoRA layer with official-init A, C, W_r, Gaussian B, and ``T`` from ``talk``.
    Everything but T is a function of (E, r, seed, d_in, d_out) only."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(_uniform((d_out, d_in), 1 / math.sqrt(d_in), g, dtype))
        base.bias.zero_()
    layer = TalkLoRALinear(base, r, E, talk_init="identity", top_k=top_k)
    m = r // E
    weights = dict(A=_uniform((r, d_in), 1 / math.sqrt(d_in), g, dtype),
                   C=_uniform((E, m, m), 1 / math.sqrt(m), g, dtype),
                   B=torch.randn(E, d_out, m, generator=g, dtype=dtype) / math.sqrt(m),
                   W_r=_uniform((E, r), 1 / math.sqrt(r), g, dtype))
    t_gen = torch.Generator().manual_seed(1_000_003 * seed + E)    # T's own stream
    weights["T"] = talk_matrix(E, talk, dtype=dtype, generator=t_gen)
    layer.set_weights(**weights)
    return layer.eval()


def synthetic_tokens(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(7919 + seed), dtype=dtype)


def _lipschitz_rows(layer, x, seed, steps) -> list[dict]:
    rows = []
    for wrt in ("code", "input"):
        res = router_lipschitz(layer, x, wrt=wrt, seed=seed, steps=steps)
        rows += [dict(layer="layer", kind=f"lipschitz_{wrt}", eps=0.0, metric="lipschitz", statistic=f,
                      value=getattr(res, f), n_tokens=len(x)) for f in ("certified", "local_max", "empirical")]
    return rows


def synthetic_cell(E: int, r: int, talk: str, seed: int, d_in: int, d_out: int, n_tokens: int,
                   eps: list, kinds: list, adversarial_steps: int) -> list[dict]:
    layer = synthetic_layer(E, r, talk, seed, d_in, d_out)
    x = synthetic_tokens(n_tokens, d_in, seed)
    rows = perturbation_response(layer, x, eps, [KIND_NAMES[k] for k in kinds], seed=seed,
                                 pgd_steps=adversarial_steps)
    rows += _lipschitz_rows(layer, x, seed, adversarial_steps)
    rows.append(dict(layer="layer", kind="talk", eps=0.0, metric="talk_norm", statistic="value",
                     value=float(torch.linalg.matrix_norm(layer.T.detach(), ord=2)), n_tokens=0))
    return rows


def router_cell(router: str, seed: int, E: int, r: int, d_in: int, d_out: int, n_tokens: int,
                eps: list, adversarial_steps: int) -> list[dict]:
    """Dense vs top-k routing on identical weights (claim C10)."""
    k = ROUTERS[router]
    layer = synthetic_layer(E, r, "identity", seed, d_in, d_out, top_k=k)
    x = synthetic_tokens(n_tokens, d_in, seed)
    rows = perturbation_response(layer, x, eps, ["gaussian_input", "adversarial"], seed=seed,
                                 pgd_steps=adversarial_steps)
    # top-k set flips: does the selected set change under the Gaussian perturbation?
    kk = k or E
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base_set = layer.router_logits(x).topk(kk, -1).indices.sort(-1).values
        for e in eps:
            d = torch.randn(x.shape, generator=g, dtype=x.dtype)
            d = d * (e * x.norm(dim=-1, keepdim=True) / d.norm(dim=-1, keepdim=True))
            new_set = layer.router_logits(x + d).topk(kk, -1).indices.sort(-1).values
            rows.append(dict(layer="layer", kind="gaussian_input", eps=e, metric="topk_set_flip_rate",
                             statistic="mean", value=float((new_set != base_set).any(-1).double().mean()),
                             n_tokens=len(x)))
    local = local_lipschitz(layer, x, wrt="code")
    rows += [dict(layer="layer", kind="lipschitz_code", eps=0.0, metric="lipschitz", statistic=s, value=v,
                  n_tokens=len(x)) for s, v in (("local_median", float(local.median())),
                                                ("local_max", float(local.max())))]
    res = router_lipschitz(layer, x, wrt="code", seed=seed, steps=adversarial_steps)
    exists = math.isfinite(res.certified)
    rows.append(dict(layer="layer", kind="lipschitz_code", eps=0.0, metric="certified_exists",
                     statistic="value", value=float(exists), n_tokens=len(x)))
    if exists:
        rows.append(dict(layer="layer", kind="lipschitz_code", eps=0.0, metric="lipschitz",
                         statistic="certified", value=res.certified, n_tokens=len(x)))
    return rows


def talk_norm_cell(E: int, seed: int, draws: int, r_per_expert: int = 8) -> list[dict]:
    """‖T‖₂ under the official init and the certified-bound ratio vs T = I (same W_r), claim C8."""
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(E)
    T = (torch.rand(draws, E, E, generator=g, dtype=torch.float64) * 2 - 1) * bound
    norms = torch.linalg.matrix_norm(T, ord=2)
    r = E * r_per_expert
    W = (torch.rand(draws, E, r, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(r)
    eye = torch.eye(r_per_expert, dtype=torch.float64)
    W_eff = W @ torch.stack([torch.kron(t, eye) for t in T])
    ratio = torch.linalg.matrix_norm(W_eff, ord=2) / torch.linalg.matrix_norm(W, ord=2)
    rows = [dict(draw=i, metric="talk_norm", value=float(v)) for i, v in enumerate(norms)]
    rows += [dict(draw=i, metric="certified_ratio", value=float(v)) for i, v in enumerate(ratio)]
    return rows


@torch.no_grad()
def equivalence_cell(seed: int, n_configs: int) -> list[dict]:
    """Max-abs output residuals of the SPEC §3 maps on random configurations (C1–C3)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_configs):
        E = int(torch.randint(1, 7, (), generator=g))
        m = int(torch.randint(1, 5, (), generator=g))
        d_in, d_out = int(torch.randint(E * m + 1, 48, (), generator=g)), int(torch.randint(1, 48, (), generator=g))
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(seed * 100_003 + i)
            base = nn.Linear(d_in, d_out, dtype=dtype)
            talk = TalkLoRALinear(base, E * m, E, talk_init="official").eval()
            with torch.no_grad():
                talk.B.normal_()
                talk.W_r.mul_(4)
            x = torch.randn(64, d_in, dtype=dtype)
            y = talk(x)

            def res(other):
                return float((other(x) - y).abs().max() / y.abs().max())
            ident = TalkLoRALinear(base, E * m, E, talk_init="identity").eval()
            ident.set_weights(**{k: v for k, v in talk.get_weights().items() if k != "T"})
            absorbed = reparam.absorb_talk(talk).eval()
            c1 = float((reparam.moelora_from_identity_talk(ident).eval()(x) - ident(x)).abs().max() / ident(x).abs().max())
            info = dict(config=i, E=E, m=m, d_in=d_in, d_out=d_out, dtype=str(dtype).replace("torch.", ""))
            rows += [dict(**info, metric="C1_identity_talk", value=c1),
                     dict(**info, metric="C2_absorption", value=res(absorbed)),
                     dict(**info, metric="C3_inclusion", value=res(reparam.input_router_from_code(absorbed).eval()))]
            if dtype == torch.float64 and E >= 2:   # with one expert the gate is constantly 1
                counter = reparam.non_representable_counterexample(d_in, E * m, E, seed=seed * 1000 + i, dtype=dtype)
                rows.append(dict(**info, metric="C3_counterexample_rowspace_residual",
                                 value=reparam.rowspace_residual(counter.W_g, counter.A)))
    return rows


# ----------------------------------------------------------------------------- real models
def real_model_cell(model: str, talk: str, seed: int, n_sentences: int, max_length: int, eps: list,
                    kinds: list, adversarial_steps: int, smollm_layers: list | None = None) -> list[dict]:
    """Official-layout TalkLoRA (r = 32, E = 4, s = 1, B tied per projection type) in a real model,
    probed on real sentences (movie-review snippets and news headlines)."""
    from .data import make_split
    from .models import load_minilm, load_smollm

    split = make_split(n_sentences // 2 + 7, 7, 7, seed=seed)
    texts = list(split[split["split"] == "train"]["text"])[:n_sentences]
    if model == "minilm":
        net, tok = load_minilm()
        targets = ["query", "key", "value", r"intermediate\.dense", r"output\.dense"]
        layers = r"encoder\.layer\.\d+\."
        pattern = [rf"{layers}(attention\.self\.)?{t}" if t in ("query", "key", "value") else rf"{layers}{t}"
                   for t in targets]
    elif model == "smollm":
        net, tok = load_smollm()
        idx = "|".join(str(i) for i in (smollm_layers or [0, 14, 29]))
        pattern = [rf"model\.layers\.({idx})\.(self_attn|mlp)\.{t}" for t in ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")]
    else:
        raise ValueError(f"model must be 'minilm' or 'smollm', got {model!r}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    net = net.double().eval()
    torch.manual_seed(seed)
    inject(net, AdapterConfig.official(target_modules=pattern, target_match="regex", dropout=0.0,
                                       gate_dropout=False, talk_init=talk))
    t_gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(net).values():
            layer.B.normal_(0.0, 0.02, generator=t_gen) if layer.B.abs().sum() == 0 else None
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    rows = perturbation_response(net, dict(enc), eps, [KIND_NAMES[k] for k in kinds], seed=seed,
                                 pgd_steps=adversarial_steps)
    return rows


def router_grid_entry(grid: list) -> tuple[int, int]:
    """The (E, r) of the dense vs top-k comparison: the first grid entry with E >= 3 (with E = 2,
    top-2 routing *is* the dense router, and top-1 the only sparse one)."""
    for E, r in grid:
        if E >= 3:
            return E, r
    raise ValueError(f"perturb.grid needs an [E, r] entry with E >= 3 for the dense vs top-k comparison, got {grid}")


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False, device: str = "cpu"):
    """All perturbation cells of ``config.perturb`` not done yet (one sweep per cell kind)."""
    from .results import Cell, run_sweep

    p = config.perturb.to_dict()
    common = dict(d_in=p["d_in"], d_out=p["d_out"], n_tokens=p["n_tokens"], eps=p["eps"],
                  adversarial_steps=p["adversarial_steps"])
    E_k, r_k = router_grid_entry(p["grid"])
    sweeps = {
        "perturb_synthetic": [Cell(synthetic_cell, dict(E=E, r=r, talk=t, seed=s), dict(**common, kinds=p["kinds"]))
                              for E, r in p["grid"] for t in p["talk"] for s in p["seeds"]],
        "perturb_routers": [Cell(router_cell, dict(router=k, seed=s), dict(**common, E=E_k, r=r_k))
                            for k in ROUTERS for s in p["seeds"]],
        "talk_norms": [Cell(talk_norm_cell, dict(E=E, seed=0), dict(draws=2000)) for E in (2, 4, 8, 16, 32)],
        "equivalence": [Cell(equivalence_cell, dict(seed=s), dict(n_configs=20)) for s in p["seeds"]],
        "perturb_real": [Cell(real_model_cell, dict(model=mdl, talk=t, seed=s),
                              dict(n_sentences=p["n_sentences"], max_length=p["max_length"], eps=p["eps"],
                                   kinds=p["kinds"], adversarial_steps=p["adversarial_steps"]))
                         for mdl in p["models"] for t in p["talk"] for s in p["seeds"][:1]],
    }
    return {name: run_sweep(name, cells, results_dir=results_dir, workers=workers, executor=executor,
                            force=force, config=config) for name, cells in sweeps.items() if cells}
