"""Load/forward timings of the experiment infrastructure: ``python -m analysis.timings``.

Prints (and returns) seconds for: loading the two-domain corpus, loading MiniLM, SmolLM2 first load
(GGUF dequantisation + safetensors cache write, into a fresh temporary cache) and cached reload, a
MiniLM forward over 64 sentences at max_length 64 (full model vs the top 2 layers from the cached
prefix), and one training step of the top-2 path.
"""
from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _best(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(smollm: bool = True, threads: int | None = None) -> dict:
    import torch
    import torch.nn.functional as F

    if threads is not None:
        torch.set_num_threads(threads)
    from .data import load_corpus, make_split
    from .models import SentenceClassifier, compute_prefix, load_minilm, load_smollm, tokenize

    out = {"torch_threads": torch.get_num_threads()}
    t = time.perf_counter()
    corpus = load_corpus()
    make_split(600, 200, 400, 0, corpus)
    out["data_load_and_split_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model, tok = load_minilm()
    out["minilm_load_s"] = time.perf_counter() - t

    texts = corpus.sample(64, random_state=0)["text"].tolist()
    clf = SentenceClassifier(model, adapt_top=2).eval()
    enc = tokenize(tok, texts, 64)
    out["forward_tokens"] = list(enc["input_ids"].shape)
    with torch.no_grad():
        hidden = clf.prefix(enc["input_ids"], enc["attention_mask"])
        out["minilm_full_forward_64x64_s"] = _best(lambda: clf(enc["input_ids"], enc["attention_mask"]))
        out["minilm_top2_forward_64x64_s"] = _best(lambda: clf.forward_top(hidden, enc["attention_mask"]))
    cache = compute_prefix(clf, tok, texts, range(64), 64)

    import talklora_min as tl
    tl.inject(model, tl.AdapterConfig(kind="talklora", rank=16, num_experts=4, dropout=0.05,
                                      target_match="regex", target_modules=clf.top_layer_targets()))
    clf.train()
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=3e-4)
    gen = torch.Generator().manual_seed(0)

    def step(bs):
        idx = torch.randint(0, 64, (bs,), generator=gen)
        h, m = cache.batch(idx)
        loss = F.cross_entropy(clf.forward_top(h, m), torch.randint(0, 7, (bs,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()

    out["train_step_top2_talklora_bs16_s"] = _best(lambda: step(16))
    out["train_step_top2_talklora_bs32_s"] = _best(lambda: step(32))

    if smollm:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            load_smollm(tmp)
            out["smollm_first_load_dequantise_and_cache_s"] = time.perf_counter() - t
            t = time.perf_counter()
            load_smollm(tmp)
            out["smollm_cached_reload_s"] = time.perf_counter() - t
    for k, v in out.items():
        print(f"{k:45s} {v:.3f}" if isinstance(v, float) else f"{k:45s} {v}")
    return out


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(prog="python -m analysis.timings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-smollm", action="store_true", help="skip the SmolLM2 load timings")
    args = parser.parse_args()
    main(smollm=not args.no_smollm, threads=args.threads)
