"""What the GPU benchmark scripts (bench/kda_bench.py, mla_bench.py, moe_bench.py) share: the
command line, the card / driver / clock record, the copy and GEMM ceilings, CUDA-event timing
(eager and CUDA-graph), the JSON-lines results file and the closing table (PERFORMANCE.md §1).

The scripts import it from their own directory; nothing here depends on a particular kernel.
"""

import argparse
import ctypes
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

import torch


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(doc, name, cases, quick_help="small shapes only (smoke test)", extra=()):
    """Parses --lib (path to lib<name>_bench.so, required), --results-dir, --cases (a
    comma-separated subset of `cases`, all of them by default), --quick and the boolean flags
    `extra` ((flag, help) pairs); the description is the first line of `doc`. Returns (args, the
    set of wanted case names); exits with usage on bad arguments (argparse)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--lib", required=True, help=f"path to lib{name}_bench.so")
    ap.add_argument("--results-dir", default="bench/results")
    ap.add_argument("--cases", default=cases, help=f"comma-separated subset of {cases}")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    for flag, help_text in extra:
        ap.add_argument(flag, action="store_true", help=help_text)
    args = ap.parse_args()
    return args, set(args.cases.split(","))


# ----------------------------------------------------------------------------------------------
# Library
# ----------------------------------------------------------------------------------------------

def ptr(t):
    """A tensor's device address as a void* argument; None (NULL) for None."""
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


class CudaLib:
    """Base of the ctypes wrappers of bench/<name>_bench_lib.cu: loads the library (whose
    functions return cudaError_t) and turns errors into exceptions. Launches go on torch's
    current stream. Not thread-safe (the scripts are single-threaded)."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(os.path.abspath(path))
        self.lib.kls_cuda_error_string.argtypes = [ctypes.c_int]
        self.lib.kls_cuda_error_string.restype = ctypes.c_char_p

    def _check(self, err, what):
        """Returns if err is cudaSuccess (0); raises RuntimeError naming `what` and the error."""
        if err != 0:
            raise RuntimeError(f"{what}: {self.lib.kls_cuda_error_string(err).decode()}")

    @staticmethod
    def _stream():
        """torch's current CUDA stream as a cudaStream_t argument."""
        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


# ----------------------------------------------------------------------------------------------
# Checks and timing
# ----------------------------------------------------------------------------------------------

def rel_rms(actual, expected):
    """‖actual − expected‖₂ / ‖expected‖₂, computed in fp64 (tensors of the same shape)."""
    a, e = actual.double(), expected.double()
    return math.sqrt(((a - e) ** 2).sum().item() / max((e ** 2).sum().item(), 1e-300))


def time_eager(fn, warmup=10, iters=50):
    """Median seconds of fn() over `iters` CUDA-event-timed runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_graph(step, calls, warmup=10, iters=50, prewarm=3):
    """Median seconds per call of `step(i)` (i = 0..calls-1) captured `calls` times into one CUDA
    graph, timed as time_eager times the graph's replay; returns (seconds, "graph"), or
    (seconds, "eager") timing plain launches if capture fails (reported on stderr). The first
    min(calls, prewarm) steps run before the capture."""
    for i in range(min(calls, prewarm)):  # autotuning and lazy loading outside the capture
        step(i)
    torch.cuda.synchronize()
    mode = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                step(i)
        run = graph.replay
    except Exception as e:  # noqa: BLE001 - report and measure eagerly instead
        print(f"  graph capture failed ({type(e).__name__}: {e}); timing eager launches",
              file=sys.stderr)
        torch.cuda.synchronize()
        mode = "eager"

        def run():
            for i in range(calls):
                step(i)
    return time_eager(run, warmup, iters) / calls, mode


# ----------------------------------------------------------------------------------------------
# Card and ceilings
# ----------------------------------------------------------------------------------------------

def device_info():
    """Card name, SM count, memory, torch version and (when nvidia-smi answers) the driver
    version and current / max SM and memory clocks of device 0. Never fails on nvidia-smi."""
    props = torch.cuda.get_device_properties(0)
    info = {"card": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "torch": torch.__version__}
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _copy_seconds(n):
    """Median seconds of one n-byte device-to-device copy (the buffers die on return)."""
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    return time_eager(lambda: dst.copy_(src))


def _gemm_seconds(n):
    """Median seconds of one [n, n] × [n, n] bf16 matmul (the buffers die on return)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return time_eager(lambda: torch.matmul(a, b))


def measure_ceilings(emit, gemm_impl="torch"):
    """Times the 1 GiB device-to-device copy and the 8192³ bf16 GEMM, emits one record each
    (cases ceiling_copy_1GiB and ceiling_gemm_8192, the GEMM's impl named `gemm_impl`) and
    returns {"copy_tb_s": ..., "gemm_tflop_s": ...}. Leaves the freed buffers in torch's cache:
    callers that want them back call torch.cuda.empty_cache()."""
    n = 1 << 30
    t = _copy_seconds(n)
    copy_tb_s = 2 * n / t / 1e12  # read + write
    emit({"case": "ceiling_copy_1GiB", "impl": "torch", "ms": t * 1e3, "tb_s": copy_tb_s})
    t = _gemm_seconds(8192)
    gemm_tflop_s = 2 * 8192 ** 3 / t / 1e12
    emit({"case": "ceiling_gemm_8192", "impl": gemm_impl, "ms": t * 1e3,
          "tflop_s": gemm_tflop_s})
    return {"copy_tb_s": copy_tb_s, "gemm_tflop_s": gemm_tflop_s}


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

class ResultsLog:
    """Appends one JSON line per record to <results_dir>/<bench>_<card>.jsonl (card: the card
    name with runs of other characters than [A-Za-z0-9] as "_"), each line led by the bench
    name, the run id (the start time, %Y%m%dT%H%M%S) and the card name, and keeps the records
    for the closing table. Not thread-safe."""

    def __init__(self, bench, results_dir, info, echo=False):
        """info: device_info(). echo: also print each record as it is written. Creates
        results_dir if missing (raises OSError if it cannot)."""
        self.bench, self.info, self.echo = bench, info, echo
        card = re.sub(r"[^A-Za-z0-9]+", "_", info["card"]).strip("_")
        self.run_id = time.strftime("%Y%m%dT%H%M%S")
        os.makedirs(results_dir, exist_ok=True)
        self.path = os.path.join(results_dir, f"{bench}_{card}.jsonl")
        self.rows = []

    def emit(self, record):
        """Writes `record` (a JSON-serializable dict, "case" first) as one line; raises OSError
        if the file cannot be written."""
        record = {"bench": self.bench, "run": self.run_id, "card": self.info["card"], **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.rows.append(record)
        if self.echo:
            print(json.dumps(record), flush=True)

    def report(self, columns, cells, note=""):
        """Prints where the records went (`note` appended to that line), then print_table of
        every record of this run."""
        print(f"\nresults appended to {self.path} (run {self.run_id}){note}")
        print_table(self.rows, columns, cells)


def time_cell(r, us_digits=2):
    """A record's time for the table: its "ms" to 3 decimals, else its "us"."""
    return f"{r['ms']:.3f} ms" if "ms" in r else f"{r['us']:.{us_digits}f} us"


def print_table(rows, columns, cells):
    """Prints a header of `columns` ((title, format spec) pairs, e.g. ("case", "<24")), then one
    line per row that cells(row) turns into a list of strings: one per column, each padded by
    its column's spec, or fewer, the last of which is free text printed unpadded. cells returns
    None for rows left out of the table."""
    print(" ".join(format(title, spec) for title, spec in columns))
    for r in rows:
        c = cells(r)
        if c is None:
            continue
        if len(c) == len(columns):
            print(" ".join(format(v, spec) for v, (_, spec) in zip(c, columns)))
        else:
            print(" ".join([format(v, spec) for v, (_, spec) in zip(c[:-1], columns)] + [c[-1]]))
