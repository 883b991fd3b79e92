#!/usr/bin/env python3
"""KDA benchmark: kls (kernels/kda, through the kda_bench shared library) against fla 0.6.0
(`chunk_kda`, `fused_recurrent_kda_fwd`) in one process, on the same torch tensors.

Protocol (PERFORMANCE.md §1): card, driver and clocks first; the 1 GiB device-to-device copy
and the 8192³ bf16 GEMM ceilings measured in the same process; correctness before speed (ours
vs fla on every case, relative RMS < 5e-3 on outputs and final states, and both against an fp64
CPU recurrence on a small case); refuse to time a mismatching case; CUDA graphs of many calls,
≥ 10 warm-up replays, median of ≥ 50 timed replays (CUDA events), divided by the calls per graph;
decode state buffers rotated over ≥ 256 MiB (the L2 is 50-60 MB). Inputs are random (never
zeros) with the exact Kimi-Linear-48B gate (no lower bound, KIMI_LINEAR.md §3.4):
q, k, v, f, beta logits ~ N(0, 1) in bf16, A_log = log U(1, 16), dt_bias ~ N(0, 1),
initial states ~ 0.1·N(0, 1) in fp32.

One JSON line per measurement goes to <results-dir>/kda_<card>.jsonl (appended; each line
carries the run id), and a table is printed last.

Usage (GPU machine, from the repository root):
  python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl
  PYTHONPATH=$PWD/.site python3 bench/kda_bench.py --lib build-cuda2/bench/libkda_bench.so
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

H, D = 32, 128
RMS_BOUND = 5e-3
STATE_BYTES = H * D * D * 4  # one sequence's fp32 state


# ----------------------------------------------------------------------------------------------
# Library
# ----------------------------------------------------------------------------------------------

class KlsKda(CudaLib):
    """ctypes wrapper of bench/kda_bench_lib.cu. Tensors must be contiguous CUDA tensors."""

    def __init__(self, path):
        super().__init__(path)
        vp, i32, i64, f32, u64 = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float,
                                  ctypes.c_uint64)
        self.lib.kls_kda_chunk_workspace_bytes.argtypes = [i32, i64, i32, i32]
        self.lib.kls_kda_chunk_workspace_bytes.restype = u64
        common = [vp] * 11 + [i32, i64, i32, i32, i32, f32]
        self.lib.kls_kda_chunk.argtypes = common + [i32, vp, u64, vp]
        self.lib.kls_kda_chunk.restype = i32
        self.lib.kls_kda_recurrent.argtypes = common + [vp]
        self.lib.kls_kda_recurrent.restype = i32

    def workspace_bytes(self, num_seqs, total_tokens, num_heads, head_dim):
        return int(self.lib.kls_kda_chunk_workspace_bytes(num_seqs, total_tokens, num_heads,
                                                          head_dim))

    def _args(self, x, pool, slots, out):
        total, heads, dim = x["q"].shape
        n = x["cu_seqlens"].numel() - 1
        return [ptr(x["q"]), ptr(x["k"]), ptr(x["v"]), ptr(x["f"]), ptr(x["beta"]),
                ptr(x["a_log"]), ptr(x["dt_bias"]), ptr(x["cu_seqlens"]), ptr(pool), ptr(slots),
                ptr(out), n, total, x["max_seqlen"], heads, dim, dim ** -0.5]

    def chunk(self, x, pool, slots, out, workspace, state_tile=0):
        """state_tile: value columns per state CTA, 32 or 64; 0 lets the launcher choose."""
        err = self.lib.kls_kda_chunk(*self._args(x, pool, slots, out), state_tile,
                                     ptr(workspace), workspace.numel(), self._stream())
        self._check(err, "LaunchKdaChunk")

    def recurrent(self, x, pool, slots, out):
        self._check(self.lib.kls_kda_recurrent(*self._args(x, pool, slots, out), self._stream()),
                    "LaunchKdaRecurrent")


# ----------------------------------------------------------------------------------------------
# Inputs and checks
# ----------------------------------------------------------------------------------------------

def make_inputs(batch, seqlen, seed, dev="cuda"):
    """Packed [B·T, H, D] bf16 inputs (the same memory fla sees as [B, T, H, D])."""
    g = torch.Generator(device=dev).manual_seed(seed)
    total = batch * seqlen
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=dev)
    x = {
        "q": rnd(total, H, D).bfloat16(),
        "k": rnd(total, H, D).bfloat16(),
        "v": rnd(total, H, D).bfloat16(),
        "f": rnd(total, H, D).bfloat16(),
        "beta": rnd(total, H).bfloat16(),
        "a_log": torch.log(1 + 15 * torch.rand(H, generator=g, device=dev)),
        "dt_bias": rnd(H * D),
        "cu_seqlens": torch.arange(0, total + 1, seqlen, device=dev, dtype=torch.int32),
        "max_seqlen": seqlen,
        "h0": 0.1 * rnd(batch, H, D, D),
    }
    return x


def fla_chunk(fla_mod, x, batch, seqlen, h0):
    shape = (batch, seqlen, H, D)
    return fla_mod.chunk_kda(
        q=x["q"].view(shape), k=x["k"].view(shape), v=x["v"].view(shape), g=x["f"].view(shape),
        beta=x["beta"].view(batch, seqlen, H), scale=D ** -0.5, initial_state=h0,
        output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
        use_beta_sigmoid_in_kernel=True, A_log=x["a_log"], dt_bias=x["dt_bias"])


def fla_decode(fla_rec, x, batch, pool, slots, out):
    shape = (batch, 1, H, D)
    return fla_rec.fused_recurrent_kda_fwd(
        q=x["q"].view(shape), k=x["k"].view(shape), v=x["v"].view(shape), g=x["f"].view(shape),
        beta=x["beta"].view(batch, 1, H), A_log=x["a_log"], dt_bias=x["dt_bias"],
        initial_state=pool, scale=D ** -0.5, output_final_state=False, inplace_final_state=True,
        ssm_state_indices=slots, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
        use_beta_sigmoid_in_kernel=True, out=out.view(shape))


def reference_fp64(x, seqlen):
    """The recurrence of KIMI_LINEAR.md §3.6 in fp64 on the CPU, one sequence (B = 1)."""
    q, k, v, f = (x[n].double().cpu() for n in ("q", "k", "v", "f"))
    beta = torch.sigmoid(x["beta"].double().cpu())
    a_log, dt_bias = x["a_log"].double().cpu(), x["dt_bias"].double().cpu().view(H, D)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) * D ** -0.5
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    xg = f + dt_bias
    g = -torch.exp(a_log)[:, None] * torch.where(xg > 20, xg, torch.log1p(torch.exp(xg)))
    s = x["h0"][0].double().cpu().clone()  # [H, K, V]
    out = torch.empty(seqlen, H, D, dtype=torch.float64)
    for t in range(seqlen):
        s = s * torch.exp(g[t])[:, :, None]
        pred = torch.einsum("hkv,hk->hv", s, k[t])
        delta = beta[t][:, None] * (v[t] - pred)
        s = s + k[t][:, :, None] * delta[:, None, :]
        out[t] = torch.einsum("hkv,hk->hv", s, q[t])
    return out, s


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

TABLE_COLUMNS = [("case", "<24"), ("impl", "<6"), ("time", ">12"), ("rate", ">14"),
                 ("speedup vs fla", ">15")]


def table_cells(r):
    """The table line of record r (bench_util.print_table), None for records not shown."""
    if "ms" in r or "us" in r:
        rate = (f"{r['mtok_s']:.2f} Mtok/s" if "mtok_s" in r else
                f"{r['tb_s']:.3f} TB/s" if "tb_s" in r else f"{r['tflop_s']:.0f} TFLOP/s")
        sp = f"{r['speedup_vs_fla']:.2f}x" if "speedup_vs_fla" in r else ""
        return [r["case"], r["impl"], time_cell(r), rate, sp]
    if "out_rel_rms" in r:
        return [r["case"], r["impl"], f"out rel RMS {r['out_rel_rms']:.2e}, "
                f"state {r['state_rel_rms']:.2e} (vs fp64)"]
    if r.get("status") == "mismatch":
        return [r["case"], r["impl"], f"MISMATCH vs fla: out "
                f"{r['out_rel_rms_vs_fla']:.2e}, state {r['state_rel_rms_vs_fla']:.2e}"]
    return None


def main():
    args, wanted = parse_args(__doc__, "kda", "ceilings,reference,prefill,decode")

    torch.backends.cuda.matmul.allow_tf32 = False
    info = device_info()
    log = ResultsLog("kda", args.results_dir, info)
    emit = log.emit

    print(json.dumps(info))
    emit({"case": "device", **info})
    ours = KlsKda(args.lib)
    # fla's FlashKDA backend (if its package were installed) only runs the bounded gate; the
    # exact gate is the Triton path.
    os.environ["FLA_FLASH_KDA"] = "0"
    import fla
    import fla.ops.kda as fla_kda
    import fla.ops.kda.fused_recurrent as fla_rec
    emit({"case": "versions", "fla": getattr(fla, "__version__", "?"), "torch": torch.__version__})

    torch.set_grad_enabled(False)

    if "ceilings" in wanted:
        measure_ceilings(emit)

    if "reference" in wanted:
        seqlen = 256
        x = make_inputs(1, seqlen, seed=7)
        ref_out, ref_state = reference_fp64(x, seqlen)
        pool = x["h0"].clone()
        out = torch.empty_like(x["v"])
        slots = torch.zeros(1, dtype=torch.int32, device="cuda")
        ws = torch.empty(ours.workspace_bytes(1, seqlen, H, D), dtype=torch.uint8, device="cuda")
        ours.chunk(x, pool, slots, out, ws)
        o_fla, s_fla = fla_chunk(fla_kda, x, 1, seqlen, x["h0"].clone())
        torch.cuda.synchronize()
        for impl, o, s in (("kls", out, pool[0]), ("fla", o_fla.view(seqlen, H, D), s_fla[0])):
            emit({"case": "reference_fp64_T256", "impl": impl,
                  "out_rel_rms": rel_rms(o.cpu(), ref_out), "state_rel_rms": rel_rms(s.cpu(),
                                                                                    ref_state)})

    if "prefill" in wanted:
        shapes = [(1, 8192), (1, 32768), (1, 131072), (8, 4096)]
        if args.quick:
            shapes = [(1, 4096), (2, 2048)]
        for batch, seqlen in shapes:
            name = f"prefill_B{batch}_T{seqlen}"
            x = make_inputs(batch, seqlen, seed=batch * 1000003 + seqlen)
            total = batch * seqlen
            slots = torch.arange(batch, dtype=torch.int32, device="cuda")
            ws = torch.empty(ours.workspace_bytes(batch, total, H, D), dtype=torch.uint8,
                             device="cuda")
            o_fla, s_fla = fla_chunk(fla_kda, x, batch, seqlen, x["h0"].clone())
            out = torch.empty_like(x["v"])
            calls = max(1, min(8, int(65536 // total)))
            timed = {}
            # The launcher's own choice of state tile (0), then both widths forced: the sweep
            # that tunes that choice (kernels/kda/kda_chunk_tuning.h).
            for tile in (0, 32, 64):
                impl = "kls" if tile == 0 else f"kls_bv{tile}"
                pool = x["h0"].clone()
                ours.chunk(x, pool, slots, out, ws, tile)
                torch.cuda.synchronize()
                check = {"out_rel_rms_vs_fla": rel_rms(out.view(batch, seqlen, H, D), o_fla),
                         "state_rel_rms_vs_fla": rel_rms(pool, s_fla)}
                if not (check["out_rel_rms_vs_fla"] < RMS_BOUND and
                        check["state_rel_rms_vs_fla"] < RMS_BOUND):
                    emit({"case": name, "impl": impl, "status": "mismatch", **check})
                    print(f"{name} {impl}: kls and fla disagree ({check}); not timed",
                          file=sys.stderr)
                    continue
                t, mode = time_graph(
                    lambda i, tile=tile, pool=pool: ours.chunk(x, pool, slots, out, ws, tile),
                    calls)
                timed[impl] = (t, mode, check)
            del o_fla, s_fla
            if timed:
                h0 = x["h0"]
                t_fla, mode_f = time_graph(lambda i: fla_chunk(fla_kda, x, batch, seqlen, h0),
                                           calls)
                timed["fla"] = (t_fla, mode_f, {})
                for impl, (t, mode, check) in timed.items():
                    emit({"case": name, "impl": impl, "ms": t * 1e3, "mtok_s": total / t / 1e6,
                          "mode": mode, "calls_per_graph": calls, "speedup_vs_fla": t_fla / t,
                          **check})
            del x, ws, pool, out
            torch.cuda.empty_cache()

    if "decode" in wanted:
        for batch in ([1, 8] if args.quick else [1, 8, 64, 256]):
            name = f"decode_B{batch}"
            rotations = max(2, math.ceil((256 << 20) / (batch * STATE_BYTES)))
            x = make_inputs(batch, 1, seed=batch + 17)
            pool_ours = 0.1 * torch.randn(rotations * batch, H, D, D, device="cuda")
            pool_fla = pool_ours.clone()
            slot_sets = [torch.arange(r * batch, (r + 1) * batch, dtype=torch.int32,
                                      device="cuda") for r in range(rotations)]
            out_ours, out_fla = torch.empty_like(x["v"]), torch.empty_like(x["v"])
            ours.recurrent(x, pool_ours, slot_sets[0], out_ours)
            fla_decode(fla_rec, x, batch, pool_fla, slot_sets[0], out_fla)
            torch.cuda.synchronize()
            err_o = rel_rms(out_ours, out_fla)
            err_s = rel_rms(pool_ours[:batch], pool_fla[:batch])
            check = {"out_rel_rms_vs_fla": err_o, "state_rel_rms_vs_fla": err_s}
            if not (err_o < RMS_BOUND and err_s < RMS_BOUND):
                emit({"case": name, "impl": "kls", "status": "mismatch", **check})
                print(f"{name}: kls and fla disagree ({check}); not timed", file=sys.stderr)
                continue
            calls = rotations * max(1, 256 // rotations) if batch < 64 else rotations * 4
            t_ours, mode_o = time_graph(
                lambda i: ours.recurrent(x, pool_ours, slot_sets[i % rotations], out_ours), calls)
            t_fla, mode_f = time_graph(
                lambda i: fla_decode(fla_rec, x, batch, pool_fla, slot_sets[i % rotations],
                                     out_fla), calls)
            # The floor for these exact bytes: a plain copy of the same rotated state slices
            # (read batch states, write batch states), captured the same way.
            pool_copy = torch.empty_like(pool_ours)
            t_copy, mode_c = time_graph(
                lambda i: pool_copy[(i % rotations) * batch:(i % rotations + 1) * batch].copy_(
                    pool_ours[(i % rotations) * batch:(i % rotations + 1) * batch]), calls)
            del pool_copy
            moved = 2 * batch * STATE_BYTES
            emit({"case": name, "impl": "copy", "us": t_copy * 1e6, "tb_s": moved / t_copy / 1e12,
                  "mode": mode_c, "calls_per_graph": calls})
            for impl, t, mode in (("kls", t_ours, mode_o), ("fla", t_fla, mode_f)):
                emit({"case": name, "impl": impl, "us": t * 1e6, "tb_s": moved / t / 1e12,
                      "mode": mode, "calls_per_graph": calls, "rotated_state_mib":
                      rotations * batch * STATE_BYTES >> 20, "speedup_vs_fla": t_fla / t,
                      "fraction_of_same_bytes_copy": t_copy / t, **check})
            del pool_ours, pool_fla
            torch.cuda.empty_cache()

    log.report(TABLE_COLUMNS, table_cells)


if __name__ == "__main__":
    main()
