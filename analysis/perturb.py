"""Perturbation sweeps (claims C5, C8, C10, the equivalence checks C1–C3; figures F2, F3, F6, F7, F9).

Cells (one per key; each returns tidy rows, ``experiment`` = the cell kind):

* ``synthetic_cell(E, r, talk, seed)`` — one TalkLoRA layer ``d_in -> d_out`` whose A, C, B, W_r
  depend only on (E, r, seed), so the talk settings differ in ``T`` alone (``talk = identity`` is
  exactly MoELoRA-code, docs/method.md §3).  B is drawn ``N(0, 1/m)`` (B = 0 at init would make every
  adapter-output quotient 0).  Tokens ``x ~ N(0, I)``.  Rows: the probe rows of
  :func:`talklora_min.probes.perturbation_response` for every kind × ε, the Lipschitz sandwich
  (``metric = lipschitz``, ``statistic`` = certified / local_max / empirical, w.r.t. code and input)
  and ``talk_norm`` = ‖T‖₂.
* ``control_cell(E, r, talk, seed)`` — the **scale-matched MoELoRA-code control** of claim C5 for
  one ``synthetic_cell``: the same layer (same A, C, B, tokens, perturbation draws) with ``T = I``
  and ``W_r' = c · W_r``, ``c = ‖W_r (T⊗I)‖ / ‖W_r‖`` (``control = "spectral"``: ‖·‖₂, the same
  certified bound ½‖W_eff‖₂ i.e. the same router temperature; ``control = "frobenius"``: ‖·‖_F).
  Rows: the probe rows (same kinds/ε/metrics/statistics as the synthetic cell, plus the column
  ``control``) and ``router_norm`` rows (``statistic`` = spectral / frobenius, ``control`` = talk /
  spectral / frobenius).  Join with ``perturb_synthetic`` on ``(E, r, talk, seed, kind, eps,
  metric, statistic)`` to get the per-seed ratio talk / control.
* ``router_cell(router, seed)`` — dense softmax vs hard–soft top-k (LoRA-Mixer) on the same
  MoELoRA-code weights: top-1 flip rate and top-k *set* flip rate vs ε, routing quotient, the local
  Lipschitz constant away from ties, and the certified bound, which for top-k with k < E does not
  exist (the gates jump across ties): its row says ``certified_exists = 0`` and carries no number.
* ``talk_norm_cell(E, seed)`` — Monte Carlo of ‖T‖₂ under the official init ``U(±1/√E)`` and of
  the ratio of certified bounds ``‖W_r(T⊗I)‖₂ / ‖W_r‖₂`` (official T vs T = I with the same W_r) —
  claim C8.  Every draw has its own T and W_r; T and W_r come from two independent seeded streams;
  batched spectral norms.  Rows per draw (``talk_norm``, ``certified_ratio``) and, per E, the
  summary rows ``share_talk_norm_gt_1`` / ``share_bound_rises`` with counts ``k`` and ``n``.
* ``equivalence_cell(seed)`` — residuals of the docs/method.md §3 maps on random configurations (C1–C3), and
  for C3 the shift-invariant (centred-row) tests on random configurations with ``B ≠ 0``.
* ``real_model_cell(model, talk, seed)`` — official-layout TalkLoRA injected into a real
  pretrained model (MiniLM or SmolLM2), probed on the hidden states of real sentences.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from talklora_min import AdapterConfig, MoELoRALinear, TalkLoRALinear, adapter_layers, inject, talk_matrix
from talklora_min.layers import absorbed_router
from talklora_min import reparam
from talklora_min.reference import formula_output
from talklora_min.probes import local_lipschitz, perturbation_response, router_lipschitz

KIND_NAMES = {"gaussian": "gaussian_input", "block": "gaussian_block", "adversarial": "adversarial"}
ROUTERS = {"dense": None, "top2": 2, "top1": 1}


def _uniform(shape, bound, g, dtype):
    return (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * bound


def synthetic_layer(E: int, r: int, talk: str, seed: int, d_in: int, d_out: int,
                    dtype=torch.float64, top_k: int | None = None, device="cpu") -> TalkLoRALinear:
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
    return layer.to(device).eval()


def synthetic_tokens(n: int, d: int, seed: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(7919 + seed), dtype=dtype).to(device)


def scaled_control_layer(layer: TalkLoRALinear, norm: str = "spectral") -> TalkLoRALinear:
    """The scale-matched MoELoRA-code control of a TalkLoRA layer (claim C5, docs/method.md §5).

    Same A, C, B, base; ``T = I`` (i.e. MoELoRA-code, docs/method.md §3) and ``W_r' = c · W_r`` with
    ``c = ‖W_r (T⊗I_m)‖ / ‖W_r‖`` in the matrix norm ``norm`` (``"spectral"``: ‖·‖₂, so
    ``½‖W_r'‖₂ = ½‖W_eff‖₂`` — the same certified bound, the same router temperature;
    ``"frobenius"``: ‖·‖_F).  Communication is then the only difference left between the layer and
    its control: a different *direction* of W_eff at the same scale.
    """
    if norm not in ("spectral", "frobenius"):
        raise ValueError(f"norm must be 'spectral' or 'frobenius', got {norm!r}")
    ord_ = 2 if norm == "spectral" else "fro"
    w = {k: v.detach() for k, v in layer.get_weights().items()}
    W_eff = layer.effective_router().detach()
    c = torch.linalg.matrix_norm(W_eff, ord=ord_) / torch.linalg.matrix_norm(w["W_r"], ord=ord_)
    control = TalkLoRALinear(layer.base, layer.rank, layer.num_experts, talk_init="identity",
                             top_k=layer.top_k).to(device=w["A"].device, dtype=w["A"].dtype)
    control.set_weights(**{**w, "T": torch.eye(layer.num_experts, dtype=w["T"].dtype, device=w["T"].device),
                           "W_r": c * w["W_r"]})
    return control.eval()


def _lipschitz_rows(layer, x, seed, steps) -> list[dict]:
    rows = []
    for wrt in ("code", "input"):
        res = router_lipschitz(layer, x, wrt=wrt, seed=seed, steps=steps)
        rows += [dict(layer="layer", kind=f"lipschitz_{wrt}", eps=0.0, metric="lipschitz", statistic=f,
                      value=getattr(res, f), n_tokens=len(x)) for f in ("certified", "local_max", "empirical")]
    return rows


def synthetic_cell(E: int, r: int, talk: str, seed: int, d_in: int, d_out: int, n_tokens: int,
                   eps: list, kinds: list, adversarial_steps: int, device: str = "cpu") -> list[dict]:
    layer = synthetic_layer(E, r, talk, seed, d_in, d_out, device=device)
    x = synthetic_tokens(n_tokens, d_in, seed, device=device)
    rows = perturbation_response(layer, x, eps, [KIND_NAMES[k] for k in kinds], seed=seed,
                                 pgd_steps=adversarial_steps)
    rows += _lipschitz_rows(layer, x, seed, adversarial_steps)
    rows.append(dict(layer="layer", kind="talk", eps=0.0, metric="talk_norm", statistic="value",
                     value=float(torch.linalg.matrix_norm(layer.T.detach(), ord=2)), n_tokens=0))
    return rows


CONTROLS = ("spectral", "frobenius")


def _router_norm_rows(control: str, W: torch.Tensor) -> list[dict]:
    return [dict(layer="layer", kind="router", eps=0.0, control=control, metric="router_norm", statistic=s,
                 value=float(torch.linalg.matrix_norm(W.detach(), ord=o)), n_tokens=0)
            for s, o in (("spectral", 2), ("frobenius", "fro"))]


def control_cell(E: int, r: int, talk: str, seed: int, d_in: int, d_out: int, n_tokens: int,
                 eps: list, kinds: list, adversarial_steps: int, controls: list = CONTROLS,
                 device: str = "cpu") -> list[dict]:
    """Scale-matched MoELoRA-code controls of ``synthetic_cell(E, r, talk, seed)`` (claim C5):
    probed on the same tokens with the same perturbation draws (same ``seed``), so the probe rows
    pair one-to-one with that cell's rows.  See :func:`scaled_control_layer`."""
    layer = synthetic_layer(E, r, talk, seed, d_in, d_out, device=device)
    x = synthetic_tokens(n_tokens, d_in, seed, device=device)
    rows = _router_norm_rows("talk", layer.effective_router())
    for name in controls:
        control = scaled_control_layer(layer, name)
        rows += _router_norm_rows(name, control.effective_router())
        rows += [dict(r_, control=name) for r_ in
                 perturbation_response(control, x, eps, [KIND_NAMES[k] for k in kinds], seed=seed,
                                       pgd_steps=adversarial_steps)]
    return rows


def router_cell(router: str, seed: int, E: int, r: int, d_in: int, d_out: int, n_tokens: int,
                eps: list, adversarial_steps: int, device: str = "cpu") -> list[dict]:
    """Dense vs top-k routing on identical weights (claim C10).  Rows per (kind, ε, metric,
    statistic) — never averaged over ε — plus ``certified_exists`` (1 dense, 0 top-k with k < E:
    no finite certified bound, so no ``certified`` row; exclude these from the C4 sandwich counts)."""
    k = ROUTERS[router]
    layer = synthetic_layer(E, r, "identity", seed, d_in, d_out, top_k=k, device=device)
    x = synthetic_tokens(n_tokens, d_in, seed, device=device)
    rows = perturbation_response(layer, x, eps, ["gaussian_input", "adversarial"], seed=seed,
                                 pgd_steps=adversarial_steps)
    # top-k set flips: does the selected set change under the Gaussian perturbation?
    kk = k or E
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base_set = layer.router_logits(x).topk(kk, -1).indices.sort(-1).values
        for e in eps:
            d = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
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


def _spectral_norm_wide(W: torch.Tensor) -> torch.Tensor:
    """Batched ‖W‖₂ of wide ``(..., E, r)`` matrices as ``√λ_max(W Wᵀ)`` (an E×E eigenproblem
    instead of an SVD of E×r; equals ``matrix_norm(W, ord=2)`` up to float64 round-off)."""
    return torch.linalg.eigvalsh(W @ W.mT)[..., -1].clamp_min(0).sqrt()


def talk_norm_streams(E: int, seed: int) -> tuple[torch.Generator, torch.Generator]:
    """The two independent seeded streams of the C8 Monte Carlo: (T's, W_r's)."""
    return (torch.Generator().manual_seed(1_000_003 * seed + 1009 * E),
            torch.Generator().manual_seed(1_000_003 * seed + 1009 * E + 1))


def talk_norm_cell(E: int, seed: int, draws: int, r_per_expert: int = 8, chunk: int = 4096,
                   device: str = "cpu") -> list[dict]:
    """Claim C8: ``draws`` independent draws of the official init, each its own
    ``T ~ U(±1/√E)^{E×E}`` and ``W_r ~ U(±1/√r)^{E×r}`` (``r = E·m``, ``m = r_per_expert``).

    T and W_r come from two independent seeded streams (seeds ``(seed, E, 0)`` and ``(seed, E, 1)``);
    within a stream the draws are i.i.d.  Per draw: ``talk_norm = ‖T‖₂`` and
    ``certified_ratio = ‖W_r (T⊗I_m)‖₂ / ‖W_r‖₂`` — the factor by which communication changes the
    certified bound ½‖W_eff‖₂ w.r.t. the code (docs/method.md §4) for the same W_r.  Batched spectral norms
    over stacks of ``chunk`` draws (``matrix_norm(ord=2)`` for T, :func:`_spectral_norm_wide` for W).
    Summary rows per E (``statistic = "share"``, columns ``k`` and ``n`` for a binomial interval):
    ``share_talk_norm_gt_1`` (‖T‖₂ > 1) and ``share_bound_rises`` (ratio > 1, i.e. the bound
    actually rises).
    """
    if draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    m, r = r_per_expert, E * r_per_expert
    g_T, g_W = talk_norm_streams(E, seed)
    norms, ratios = [], []
    for start in range(0, draws, chunk):
        n = min(chunk, draws - start)
        T = ((torch.rand(n, E, E, generator=g_T, dtype=torch.float64) * 2 - 1) / math.sqrt(E)).to(device)
        W = ((torch.rand(n, E, r, generator=g_W, dtype=torch.float64) * 2 - 1) / math.sqrt(r)).to(device)
        # W_r (T ⊗ I_m): column block e of width m is Σ_e' T[e', e] W_r^{(e')}  (layers.absorbed_router)
        W_eff = torch.einsum("nipk,npq->niqk", W.view(n, E, E, m), T).reshape(n, E, r)
        norms.append(torch.linalg.matrix_norm(T, ord=2).cpu())
        ratios.append((_spectral_norm_wide(W_eff) / _spectral_norm_wide(W)).cpu())
    norms, ratios = torch.cat(norms), torch.cat(ratios)
    rows = [dict(draw=i, metric="talk_norm", value=v) for i, v in enumerate(norms.tolist())]
    rows += [dict(draw=i, metric="certified_ratio", value=v) for i, v in enumerate(ratios.tolist())]
    for metric, hit in (("share_talk_norm_gt_1", norms > 1), ("share_bound_rises", ratios > 1)):
        k = int(hit.sum())
        rows.append(dict(draw=-1, metric=metric, statistic="share", k=k, n=draws, m=m, value=k / draws))
    return rows


def _relative_output_residual(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    ya = a(x)
    return float((b(x) - ya).norm() / ya.norm().clamp_min(torch.finfo(x.dtype).tiny))


@torch.no_grad()
def centred_c3_rows(config: int, E: int, m: int, d_in: int, d_out: int, seed: int) -> list[dict]:
    """C3 on centred router rows ``(I − J/E) W`` (softmax ignores a common logit shift) with B ≠ 0,
    on one random configuration (float64).  Nothing here is fixed by construction: W_g, A, C, B are
    generic random draws.

    * ``C3_centred_residual_random_input_router`` — ``rowspace_residual(W_g, A, modulo_shift=True)``
      of a generic input router; > 0 whenever ``d_in > r`` (then no code router, hence no TalkLoRA,
      with these experts reproduces its gates); its typical size is ``√((d_in − r)/d_in)``, reported
      as ``C3_centred_residual_reference``.
    * ``C3_best_code_output_residual`` — relative output gap ``‖y_input − y_code‖/‖y_input‖`` on
      random tokens between that input-router layer and the code router ``W' = (I − J/E) W_g A⁺``
      (least squares) with the same experts, B ≠ 0;  ``C3_best_code_output_residual_B0`` — the same
      gap with B = 0, exactly 0 (at B = 0 every router gives the same function).
    * ``C3_inclusion_centred_residual`` — centred residual of ``W_r (T⊗I) A`` (an absorbed TalkLoRA
      router, official T): ≈ 0 (float round-off), the inclusion direction.
    * ``C3_shift_only_plain_residual`` / ``C3_shift_only_centred_residual`` — an input router
      ``W' A + 1 vᵀ`` (a code router plus a common shift): the plain residual is > 0 but the centred
      one ≈ 0, and the gates are reproduced — why the test must centre.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    r = E * m

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=f64)

    base = nn.Linear(d_in, d_out, dtype=f64)
    with torch.no_grad():
        base.weight.copy_(randn(d_out, d_in) / math.sqrt(d_in))
        base.bias.zero_()
    A = randn(r, d_in) / math.sqrt(d_in)
    C = randn(E, m, m) / math.sqrt(m)
    B = randn(E, d_out, m) / math.sqrt(m)
    W_g = randn(E, d_in) * 3 / math.sqrt(d_in)
    x = randn(256, d_in)

    def moe(router_input, **w):
        layer = MoELoRALinear(base, r, E, router_input).to(f64)
        layer.set_weights(A=A, C=C, **w)
        return layer.eval()

    info = dict(config=config, E=E, m=m, d_in=d_in, d_out=d_out, dtype="float64", centred=1)
    W_code = reparam.code_router_weight(W_g, A, modulo_shift=True)
    out = {"C3_centred_residual_random_input_router": reparam.rowspace_residual(W_g, A, modulo_shift=True),
           "C3_centred_residual_reference": math.sqrt(max(d_in - r, 0) / d_in),
           "C3_best_code_output_residual": _relative_output_residual(
               lambda t: moe("input", B=B, W_g=W_g).adapter_output(t),
               lambda t: moe("code", B=B, W_r=W_code).adapter_output(t), x),
           "C3_best_code_output_residual_B0": float(
               (moe("input", B=torch.zeros_like(B), W_g=W_g).adapter_output(x)
                - moe("code", B=torch.zeros_like(B), W_r=W_code).adapter_output(x)).abs().max())}
    T = (torch.rand(E, E, generator=g, dtype=f64) * 2 - 1) / math.sqrt(E)
    W_r = (torch.rand(E, r, generator=g, dtype=f64) * 2 - 1) / math.sqrt(r)
    W_eff = absorbed_router(W_r, T, m)
    out["C3_inclusion_centred_residual"] = reparam.rowspace_residual(W_eff @ A, A, modulo_shift=True)
    shifted = W_eff @ A + torch.ones(E, 1, dtype=f64) * randn(1, d_in)
    out["C3_shift_only_plain_residual"] = reparam.rowspace_residual(shifted, A)
    out["C3_shift_only_centred_residual"] = reparam.rowspace_residual(shifted, A, modulo_shift=True)
    out["C3_shift_only_gate_residual"] = float(
        (moe("input", B=B, W_g=shifted).gates(x) - moe("code", B=B, W_r=W_eff).gates(x)).abs().max())
    return [dict(**info, metric=k, value=float(v)) for k, v in out.items()]


@torch.no_grad()
def equivalence_cell(seed: int, n_configs: int) -> list[dict]:
    """Max-abs output residuals of the docs/method.md §3 maps on random configurations (C1–C3)."""
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
            # the reference side of every residual is the paper's formula written out term by term
            # (T mixes the code blocks), not the layer's forward, which folds T into the router
            y = formula_output(talk, x)

            def res(other):
                return float((other(x) - y).abs().max() / y.abs().max())
            ident = TalkLoRALinear(base, E * m, E, talk_init="identity").eval()
            ident.set_weights(**{k: v for k, v in talk.get_weights().items() if k != "T"})
            absorbed = reparam.absorb_talk(talk).eval()
            y_ident = formula_output(ident, x)
            c1 = float((reparam.moelora_from_identity_talk(ident).eval()(x) - y_ident).abs().max() / y_ident.abs().max())
            info = dict(config=i, E=E, m=m, d_in=d_in, d_out=d_out, dtype=str(dtype).replace("torch.", ""))
            rows += [dict(**info, metric="C1_identity_talk", value=c1),
                     dict(**info, metric="C2_absorption", value=res(absorbed)),
                     dict(**info, metric="C3_inclusion", value=res(reparam.input_router_from_code(absorbed).eval()))]
            if dtype == torch.float64 and E >= 2:   # with one expert the gate is constantly 1
                counter = reparam.non_representable_counterexample(d_in, E * m, E, seed=seed * 1000 + i, dtype=dtype)
                rows.append(dict(**info, metric="C3_counterexample_rowspace_residual",
                                 value=reparam.rowspace_residual(counter.W_g, counter.A)))
                rows += centred_c3_rows(i, E, m, d_in, d_out, seed=seed * 1000 + i)
    return rows


# ----------------------------------------------------------------------------- real models
def real_model_cell(model: str, talk: str, seed: int, n_sentences: int, max_length: int, eps: list,
                    kinds: list, adversarial_steps: int, smollm_layers: list | None = None,
                    device: str = "cpu") -> list[dict]:
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
    net = net.double().to(device).eval()
    torch.manual_seed(seed)
    inject(net, AdapterConfig.official(target_modules=pattern, target_match="regex", dropout=0.0,
                                       gate_dropout=False, talk_init=talk))
    t_gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(net).values():
            layer.B.normal_(0.0, 0.02, generator=t_gen) if layer.B.abs().sum() == 0 else None
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
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


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False,
        device: str = "cpu"):
    """All perturbation cells of ``config.perturb`` not done yet (one sweep per cell kind).
    ``device``: where the synthetic layers, the C8 Monte Carlo and the real models run (the
    device enters the cells' parameters, so CPU and GPU results are stored as different cells)."""
    from .results import Cell, run_sweep

    p = config.perturb.to_dict()
    dev = {} if device == "cpu" else {"device": device}      # CPU cells keep their hashes
    common = dict(d_in=p["d_in"], d_out=p["d_out"], n_tokens=p["n_tokens"], eps=p["eps"],
                  adversarial_steps=p["adversarial_steps"], **dev)
    E_k, r_k = router_grid_entry(p["grid"])
    sweeps = {
        "perturb_synthetic": [Cell(synthetic_cell, dict(E=E, r=r, talk=t, seed=s), dict(**common, kinds=p["kinds"]))
                              for E, r in p["grid"] for t in p["talk"] for s in p["seeds"]],
        "perturb_controls": [Cell(control_cell, dict(E=E, r=r, talk=t, seed=s),
                                  dict(**common, kinds=p["kinds"], controls=p["controls"]))
                             for E, r in p["grid"] for t in p["talk"] if t != "identity" for s in p["seeds"]],
        "perturb_routers": [Cell(router_cell, dict(router=k, seed=s), dict(**common, E=E_k, r=r_k))
                            for k in ROUTERS for s in p["seeds"]],
        "talk_norms": [Cell(talk_norm_cell, dict(E=E, seed=0), dict(draws=p["mc_draws"], **dev))
                       for E in p["mc_experts"]],
        "equivalence": [Cell(equivalence_cell, dict(seed=s), dict(n_configs=20)) for s in p["seeds"]],
        "perturb_real": [Cell(real_model_cell, dict(model=mdl, talk=t, seed=s),
                              dict(n_sentences=p["n_sentences"], max_length=p["max_length"], eps=p["eps"],
                                   kinds=p["kinds"], adversarial_steps=p["adversarial_steps"], **dev))
                         for mdl in p["models"] for t in p["talk"] for s in p["seeds"][:1]],
    }
    return {name: run_sweep(name, cells, results_dir=results_dir, workers=workers, executor=executor,
                            force=force, config=config) for name, cells in sweeps.items() if cells}
