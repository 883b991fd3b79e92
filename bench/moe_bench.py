#!/usr/bin/env python3
"""MoE benchmark: kls (kernels/moe, through the moe_bench shared library) on the real
Kimi-Linear-48B expert shapes (D 2304, I 1024, E 256, top-8) against cuBLAS and a plain torch
per-expert loop, in one process on the same torch tensors.

Protocol (PERFORMANCE.md §1): card, driver and clocks first; the 1 GiB device-to-device copy
and the 8192³ bf16 GEMM ceilings measured in the same process; correctness before speed (the
router's ids and weights against an fp64 torch router, every timed expert case against an fp32
torch per-expert reference, relative RMS < 5e-3, and one small case against fp64 on the CPU);
a case that does not match is not timed; CUDA events, ≥ 10 warm-ups, median of ≥ 50 timed
runs; decode runs are CUDA graphs of many calls that rotate over distinct routings and inputs,
so consecutive calls touch different experts (the 3.6 GB of expert weights dwarf the L2).
Inputs are random (never zeros): hidden ~ N(0, 1), weights ~ N(0, 1)/√fan_in in bf16, router
logits ~ N(0, 2) with a small correction bias.

Cases:
  route      LaunchMoeRoute at T = 1, 64, 4096, 16384 (µs per call).
  decode     T = 1, 8, 32, 64 (the kAuto path, decode): bytes of expert weights touched per call
             (distinct experts × 14.2 MB) / time, as a fraction of the copy ceiling; the forced
             prefill path and the torch loop for comparison.
  crossover  T = 1 … 512, both forced paths (to tune kMoeDecodeMaxPairsPerExpert).
  prefill    T = 4096, 16384 (kAuto → prefill): useful TFLOP/s (6·T·K·D·I) against the
             8192³ GEMM ceiling, against cuBLAS on the same FLOPs as two dense GEMMs
             ([T·K, D]×[D, 2I] and [T·K, I]×[I, D]: the no-routing upper bound), and against the
             torch per-expert loop.

One JSON line per measurement goes to <results-dir>/moe_<card>.jsonl (appended; each line
carries the run id), and a table is printed last.

Usage (GPU machine, from the repository root):
  python3 bench/moe_bench.py --lib build-gpu/bench/libmoe_bench.so
"""

import ctypes
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_util, however started
from bench_util import (CudaLib, ResultsLog, device_info, measure_ceilings,  # noqa: E402
                        parse_args, ptr, rel_rms, time_cell, time_eager, time_graph)

D, I, E, K = 2304, 1024, 256, 8
SCALING = 2.446
RMS_BOUND = 5e-3
PATHS = {"auto": 0, "decode": 1, "prefill": 2}
EXPERT_BYTES = (2 * I * D + D * I) * 2  # one expert's w1, w3, w2 in bf16


# ----------------------------------------------------------------------------------------------
# Library
# ----------------------------------------------------------------------------------------------

class KlsMoe(CudaLib):
    """ctypes wrapper of bench/moe_bench_lib.cu. Tensors must be contiguous CUDA tensors."""

    def __init__(self, path):
        super().__init__(path)
        vp, i32, i64, f64, u64 = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                  ctypes.c_double, ctypes.c_uint64)
        self.lib.kls_moe_route.argtypes = [vp, i64, vp, i64, i32, i32, i32, f64, i32, vp, vp, vp]
        self.lib.kls_moe_route.restype = i32
        self.lib.kls_moe_experts_workspace_bytes.argtypes = [i64, i32, i32, i32, i32, i32,
                                                             ctypes.POINTER(u64)]
        self.lib.kls_moe_experts_workspace_bytes.restype = i32
        self.lib.kls_moe_tile_rows.argtypes = [i64, i32, i32, i32, i32, i32]
        self.lib.kls_moe_tile_rows.restype = i32
        self.lib.kls_moe_experts.argtypes = [vp] * 7 + [i64, i32, i32, i32, i32, i32, vp, u64, vp]
        self.lib.kls_moe_experts.restype = i32

    def route(self, logits, bias, ids, weights):
        t, e = logits.shape
        self._check(self.lib.kls_moe_route(
            ptr(logits), logits.stride(0), ptr(bias), t, e, ids.shape[1], 1, SCALING, 0, ptr(ids),
            ptr(weights), self._stream()), "LaunchMoeRoute")

    def workspace(self, tokens, path):
        b = ctypes.c_uint64(0)
        self._check(self.lib.kls_moe_experts_workspace_bytes(tokens, D, I, E, K, PATHS[path],
                                                             ctypes.byref(b)),
                    "MoeExpertsWorkspaceBytes")
        return torch.empty(max(int(b.value), 1), dtype=torch.uint8, device="cuda")

    def tile_rows(self, tokens, path):
        return int(self.lib.kls_moe_tile_rows(tokens, D, I, E, K, PATHS[path]))

    def experts(self, hidden, ids, weights, w13, w2, out, path, workspace, shared=None):
        self._check(self.lib.kls_moe_experts(
            ptr(hidden), ptr(ids), ptr(weights), ptr(w13), ptr(w2), ptr(shared), ptr(out),
            hidden.shape[0], D, I, E, K, PATHS[path], ptr(workspace), workspace.numel(),
            self._stream()), "LaunchMoeExperts")


# ----------------------------------------------------------------------------------------------
# Inputs, references
# ----------------------------------------------------------------------------------------------

def make_weights(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, D, generator=g, device="cuda") * D ** -0.5).bfloat16()
    w2 = (torch.randn(E, D, I, generator=g, device="cuda") * I ** -0.5).bfloat16()
    return w13, w2


def torch_route(logits, bias):
    """The reference router in fp64: unbiased sigmoid weights, renormalized, scaled."""
    s = torch.sigmoid(logits.double())
    keys = s + bias.double()
    ids = torch.topk(keys, K, dim=1, sorted=True).indices
    w = torch.gather(s, 1, ids)
    w = w / w.sum(1, keepdim=True) * SCALING
    return ids.int(), w.float()


def make_routing(tokens, seed, ours):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(tokens, E, generator=g, device="cuda") * 2.0
    bias = torch.randn(E, generator=g, device="cuda") * 0.05
    ids = torch.empty(tokens, K, dtype=torch.int32, device="cuda")
    weights = torch.empty(tokens, K, dtype=torch.float32, device="cuda")
    ours.route(logits, bias, ids, weights)
    return logits, bias, ids, weights


def torch_loop(hidden, ids, weights, w13, w2, dtype=None):
    """The plain per-expert loop a user would write (the baseline), or with dtype=float32 /
    float64 the reference (the same math in a wider type)."""
    dt = dtype or hidden.dtype
    x_all = hidden.to(dt)
    out = torch.zeros(hidden.shape[0], D, dtype=torch.float32 if dtype is None else dt,
                      device=hidden.device)
    flat_ids = ids.reshape(-1).long()
    flat_w = weights.reshape(-1)
    for e in torch.unique(flat_ids).tolist():
        pairs = (flat_ids == e).nonzero().squeeze(1)
        tok = pairs // K
        x = x_all[tok]
        gu = x @ w13[e].to(dt).t()
        a = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
        y = (a @ w2[e].to(dt).t()) * flat_w[pairs].to(dt)[:, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out if dtype is not None else out.to(hidden.dtype)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

TABLE_COLUMNS = [("case", "<20"), ("impl", "<24"), ("time", ">12"), ("rate", ">16"),
                 ("vs ceiling", ">11"), ("note", ">26")]


def table_cells(r):
    """The table line of record r (bench_util.print_table), None for records not shown."""
    if "ms" in r or "us" in r:
        rate = (f"{r['tflop_s']:.0f} TFLOP/s" if "tflop_s" in r else
                f"{r['tb_s']:.3f} TB/s" if "tb_s" in r else "")
        frac = r.get("fraction_of_copy", r.get("fraction_of_gemm_ceiling"))
        frac = f"{frac:.0%}" if frac is not None else ""
        note = ""
        if "speedup_vs_torch_loop" in r:
            note = (f"{r['speedup_vs_torch_loop']:.1f}x loop, "
                    f"{r['fraction_of_cublas_dense']:.0%} cuBLAS")
        elif "tile_rows" in r:
            note = f"tile {r['tile_rows']}"
        return [r["case"], r["impl"], time_cell(r), rate, frac, note]
    if "out_rel_rms" in r:
        return [r["case"], r["impl"], f"out rel RMS {r['out_rel_rms']:.2e} vs fp64"]
    if "ids_equal" in r:
        return [r["case"], r["impl"], f"ids equal: {r['ids_equal']}, weights max "
                f"abs err {r['weights_max_abs_err']:.1e}"]
    if r.get("status") == "mismatch":
        return [r["case"], r["impl"], f"MISMATCH (rel RMS "
                f"{r['out_rel_rms_vs_fp32']:.2e}); not timed"]
    return None


def main():
    args, wanted = parse_args(__doc__, "moe", "ceilings,reference,route,decode,crossover,prefill",
                              quick_help="fewer, smaller cases (smoke test)")

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_grad_enabled(False)
    info = device_info()
    log = ResultsLog("moe", args.results_dir, info)
    emit = log.emit
    ceilings = {}

    print(json.dumps(info))
    emit({"case": "device", **info})
    ours = KlsMoe(args.lib)

    if "ceilings" in wanted:
        ceilings = measure_ceilings(emit, gemm_impl="cublas")
        torch.cuda.empty_cache()

    w13, w2 = make_weights(seed=1)

    if "reference" in wanted:
        # Router vs fp64 torch; experts (both paths) vs fp64 on the CPU for a small T.
        for tokens in (4, 300):
            logits, bias, ids, weights = make_routing(tokens, seed=tokens, ours=ours)
            ref_ids, ref_w = torch_route(logits, bias)
            ids_equal = bool(torch.equal(ids, ref_ids))
            w_err = (weights - ref_w).abs().max().item()
            emit({"case": f"reference_route_T{tokens}", "impl": "kls", "ids_equal": ids_equal,
                  "weights_max_abs_err": w_err})
        tokens = 4
        _, _, ids, weights = make_routing(tokens, seed=99, ours=ours)
        hidden = torch.randn(tokens, D, device="cuda").bfloat16()
        touched = torch.unique(ids).tolist()
        cpu_w13 = {e: w13[e].double().cpu() for e in touched}
        cpu_w2 = {e: w2[e].double().cpu() for e in touched}
        expected = torch.zeros(tokens, D, dtype=torch.float64)
        h64 = hidden.double().cpu()
        for t in range(tokens):
            for s in range(K):
                e = int(ids[t, s])
                gu = cpu_w13[e] @ h64[t]
                a = torch.nn.functional.silu(gu[:I]) * gu[I:]
                expected[t] += float(weights[t, s]) * (cpu_w2[e] @ a)
        for path in ("decode", "prefill"):
            out = torch.empty(tokens, D, dtype=torch.bfloat16, device="cuda")
            ws = ours.workspace(tokens, path)
            ours.experts(hidden, ids, weights, w13, w2, out, path, ws)
            torch.cuda.synchronize()
            emit({"case": "reference_fp64_T4", "impl": f"kls_{path}",
                  "out_rel_rms": rel_rms(out.cpu(), expected)})

    if "route" in wanted:
        for tokens in ([1, 64] if args.quick else [1, 64, 4096, 16384]):
            logits, bias, ids, weights = make_routing(tokens, seed=tokens + 5, ours=ours)
            t, mode = time_graph(lambda i: ours.route(logits, bias, ids, weights), 20)
            emit({"case": f"route_T{tokens}", "impl": "kls", "us": t * 1e6, "mode": mode})

    def check_case(name, tokens, path, hidden, ids, weights, out, ws):
        ours.experts(hidden, ids, weights, w13, w2, out, path, ws)
        ref = torch_loop(hidden, ids, weights, w13, w2, dtype=torch.float32)
        torch.cuda.synchronize()
        err = rel_rms(out, ref)
        if not err < RMS_BOUND:
            emit({"case": name, "impl": f"kls_{path}", "status": "mismatch",
                  "out_rel_rms_vs_fp32": err})
            print(f"{name} {path}: mismatch vs the fp32 torch reference (rel RMS {err:.2e}); "
                  "not timed", file=sys.stderr)
            return None
        return err

    def decode_like(name_prefix, token_list, paths, with_torch):
        for tokens in token_list:
            name = f"{name_prefix}_T{tokens}"
            rotations = 16
            sets = [make_routing(tokens, seed=1000 * tokens + r, ours=ours)[2:]
                    for r in range(rotations)]
            hiddens = [torch.randn(tokens, D, device="cuda").bfloat16() for _ in range(rotations)]
            out = torch.empty(tokens, D, dtype=torch.bfloat16, device="cuda")
            distinct = statistics.mean(len(torch.unique(s[0])) for s in sets)
            weight_bytes = distinct * EXPERT_BYTES
            for path in paths:
                ws = ours.workspace(tokens, path)
                err = check_case(name, tokens, path, hiddens[0], sets[0][0], sets[0][1], out, ws)
                if err is None:
                    continue
                t, mode = time_graph(
                    lambda i, path=path, ws=ws: ours.experts(
                        hiddens[i % rotations], sets[i % rotations][0], sets[i % rotations][1],
                        w13, w2, out, path, ws),
                    rotations * 4 if tokens <= 64 else rotations)
                rec = {"case": name, "impl": f"kls_{path}", "us": t * 1e6, "mode": mode,
                       "tile_rows": ours.tile_rows(tokens, path),
                       "distinct_experts": distinct, "weight_bytes": weight_bytes,
                       "tb_s": weight_bytes / t / 1e12, "out_rel_rms_vs_fp32": err}
                if "copy_tb_s" in ceilings:
                    rec["fraction_of_copy"] = rec["tb_s"] / ceilings["copy_tb_s"]
                emit(rec)
            if with_torch:
                t = time_eager(lambda: torch_loop(hiddens[0], sets[0][0], sets[0][1], w13, w2))
                emit({"case": name, "impl": "torch_loop", "us": t * 1e6, "mode": "eager",
                      "tb_s": weight_bytes / t / 1e12})
            sets = hiddens = None  # free before the next size
            torch.cuda.empty_cache()

    if "decode" in wanted:
        decode_like("decode", [1, 8] if args.quick else [1, 8, 32, 64],
                    ("auto", "prefill"), with_torch=True)

    if "crossover" in wanted and not args.quick:
        decode_like("crossover", [1, 8, 32, 64, 128, 192, 256, 512], ("decode", "prefill"),
                    with_torch=False)

    if "prefill" in wanted:
        for tokens in ([2048] if args.quick else [4096, 16384]):
            name = f"prefill_T{tokens}"
            _, _, ids, weights = make_routing(tokens, seed=tokens + 77, ours=ours)
            hidden = torch.randn(tokens, D, device="cuda").bfloat16()
            out = torch.empty(tokens, D, dtype=torch.bfloat16, device="cuda")
            flops = 6.0 * tokens * K * D * I
            # Baselines first, so that our record carries the ratios.
            # cuBLAS on the same FLOPs as two dense GEMMs (no routing, one weight).
            x = torch.randn(tokens * K, D, device="cuda").bfloat16()
            a = torch.randn(tokens * K, I, device="cuda").bfloat16()
            wgu, wd = w13[0].t(), w2[0].t()
            t_blas = time_eager(lambda: (x @ wgu, a @ wd))
            emit({"case": name, "impl": "cublas_dense_same_flops", "ms": t_blas * 1e3,
                  "tflop_s": flops / t_blas / 1e12})
            del x, a
            t_loop = time_eager(lambda: torch_loop(hidden, ids, weights, w13, w2), warmup=3,
                                iters=10)
            emit({"case": name, "impl": "torch_loop", "ms": t_loop * 1e3, "mode": "eager",
                  "tflop_s": flops / t_loop / 1e12})
            ws = ours.workspace(tokens, "auto")
            err = check_case(name, tokens, "auto", hidden, ids, weights, out, ws)
            if err is not None:
                t, mode = time_graph(
                    lambda i: ours.experts(hidden, ids, weights, w13, w2, out, "auto", ws), 3)
                rec = {"case": name, "impl": "kls", "ms": t * 1e3, "mode": mode,
                       "tile_rows": ours.tile_rows(tokens, "auto"), "tflop_s": flops / t / 1e12,
                       "out_rel_rms_vs_fp32": err, "speedup_vs_torch_loop": t_loop / t,
                       "fraction_of_cublas_dense": t_blas / t}
                if "gemm_tflop_s" in ceilings:
                    rec["fraction_of_gemm_ceiling"] = rec["tflop_s"] / ceilings["gemm_tflop_s"]
                emit(rec)
            del ws
            torch.cuda.empty_cache()

    log.report(TABLE_COLUMNS, table_cells)


if __name__ == "__main__":
    main()
