"""Forward+backward speed and activation memory of the adapter layers vs plain LoRA and Python loops.

Usage::

    python benchmarks/layer_speed.py [--quick] [--json out.json] [--profile] [--device cpu|cuda]
                                     [--repeats N] [--threads N]

What is compared (all on the *same* frozen base ``nn.Linear``, same rank r, float32):

* ``lora``       :class:`talklora_min.LoRALinear` — the baseline of every ratio;
* ``moelora``    :class:`talklora_min.MoELoRALinear` (code router, batched experts);
* ``talklora``   :class:`talklora_min.TalkLoRALinear` (batched experts);
* ``talk-fused`` :class:`FusedTalkLoRALinear` below: the same TalkLoRA function with T absorbed
  into the router and the experts folded into one matrix (a proposal for ``layers.py``);
* ``loop-talk``  the official TalkLoRA module, one Python iteration per expert
  (:class:`talklora_min.reference.OfficialTalkLoRALinear`; a local copy is used if that module is
  missing);
* ``loop-moe``   MoELoRA-code with a per-expert Python loop
  (:class:`talklora_min.reference.LoopMoELoRALinear`, or the local copy).

Time: one step is ``y = layer(x); y.backward(grad)`` with ``x.requires_grad = True`` (a layer in the
middle of a network must also return ``∂L/∂x``, so the frozen base contributes a backward matmul).
Each layer is warmed up, then the layers are timed **round-robin** (every repeat times every layer
once, so slow drifts of the machine hit all layers alike) and the **median** over repeats is
reported.  ``torch.set_num_threads`` is set to the number of CPUs this process may use
(``--threads`` overrides).  On a machine shared with other jobs, use ``--threads 1``: with 2
intra-op threads on a loaded 2-core box the many small ops (bmm, softmax) stall on OpenMP barriers
and the timings become noise (measured: 2 threads 1.6–2.5× *slower* than 1 thread under load).

Memory: the bytes of the tensors autograd *saves for backward* during the forward, counted with
``torch.autograd.graph.saved_tensors_hooks`` — distinct storages only, excluding parameters, buffers
and the input itself (they exist anyway).  This is the activation memory the layer adds per step; it
is exact, deterministic and independent of the allocator (unlike RSS deltas).  With
``--device cuda`` the peak ``torch.cuda.max_memory_allocated`` over a step is reported too.

Ratios (TalkLoRA/LoRA, MoELoRA/LoRA, loop/ours, memory ratios) are computed from the same run:
time ratios are the median over repeats of the *paired* ratio ``t_a / t_b`` of the same round
(robust to load changes during the run); ``min …`` ratios compare the fastest repeats, which
is the better estimate on a machine shared with other jobs.  The table's ``/ lora`` column is the
ratio of medians.
The script always exits with status 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                       # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from talklora_min import LoRALinear, MoELoRALinear, TalkLoRALinear  # noqa: E402

try:                                                # written by another engineer; optional
    from talklora_min.reference import LoopMoELoRALinear, OfficialTalkLoRALinear  # noqa: E402
except ImportError:                                 # pragma: no cover - fallback copies
    OfficialTalkLoRALinear = None
    LoopMoELoRALinear = None

#: (batch, seq, d, rank, experts)
SHAPES = [(8, 128, 1024, 32, 4), (8, 512, 2048, 32, 4)]
QUICK_SHAPES = [(8, 128, 1024, 32, 4), (4, 256, 2048, 32, 4)]
TARGET_TALK_OVER_LORA = 1.10


class LocalLoopTalkLoRA(nn.Module):
    """Fallback per-expert loop TalkLoRA (used only if ``talklora_min.reference`` is missing):
    ``h = A x``; ``h~_e = Σ_f T[e, f] h_f``; ``g = softmax(W_r h~)``; ``y = W0 x + b + Σ_e g_e B_e C_e h_e``."""

    def __init__(self, base: nn.Linear, rank: int, num_experts: int, dropout: float = 0.0):
        super().__init__()
        E, m = num_experts, rank // num_experts
        self.base, self.E = base, E
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.C = nn.ParameterList(nn.Parameter(torch.randn(m, m) / m ** 0.5) for _ in range(E))
        self.B = nn.ParameterList(nn.Parameter(torch.randn(base.out_features, m)) for _ in range(E))
        self.T = nn.Parameter(torch.randn(E, E))
        self.W_r = nn.Parameter(torch.randn(E, rank) / rank ** 0.5)

    def forward(self, x: Tensor) -> Tensor:
        blocks = torch.chunk(F.linear(x, self.A), self.E, -1)
        mixed = [sum(self.T[e, f] * blocks[f] for f in range(self.E)) for e in range(self.E)]
        gates = torch.softmax(F.linear(torch.cat(mixed, -1), self.W_r), -1)
        out = 0
        for e in range(self.E):
            out = out + gates[..., e:e + 1] * F.linear(F.linear(blocks[e], self.C[e]), self.B[e])
        return self.base(x) + out


class FusedTalkLoRALinear(TalkLoRALinear):
    """Proposed faster TalkLoRA forward (same function, same parameters; not used by the toolkit).

    Two changes to :meth:`TalkLoRALinear.adapter_output`, both exact rewrites:
    1. absorb T into the router per step (SPEC §3): ``logits = (W_r (T ⊗ I_m)) h`` — an (E, r)
       product instead of mixing the (N, r) code ``h~ = (T ⊗ I_m) h`` for every token;
    2. fold the experts into one matrix: ``Σ_e g_e B_e C_e h_e = W_BC (g ⊗ 1_m ∘ h)`` with
       ``W_BC = [B_1 C_1, …, B_E C_E] = B_flat · blockdiag(C)`` (d_out, r), built once per step —
       one (N, r)·(r, d_out) GEMM instead of a batched per-expert matmul plus the B GEMM.
    Routing hooks and balance losses are omitted here (benchmark only)."""

    def adapter_output(self, x: Tensor) -> Tensor:
        x = self._drop(x)
        h = self.code(x)
        gates, _ = self.gates_from_logits(F.linear(h, self.effective_router()))
        if self.gate_dropout:
            gates = self._drop(gates)
        W_bc = self.B.transpose(0, 1).reshape(self.out_features, self.rank) @ torch.block_diag(*self.C)
        u = gates.repeat_interleave(self.expert_rank, dim=-1) * h
        return self.scaling * self._drop(F.linear(u, W_bc))


def available_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                          # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def make_layers(d: int, rank: int, num_experts: int, device, seed: int = 0) -> dict[str, nn.Module]:
    """All benchmarked layers on one shared frozen base; every adapter tensor random and non-zero."""
    torch.manual_seed(seed)
    base = nn.Linear(d, d).to(device)
    base.requires_grad_(False)
    layers = {"lora": LoRALinear(base, rank),
              "moelora": MoELoRALinear(base, rank, num_experts),
              "talklora": TalkLoRALinear(base, rank, num_experts),
              "talk-fused": FusedTalkLoRALinear(base, rank, num_experts)}
    loop_talk = OfficialTalkLoRALinear or LocalLoopTalkLoRA
    layers["loop-talk"] = loop_talk(base, rank, num_experts).to(device)
    if LoopMoELoRALinear is not None:
        layers["loop-moe"] = LoopMoELoRALinear(base, rank, num_experts).to(device)
    with torch.no_grad():
        for name, layer in layers.items():
            for p in layer.parameters():
                if p.requires_grad and p.abs().max() == 0:          # B = 0 at init
                    p.normal_(0, 0.02)
    return {n: layer.to(device).train() for n, layer in layers.items()}


def saved_tensor_bytes(layer: nn.Module, x: Tensor) -> int:
    """Bytes of distinct storages saved for backward by one forward (params, buffers, x excluded)."""
    exclude = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers(), x)}
    seen: dict[int, int] = {}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    return sum(seen.values())


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step(layer: nn.Module, x: Tensor, grad: Tensor) -> None:
    layer(x).backward(grad)
    for p in layer.parameters():
        p.grad = None
    x.grad = None


def bench_shape(shape, *, repeats: int, warmup: int, device="cpu", seed: int = 0) -> dict:
    batch, seq, d, rank, E = shape
    layers = make_layers(d, rank, E, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, seq, d, device=device, generator=gen).requires_grad_(True)
    grad = torch.randn(batch, seq, d, device=device, generator=gen)
    for layer in layers.values():
        for _ in range(warmup):
            step(layer, x, grad)
    times: dict[str, list[float]] = {n: [] for n in layers}
    for _ in range(repeats):                           # round-robin over layers
        for name, layer in layers.items():
            _sync(device)
            t0 = time.perf_counter()
            step(layer, x, grad)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    result = {"shape": dict(batch=batch, seq=seq, d=d, rank=rank, experts=E), "layers": {}}
    for name, layer in layers.items():
        entry = {"median_s": statistics.median(times[name]), "min_s": min(times[name]),
                 "saved_bytes": saved_tensor_bytes(layer, x)}
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(layer, x, grad)
            entry["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - before
        result["layers"][name] = entry
    L = result["layers"]

    def ratio(a, b, key):
        return L[a][key] / L[b][key] if a in L and b in L and L[b][key] else float("nan")

    def paired(a, b):
        """Median over repeats of t_a / t_b within the same round (robust to slow drifts)."""
        if a not in times or b not in times:
            return float("nan")
        return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))

    result["ratios"] = {
        "talklora/lora": paired("talklora", "lora"),
        "moelora/lora": paired("moelora", "lora"),
        "loop-talk/talklora": paired("loop-talk", "talklora"),
        "loop-moe/moelora": paired("loop-moe", "moelora"),
        "talk-fused/lora": paired("talk-fused", "lora"),
        "min talklora/lora": ratio("talklora", "lora", "min_s"),
        "min moelora/lora": ratio("moelora", "lora", "min_s"),
        "mem talklora/lora": ratio("talklora", "lora", "saved_bytes"),
        "mem moelora/lora": ratio("moelora", "lora", "saved_bytes"),
        "mem loop-talk/talklora": ratio("loop-talk", "talklora", "saved_bytes"),
    }
    result["ratios"] = {k: v for k, v in result["ratios"].items() if not math.isnan(v)}
    return result


def profile_layer(shape, name: str = "talklora", device="cpu", rows: int = 12) -> str:
    """Top ops by self time for a few steps of one layer (torch.profiler)."""
    batch, seq, d, rank, E = shape
    layer = make_layers(d, rank, E, device)[name]
    x = torch.randn(batch, seq, d, device=device).requires_grad_(True)
    grad = torch.randn_like(x)
    step(layer, x, grad)
    with torch.profiler.profile() as prof:
        for _ in range(3):
            step(layer, x, grad)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run(shapes=SHAPES, repeats: int = 7, warmup: int = 2, device="cpu", threads: int | None = None) -> dict:
    """Benchmark every shape; returns a JSON-ready dict (see the module docstring)."""
    threads = threads or available_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    return {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "repeats": repeats, "warmup": warmup,
            "loop_talk_impl": (OfficialTalkLoRALinear or LocalLoopTalkLoRA).__name__,
            "results": [bench_shape(s, repeats=repeats, warmup=warmup, device=device) for s in shapes]}


def format_report(report: dict) -> str:
    lines = [f"device={report['device']} threads={report['threads']} torch={report['torch']} "
             f"repeats={report['repeats']} (median, round-robin) loop-talk={report['loop_talk_impl']}"]
    for res in report["results"]:
        s = res["shape"]
        lines.append(f"\nbatch {s['batch']}, seq {s['seq']}, d {s['d']}, r {s['rank']}, E {s['experts']}")
        lines.append(f"  {'layer':<10} {'median ms':>10} {'min ms':>8} {'/ lora':>7} {'saved MB':>9} {'/ lora':>7}")
        lora = res["layers"]["lora"]
        for name, e in res["layers"].items():
            lines.append(f"  {name:<10} {1e3 * e['median_s']:>10.2f} {1e3 * e['min_s']:>8.2f} "
                         f"{e['median_s'] / lora['median_s']:>7.3f} "
                         f"{e['saved_bytes'] / 2**20:>9.2f} {e['saved_bytes'] / max(lora['saved_bytes'], 1):>7.3f}"
                         + (f"  cuda peak {e['cuda_peak_bytes'] / 2**20:.1f} MB" if "cuda_peak_bytes" in e else ""))
        lines.append("  ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in res["ratios"].items()))
        r = res["ratios"].get("talklora/lora", float("nan"))
        verdict = "OK" if r <= TARGET_TALK_OVER_LORA else "ABOVE TARGET"
        lines.append(f"  TalkLoRA/LoRA = {r:.3f} (target ≤ {TARGET_TALK_OVER_LORA}): {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller second shape")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler top ops for TalkLoRA and LoRA at the first shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: all CPUs available)")
    args = parser.parse_args(argv)
    try:
        shapes = QUICK_SHAPES if args.quick else SHAPES
        repeats = args.repeats or (3 if args.quick else 7)
        report = run(shapes, repeats=repeats, warmup=1 if args.quick else 2, device=args.device,
                     threads=args.threads)
        print(format_report(report))
        over = [res for res in report["results"]
                if res["ratios"].get("talklora/lora", 0) > TARGET_TALK_OVER_LORA]
        if args.profile or over:
            shape = tuple((over or report["results"])[0]["shape"].values())
            for name in ("talklora", "lora"):
                print(f"\n--- torch.profiler, {name}, shape {shape} ---")
                print(profile_layer(shape, name, args.device))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
            print(f"\nwrote {args.json}")
    except Exception as err:  # the benchmark reports, it never fails a pipeline
        print(f"benchmark error: {type(err).__name__}: {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
