"""A whole SmolLM2-shaped model: TalkLoRA (and our LoRA, MoELoRA-code) against PEFT's LoRA.

    python benchmarks/model_speed.py [--quick] [--json out.json] [--threads N] [--clock cpu|wall]
                                     [--repeats N]

The model is transformers' ``LlamaForCausalLM`` with SmolLM2-135M's shapes (width 576, FFN 1536,
9 heads / 3 key-value heads, vocabulary 49,152, tied embeddings) but 4 layers and random weights;
q/k/v/up/down are adapted with rank 32 (``peft.get_peft_model`` with ``LoraConfig(r=32,
lora_alpha=32)`` for PEFT; ``talklora_min.inject`` with E = 4 and the official T for TalkLoRA).
A step is ``model(input_ids, labels=input_ids).loss.backward()`` on 2 × 256 tokens; the four
models (same weights) are timed interleaved and every ratio is the median of paired ratios
(``benchmarks/common.py``).  Target: TalkLoRA / PEFT LoRA ≤ 1.04.  ``--quick``: a tiny model for
the smoke test.  Exits 0 whatever it finds.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import interleaved, paired_ratio, print_report, report_never_failing, setup  # noqa: E402
from talklora_min import AdapterConfig, inject  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
QUICK = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
             num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True)
TARGET_TALK_OVER_PEFT = 1.04


def models(shape: dict, rank: int, experts: int, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The base model and its adapted copies (every adapter tensor random, non-zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=1024)).train()
    out = {"peft-lora": get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                                       target_modules=list(TARGETS)))}
    for name, kind in (("lora", dict(kind="lora", alpha=float(rank))), ("talklora", dict(kind="talklora")),
                       ("moelora-code", dict(kind="moelora"))):
        model = copy.deepcopy(base)
        inject(model, AdapterConfig(rank=rank, num_experts=experts, target_modules=TARGETS, **kind))
        out[name] = model
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for model in out.values():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / max(1, p.shape[-1]) ** 0.5)
    return out


def model_step(model: torch.nn.Module, ids: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        for p in params:
            p.grad = None
    return step


def run(shape=SMOLLM2, *, batch: int = 2, seq: int = 256, rank: int = 32, experts: int = 4, repeats: int = 5,
        threads=None, clock=None) -> dict:
    threads, clock_fn, clock_name, allocator = setup(threads, clock)
    nets = models(shape, rank, experts)
    ids = torch.randint(shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(2))
    times = interleaved({name: model_step(m, ids) for name, m in nets.items()}, repeats, clock_fn, warmup=1)
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in nets.items()}
    return {"threads": threads, "clock": clock_name, "allocator": allocator, "torch": torch.__version__, "shape": shape,
            "tokens": batch * seq, "rank": rank, "experts": experts, "repeats": repeats,
            "median_s": {name: statistics.median(t) for name, t in times.items()}, "trainable": trainable,
            "ratios": {"talklora/peft-lora": paired_ratio(times, "talklora", "peft-lora"),
                       "lora/peft-lora": paired_ratio(times, "lora", "peft-lora"),
                       "moelora-code/peft-lora": paired_ratio(times, "moelora-code", "peft-lora"),
                       "talklora/lora": paired_ratio(times, "talklora", "lora")}}


def format_report(report: dict) -> str:
    r = report["ratios"]
    lines = [f"SmolLM2-shaped Llama, {report['shape']['num_hidden_layers']} layers, width "
             f"{report['shape']['hidden_size']}, {report['tokens']} tokens, r {report['rank']}, E {report['experts']}; "
             f"threads={report['threads']} clock={report['clock']} allocator: {report['allocator']}, "
             f"{report['repeats']} interleaved rounds"]
    for name, t in report["median_s"].items():
        lines.append(f"  {name:<13} {1e3 * t:9.1f} ms per step  ({report['trainable'][name]:,} trainable)")
    lines.append("  " + ", ".join(f"{k} = {v:.3f}" for k, v in r.items()))
    ok = "OK" if r["talklora/peft-lora"] <= TARGET_TALK_OVER_PEFT else "ABOVE TARGET"
    lines.append(f"TalkLoRA / PEFT LoRA = {r['talklora/peft-lora']:.3f} (target ≤ {TARGET_TALK_OVER_PEFT}: {ok})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--threads", type=int, help="intra-op threads (default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    return report_never_failing(
        lambda: (run(QUICK, batch=2, seq=8, rank=4, experts=2, repeats=2, threads=args.threads, clock=args.clock)
                 if args.quick else run(repeats=args.repeats, threads=args.threads, clock=args.clock)),
        lambda report: print_report(report, format_report, args.json))


if __name__ == "__main__":
    sys.exit(main())
