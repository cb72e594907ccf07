"""End-to-end HF Qwen3 decode: stock (SDPA + DynamicCache) vs patched (fa_fused + PagedKVCache), tokens/s.

    python benchmarks/bench_decode.py                          # 0.6B shape and a 14B-shaped stack, L 512/2048/8192
    python benchmarks/bench_decode.py --presets 0.6b -L 512 --steps 4 --reps 1   # smoke run

For each model shape and context length L, a seeded random-weight model (bf16) gets a context of L tokens
in a DynamicCache: random K/V (the default; decode time does not depend on the values) or a real prefill of
a random prompt (``--prefill model``). The DynamicCache is copied into a PagedKVCache (one vectorized write
per layer), so both runs decode from the same context; each rep then times ``--steps`` greedy decode steps
of the stock model and of the patched one, side by side (the order alternates), and crops both caches back
to L tokens. Reported: decode tokens/s (batch x steps / time), median over reps, and patched / stock.
Before timing, one decode step of an fp32 copy of the model is checked, stock vs patched (relative logit
difference <= 1e-3); the run's own first-step logit difference (bf16 rounding included) is reported as a figure.

Output: benchmarks/results/bench_decode.json and .png (tokens/s vs context, one line per method).

``--measure ttft`` times the time to first token instead: ``generate(max_new_tokens=1)`` from a random prompt of L
tokens, stock and patched side by side (interleaved reps, medians), at each batch of ``--ttft-batches``; the first
tokens must agree. Output: benchmarks/results/bench_decode_ttft.json and .png (seconds vs L, one panel per batch).

    python -m benchmarks.bench_decode --measure ttft -L 128,2048,8192 --layers 2 --reps 3
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import common, plot  # noqa: E402

from torch_qwen_fused import demo, hf  # noqa: E402

# A few layers of the 14B shape: its attention (40/8/128) at a cost this machine can prefill.
PRESET_LAYERS = {"0.6b": None, "14b": 2}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--presets", type=common.name_list(sorted(demo.PRESETS)), default=["0.6b", "14b"])
    parser.add_argument("-L", "--contexts", type=common.int_list, default=[512, 2048, 8192])
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers for every preset (default: all 28 for 0.6b, 2 for 14b)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size (default 32768; Qwen3: 151936)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timed rep (default 8)")
    parser.add_argument("--reps", type=int, default=3, help="timed reps per method (default 3)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--kv-cache-dtype", default=None, choices=["float8_e4m3fn", "float8_e5m2"],
                        help="the patched run's cache dtype (default: the model's); the scales calibrate per layer")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--prefill", choices=("random", "model"), default="random",
                        help="context: random K/V of the right shape (default), or a real prefill of a random "
                             "prompt (minutes per layer stack at L=8192 here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", choices=("decode", "ttft"), default="decode",
                        help="decode tokens/s (default) or the prefill's time to first token")
    parser.add_argument("--ttft-batches", type=common.int_list, default=[1, 4], help="batches of --measure ttft")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="default: benchmarks/results/bench_decode.json (bench_decode_ttft.json for ttft)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.output is None:
        name = "bench_decode.json" if args.measure == "decode" else "bench_decode_ttft.json"
        args.output = common.RESULTS_DIR / name
    return args


def build_model(preset: str, args):
    layers = args.layers or PRESET_LAYERS[preset]
    model_args = argparse.Namespace(preset=preset, layers=layers, vocab=args.vocab, dtype=args.dtype, seed=args.seed)
    return demo.build_model(model_args)


def decode(model, cache, token, steps: int):
    """``steps`` greedy decode steps from ``token`` [B, 1]; returns the generated ids and the first logits."""
    generated, first_logits = [], None
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
            if first_logits is None:
                first_logits = logits.float()
            token = logits.argmax(dim=-1, keepdim=True)
            generated.append(token)
    return torch.cat(generated, dim=1), first_logits


# fp32 stock vs fp32 patched, one decode step from the same context: what the fused path itself changes. (A bf16
# run adds bf16 rounding on top, which a deep random model amplifies past any fixed bound: it is reported only.)
FP32_RELATIVE_BOUND = 1e-3


def fp32_logit_diff(model, dense_cache, first, args) -> float:
    """max |stock - patched| / max |stock| of one decode step of an fp32 copy of ``model`` over the context
    in ``dense_cache`` (a DynamicCache, left as it is)."""
    from transformers import DynamicCache

    reference = copy.deepcopy(model).float()
    stock_cache = DynamicCache(config=model.config)
    for index, layer in enumerate(dense_cache.layers):
        stock_cache.update(layer.keys.float(), layer.values.float(), index)
    with hf.patch_model(reference, block_size=args.block_size) as handle:
        paged_cache = demo.paged_copy(handle, stock_cache, stock_cache.get_seq_length() + 2)
        _, patched = decode(reference, paged_cache, first, 1)
    _, stock = decode(reference, stock_cache, first, 1)
    return (stock - patched).abs().max().item() / stock.abs().max().item()


def bench_context(model, preset, context, args, progress):
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(args.seed + context)
    stock_cache = DynamicCache(config=model.config)
    if args.prefill == "model":
        progress(f"{preset} L={context}: stock prefill")
        prompt = torch.randint(1, model.config.vocab_size, (args.batch, context), generator=generator)
        with torch.no_grad():
            logits = model(input_ids=prompt, cache=stock_cache, use_cache=True).logits[:, -1]
        first = logits.argmax(-1, keepdim=True)
    else:
        # Decode time does not depend on what the context holds: random K/V of its shape and dtype stand
        # in for a prefill, which would cost minutes at L=8192 on this machine.
        progress(f"{preset} L={context}: random context")
        config = model.config
        shape = (args.batch, config.num_key_value_heads, context, config.head_dim)
        dtype = next(model.parameters()).dtype
        for layer in range(config.num_hidden_layers):
            keys = torch.randn(shape, generator=generator).to(dtype)
            values = torch.randn(shape, generator=generator).to(dtype)
            stock_cache.update(keys, values, layer)
        first = torch.randint(1, config.vocab_size, (args.batch, 1), generator=generator)
    kv_cache_dtype = getattr(torch, args.kv_cache_dtype) if args.kv_cache_dtype else None
    with hf.patch_model(model, block_size=args.block_size, kv_cache_dtype=kv_cache_dtype) as handle:
        paged_cache = demo.paged_copy(handle, stock_cache, context + args.steps + 1)

    def run(method):
        """Decodes --steps tokens with the stock model or the patched one; restores the cache to L tokens."""
        start = time.perf_counter()
        if method == "stock":
            tokens, logits = decode(model, stock_cache, first, args.steps)
            elapsed, calls = time.perf_counter() - start, 0
            stock_cache.crop(-args.steps)
        else:
            with hf.patch_model(model, block_size=args.block_size, kv_cache_dtype=kv_cache_dtype) as handle:
                tokens, logits = decode(model, paged_cache, first, args.steps)
                elapsed, calls = time.perf_counter() - start, handle.fused_calls
            paged_cache.crop(-args.steps)
        return elapsed, tokens, logits, calls

    _, stock_tokens, stock_logits, _ = run("stock")
    _, patched_tokens, patched_logits, fused = run("patched")
    expected_calls = args.steps * model.config.num_hidden_layers
    if fused != expected_calls:
        raise RuntimeError(f"{preset} L={context}: {fused} fused calls, expected {expected_calls}")
    logit_diff = (stock_logits - patched_logits).abs().max().item()
    progress(f"{preset} L={context}: fp32 check (stock vs patched, one step)")
    fp32_diff = fp32_logit_diff(model, stock_cache, first, args)
    if fp32_diff > FP32_RELATIVE_BOUND:
        raise RuntimeError(f"{preset} L={context}: in fp32, patched logits differ from stock by {fp32_diff:.3g} of "
                           f"the max |logit| (bound {FP32_RELATIVE_BOUND})")
    agreement = (stock_tokens == patched_tokens).float().mean().item()

    # K/V bytes each holds for the L-token context (the paged pools also hold their blocks' free tail).
    cache_bytes = {"stock": sum(t.nbytes for layer in stock_cache.layers for t in (layer.keys, layer.values)),
                   "patched": sum(t.nbytes for layer in paged_cache.layers for t in (layer.k_cache, layer.v_cache))}
    cache_dtypes = {"stock": str(stock_cache.layers[0].keys.dtype), "patched": str(paged_cache.layers[0].k_cache.dtype)}
    times = {"stock": [], "patched": []}
    for rep in range(args.reps):
        order = ("stock", "patched") if rep % 2 == 0 else ("patched", "stock")
        for method in order:
            progress(f"{preset} L={context}: rep {rep + 1}/{args.reps} {method}")
            times[method].append(run(method)[0])
    results = []
    for method, samples in times.items():
        tokens_per_s = [args.batch * args.steps / t for t in samples]
        results.append({"preset": preset, "L": context, "batch": args.batch, "method": method,
                        "tokens_per_s": statistics.median(tokens_per_s), "min_tokens_per_s": min(tokens_per_s),
                        "max_tokens_per_s": max(tokens_per_s), "step_times_s": [t / args.steps for t in samples],
                        "first_step_max_logit_diff": logit_diff, "fp32_first_step_relative_logit_diff": fp32_diff,
                        "token_agreement": agreement,
                        "fused_calls_per_step": fused // args.steps, "cache_dtype": cache_dtypes[method],
                        "cache_bytes": cache_bytes[method]})
    return results


def bench_ttft(model, preset, context, batch, args, progress):
    """Time to first token of ``generate()`` from a random ``batch`` x ``context`` prompt, stock and patched: the
    prefill (stock attention math in both; patched, its K/V also go to the paged pools) and the first token. The
    patch is applied before the clock starts (once per model in a real run)."""
    generator = torch.Generator().manual_seed(args.seed + context + batch)
    prompt = torch.randint(1, model.config.vocab_size, (batch, context), generator=generator)

    def run(method):
        handle = hf.patch_model(model, block_size=args.block_size) if method == "patched" else None
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=prompt, max_new_tokens=1, do_sample=False)
        elapsed = time.perf_counter() - start
        if handle is not None:
            handle.remove()
        return elapsed, out[:, -1]

    times, first = {"stock": [], "patched": []}, {}
    for rep in range(args.reps):
        for method in (("stock", "patched") if rep % 2 == 0 else ("patched", "stock")):
            progress(f"{preset} L={context} batch {batch}: rep {rep + 1}/{args.reps} {method}")
            elapsed, first[method] = run(method)
            times[method].append(elapsed)
    agreement = (first["stock"] == first["patched"]).float().mean().item()
    return [{"preset": preset, "L": context, "batch": batch, "method": method, "ttft_s": statistics.median(samples),
             "min_ttft_s": min(samples), "max_ttft_s": max(samples), "ttft_times_s": samples,
             "first_token_agreement": agreement} for method, samples in times.items()]


def main_ttft(args) -> int:
    payload = {"benchmark": "bench_decode --measure ttft", "environment": common.environment(),
               "args": vars(args) | {"output": str(args.output)}, "results": [], "complete": False}
    payload["plot"] = {"x": "L", "y": "ttft_s", "low": "min_ttft_s", "high": "max_ttft_s", "series": "method",
                       "cols": ["preset", "batch"], "ylabel": "time to first token", "time_unit": ["s", 1],
                       "xlabel": "prompt length L (tokens)",
                       "title": f"HF Qwen3 prefill (generate, 1 new token), {args.dtype}: stock vs fa_fused patch"}
    started = time.perf_counter()

    def progress(message):
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    rows = []
    for preset in args.presets:
        model = build_model(preset, args)
        bench_ttft(model, preset, 16, 1, argparse.Namespace(**(vars(args) | {"reps": 1})), progress)   # warm-up
        for batch in args.ttft_batches:
            for context in args.contexts:
                results = bench_ttft(model, preset, context, batch, args, progress)
                payload["results"] += results
                common.write_json(args.output, payload)
                by = {r["method"]: r for r in results}
                rows.append({"preset": preset, "batch": batch, "L": context,
                             "stock s": f"{by['stock']['ttft_s']:.3f}", "patched s": f"{by['patched']['ttft_s']:.3f}",
                             "patched/stock": f"{by['patched']['ttft_s'] / by['stock']['ttft_s']:.3f}",
                             "first tokens agree": f"{by['patched']['first_token_agreement']:.2f}"})
        del model
    payload["complete"] = True
    common.write_json(args.output, payload)
    print(f"results: {args.output}")
    if not args.no_plot:
        print(f"plot:    {plot.plot_file(args.output)}")
    print(common.format_table(rows, list(rows[0])))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure == "ttft":
        return main_ttft(args)
    payload = {"benchmark": "bench_decode", "environment": common.environment(), "args": vars(args) | {
        "output": str(args.output)}, "results": [], "complete": False}
    payload["plot"] = {"x": "L", "y": "tokens_per_s", "low": "min_tokens_per_s", "high": "max_tokens_per_s",
                       "series": "method", "cols": ["preset"], "ylabel": "decode tokens/s", "time_unit": ["", 1],
                       "xlabel": "context length L (tokens)",
                       "title": f"HF Qwen3 decode, {args.dtype}, batch {args.batch}: stock vs fa_fused patch"}
    started = time.perf_counter()

    def progress(message):
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    for preset in args.presets:
        model = build_model(preset, args)
        for context in args.contexts:
            payload["results"] += bench_context(model, preset, context, args, progress)
            common.write_json(args.output, payload)
        del model
    payload["complete"] = True
    common.write_json(args.output, payload)

    rows = []
    for preset in args.presets:
        for context in args.contexts:
            by = {r["method"]: r for r in payload["results"] if r["preset"] == preset and r["L"] == context}
            rows.append({"preset": preset, "L": context, "stock tok/s": f"{by['stock']['tokens_per_s']:.2f}",
                         "patched tok/s": f"{by['patched']['tokens_per_s']:.2f}",
                         "patched/stock": f"{by['patched']['tokens_per_s'] / by['stock']['tokens_per_s']:.2f}",
                         "agreement": f"{by['patched']['token_agreement']:.2f}",
                         "logit diff": f"{by['patched']['first_step_max_logit_diff']:.3g}"})
    print(f"results: {args.output}")
    if not args.no_plot:
        print(f"plot:    {plot.plot_file(args.output)}")
    print(common.format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
