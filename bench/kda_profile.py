#!/usr/bin/env python3
"""Per-kernel time split of kls's KDA prefill (plan / prepare / state) and decode, from the CUDA
profiler (torch.profiler sees every kernel in the process, including the ctypes library's), to
say what limits each shape. Same inputs as bench/kda_bench.py.

  python3 bench/kda_profile.py --lib .gpu/bin/libkda_bench.so
"""
import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

import kda_bench as kb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    ours = kb.KlsKda(args.lib)
    print(kb.device_info()["card"])
    for batch, seqlen in ((1, 8192), (1, 32768), (1, 131072), (8, 4096)):
        x = kb.make_inputs(batch, seqlen, seed=1)
        total = batch * seqlen
        slots = torch.arange(batch, dtype=torch.int32, device="cuda")
        ws = torch.empty(ours.workspace_bytes(batch, total, kb.H, kb.D), dtype=torch.uint8,
                         device="cuda")
        out = torch.empty_like(x["v"])
        pool = x["h0"].clone()
        for _ in range(3):
            ours.chunk(x, pool, slots, out, ws)
        torch.cuda.synchronize()
        reps = 5
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                ours.chunk(x, pool, slots, out, ws)
            torch.cuda.synchronize()
        times = collections.defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                times[e.name.split("(")[0][:60]] += e.device_time_total / reps
        total_us = sum(times.values())
        print(f"prefill B={batch} T={seqlen}: {total_us / 1e3:.3f} ms of kernels")
        for name, us in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"   {us / 1e3:8.3f} ms  {100 * us / total_us:5.1f}%  {name}")
        del ws, out, pool, x
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
