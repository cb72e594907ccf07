"""pypto's cost-model estimate of the pypto kernel's NPU time, next to the upstream figures
(docs/contract.md, section 6).

    python benchmarks/bench_pypto_costmodel.py                  # Qwen3-14B: B=16, ctx 4096, block 128, bf16
    python benchmarks/bench_pypto_costmodel.py -B 2 --ctx 512   # a quick one
    python benchmarks/bench_pypto_costmodel.py --kv-blocks-per-task 8 --tag kvb8

THIS IS A COST-MODEL ESTIMATE, NOT A MEASUREMENT. Without an NPU, pypto 0.2.0's SIM run mode
compiles the kernel exactly as for the NPU (same passes, same task graph, same tiles) and then runs
its cost model, which simulates the task schedule on an Ascend a2/a3 part (24 AIC + 48 AIV cores)
from per-op cycle estimates. It computes no numbers and times nothing real; treat the result as a
guide to parallelism and tiling, not as a kernel time.

Where the figure comes from: pypto's swim-lane post-processing (lib/scripts/draw_swim_lane.py)
prints "AICore End-to-End Time" (last task end - first task start, in cycles of its trace) for
small runs; above its drawing threshold (as at B=16 ctx 4096) pypto skips that step, and this
script runs pypto's own draw_swim_lane.py on the run's swim-lane files to recover it. Cycles / 1800
= microseconds at the script's default 1.8 GHz (its trans_cycles_to_time).

Upstream figures (docs/contract.md, section 6; Ascend 910B, bf16, batch 16, ctx 4096): the upstream pypto-lib
fused kernel ~1263 us on-core; CANN's hand-written kernel ~548 us.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch


from benchmarks import common  # noqa: E402

import torch_qwen_fused  # noqa: E402
from torch_qwen_fused.backends.pypto import compat as pypto_compat  # noqa: E402
from torch_qwen_fused.backends.pypto.replay import kernel_config, prepare  # noqa: E402
from torch_qwen_fused.backends.pypto.kernel import RUNTIME_OPTIONS, KernelTiles, build_kernel  # noqa: E402

UPSTREAM_PYPTO_US = 1263.0
CANN_US = 548.0
CYCLES_PER_US = 1800.0  # draw_swim_lane.py's freq_convert (1.8 GHz)


def make_inputs(batch, ctx, num_heads, num_kv_heads, head_dim, block_size, dtype):
    """Shapes of one decode step (values are irrelevant to the cost model: zeros, a shuffled block table)."""
    blocks_per_row = -(-ctx // block_size)
    num_blocks = batch * blocks_per_row
    gen = torch.Generator().manual_seed(0)
    q = torch.zeros(batch, num_heads, head_dim, dtype=dtype)
    k = torch.zeros(batch, num_kv_heads, head_dim, dtype=dtype)
    v = torch.zeros_like(k)
    w = torch.ones(head_dim)
    cos, sin = torch_qwen_fused.rope_cos_sin(ctx, head_dim)
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    block_table = torch.randperm(num_blocks, generator=gen).reshape(batch, blocks_per_row).int()
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32)
    return (q, k, v, w, w, cos, sin, k_cache, v_cache, block_table, seq_lens, None, None)


def _summary_from_text(text):
    found = {}
    for key, pattern in (("end_to_end", r"AICore End-to-End Time:\s*([0-9.]+)"),
                         ("utilization_percent", r"AICore Utilization:\s*([0-9.]+)%"),
                         ("total_cores", r"Total Core:\s*(\d+)"),
                         ("total_tasks", r"Total Task Count:\s*(\d+)")):
        matches = re.findall(pattern, text)
        if matches:
            found[key] = float(matches[-1])
    return found


def swim_lane_summary(output_root: str, console: str, force_script: bool = False) -> dict:
    """The cost model's end-to-end time in us: from pypto's console, else from its draw_swim_lane.py.

    pypto runs ``draw_swim_lane.py <swim> <topo> <program.json> --label_type=1
    --time_convert_denominator=1800`` after a SIM run (cycles / 1800 = us) unless the run is above
    its drawing threshold; then this runs the same script, the same way, on the run's files.
    """
    summary = _summary_from_text(console)
    if "end_to_end" in summary and not force_script:
        summary["source"] = "pypto's console (its draw_swim_lane.py summary)"
        return summary
    sim_dirs = sorted(glob.glob(os.path.join(output_root, "**", "CostModelSimulationOutput"), recursive=True))
    if not sim_dirs:
        raise RuntimeError(f"no CostModelSimulationOutput under {output_root}")
    sim = sim_dirs[-1]
    run_dir = os.path.dirname(sim)
    swim = os.path.join(sim, "_simulate.swim.json")
    topo = os.path.join(run_dir, "dyn_topo.txt")
    program = os.path.join(run_dir, "program.json")
    for path in (swim, topo, program):
        if not os.path.exists(path):
            raise RuntimeError(f"pypto's cost-model run left no {path}")
    script = Path(pypto_compat.import_pypto().__file__).parent / "lib" / "scripts" / "draw_swim_lane.py"
    cmd = [sys.executable, str(script), swim, topo, program, "--label_type=1",
           f"--time_convert_denominator={int(CYCLES_PER_US)}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=sim)
    found = _summary_from_text(result.stdout + result.stderr)
    if "end_to_end" not in found:
        raise RuntimeError(f"draw_swim_lane.py gave no summary: {' '.join(cmd)}\n{result.stdout[-3000:]}\n"
                           f"{result.stderr[-3000:]}")
    summary.update(found)
    summary["source"] = "pypto's lib/scripts/draw_swim_lane.py, run on the run's swim-lane output"
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-B", "--batch", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=4096, help="context length of every row (new token included)")
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    parser.add_argument("--kv-blocks-per-task", type=int, default=KernelTiles().kv_blocks_per_task)
    parser.add_argument("--force-script", action="store_true",
                        help="run draw_swim_lane.py even when pypto printed its summary (a cross-check)")
    parser.add_argument("--keep-output", default=None, help="copy pypto's output dir here (for inspection)")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--out", default=None,
                        help="results JSON (default benchmarks/results/bench_pypto_costmodel[_tag].json)")
    args = parser.parse_args()

    dtype = common.DTYPES[args.dtype]
    inputs = make_inputs(args.batch, args.ctx, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype)
    tiles = KernelTiles(kv_blocks_per_task=args.kv_blocks_per_task)
    config = kernel_config(inputs[0], inputs[1], inputs[7], 1e-6, None, tiles)
    kernel_args = prepare(*inputs)
    print(f"compiling the pypto kernel for B={args.batch} ctx={args.ctx} Hq={args.heads} Hkv={args.kv_heads} "
          f"D={args.head_dim} block={args.block_size} {args.dtype} in SIM mode (cost model)...", file=sys.stderr)
    pypto_compat.import_pypto()
    kernel = build_kernel(config, "sim")
    with pypto_compat.sandbox() as tmp:
        start = time.perf_counter()
        with pypto_compat.captured_output(tmp) as console_path:
            kernel(*kernel_args)
        wall_s = time.perf_counter() - start
        with open(console_path, errors="replace") as f:
            console = f.read()
        summary = swim_lane_summary(os.path.join(tmp, "output"), console, args.force_script)
        if args.keep_output:
            import shutil

            shutil.copytree(os.path.join(tmp, "output"), args.keep_output, dirs_exist_ok=True)

    estimate_us = summary["end_to_end"]
    record = {
        "what": "pypto 0.2.0 cost-model ESTIMATE of the pypto kernel's on-core time (SIM mode, no NPU); "
                "not a measurement",
        "shape": {"batch": args.batch, "ctx": args.ctx, "num_heads": args.heads, "num_kv_heads": args.kv_heads,
                  "head_dim": args.head_dim, "block_size": args.block_size, "dtype": args.dtype},
        "tiles": vars(tiles) if hasattr(tiles, "__dict__") else str(tiles),
        "runtime_options": dict(RUNTIME_OPTIONS),
        "estimate_us": estimate_us,
        "end_to_end_cycles": estimate_us * CYCLES_PER_US,
        "cycles_per_us": CYCLES_PER_US,
        "aicore_utilization_percent": summary.get("utilization_percent"),
        "total_tasks": summary.get("total_tasks"),
        "total_cores": summary.get("total_cores"),
        "figure_source": summary["source"],
        "upstream_pypto_us": UPSTREAM_PYPTO_US,
        "cann_us": CANN_US,
        "ratio_to_upstream_pypto": estimate_us / UPSTREAM_PYPTO_US,
        "ratio_to_cann": estimate_us / CANN_US,
        "compile_and_simulate_wall_s": wall_s,
        "environment": dict(common.environment(), pypto=pypto_compat.pypto_version()),
    }
    name = "bench_pypto_costmodel" + (f"_{args.tag}" if args.tag else "") + ".json"
    path = common.write_json(Path(args.out) if args.out else common.RESULTS_DIR / name, record)
    print(common.format_table([
        {"kernel": "this pypto kernel (cost-model estimate)", "us": f"{estimate_us:.0f}",
         "vs upstream pypto": f"{estimate_us / UPSTREAM_PYPTO_US:.2f}x", "vs CANN": f"{estimate_us / CANN_US:.2f}x"},
        {"kernel": "upstream pypto-lib fa_fused (910B, measured)", "us": f"{UPSTREAM_PYPTO_US:.0f}",
         "vs upstream pypto": "1.00x", "vs CANN": f"{UPSTREAM_PYPTO_US / CANN_US:.2f}x"},
        {"kernel": "CANN hand-written (910B, measured)", "us": f"{CANN_US:.0f}",
         "vs upstream pypto": f"{CANN_US / UPSTREAM_PYPTO_US:.2f}x", "vs CANN": "1.00x"},
    ], ["kernel", "us", "vs upstream pypto", "vs CANN"]))
    print(f"cost-model estimate (not a measurement): {estimate_us:.1f} us "
          f"({estimate_us * CYCLES_PER_US:.0f} cycles / {CYCLES_PER_US:.0f}), AICore utilization "
          f"{summary.get('utilization_percent')}%, {summary.get('total_tasks')} tasks; source: {summary['source']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
