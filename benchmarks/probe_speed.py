"""Speed of the router probes on one TalkLoRA layer (docs/method.md §4).

    python benchmarks/probe_speed.py [--quick] [--json out.json] [--tokens N] [--d D]

Measures, for a TalkLoRA layer (d_in = d_out = d, r = 32, E = 4, official init, B random non-zero)
over N tokens (default d = 1024, N = 4096; best of --repeats runs, 1 with --quick):

* the full Lipschitz sandwich (certified, local, empirical) w.r.t. the code and w.r.t. the input;
* a 3-kind × 8-ε amplification sweep (one ``perturbation_response`` call);
* the closed-form local constants vs the generic ``torch.func`` (vmap + jacrev) path, w.r.t. x, both in
  float32 (the target's ratio) and both in float64 (reported).

Targets on the 2-core CPU: sandwich ≤ 2 s (each of code / input), sweep ≤ 5 s, closed form ≥ 20×
faster than the generic path.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
from torch import nn

from talklora_min import TalkLoRALinear
from talklora_min.probes import (KINDS, local_lipschitz, local_lipschitz_generic, perturbation_response,
                                 router_lipschitz)

TARGETS = {"sandwich_code_s": 2.0, "sandwich_input_s": 2.0, "sweep_s": 5.0}
MIN_SPEEDUP = 20.0


def best_time(fn, repeats: int):
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def make_layer(d: int, r: int, E: int, seed: int = 0) -> TalkLoRALinear:
    torch.manual_seed(seed)
    layer = TalkLoRALinear(nn.Linear(d, d), r, E)
    gen = torch.Generator().manual_seed(seed)
    layer.set_weights(B=torch.randn(layer.B.shape, generator=gen) / math.sqrt(r))
    return layer


def run_benchmark(d: int = 1024, r: int = 32, E: int = 4, n_tokens: int = 4096, repeats: int = 3) -> dict:
    layer = make_layer(d, r, E)
    x = torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(1))
    eps = torch.logspace(-4, math.log10(0.3), 8).tolist()
    out = {"d": d, "r": r, "E": E, "n_tokens": n_tokens, "threads": torch.get_num_threads()}
    for wrt in ("code", "input"):
        t, res = best_time(lambda: router_lipschitz(layer, x, wrt), repeats)
        out[f"sandwich_{wrt}_s"] = t
        out[f"sandwich_{wrt}"] = {"certified": res.certified, "local_max": res.local_max,
                                  "empirical": res.empirical}
    t, rows = best_time(lambda: perturbation_response(layer, x, eps, KINDS), repeats)
    out["sweep_s"], out["sweep_rows"] = t, len(rows)
    out["sweep_max_value"] = max(r["value"] for r in rows)
    out["sweep_all_finite"] = all(math.isfinite(r["value"]) for r in rows)
    # closed form vs torch.func in the same dtype: float32 (the layer's own; the ratio the target is
    # about) and float64 (the probes' default: a float64 copy of the layer for the generic path)
    t_closed, closed32 = best_time(lambda: local_lipschitz(layer, x, "input", dtype=torch.float32), repeats)
    t_generic, generic = best_time(lambda: local_lipschitz_generic(layer.gates, x), max(1, repeats - 1))
    layer64, x64 = copy.deepcopy(layer).double(), x.double()
    t_closed64, closed = best_time(lambda: local_lipschitz(layer, x, "input"), repeats)
    t_generic64, generic64 = best_time(lambda: local_lipschitz_generic(layer64.gates, x64), max(1, repeats - 1))
    out.update(local_closed_s=t_closed, local_generic_s=t_generic, speedup=t_generic / t_closed,
               local_closed64_s=t_closed64, local_generic64_s=t_generic64, speedup64=t_generic64 / t_closed64,
               local_max_abs_diff=float((generic.double() - closed).abs().max()),
               local_max_abs_diff64=float((generic64 - closed).abs().max()))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run per measurement")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    out = run_benchmark(d=args.d, n_tokens=args.tokens, repeats=1 if args.quick else args.repeats)
    print(f"TalkLoRA layer d={out['d']} r={out['r']} E={out['E']}, {out['n_tokens']} tokens, "
          f"{out['threads']} torch threads")
    for key, target in TARGETS.items():
        print(f"  {key:<18} {out[key]:8.3f} s   target ≤ {target:g} s   "
              f"{'ok' if out[key] <= target else 'MISSED'}")
    for wrt in ("code", "input"):
        s = out[f"sandwich_{wrt}"]
        print(f"  sandwich wrt {wrt:<5}  certified {s['certified']:.4g}  local max {s['local_max']:.4g}  "
              f"empirical {s['empirical']:.4g}")
    print(f"  local constant, float32: closed form {out['local_closed_s']:.4f} s, torch.func "
          f"{out['local_generic_s']:.4f} s, ratio {out['speedup']:.1f}x (target ≥ {MIN_SPEEDUP:g}x "
          f"{'ok' if out['speedup'] >= MIN_SPEEDUP else 'MISSED'}); max |diff| to float64 {out['local_max_abs_diff']:.2e}")
    print(f"  local constant, float64: closed form {out['local_closed64_s']:.4f} s, torch.func "
          f"{out['local_generic64_s']:.4f} s, ratio {out['speedup64']:.1f}x; max |diff| {out['local_max_abs_diff64']:.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
