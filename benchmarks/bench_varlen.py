"""fa_fused_varlen: what verifying n draft tokens per row costs next to one decode step, and HF assisted decoding.

    python -m benchmarks.bench_varlen                       # B {1,4,16} x L {2048, 8192} x n {1,2,4,8}; HF at 2048
    python -m benchmarks.bench_varlen --quick               # a small grid, seconds

Part 1 (op): Qwen3-14B attention (40/8/128), bf16 cache, block 128. For each (B, L), one fa_fused decode step
(one new token per row) and fa_fused_varlen with n new tokens per row, timed side by side (interleaved reps,
the last-level cache flushed before every call: a layer's K/V comes from DRAM). The ratio n-token / 1-token is
what speculative decoding's verification costs relative to a decode step: each K/V row is read once for all
n tokens, so it should stay near 1.

Part 2 (HF): a Qwen3-0.6B-shaped random model (its layers cut with --hf-layers), assisted decoding with the
model as its own assistant (3 drafted tokens per round), stock vs patched, from an L-token prompt. A stopping
criterion stamps the time and length after every round; decode tokens/s counts the rounds after the first (which
holds both prefills, the model's and the assistant's): (tokens since the first stamp) / (time since it).

Output: benchmarks/results/bench_varlen.json and .png, with the machine, versions, commit and timestamp.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

import torch_qwen_fused
from benchmarks import common, plot  # noqa: E402
from torch_qwen_fused import demo  # noqa: E402
from torch_qwen_fused.testing import make_case  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 40, 8, 128, 128


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-B", "--batches", type=common.int_list, default=[1, 4, 16])
    parser.add_argument("-L", "--contexts", type=common.int_list, default=[2048, 8192])
    parser.add_argument("-n", "--new-tokens", type=common.int_list, default=[1, 2, 4, 8])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--flush-cache-mib", type=int, default=None,
                        help="MiB written before every timed call (default: twice the last-level cache; 0: off)")
    parser.add_argument("--hf-context", type=int, default=2048, help="prompt length of the HF part (0: skip it)")
    parser.add_argument("--hf-layers", type=int, default=4, help="layers of the 0.6B-shaped model")
    parser.add_argument("--hf-new-tokens", type=int, default=18)
    parser.add_argument("--hf-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--hf-reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="B 1,4 x L 512 x n 1,4; HF at 256 with 2 layers")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.contexts, args.new_tokens, args.reps = [1, 4], [512], [1, 4], 5
        args.hf_context, args.hf_layers, args.hf_new_tokens, args.hf_reps = 256, 2, 8, 2
    name = "bench_varlen_quick.json" if args.quick else "bench_varlen.json"
    args.output = args.output or common.RESULTS_DIR / name
    return args


def verification_calls(batch: int, context: int, counts) -> dict:
    """One call per method, all on one cache: "decode (fa_fused)" and "verify n (fa_fused_varlen)" per n."""
    cases = {"decode (fa_fused)": make_case([context] * batch, HEADS, KV_HEADS, HEAD_DIM, BLOCK, torch.bfloat16,
                                            positions_offset=None, extra_blocks=0)}
    shared = cases["decode (fa_fused)"]
    generator = torch.Generator().manual_seed(1)
    for count in counts:
        tokens = batch * count

        def randn(heads, tokens=tokens):
            return torch.randn(tokens, heads, HEAD_DIM, generator=generator).to(torch.bfloat16)

        # The decode step's cache and block table (no copy): the timings differ by the work, not by the K/V.
        cases[f"verify {count} (fa_fused_varlen)"] = dataclasses.replace(
            shared, q=randn(HEADS), k=randn(KV_HEADS), v=randn(KV_HEADS),
            query_start_loc=torch.arange(0, tokens + 1, count, dtype=torch.int32))
    return {name: (lambda case=case: case.op()(*case.args())) for name, case in cases.items()}


def bench_op(args, flusher, progress) -> list:
    results = []
    path = torch_qwen_fused.cpu_attention_path(torch.bfloat16)
    for batch in args.batches:
        for context in args.contexts:
            methods = verification_calls(batch, context, args.new_tokens)
            with torch.inference_mode():
                times = common.time_interleaved(methods, args.reps, args.warmup, before_call=flusher)
            decode = common.summarize(times["decode (fa_fused)"])["median_s"]
            for name, samples in times.items():
                summary = common.summarize(samples)
                count = 1 if name.startswith("decode") else int(name.split()[1])
                results.append({"part": "op", "B": batch, "L": context, "method": name, "new_tokens": count,
                                **summary, "vs_decode": summary["median_s"] / decode, "path": path})
            progress(f"op B={batch} L={context}: " + ", ".join(
                f"{r['method']} {r['median_s'] * 1e3:.2f} ms (x{r['vs_decode']:.2f})"
                for r in results[-len(times):]))
            del methods
    return results


class RoundClock:
    """A stopping criterion that never stops: it stamps (time, sequence length) after every round."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append((time.perf_counter(), input_ids.shape[1]))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def decode_tokens_per_s(self) -> float:
        (first_time, first_length), (last_time, last_length) = self.stamps[0], self.stamps[-1]
        return (last_length - first_length) / (last_time - first_time)


def bench_hf(args, progress) -> list:
    from torch_qwen_fused.hf import patch_model

    model = demo.build_model(argparse.Namespace(preset="0.6b", layers=args.hf_layers, vocab=None,
                                                dtype=args.hf_dtype, seed=0))
    model.generation_config.update(assistant_confidence_threshold=0.0, num_assistant_tokens=3,
                                   num_assistant_tokens_schedule="constant")
    ids = torch.randint(1, model.config.vocab_size, (1, args.hf_context), generator=torch.Generator().manual_seed(0))

    def generate(clock):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.hf_new_tokens,
                              do_sample=False, assistant_model=model, stopping_criteria=[clock])

    runs = {"stock": [], "patched": []}
    sequences = {}
    handle = patch_model(model)
    for rep in range(args.hf_reps):
        for method in ("stock", "patched") if rep % 2 == 0 else ("patched", "stock"):
            if method == "stock":
                handle.remove()
            else:
                handle = patch_model(model)
            clock = RoundClock()
            sequences[method] = generate(clock)[:, ids.shape[1]:]
            runs[method].append(clock.decode_tokens_per_s())
            progress(f"hf rep {rep + 1}/{args.hf_reps} {method}: {runs[method][-1]:.2f} decode tokens/s over "
                     f"{len(clock.stamps)} rounds")
    handle.remove()
    results = []
    for method, per_s in runs.items():
        agreement = float((sequences[method] == sequences["stock"]).float().mean())
        results.append({"part": "hf", "L": args.hf_context, "method": method,
                        "tokens_per_s": sorted(per_s)[len(per_s) // 2],
                        "min_tokens_per_s": min(per_s), "max_tokens_per_s": max(per_s),
                        "token_agreement_with_stock": agreement, "layers": args.hf_layers,
                        "new_tokens": args.hf_new_tokens, "fused_calls": handle.fused_calls,
                        "varlen_calls": handle.varlen_calls})
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()

    def progress(message):
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    flusher = common.CacheFlusher(args.flush_cache_mib)
    payload = {"benchmark": "bench_varlen", "environment": common.environment(), "complete": False,
               "config": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block": BLOCK,
                          "cache_dtype": "bfloat16", "flush_cache_mib": flusher.mib, "reps": args.reps,
                          "warmup": args.warmup, "hf": {"context": args.hf_context, "layers": args.hf_layers,
                                                         "new_tokens": args.hf_new_tokens, "reps": args.hf_reps,
                                                         "dtype": args.hf_dtype}},
               "results": [],
               "plot": {"x": "L", "y": "median_s", "series": "method", "cols": ["B"], "time_unit": ["ms", 1e3],
                        "xlabel": "context length L (tokens)", "ylabel": "time per call",
                        "title": "verifying n tokens per row (fa_fused_varlen) vs one decode step (fa_fused), "
                                 f"{HEADS}/{KV_HEADS}/{HEAD_DIM} bf16"}}
    payload["results"] += bench_op(args, flusher, progress)
    common.write_json(args.output, payload)
    if args.hf_context:
        payload["hf_results"] = bench_hf(args, progress)
    payload["complete"] = True
    common.write_json(args.output, payload)
    plot.plot_results(payload, args.output.with_suffix(".png"))
    rows = [{"B": r["B"], "L": r["L"], "method": r["method"], "median": common.fmt_time(r["median_s"]),
             "vs decode": f"{r['vs_decode']:.2f}", "path": r["path"]} for r in payload["results"]]
    print(common.format_table(rows, ["B", "L", "method", "median", "vs decode", "path"]))
    for r in payload.get("hf_results", []):
        print(f"HF assisted decoding L={r['L']}, {r['layers']} layers: {r['method']} {r['tokens_per_s']:.2f} tokens/s "
              f"(agreement with stock {r['token_agreement_with_stock']:.2f})")
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
