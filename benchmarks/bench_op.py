"""Benchmark one decode step of ``torch.ops.qwen.fa_fused`` on the CPU against the alternatives.

    python benchmarks/bench_op.py                  # the full grid (long: run on a quiet machine)
    python benchmarks/bench_op.py --quick          # smoke run: B=1, L=512, bf16, block 128, 3 reps
    python benchmarks/bench_op.py -B 16 -L 4096 --dtypes bf16 --blocks 128   # one shape
    python benchmarks/bench_op.py --dtypes bf16,fp8e4m3,fp8e5m2 --blocks 128   # fp8 caches vs bf16
    python benchmarks/plot.py benchmarks/results/bench_op.json                # redraw the PNG

Methods, all doing the same math on the same data (qk-norm + RoPE of the new token in fp32, the
write of its K/V into the cache, GQA attention of one query token over L cached tokens):

  fused        torch.ops.qwen.fa_fused on the paged cache (the C++ kernel, cache write included).
  eager        torch_qwen_fused.fa_fused(..., backend="eager"): the pure-PyTorch fallback
               (validation, gather, fp32 einsum softmax).
  gather_sdpa  reference.rms_norm/apply_rope in fp32, reference.write_cache, then k_cache[block_table]
               gathers each row's blocks into one contiguous [B, L, Hkv, D] buffer per cache, viewed
               (no copy) as [B, Hkv, L, D] for F.scaled_dot_product_attention(enable_gqa=True) with q
               [B, Hq, 1, D], all in the cache dtype. (SDPA's CPU flash kernel takes that strided
               view as is; a .contiguous() would only add a second copy.)
  contig_sdpa  the same norm/rope, a slice-assignment write and SDPA on an unpaged contiguous
               [B, Hkv, L, D] cache: what paging costs the SDPA path.
  floor        a streaming read of the same K and V bytes (B*L*Hkv*D elements each, cache dtype,
               contiguous): the memory-bandwidth floor of any kernel that reads the context once.
               Several readers are timed side by side (floor[sum], floor[int32-sum],
               floor[int32-amax], floor[cpp]: a C++ loop, benchmarks/stream_read.py; see
               FLOOR_READERS); "floor" is the fastest one for that shape.

dtypes: bf16, fp32, fp16 (q, k, v and the cache); fp8e4m3 / fp8e5m2: q, k, v in bf16 over a float8_e4m3fn /
float8_e5m2 cache with k_scale / v_scale (half bf16's bytes). fp8 rows run fused, eager and floor (SDPA has
no fp8 inputs); the table gives their time over the bf16 row of the same shape (fp8/bf16).

Timing: per shape, every rep calls every method once, the order rotating each rep, so ratios are
measured side by side; median, min and max over --reps timed reps after --warmup untimed rounds.
Before timing, each shape checks the fused output against every other method (a benchmark never
times a wrong kernel). Peak extra memory: one more call per method under torch.profiler.

Output: benchmarks/results/bench_op.json (bench_op_quick.json with --quick) with the machine, the
library versions, the commit and the timestamp, rewritten after every shape; then the PNG via
plot.py; then a table of medians and ratios on stdout.
"""

import argparse
import gc
import math
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from benchmarks import common, plot  # noqa: E402
from benchmarks.stream_read import stream_read  # noqa: E402

import torch_qwen_fused  # noqa: E402
from torch_qwen_fused import paged  # noqa: E402
from torch_qwen_fused.backends import eager as reference  # noqa: E402

MAIN_METHODS = ("fused", "eager", "gather_sdpa", "contig_sdpa", "floor")
ROPE_THETA = 1e6
EPS = 1e-6

# Streaming readers for the floor. Each reads every byte of its tensor once, allocates nothing
# but its scalar result (the peak-memory column shows it) and returns that scalar.
# "sum" in the cache dtype accumulates in fp32 (a bf16 -> fp32 conversion per element, which may
# make it compute-bound); the int32 views reduce the same bytes as integers with no conversion.
# Not t.view(torch.int32).sum(): without dtype=int32 it first copies the tensor to int64 (checked:
# 16x slower, 2x the tensor's bytes allocated).
FLOOR_READERS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sum": lambda t: t.sum(),
    "int32-sum": lambda t: t.view(torch.int32).sum(dtype=torch.int32),
    "int32-amax": lambda t: t.view(torch.int32).amax(),
    "cpp": stream_read,
}
# fp8 cache dtypes (q, k and v stay bf16, as in a bf16 model with an fp8 KV cache), with the scales they use.
FP8_CACHES = {"fp8e4m3": torch.float8_e4m3fn, "fp8e5m2": torch.float8_e5m2}
FP8_SCALES = (0.5, 0.25)  # k_scale, v_scale: not 1, so that a scale left out would show in the checks
SDPA_METHODS = ("gather_sdpa", "contig_sdpa")

# Fused vs each other method: |a - b| <= atol + rtol * |b| (docs/contract.md, section 4; the SDPA methods round
# q to the cache dtype and accumulate in another order, hence a looser fp32 bound for them).
TOLERANCES = {
    torch.float32: {"eager": (1e-5, 1e-5), "sdpa": (1e-4, 1e-4)},
    torch.bfloat16: {"eager": (2e-2, 5e-3), "sdpa": (2e-2, 5e-3)},
    torch.float16: {"eager": (2e-2, 5e-3), "sdpa": (2e-2, 5e-3)},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("-B", "--batches", type=common.int_list, default=[1, 4, 16], help="batch sizes (1,4,16)")
    parser.add_argument("-L", "--contexts", type=common.int_list, default=[512, 2048, 8192],
                        help="context lengths incl. the new token (512,2048,8192)")
    parser.add_argument("--dtypes", type=common.name_list(tuple(common.DTYPES) + tuple(FP8_CACHES)),
                        default=["bf16", "fp32", "fp8e4m3", "fp8e5m2"],
                        help="q and cache dtypes (bf16,fp32,fp8e4m3,fp8e5m2; fp16 also accepted; fp8: bf16 q "
                             "over an fp8 cache)")
    parser.add_argument("--blocks", type=common.int_list, default=[16, 128], help="cache block sizes (16,128)")
    parser.add_argument("--heads", type=int, default=40, help="query heads (Qwen3-14B: 40)")
    parser.add_argument("--kv-heads", type=int, default=8, help="kv heads (Qwen3-14B: 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim (Qwen3: 128)")
    parser.add_argument("--methods", type=common.name_list(MAIN_METHODS), default=list(MAIN_METHODS),
                        help=f"subset of {','.join(MAIN_METHODS)} (fused is always run: it is the reference "
                             f"of the checks and the ratios)")
    parser.add_argument("--reps", type=int, default=15, help="timed reps per method and shape (15; >= 10 "
                                                            "for a result worth quoting)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before the reps (2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    # In a model, the other layers' weights and caches pass through the caches between two calls of
    # one layer's attention: its K/V always comes from DRAM. Without the flush, shapes whose K/V fit
    # in the last-level cache would time cache reads (and one method would warm it for the next).
    parser.add_argument("--flush-cache-mib", type=int, default=None,
                        help="write a buffer of this many MiB before every timed call to start from a "
                             "cold last-level cache (default: twice this machine's last-level cache; 0: off)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory profiling calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: B=1, L=512, bf16, block 128, 3 reps, 1 warm-up (unless given)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="results JSON (default benchmarks/results/bench_op.json, "
                             "bench_op_quick.json with --quick); the PNG goes next to it")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")
    args = parser.parse_args(argv)
    if args.quick:
        given = set(arg.split("=")[0] for arg in (argv if argv is not None else sys.argv[1:]))
        defaults = {("-B", "--batches"): ("batches", [1]), ("-L", "--contexts"): ("contexts", [512]),
                    ("--dtypes",): ("dtypes", ["bf16"]), ("--blocks",): ("blocks", [128]),
                    ("--reps",): ("reps", 3), ("--warmup",): ("warmup", 1)}
        for flags, (name, value) in defaults.items():
            if not given.intersection(flags):
                setattr(args, name, value)
    if "fused" not in args.methods:
        args.methods = ["fused"] + args.methods
    if args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    if args.output is None:
        args.output = common.RESULTS_DIR / ("bench_op_quick.json" if args.quick else "bench_op.json")
    return args


class Shape:
    """The inputs of one decode step and the methods that run it, for one (B, L, dtype, block)."""

    def __init__(self, batch: int, context: int, dtype_name: str, block: int, heads: int, kv_heads: int,
                 head_dim: int, seed: int):
        self.batch, self.context, self.dtype_name, self.block = batch, context, dtype_name, block
        dtype = self.dtype = torch.bfloat16 if dtype_name in FP8_CACHES else common.DTYPES[dtype_name]
        self.cache_dtype = FP8_CACHES.get(dtype_name, dtype)
        self.fp8 = dtype_name in FP8_CACHES
        self.scales = ({"k_scale": torch.tensor([FP8_SCALES[0]]), "v_scale": torch.tensor([FP8_SCALES[1]])}
                       if self.fp8 else {})
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)

        self.q = randn(batch, heads, head_dim)
        self.k = randn(batch, kv_heads, head_dim)
        self.v = randn(batch, kv_heads, head_dim)
        self.q_norm_weight = (1 + 0.1 * torch.randn(head_dim, generator=gen)).to(dtype)
        self.k_norm_weight = (1 + 0.1 * torch.randn(head_dim, generator=gen)).to(dtype)
        self.cos, self.sin = torch_qwen_fused.rope_cos_sin(context, head_dim, ROPE_THETA)
        self.scale = 1.0 / math.sqrt(head_dim)

        # Paged cache: each row's ceil(L / block) blocks at shuffled physical ids, plus spare blocks.
        blocks_per_row = -(-context // block)
        num_blocks = batch * blocks_per_row + max(1, batch // 2)
        self.block_table = (torch.randperm(num_blocks, generator=gen)[:batch * blocks_per_row]
                            .view(batch, blocks_per_row).to(torch.int32))
        self.k_cache = randn(num_blocks, block, kv_heads, head_dim).to(self.cache_dtype)
        self.v_cache = randn(num_blocks, block, kv_heads, head_dim).to(self.cache_dtype)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32)
        self.positions = paged.default_positions(self.seq_lens)
        self.slot_mapping = paged.default_slot_mapping(self.block_table, self.seq_lens, block)
        self.table_long = self.block_table.long()

        # The unpaged cache holds the same tokens, [B, Hkv, L, D]; the floor reads these bytes.
        self.k_contig = self._gather(self.k_cache).transpose(1, 2).contiguous()
        self.v_contig = self._gather(self.v_cache).transpose(1, 2).contiguous()
        self.kv_bytes = 2 * batch * context * kv_heads * head_dim * self.k_cache.element_size()

    def _gather(self, cache: torch.Tensor) -> torch.Tensor:
        """Each row's blocks, in order, as one contiguous [B, L, Hkv, D] tensor (fp8 indexed as its bytes)."""
        data = cache.view(torch.uint8) if self.fp8 else cache
        return data[self.table_long].flatten(1, 2)[:, :self.context].view(cache.dtype)

    def _norm_rope(self):
        q = reference.apply_rope(reference.rms_norm(self.q, self.q_norm_weight, EPS), self.cos, self.sin,
                                 self.positions)
        k = reference.apply_rope(reference.rms_norm(self.k, self.k_norm_weight, EPS), self.cos, self.sin,
                                 self.positions)
        return q, k

    def fused(self) -> torch.Tensor:
        return torch.ops.qwen.fa_fused(self.q, self.k, self.v, self.q_norm_weight, self.k_norm_weight,
                                       self.cos, self.sin, self.k_cache, self.v_cache, self.block_table,
                                       self.seq_lens, self.positions, self.slot_mapping, EPS, None, **self.scales)

    def eager(self) -> torch.Tensor:
        return torch_qwen_fused.fa_fused(self.q, self.k, self.v, self.q_norm_weight, self.k_norm_weight,
                                         self.cos, self.sin, self.k_cache, self.v_cache, self.block_table,
                                         self.seq_lens, self.positions, self.slot_mapping, eps=EPS,
                                         backend="eager", **self.scales)

    def gather_sdpa(self) -> torch.Tensor:
        q, k = self._norm_rope()
        reference.write_cache(self.k_cache, self.v_cache, k, self.v, self.slot_mapping)
        keys = self._gather(self.k_cache).transpose(1, 2)  # [B, Hkv, L, D] view of a [B, L, Hkv, D] copy
        values = self._gather(self.v_cache).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.to(self.dtype).unsqueeze(2), keys, values, scale=self.scale,
                                             enable_gqa=True)
        return out.squeeze(2)

    def contig_sdpa(self) -> torch.Tensor:
        q, k = self._norm_rope()
        last = self.context - 1  # every row's new token sits at L - 1
        self.k_contig[:, :, last] = k.to(self.dtype)
        self.v_contig[:, :, last] = self.v.to(self.dtype)
        out = F.scaled_dot_product_attention(q.to(self.dtype).unsqueeze(2), self.k_contig, self.v_contig,
                                             scale=self.scale, enable_gqa=True)
        return out.squeeze(2)

    def floor(self, reader: str) -> Callable[[], object]:
        read = FLOOR_READERS[reader]
        return lambda: (read(self.k_contig), read(self.v_contig))

    def methods(self, names: List[str]) -> Dict[str, Callable[[], object]]:
        table = {}
        for name in names:
            if self.fp8 and name in SDPA_METHODS:
                continue
            if name == "floor":
                for reader in FLOOR_READERS:
                    if not (self.fp8 and reader == "sum"):   # torch has no fp8 sum
                        table[f"floor[{reader}]"] = self.floor(reader)
            else:
                table[name] = getattr(self, name)
        return table


def check_outputs(shape: Shape, names: List[str]) -> List[Dict[str, object]]:
    """Run each attention method once; raise unless all agree with the fused kernel."""
    expected = shape.fused()
    checks = []
    for name in names:
        if name in ("fused", "floor") or (shape.fp8 and name in SDPA_METHODS):
            continue
        got = getattr(shape, name)()
        atol, rtol = TOLERANCES[shape.dtype]["eager" if name == "eager" else "sdpa"]
        diff = (expected.float() - got.float()).abs()
        bound = atol + rtol * got.float().abs()
        ok = bool((diff <= bound).all()) and got.shape == expected.shape and got.dtype == expected.dtype
        checks.append({"B": shape.batch, "L": shape.context, "dtype": shape.dtype_name, "block": shape.block,
                       "method": name, "max_abs_err": float(diff.max()), "atol": atol, "rtol": rtol, "ok": ok})
        if not ok:
            raise RuntimeError(
                f"bench_op: fused output differs from {name} at B={shape.batch} L={shape.context} "
                f"{shape.dtype_name} block={shape.block}: max abs err {float(diff.max()):.3g} "
                f"(atol {atol}, rtol {rtol}); shapes {list(expected.shape)} vs {list(got.shape)}, "
                f"dtypes {expected.dtype} vs {got.dtype}. Not timing a wrong kernel.")
    return checks


def run_shape(shape: Shape, args: argparse.Namespace, flusher: common.CacheFlusher,
              progress: common.Progress) -> List[Dict[str, object]]:
    """Time every method on one shape; one record per method (and per floor reader)."""
    methods = shape.methods(args.methods)
    times = common.time_interleaved(methods, reps=args.reps, warmup=args.warmup, on_rep=progress.update,
                                    before_call=flusher)
    base = {"B": shape.batch, "L": shape.context, "dtype": shape.dtype_name, "block": shape.block,
            "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
            "kv_bytes": shape.kv_bytes, "path": torch_qwen_fused.cpu_attention_path(shape.cache_dtype)}
    records = []
    for name, fn in methods.items():
        record = dict(base, method=name, **common.summarize(times[name]))
        record["kv_gbps"] = shape.kv_bytes / record["median_s"] / 1e9
        if not args.no_memory:
            record.update(common.peak_extra_bytes(fn))
        records.append(record)
    floors = [record for record in records if record["method"].startswith("floor[")]
    if floors:
        best = min(floors, key=lambda record: record["median_s"])
        records.append(dict(best, method="floor", floor_reader=best["method"][len("floor["):-1]))
    return records


def ratio(numerator, denominator) -> str:
    return f"{numerator / denominator:.2f}" if numerator and denominator else "-"


def print_tables(results: List[Dict[str, object]]) -> None:
    by_shape: Dict[tuple, Dict[str, Dict[str, object]]] = {}
    for record in results:
        key = (record["B"], record["L"], record["dtype"], record["block"])
        by_shape.setdefault(key, {})[record["method"]] = record
    rows, memory_rows = [], []
    for (batch, context, dtype, block), methods in by_shape.items():
        median = {name: record["median_s"] for name, record in methods.items()}
        floor = methods.get("floor", {})
        bf16_fused = by_shape.get((batch, context, "bf16", block), {}).get("fused", {}).get("median_s")
        rows.append({
            "B": batch, "L": context, "dtype": dtype, "block": block, "path": methods["fused"]["path"],
            **{name: common.fmt_time(median.get(name)) for name in MAIN_METHODS},
            "floor GB/s": f"{floor['kv_gbps']:.1f}" if floor else "-",
            "floor reader": floor.get("floor_reader", "-"),
            "fused/floor": ratio(median.get("fused"), median.get("floor")),
            "eager/fused": ratio(median.get("eager"), median.get("fused")),
            "gather/fused": ratio(median.get("gather_sdpa"), median.get("fused")),
            "contig/fused": ratio(median.get("contig_sdpa"), median.get("fused")),
            "fp8/bf16": ratio(median.get("fused"), bf16_fused) if dtype in FP8_CACHES else "-",
        })
        memory_rows.append({"B": batch, "L": context, "dtype": dtype, "block": block,
                            "KV bytes": common.fmt_bytes(methods["fused"]["kv_bytes"]),
                            **{name: common.fmt_bytes(methods[name].get("peak_extra_bytes"))
                               for name in MAIN_METHODS if name in methods}})
    print("Median time per call (min/max and every rep in the JSON); ratios of medians:")
    print(common.format_table(rows, ["B", "L", "dtype", "block", *MAIN_METHODS, "floor GB/s", "floor reader",
                                     "fused/floor", "eager/fused", "gather/fused", "contig/fused", "fp8/bf16", "path"]))
    if any("peak_extra_bytes" in record for record in results):
        print("\nPeak memory allocated during one call, beyond its inputs (output included):")
        print(common.format_table(memory_rows, list(memory_rows[0])))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reps < 10 and not args.quick:
        print(f"bench_op: warning: --reps {args.reps} < 10; medians this short are smoke only", file=sys.stderr)
    grid = [(batch, context, dtype, block) for batch in args.batches for dtype in args.dtypes
            for block in args.blocks for context in args.contexts]
    flusher = common.CacheFlusher(args.flush_cache_mib)
    payload = {
        "benchmark": "bench_op",
        "description": "one fa_fused decode step on the CPU: fused kernel vs eager fallback vs gather+SDPA "
                       "vs SDPA on an unpaged cache, and a streaming read of the same K/V bytes (floor)",
        "complete": False,
        "environment": common.environment(),
        "config": {"batches": args.batches, "contexts": args.contexts, "dtypes": args.dtypes,
                   "blocks": args.blocks, "heads": args.heads, "kv_heads": args.kv_heads,
                   "head_dim": args.head_dim, "methods": args.methods, "reps": args.reps,
                   "warmup": args.warmup, "flush_cache_mib": flusher.mib, "eps": EPS,
                   "rope_theta": ROPE_THETA, "seed": args.seed, "seq_lens": "uniform, all = L",
                   "floor_readers": list(FLOOR_READERS), "fp8_k_v_scales": list(FP8_SCALES), "quick": args.quick},
        "checks": [],
        "results": [],
        "plot": {"x": "L", "y": "median_s", "low": "min_s", "high": "max_s", "series": "method",
                 "series_order": list(MAIN_METHODS), "rows": ["B"], "cols": ["dtype", "block"],
                 "xlabel": "context length L (tokens)", "ylabel": "time per call",
                 "time_unit": ["ms", 1e3],
                 "title": f"fa_fused decode step, Hq/Hkv/D = {args.heads}/{args.kv_heads}/{args.head_dim}"},
    }
    methods_per_shape = len(args.methods) - 1 + len(FLOOR_READERS) if "floor" in args.methods else len(args.methods)
    progress = common.Progress(total=len(grid) * (args.warmup + args.reps), desc="bench_op")
    with torch.inference_mode():
        for index, (batch, context, dtype, block) in enumerate(grid):
            progress.set_postfix(f"B={batch} L={context} {dtype} block={block}")
            shape = Shape(batch, context, dtype, block, args.heads, args.kv_heads, args.head_dim,
                          seed=args.seed + index)
            payload["checks"] += check_outputs(shape, args.methods)
            payload["results"] += run_shape(shape, args, flusher, progress)
            common.write_json(args.output, payload)  # partial results survive an interrupted run
            del shape
            gc.collect()
    progress.close()
    payload["complete"] = True
    common.write_json(args.output, payload)
    print(f"results: {args.output}  ({len(grid)} shapes x {methods_per_shape} methods, "
          f"{len(payload['checks'])} output checks passed)")
    if not args.no_plot:
        print(f"plot:    {plot.plot_file(args.output)}")
    print_tables(payload["results"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
