#!/usr/bin/env python3
"""GEMM benchmark: the skinny GEMM (kernels/gemm LaunchSkinnyGemm, through the gemm_bench shared
library) on Kimi-Linear-48B's decode projections, against our cuBLASLt wrapper (the path decode
steps took before) and torch's F.linear, in one process on the same torch tensors.

Protocol (PERFORMANCE.md §1): card, driver and clocks first; the 1 GiB device-to-device copy and
the 8192³ bf16 GEMM ceilings measured in the same process; correctness before speed (every impl
against an fp32 torch product of the same bf16 inputs, relative RMS < 5e-3; a case that does not
match is not timed); CUDA events, ≥ 10 warm-ups, median of ≥ 50 timed runs of a CUDA graph of
many calls that rotate over enough copies of the weight (≥ 256 MB in all) that none is served
from the L2. Rate = weight bytes / time, as a fraction of the copy ceiling (the bytes floor of a
decode-sized projection is reading its weight once).

Cases (m = token rows 1, 8, 16 each):
  kda_qkv     n 12288, k 2304   (q, k, v of a KDA layer, one weight)
  o_proj      n 2304,  k 4096
  mla_q       n 6144,  k 2304
  shared_gu   n 2048,  k 2304   (the shared expert's gate + up)
  shared_down n 2304,  k 1024
  lm_head     n 163840, k 2304, fp32 out
  fa_ga       n 256,   k 2304   (small: launch-bound)

Usage (GPU machine, from the repository root):
  python3 bench/gemm_bench.py --lib build-gpu/bench/libgemm_bench.so
"""

import ctypes
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_util, however started
from bench_util import (CudaLib, ResultsLog, device_info, measure_ceilings,  # noqa: E402
                        parse_args, ptr, rel_rms, time_cell, time_graph)

RMS_BOUND = 5e-3
ROTATION_BYTES = 256 << 20
SHAPES = {  # name: (n, k, fp32 output)
    "kda_qkv": (12288, 2304, False),
    "o_proj": (2304, 4096, False),
    "mla_q": (6144, 2304, False),
    "shared_gu": (2048, 2304, False),
    "shared_down": (2304, 1024, False),
    "lm_head": (163840, 2304, True),
    "fa_ga": (256, 2304, False),
}


class KlsGemm(CudaLib):
    """ctypes wrapper of bench/gemm_bench_lib.cu. Tensors must be contiguous CUDA tensors."""

    def __init__(self, path):
        super().__init__(path)
        vp, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        self.lib.kls_skinny_gemm.argtypes = [vp, vp, vp, i32, i64, i64, i64, i32, i32, i32, vp]
        self.lib.kls_skinny_gemm.restype = i32
        self.lib.kls_cublaslt_linear.argtypes = [vp, vp, vp, i32, i64, i64, i64, vp]
        self.lib.kls_cublaslt_linear.restype = i32

    @staticmethod
    def _dims(x, w, y):
        return x.shape[0], w.shape[0], x.shape[1], int(y.dtype == torch.float32)

    def skinny(self, x, w, y, warps=0, chunks=0, overlap=False):
        """LaunchSkinnyGemm; warps / chunks / overlap: its launch-shape fields (0: default)."""
        m, n, k, fp32 = self._dims(x, w, y)
        self._check(self.lib.kls_skinny_gemm(ptr(x), ptr(w), ptr(y), fp32, m, n, k, warps, chunks,
                                             int(overlap), self._stream()), "LaunchSkinnyGemm")

    def cublaslt(self, x, w, y):
        m, n, k, fp32 = self._dims(x, w, y)
        self._check(self.lib.kls_cublaslt_linear(ptr(x), ptr(w), ptr(y), fp32, m, n, k,
                                                 self._stream()), "CublasLtGemm::Run")


TABLE_COLUMNS = [("case", "<18"), ("impl", "<12"), ("time", ">12"), ("rate", ">12"),
                 ("vs copy", ">8"), ("note", ">20")]


def table_cells(r):
    if "us" in r:
        note = (f"{r['speedup_vs_cublaslt']:.2f}x cuBLASLt" if "speedup_vs_cublaslt" in r
                else "")
        return [r["case"], r["impl"], time_cell(r), f"{r['tb_s']:.2f} TB/s",
                f"{r['fraction_of_copy']:.0%}" if "fraction_of_copy" in r else "", note]
    if r.get("status") == "mismatch":
        return [r["case"], r["impl"], f"MISMATCH (rel RMS {r['rel_rms']:.2e}); not timed"]
    return None


def main():
    args, wanted = parse_args(__doc__, "gemm", "ceilings," + ",".join(SHAPES),
                              quick_help="m = 1 only",
                              extra=[("--sweep", "also every launch shape of the skinny GEMM "
                                      "(warps per CTA × chunks in flight, and overlapped)")])
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_grad_enabled(False)
    info = device_info()
    log = ResultsLog("gemm", args.results_dir, info)
    emit = log.emit
    print(json.dumps(info))
    emit({"case": "device", **info})
    ours = KlsGemm(args.lib)
    ceilings = measure_ceilings(emit, gemm_impl="torch") if "ceilings" in wanted else {}
    torch.cuda.empty_cache()

    for name, (n, k, fp32) in SHAPES.items():
        if name not in wanted:
            continue
        weight_bytes = n * k * 2
        copies = max(2, math.ceil(ROTATION_BYTES / weight_bytes))
        gen = torch.Generator(device="cuda").manual_seed(n + k)
        ws = [(torch.randn(n, k, device="cuda", generator=gen) / math.sqrt(k)).bfloat16()
              for _ in range(copies)]
        for m in ([1] if args.quick else [1, 8, 16]):
            case = f"{name}_m{m}"
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            y = torch.empty(m, n, device="cuda", dtype=torch.float32 if fp32 else torch.bfloat16)
            ref = x.float() @ ws[0].float().t()
            impls = {"cublaslt": lambda w: ours.cublaslt(x, w, y),
                     "torch": lambda w: torch.nn.functional.linear(x, w),  # bf16 out
                     "kls": lambda w: ours.skinny(x, w, y)}
            if args.sweep:
                for warps in (4, 8, 16):
                    for chunks in (4, 8):
                        impls[f"kls_w{warps}_c{chunks}"] = (
                            lambda w, warps=warps, chunks=chunks: ours.skinny(x, w, y, warps,
                                                                              chunks))
                impls["kls_overlap"] = lambda w: ours.skinny(x, w, y, overlap=True)
            times = {}
            for impl, fn in impls.items():
                y.fill_(float("nan"))  # an impl that leaves y unwritten cannot pass the check
                out = fn(ws[0])
                torch.cuda.synchronize()
                got = out if out is not None else y
                err = rel_rms(got.float(), ref)
                if not err < RMS_BOUND:
                    emit({"case": case, "impl": impl, "status": "mismatch", "rel_rms": err})
                    continue
                t, mode = time_graph(lambda i, fn=fn: fn(ws[i % copies]), 4 * copies)
                times[impl] = t
                rec = {"case": case, "impl": impl, "us": t * 1e6, "mode": mode, "m": m, "n": n,
                       "k": k, "weight_bytes": weight_bytes, "tb_s": weight_bytes / t / 1e12,
                       "rel_rms_vs_fp32": err}
                if "copy_tb_s" in ceilings:
                    rec["fraction_of_copy"] = rec["tb_s"] / ceilings["copy_tb_s"]
                if impl.startswith("kls") and "cublaslt" in times:
                    rec["speedup_vs_cublaslt"] = times["cublaslt"] / t
                emit(rec)
        del ws
        torch.cuda.empty_cache()

    log.report(TABLE_COLUMNS, table_cells)


if __name__ == "__main__":
    main()
