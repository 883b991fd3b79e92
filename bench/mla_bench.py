#!/usr/bin/env python3
"""MLA benchmark: kls (kernels/mla, through the mla_bench shared library) against PyTorch in one
process, on the same torch tensors (Kimi-Linear-48B shapes: H = 32, Dqk = 192, Dv = 128,
Dc = 512, Dr = 64, page size 64).

Prefill (causal, non-absorbed): ours vs torch.nn.functional.scaled_dot_product_attention at
B = 1, T ∈ {4K, 16K, 32K} and B = 8, T = 4K, with q, k, v laid out [B, T, H, D] (the projection
output layout; SDPA gets the [B, H, T, D] transposed views). SDPA variants: the default dispatch
with V of width 128, and each backend forced (flash with V zero-padded to 192, since flash wants
one head dim, the output sliced back; cuDNN and mem-efficient with V 128); a variant a backend
rejects is recorded as unsupported. TFLOP/s count the useful causal work of every variant the same
way: 2·H·T(T+1)/2·(Dqk + Dv) per sequence.

Decode (absorbed, one query per sequence): ours over the paged cache vs plain PyTorch
(bmm + fp32 softmax + bmm over a contiguous [B, L, 576] view of the same cache memory) at
B = 1 L ∈ {4K, 128K, 1M}, B = 8 L = 128K, B = 64 L ∈ {4K, 32K}, B = 32 L = 128K. Bandwidth counts
the cache bytes read, B·L·576·2, against the copy ceiling.

Protocol (PERFORMANCE.md §1): card, driver and clocks first; the 1 GiB device-to-device copy and
the 8192³ bf16 GEMM ceilings in the same process; correctness before speed (an fp64 reference on
small ragged cases, then every timed case against an fp32 reference or the other
implementation; a case that does not match is not timed); CUDA events, ≥ 10 warm-ups, median of
≥ 50; decode launches captured in CUDA graphs of many calls over caches rotated past ≥ 256 MiB.
Inputs are random (N(0, 1) bf16), never zeros.

One JSON line per measurement goes to <results-dir>/mla_<card>.jsonl (appended; each line carries
the run id), and a table is printed last.

Usage (GPU machine, from the repository root):
  cmake --build build-cuda2 --target mla_bench
  python3 bench/mla_bench.py --lib build-cuda2/bench/libmla_bench.so
  python3 bench/mla_bench.py --lib ... --cases prefill --quick      # smoke test
"""

import ctypes
import itertools
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_util, however started
from bench_util import (CudaLib, ResultsLog, device_info, measure_ceilings,  # noqa: E402
                        parse_args, ptr, rel_rms, time_cell, time_eager, time_graph)

H, DQK, DV = 32, 192, 128
DC, DR, PAGE = 512, 64, 64
ROW = DC + DR
SCALE = DQK ** -0.5
RMS_FP64 = 5e-3   # ours vs an fp64 / fp32 reference (the H5 bound for bf16 outputs)
RMS_PEER = 1e-2   # ours vs another bf16 implementation (both carry ~3e-3 of rounding)
ROTATE_BYTES = 256 << 20


# ----------------------------------------------------------------------------------------------
# Library
# ----------------------------------------------------------------------------------------------

class KlsMla(CudaLib):
    """ctypes wrapper of bench/mla_bench_lib.cu. Tensors must be CUDA tensors in mla.h layouts."""

    def __init__(self, path):
        super().__init__(path)
        vp, i32, i64, f32, u64 = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float,
                                  ctypes.c_uint64)
        self.lib.kls_mla_prefill.argtypes = ([vp, i64, i64] * 3 + [vp, vp, vp] +
                                             [i32, i32, i64, i32, i32, i32, f32, vp])
        self.lib.kls_mla_prefill.restype = i32
        sizes = [i32, i32, i32, i32, i32, i32, i32, i64, i32]
        self.lib.kls_mla_decode_num_splits.argtypes = sizes
        self.lib.kls_mla_decode_num_splits.restype = i32
        self.lib.kls_mla_decode_workspace_bytes.argtypes = sizes
        self.lib.kls_mla_decode_workspace_bytes.restype = u64
        self.lib.kls_mla_decode.argtypes = ([vp, vp, vp, vp, i32, vp, vp] +
                                            [i32, i32, i32, i32, i32, i32, f32, i64, i32] +
                                            [vp, u64, vp])
        self.lib.kls_mla_decode.restype = i32

    def prefill(self, q, k, v, out, cu_q, cu_k, max_seqlen_q):
        """q, k: [tokens, H, Dqk] views (last dim contiguous); v: [tokens, H, Dv]; out contiguous
        [total_q, H, Dv]; cu_q, cu_k int32."""
        total_q, heads, dqk = q.shape
        err = self.lib.kls_mla_prefill(
            ptr(q), q.stride(0), q.stride(1), ptr(k), k.stride(0), k.stride(1), ptr(v),
            v.stride(0), v.stride(1), ptr(out), ptr(cu_q), ptr(cu_k), cu_q.numel() - 1,
            max_seqlen_q, total_q, heads, dqk, v.shape[2], SCALE, self._stream())
        self._check(err, "LaunchMlaPrefill")

    def _sizes(self, batch, heads, max_pages, max_seq_len, num_pages, splits):
        return [batch, heads, DC, DR, PAGE, max_pages, max_seq_len, num_pages, splits]

    def decode_splits(self, *sizes):
        return int(self.lib.kls_mla_decode_num_splits(*self._sizes(*sizes)))

    def decode_workspace_bytes(self, *sizes):
        return int(self.lib.kls_mla_decode_workspace_bytes(*self._sizes(*sizes)))

    def decode(self, q_lat, q_pe, pool, table, seq_lens, out, max_seq_len, workspace, splits=0):
        batch, heads, _ = q_lat.shape
        err = self.lib.kls_mla_decode(
            ptr(q_lat), ptr(q_pe), ptr(pool), ptr(table), table.shape[1], ptr(seq_lens),
            ptr(out), batch, heads, DC, DR, PAGE, max_seq_len, SCALE, pool.shape[0], splits,
            ctypes.c_void_p(workspace.data_ptr() if workspace.numel() else 0), workspace.numel(),
            self._stream())
        self._check(err, "LaunchMlaDecode")


# ----------------------------------------------------------------------------------------------
# Prefill
# ----------------------------------------------------------------------------------------------

def prefill_inputs(len_q, len_k, seed):
    """Packed [tokens, H, D] bf16 inputs; sequence n has len_q[n] queries over len_k[n] keys."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    tq, tk = sum(len_q), sum(len_k)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)
    cu = lambda lens: torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32,
                                   device="cuda")
    return {"q": rnd(tq, H, DQK), "k": rnd(tk, H, DQK), "v": rnd(tk, H, DV),
            "cu_q": cu(len_q), "cu_k": cu(len_k), "len_q": list(len_q), "len_k": list(len_k)}


def prefill_reference(x, dtype):
    """Causal attention per sequence in `dtype` (queries are the last len_q of len_k keys)."""
    outs, bq, bk = [], 0, 0
    for lq, lk in zip(x["len_q"], x["len_k"]):
        q = x["q"][bq:bq + lq].to(dtype).transpose(0, 1)  # [H, lq, D]
        k = x["k"][bk:bk + lk].to(dtype).transpose(0, 1)
        v = x["v"][bk:bk + lk].to(dtype).transpose(0, 1)
        s = torch.matmul(q, k.transpose(1, 2)) * SCALE
        pos = torch.arange(lk - lq, lk, device="cuda")[:, None]
        s.masked_fill_(torch.arange(lk, device="cuda")[None, :] > pos, float("-inf"))
        outs.append(torch.matmul(torch.softmax(s, -1), v).transpose(0, 1))
        bq, bk = bq + lq, bk + lk
    return torch.cat(outs)


def sdpa_variants(batch, seqlen, x):
    """(name, callable) for each SDPA variant; q, k, v as [B, H, T, D] views of [B, T, H, D]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    view = lambda t: t.view(batch, seqlen, H, t.shape[-1]).transpose(1, 2)
    q, k, v = view(x["q"]), view(x["k"]), view(x["v"])
    v_pad = view(F.pad(x["v"], (0, DQK - DV)))

    def run(backend, vv):
        def fn():
            if backend is None:
                o = F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=SCALE)
            else:
                with sdpa_kernel([backend]):
                    o = F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=SCALE)
            return o[..., :DV]
        return fn

    return [("sdpa_default", run(None, v)),
            ("sdpa_flash_vpad192", run(SDPBackend.FLASH_ATTENTION, v_pad)),
            ("sdpa_cudnn", run(SDPBackend.CUDNN_ATTENTION, v)),
            ("sdpa_efficient", run(SDPBackend.EFFICIENT_ATTENTION, v))]


def bench_prefill(ours, emit, quick):
    # fp64 reference on small ragged shapes (contiguous and strided views, with context).
    for name, len_q, len_k in (("ref_T1000", [1000], [1000]),
                               ("ref_ragged_context", [1, 300, 129, 77], [700, 300, 1000, 77])):
        x = prefill_inputs(len_q, len_k, seed=11)
        ref = prefill_reference(x, torch.float64)
        out = torch.empty(sum(len_q), H, DV, dtype=torch.bfloat16, device="cuda")
        ours.prefill(x["q"], x["k"], x["v"], out, x["cu_q"], x["cu_k"], max(len_q))
        # The same through strided views of one [tokens, H, Dqk + Dv] buffer.
        kv = torch.cat([x["k"], x["v"]], dim=2)
        out_s = torch.empty_like(out)
        ours.prefill(x["q"], kv[..., :DQK], kv[..., DQK:], out_s, x["cu_q"], x["cu_k"], max(len_q))
        torch.cuda.synchronize()
        emit({"case": f"prefill_{name}", "impl": "kls", "out_rel_rms_vs_fp64": rel_rms(out, ref),
              "strided_out_rel_rms_vs_fp64": rel_rms(out_s, ref)})

    shapes = [(1, 4096), (1, 16384), (1, 32768), (8, 4096)]
    if quick:
        shapes = [(1, 4096), (2, 2048)]
    for batch, seqlen in shapes:
        name = f"prefill_B{batch}_T{seqlen}"
        x = prefill_inputs([seqlen] * batch, [seqlen] * batch, seed=batch * 7919 + seqlen)
        flops = 2 * batch * H * (seqlen * (seqlen + 1) // 2) * (DQK + DV)
        out = torch.empty(batch * seqlen, H, DV, dtype=torch.bfloat16, device="cuda")
        step = lambda: ours.prefill(x["q"], x["k"], x["v"], out, x["cu_q"], x["cu_k"], seqlen)
        step()
        torch.cuda.synchronize()
        ours_out = out.view(batch, seqlen, H, DV)
        variants = sdpa_variants(batch, seqlen, x)
        results, check = {}, {}
        for impl, fn in variants:
            try:
                o = fn()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a backend may reject these shapes
                emit({"case": name, "impl": impl, "status": "unsupported",
                      "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            check[impl] = rel_rms(ours_out, o.transpose(1, 2))
            del o
            results[impl] = fn
        if not check:
            emit({"case": name, "impl": "kls", "status": "no_baseline"})
            continue
        peer = "sdpa_default" if "sdpa_default" in check else next(iter(check))
        if not check[peer] < RMS_PEER:
            emit({"case": name, "impl": "kls", "status": "mismatch", "peer": peer,
                  "out_rel_rms_vs_peer": check[peer]})
            print(f"{name}: kls and {peer} disagree (rel RMS {check[peer]:.2e}); not timed",
                  file=sys.stderr)
            continue
        t_ours = time_eager(step)
        timed = {}
        for impl, fn in results.items():
            timed[impl] = time_eager(fn)
        best = min(timed.values())
        emit({"case": name, "impl": "kls", "ms": t_ours * 1e3, "tflop_s": flops / t_ours / 1e12,
              "speedup_vs_sdpa_default": timed.get("sdpa_default", float("nan")) / t_ours,
              "speedup_vs_best_sdpa": best / t_ours, "out_rel_rms_vs_peer": check[peer],
              "peer": peer})
        for impl, t in timed.items():
            emit({"case": name, "impl": impl, "ms": t * 1e3, "tflop_s": flops / t / 1e12,
                  "out_rel_rms_kls_vs_this": check[impl]})
        x = out = results = variants = step = None  # free before the next shape
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------

def decode_reference(q_lat, q_pe, cache_rows, dtype):
    """Σ softmax(scale·(q_lat·c + q_pe·kpe)) c per sequence, in `dtype`; cache_rows[b] is the
    [L_b, 576] cache of sequence b."""
    outs = []
    for b, rows in enumerate(cache_rows):
        q = torch.cat([q_lat[b], q_pe[b]], dim=-1).to(dtype)  # [H, 576]
        c = rows.to(dtype)
        p = torch.softmax((q @ c.T) * SCALE, dim=-1)
        outs.append(p @ c[:, :DC])
    return torch.stack(outs)


def torch_decode(q_cat, cache):
    """Plain-PyTorch absorbed decode: q_cat [B, H, 576], cache [B, L, 576] (a strided view)."""
    s = torch.bmm(q_cat, cache.transpose(1, 2)).float() * SCALE
    p = torch.softmax(s, dim=-1).to(torch.bfloat16)
    return torch.bmm(p, cache[..., :DC])


def bench_decode(ours, emit, copy_tb_s, quick):
    # fp64 reference: ragged lengths over a shuffled page pool, automatic and forced splits.
    g = torch.Generator(device="cuda").manual_seed(5)
    lens = [1, 1000, 5000]
    max_pages = math.ceil(max(lens) / PAGE)
    num_pages = len(lens) * max_pages
    pool = torch.randn(num_pages, PAGE, ROW, generator=g, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(num_pages, generator=g, device="cuda").to(torch.int32).view(
        len(lens), max_pages)
    q_lat = torch.randn(len(lens), H, DC, generator=g, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(len(lens), H, DR, generator=g, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    rows = [pool[table[b].long()].reshape(-1, ROW)[:n] for b, n in enumerate(lens)]
    ref = decode_reference(q_lat, q_pe, rows, torch.float64)
    for splits in (0, 1, 7):
        sizes = (len(lens), H, max_pages, max(lens), num_pages, splits)
        ws = torch.empty(ours.decode_workspace_bytes(*sizes), dtype=torch.uint8, device="cuda")
        out = torch.empty(len(lens), H, DC, dtype=torch.bfloat16, device="cuda")
        ours.decode(q_lat, q_pe, pool, table, seq_lens, out, max(lens), ws, splits)
        torch.cuda.synchronize()
        emit({"case": "decode_ref_ragged_shuffled", "impl": "kls",
              "splits": ours.decode_splits(*sizes), "out_rel_rms_vs_fp64": rel_rms(out, ref)})
    del pool, rows, ref
    torch.cuda.empty_cache()

    shapes = [(1, 4096), (1, 131072), (1, 1 << 20), (8, 131072), (64, 4096), (64, 32768),
              (32, 131072)]
    if quick:
        shapes = [(1, 4096), (1, 65536), (8, 8192)]
    for batch, seqlen in shapes:
        name = f"decode_B{batch}_L{seqlen}"
        pages = math.ceil(seqlen / PAGE)
        set_bytes = batch * pages * PAGE * ROW * 2
        rotations = max(1, math.ceil(ROTATE_BYTES / set_bytes))
        free, _ = torch.cuda.mem_get_info()
        if rotations * set_bytes * 1.3 > free:
            emit({"case": name, "impl": "kls", "status": "skipped_memory",
                  "need_gib": rotations * set_bytes * 1.3 / 2 ** 30})
            continue
        g = torch.Generator(device="cuda").manual_seed(batch * 31 + seqlen)
        pool = torch.randn(rotations * batch * pages, PAGE, ROW, generator=g, device="cuda",
                           dtype=torch.bfloat16)
        # Pages of rotation r: sequence b owns pages [(r·B + b)·pages, ... + pages) in order, so
        # the same memory is also a contiguous [B, pages·PAGE, 576] cache for the torch baseline.
        tables = [torch.arange((r * batch) * pages, (r + 1) * batch * pages, device="cuda",
                               dtype=torch.int32).view(batch, pages) for r in range(rotations)]
        caches = [pool[r * batch * pages:(r + 1) * batch * pages].view(batch, pages * PAGE,
                                                                       ROW)[:, :seqlen]
                  for r in range(rotations)]
        q_lat = torch.randn(batch, H, DC, generator=g, device="cuda", dtype=torch.bfloat16)
        q_pe = torch.randn(batch, H, DR, generator=g, device="cuda", dtype=torch.bfloat16)
        q_cat = torch.cat([q_lat, q_pe], dim=-1)
        seq_lens = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
        sizes = (batch, H, pages, seqlen, pool.shape[0], 0)
        splits = ours.decode_splits(*sizes)
        ws = torch.empty(ours.decode_workspace_bytes(*sizes), dtype=torch.uint8, device="cuda")
        out = torch.empty(batch, H, DC, dtype=torch.bfloat16, device="cuda")

        ours.decode(q_lat, q_pe, pool, tables[0], seq_lens, out, seqlen, ws)
        base_out = torch_decode(q_cat, caches[0])
        torch.cuda.synchronize()
        ref = decode_reference(q_lat, q_pe, list(caches[0]), torch.float32)
        check = {"out_rel_rms_vs_fp32": rel_rms(out, ref),
                 "torch_out_rel_rms_vs_fp32": rel_rms(base_out, ref)}
        del ref, base_out
        if not check["out_rel_rms_vs_fp32"] < RMS_FP64:
            emit({"case": name, "impl": "kls", "status": "mismatch", **check})
            print(f"{name}: kls disagrees with the fp32 reference ({check}); not timed",
                  file=sys.stderr)
            pool = tables = caches = ws = out = None
            torch.cuda.empty_cache()
            continue
        calls = rotations * max(1, math.ceil(32 / rotations)) if set_bytes < (1 << 30) else 4
        t_ours, mode_o = time_graph(
            lambda i: ours.decode(q_lat, q_pe, pool, tables[i % rotations], seq_lens, out, seqlen,
                                  ws), calls, prewarm=2)
        t_torch, mode_t = time_graph(lambda i: torch_decode(q_cat, caches[i % rotations]), calls,
                                     prewarm=2)
        cache_bytes = batch * seqlen * ROW * 2
        common = {"calls_per_graph": calls, "rotated_mib": rotations * set_bytes >> 20,
                  "cache_mib": cache_bytes >> 20, "pages": "in order, 64 tokens"}
        for impl, t, mode in (("kls", t_ours, mode_o), ("torch_bmm", t_torch, mode_t)):
            tb_s = cache_bytes / t / 1e12
            emit({"case": name, "impl": impl, "us": t * 1e6, "tb_s": tb_s,
                  "fraction_of_copy": tb_s / copy_tb_s if copy_tb_s else float("nan"),
                  "speedup_vs_torch": t_torch / t, "mode": mode, **common,
                  **({"splits": splits, **check} if impl == "kls" else {})})
        pool = tables = caches = ws = out = None  # free before the next shape
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

TABLE_COLUMNS = [("case", "<26"), ("impl", "<19"), ("time", ">12"), ("rate", ">15"),
                 ("vs copy", ">8"), ("ratio", ">22")]


def table_cells(r):
    """The table line of record r (bench_util.print_table), None for records not shown."""
    if "ms" in r or "us" in r:
        rate = (f"{r['tflop_s']:.0f} TFLOP/s" if "tflop_s" in r else
                f"{r['tb_s']:.3f} TB/s")
        frac = f"{r['fraction_of_copy']:.0%}" if "fraction_of_copy" in r else ""
        ratio = ""
        if "speedup_vs_best_sdpa" in r:
            ratio = (f"{r['speedup_vs_sdpa_default']:.2f}x dflt "
                     f"{r['speedup_vs_best_sdpa']:.2f}x best")
        elif r["impl"] == "kls" and "speedup_vs_torch" in r:
            ratio = f"{r['speedup_vs_torch']:.2f}x torch"
        return [r["case"], r["impl"], time_cell(r, us_digits=1), rate, frac, ratio]
    if "status" in r:
        return [r["case"], r["impl"], r["status"]]
    if any(k.endswith("vs_fp64") for k in r):
        errs = ", ".join(f"{k} {v:.2e}" for k, v in r.items() if k.endswith("vs_fp64"))
        return [r["case"], r["impl"], errs]
    return None


def main():
    args, wanted = parse_args(__doc__, "mla", "ceilings,prefill,decode")

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_grad_enabled(False)
    info = device_info()
    log = ResultsLog("mla", args.results_dir, info, echo=True)
    emit = log.emit

    emit({"case": "device", **info})
    ours = KlsMla(args.lib)

    copy_tb_s = None
    if "ceilings" in wanted:
        copy_tb_s = measure_ceilings(emit)["copy_tb_s"]
        torch.cuda.empty_cache()

    if "prefill" in wanted:
        bench_prefill(ours, emit, args.quick)
    if "decode" in wanted:
        bench_decode(ours, emit, copy_tb_s, args.quick)

    log.report(TABLE_COLUMNS, table_cells, note=f"; card {info['card']}")


if __name__ == "__main__":
    main()
