"""A user setting (``[setting]`` of a config file, :class:`analysis.settings.UserSetting`): the paired
battery of ``train.methods`` × ``train.seeds`` (classification) or ``lm.methods`` × ``lm.seeds``
(causal LM) on a local Hugging Face model folder and a CSV / JSONL file.

    # my.toml
    extends = "quick"
    [setting]
    name = "my-reviews"
    model = "models/my-bert"          # a local folder: config.json, weights, tokenizer files
    data = "data/reviews.csv"         # columns text,label (classification) or text (causal LM)

    python -m analysis train --config my.toml

The protocol is that of the built-in settings (docs/method.md §5): every method of a seed draws
the same adapter tensors from keyed streams (:func:`analysis.train.crn_weights`, keyed by module
name), the same head and the same batch order; rows have the built-in rows' schema (experiment
``custom``, cell keys ``setting, method, seed``).  Unlike the MiniLM path, nothing is cached: the
whole (frozen) model runs every step, so keep user models small on a CPU.

Each method trains at its lr chosen on the validation split from the section's ``lr_grid`` with its
``tuning_seeds`` (sweep ``custom_tuning``), cosine-decayed, as in the built-in settings.

Rows: ``split = "val"`` at step 0, 3/4 of the run (loss) and the end, ``"test"`` at the end: ``loss`` (cross-entropy,
nats; token-weighted for a causal LM), ``accuracy`` (classification), per routed layer ``gini``,
``load_entropy``, ``token_entropy`` (normalised); ``test`` also ``trainable_parameters``,
``n_train``, ``n_test``, ``wall_seconds``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from talklora_min import AdapterConfig, adapter_layers, auxiliary_loss, count_parameters, inject
from talklora_min.inject import adaptable_modules, resolve_targets
from talklora_min.probes import gini, load_entropy, record_routing

from . import methods as registry
from .sections import ConfigError
from .crn import batch_order, crn_generator, crn_head, crn_weights
from .protocol import cosine_schedule, quarter_steps, run_tuning

MAX_DATA_BYTES = 512 * 2**20        # a data file larger than this is refused (read into memory)


# ----------------------------------------------------------------------------- data and model
def read_data(setting) -> tuple[pd.DataFrame, str]:
    """``(frame with columns text[, label], objective)`` of the setting's data file; ``ConfigError``
    (one line, naming the file) for anything that does not fit."""
    path = Path(setting.data)
    if not path.is_file():
        raise ConfigError(f"setting.data: {path} is not a file")
    if path.stat().st_size > MAX_DATA_BYTES:
        raise ConfigError(f"setting.data: {path} is larger than {MAX_DATA_BYTES >> 20} MiB")
    try:
        if path.suffix.lower() == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            df = pd.DataFrame([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                               if line.strip()])
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise ConfigError(f"setting.data: {path} is not a readable {path.suffix} file "
                          f"({' '.join(str(err).split())[:160]})") from None
    if setting.text_column not in df:
        raise ConfigError(f"setting.data: {path} has no column {setting.text_column!r} "
                          f"(setting.text_column); its columns: {list(df.columns)[:10]}")
    has_labels = setting.label_column in df
    objective = setting.objective if setting.objective != "auto" else (
        "classification" if has_labels else "causal-lm")
    if objective == "classification" and not has_labels:
        raise ConfigError(f"setting.data: {path} has no column {setting.label_column!r} "
                          f"(setting.label_column), needed for classification")
    out = pd.DataFrame({"text": df[setting.text_column].astype(str).str.strip()})
    if objective == "classification":
        out["label"] = df[setting.label_column].astype(str).str.strip()
    out = out[out["text"].str.len() > 0].drop_duplicates("text").reset_index(drop=True)
    need = setting.n_val + setting.n_test + 2
    if len(out) < need:
        raise ConfigError(f"setting.data: {path} has {len(out)} distinct non-empty texts, fewer than "
                          f"n_val + n_test + 2 = {need}")
    if objective == "classification":
        counts = out["label"].value_counts()
        if len(counts) < 2:
            raise ConfigError(f"setting.data: {path} needs at least two classes in {setting.label_column!r}, "
                              f"found {list(counts.index)}")
    return out, objective


def make_split(df: pd.DataFrame, n_val: int, n_test: int, seed: int) -> pd.DataFrame:
    """A seeded split (stratified by label when there is one); adds columns ``split`` and, for
    classification, ``y`` (label index in sorted label order)."""
    rng = np.random.default_rng(seed)
    df = df.copy()
    if "label" in df:
        classes = sorted(df["label"].unique())
        df["y"] = df["label"].map({c: i for i, c in enumerate(classes)})
        share = df["label"].value_counts(normalize=True)
        parts = []
        for label, group in df.groupby("label", sort=True):
            idx = rng.permutation(group.index.to_numpy())
            nv, nt = round(n_val * share[label]), round(n_test * share[label])
            parts.append(df.loc[idx].assign(split=["val"] * nv + ["test"] * nt + ["train"] * (len(idx) - nv - nt)))
        out = pd.concat(parts)
    else:
        idx = rng.permutation(len(df))
        out = df.iloc[idx].assign(split=["val"] * n_val + ["test"] * n_test + ["train"] * (len(df) - n_val - n_test))
    return out.sort_index(kind="stable").reset_index(drop=True)


def load_model(setting, objective: str):
    """``(model, tokenizer)`` from the local folder, frozen; ``ConfigError`` naming the folder when it
    does not hold a loadable model."""
    folder = Path(setting.model)
    if not folder.is_dir():
        raise ConfigError(f"setting.model: {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"setting.model: {folder} has no config.json (not a Hugging Face model folder)")
    import transformers
    cls = transformers.AutoModelForCausalLM if objective == "causal-lm" else transformers.AutoModel
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:          # transformers raises many types; the user needs one line
        raise ConfigError(f"setting.model: cannot load {folder} as a {cls.__name__} with its tokenizer "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    for module in model.modules():               # the only noise in training is the adapters'
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.requires_grad_(False).eval(), tokenizer


def adapted_names(model: nn.Module, setting) -> list[str]:
    """Full names of the linear modules to adapt: the targets (or the architecture's usual
    projections) inside the top ``adapt_top_layers`` numbered blocks."""
    targets = tuple(setting.targets) or resolve_targets(model, AdapterConfig(target_modules=None))
    names = [n for n in adaptable_modules(model) if any(n == t or n.endswith("." + t) for t in targets)]
    index = {n: int(re.findall(r"\.(\d+)\.", f".{n}.")[-1]) for n in names if re.search(r"\.(\d+)\.", f".{n}.")}
    blocks = sorted(set(index.values()))
    if not blocks:
        raise ConfigError(f"setting.targets: no module of {targets} sits in a numbered block of "
                          f"{type(model).__name__}")
    top = set(blocks[-setting.adapt_top_layers:])
    return [n for n in names if index.get(n) in top]


class Classifier(nn.Module):
    """``head(mean-pooled last hidden state)`` over a frozen encoder."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))


def build(method: str, seed: int, model, names: list[str], cfg: dict, num_labels: int | None):
    """A private copy of ``model`` with ``method`` adapters on ``names``, every adapter tensor (and
    the head) from the seed's keyed streams."""
    spec = registry.method(method)
    net = Classifier(copy.deepcopy(model), num_labels) if num_labels else copy.deepcopy(model)
    if num_labels:
        crn_head(net.head, seed)
    if spec.adapter is not None:
        prefix = "encoder." if num_labels else ""
        alpha = cfg.get("alpha") or None
        inject(net, AdapterConfig(rank=cfg["rank"], num_experts=cfg["num_experts"], alpha=alpha,
                                  dropout=cfg["dropout"], target_match="exact",
                                  target_modules=[prefix + n for n in names], **spec.adapter_kwargs()))
        for name, layer in adapter_layers(net).items():
            layer.set_weights(**crn_weights(method, layer, seed, name))
            for tensor in spec.frozen:
                getattr(layer, tensor).requires_grad_(False)
    if num_labels:
        net.head.requires_grad_(True)
    return net


# ----------------------------------------------------------------------------- one cell
def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def evaluate(net, enc: dict, y, objective: str, batch_size: int = 32) -> list[tuple[str, str, float]]:
    """``(layer, metric, value)`` on every example of ``enc``: loss (and accuracy), routing per layer."""
    net.eval()
    routed = any(getattr(m, "num_experts", None) for m in adapter_layers(net).values())
    total, count, correct = 0.0, 0, 0
    with (record_routing(net) if routed else contextlib.nullcontext()) as rec:
        for sl in _batches(len(enc["input_ids"]), batch_size):
            ids, mask = enc["input_ids"][sl], enc["attention_mask"][sl]
            if objective == "classification":
                logits = net(ids, mask)
                total += float(F.cross_entropy(logits.double(), y[sl], reduction="sum"))
                correct += int((logits.argmax(-1) == y[sl]).sum())
                count += len(ids)
            else:
                logits = net(input_ids=ids, attention_mask=mask).logits[:, :-1]
                keep = (mask[:, :-1] * mask[:, 1:]).bool()
                total += float(F.cross_entropy(logits[keep].double(), ids[:, 1:][keep], reduction="sum"))
                count += int(keep.sum())
    out = [("all", "loss", total / count)]
    if objective == "classification":
        out.append(("all", "accuracy", correct / count))
    if routed:
        for name in rec.layer_names:
            g = rec.gates(name).double()
            load = g.sum(0)
            entropy = float((-(g * g.clamp_min(1e-300).log()).sum(-1)).mean() / math.log(g.shape[-1]))
            out += [(name, "gini", gini(load)), (name, "load_entropy", load_entropy(load)),
                    (name, "token_entropy", entropy)]
    return out


def custom_cell(setting: str, method: str, seed: int, user: dict, cfg: dict, lr: float | None = None,
                tuning: bool = False) -> list[dict]:
    """One training run of ``method`` on the user setting ``setting`` (described by ``user``, the
    ``[setting]`` table; rows: module docstring).  ``lr``: the adapter learning rate (the no-adapter
    classifier's head lr), default ``cfg["lr"]`` / ``cfg["head_lr"]``, decayed with a cosine schedule;
    ``tuning``: the lr-selection run — validation rows only."""
    from .settings import UserSetting

    t0 = time.perf_counter()
    user = UserSetting(**user)
    df, objective = read_data(user)
    split = make_split(df, user.n_val, user.n_test, user.split_seed)
    model, tokenizer = load_model(user, objective)
    names = adapted_names(model, user)
    num_labels = int(split["y"].max()) + 1 if objective == "classification" else None
    enc, y = {}, {}
    for part in ("train", "val", "test"):
        rows = split[split["split"] == part]
        enc[part] = dict(tokenizer(list(rows["text"]), truncation=True, max_length=user.max_length,
                                   padding=True, return_tensors="pt"))
        y[part] = torch.tensor(rows["y"].to_numpy()) if num_labels else None
    spec = registry.method(method)
    net = build(method, seed, model, names, cfg, num_labels)

    def rows_at(step: int, part: str) -> list[dict]:
        return [dict(step=step, split=part, layer=layer, domain="all", metric=k, value=v)
                for layer, k, v in evaluate(net, enc[part], y[part], objective)]

    out = rows_at(0, "val")
    params = [p for p in net.parameters() if p.requires_grad]
    if params and not (spec.adapter is None and objective == "causal-lm"):
        head = list(net.head.parameters()) if num_labels else []
        rest = [p for p in params if all(p is not h for h in head)]
        adapter_lr = cfg["lr"] if lr is None else lr
        head_lr = adapter_lr if spec.adapter is None else cfg["head_lr"]
        groups = ([dict(params=head, lr=head_lr)] if head else []) + ([dict(params=rest, lr=adapter_lr)] if rest else [])
        opt = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])
        schedule = cosine_schedule(opt, cfg["steps"])
        quarter = min(quarter_steps(cfg["steps"]))
        torch.manual_seed(int(crn_generator(seed, "dropout").initial_seed()))
        for step, index in enumerate(batch_order(len(enc["train"]["input_ids"]), cfg["batch_size"], cfg["steps"], seed), 1):
            net.train()
            ids, mask = enc["train"]["input_ids"][index], enc["train"]["attention_mask"][index]
            if num_labels:
                loss = F.cross_entropy(net(ids, mask), y["train"][index])
            else:
                logits = net(input_ids=ids, attention_mask=mask).logits[:, :-1]
                keep = (mask[:, :-1] * mask[:, 1:]).bool()
                loss = F.cross_entropy(logits[keep], ids[:, 1:][keep])
            aux = auxiliary_loss(net) if spec.aux_weight else 0.0
            opt.zero_grad(set_to_none=True)
            (loss + spec.aux_weight * aux if torch.is_tensor(aux) else loss).backward()
            opt.step()
            schedule.step()
            if step == quarter and quarter < cfg["steps"]:          # the flattening check
                out += [r for r in rows_at(step, "val") if r["layer"] == "all"]
    last = cfg["steps"]
    out += rows_at(last, "val")
    if tuning:
        return [dict(r, objective=objective) for r in out]
    out += rows_at(last, "test")
    head_params = sum(p.numel() for p in net.head.parameters()) if num_labels else 0
    common = dict(step=last, split="test", layer="all", domain="all")
    out += [dict(common, metric="trainable_parameters", value=count_parameters(net) - head_params),
            dict(common, metric="n_train", value=int((split["split"] == "train").sum())),
            dict(common, metric="n_test", value=user.n_test),
            dict(common, metric="wall_seconds", value=time.perf_counter() - t0)]
    return [dict(r, objective=objective) for r in out]


# ----------------------------------------------------------------------------- the battery
SECTION_KEYS = ("steps", "batch_size", "lr", "weight_decay", "rank", "num_experts", "dropout")


def run(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False,
        device: str = "cpu"):
    """Every (method, seed) cell on the config's user setting (experiment ``custom``).  The data file
    and the model folder are checked before any cell runs."""
    from .results import Cell, run_sweep

    user = config.setting
    if user is None:
        raise ConfigError("setting: this command needs a [setting] table in the config file")
    if device != "cpu":
        raise ConfigError("setting: user settings run on the CPU only (--device cpu)")
    _, objective = read_data(user)
    model, _ = load_model(user, objective)
    adapted_names(model, user)
    section = config.train.to_dict() if objective == "classification" else config.lm.to_dict()
    cfg = {k: section[k] for k in SECTION_KEYS}
    cfg.update(head_lr=section.get("head_lr", section["lr"]), alpha=section.get("alpha", 0.0))
    params = dict(user=user.to_dict(), cfg=cfg)
    # the protocol of the built-in settings: each method at its lr chosen on validation with the
    # section's tuning seeds (the no-adapter classifier tunes its head over head_lr_grid; a frozen
    # causal LM trains nothing)
    trained = [m for m in section["methods"]
               if registry.method(m).adapter is not None or objective == "classification"]
    keys = [(dict(setting=user.name, method=m), section["lr_grid"] if registry.method(m).adapter is not None
             else section["head_lr_grid"]) for m in trained]
    lrs = run_tuning("custom", custom_cell, keys, section["tuning_seeds"], params, results_dir=results_dir,
                     workers=workers, executor=executor, force=force, config=config, by=("setting", "method"))
    cells = [Cell(custom_cell, dict(setting=user.name, method=m, seed=s, lr=lrs.get((user.name, m), 0.0)), params)
             for m in section["methods"] for s in section["seeds"]]
    return run_sweep("custom", cells, results_dir=results_dir, workers=workers, executor=executor,
                     force=force, config=config)
