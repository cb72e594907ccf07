"""HF continuous batching (``model.generate_batch``): stock vs patched, throughput and tokens.

    python -m benchmarks.bench_batch                      # 0.6B shape, 8 requests of 128-2048 tokens, 64 new each
    python -m benchmarks.bench_batch --layers 2 --new-tokens 8 --reps 1      # smoke run

A seeded random-weight Qwen3 (fp32 by default, so that the tokens must be identical) serves the same requests
through ``generate_batch`` stock (HF's ``PagedAttentionCache`` read back by ``cache.update`` and SDPA over the step's
tokens) and patched (one ``fa_fused`` / ``fa_fused_varlen`` call per layer per step on HF's pages), side by side, the
order alternating per rep. Reported per method: wall time of the call (median over reps), generated tokens/s
(requests x new tokens / time), patched / stock, the fused call counts and whether the tokens agree.

Output: benchmarks/results/bench_batch.json.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import common
from torch_qwen_fused import demo, hf

DEFAULT_PROMPTS = [128, 256, 512, 768, 1024, 1280, 1664, 2048]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--prompts", type=common.int_list, default=DEFAULT_PROMPTS,
                        help="prompt length of each request (default: 8 requests, 128-2048 tokens)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 28, the 0.6B's)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size (default 32768; Qwen3: 151936)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    parser.add_argument("--page-size", type=int, default=256, help="HF's page size (its default, 256)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=common.RESULTS_DIR / "bench_batch.json")
    return parser.parse_args(argv)


def build_model(args):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = dict(demo.PRESETS["0.6b"], vocab_size=args.vocab)
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    config = Qwen3Config(**shape, max_position_embeddings=40960, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, attn_implementation="sdpa")
    model = demo.random_model(Qwen3ForCausalLM, config, args.seed, getattr(torch, args.dtype)).eval()
    return demo.fixed_length(model)


def serve(model, requests, args):
    """One generate_batch call: (seconds, generated tokens per request)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    generation = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1)
    # Enough pages for every request at once (HF would size the cache from the free memory: GiBs to zero).
    pages = sum(-(-(length + args.new_tokens) // args.page_size) for length in args.prompts)
    config = ContinuousBatchingConfig(page_size=args.page_size, num_blocks=pages + len(requests))
    start = time.perf_counter()
    outputs = model.generate_batch(requests, generation_config=generation, continuous_batching_config=config)
    seconds = time.perf_counter() - start
    return seconds, [output.generated_tokens for output in outputs.values()]


def main(argv=None) -> int:
    args = parse_args(argv)
    environment = common.environment()   # the commit and machine the run starts with
    model = build_model(args)
    generator = torch.Generator().manual_seed(args.seed)
    requests = [torch.randint(1, model.config.vocab_size, (n,), generator=generator).tolist() for n in args.prompts]
    generated = len(requests) * args.new_tokens
    times = {"stock": [], "patched": []}
    tokens = {}
    handle = hf.patch_model(model)
    handle.remove()
    for rep in range(args.reps):
        for method in (("stock", "patched") if rep % 2 == 0 else ("patched", "stock")):
            if method == "patched":
                handle = hf.patch_model(model)
                calls_before = (handle.fused_calls, handle.varlen_calls)
            seconds, tokens[method] = serve(model, requests, args)
            if method == "patched":
                calls = (handle.fused_calls - calls_before[0], handle.varlen_calls - calls_before[1])
                handle.remove()
            times[method].append(seconds)
            print(f"rep {rep} {method}: {seconds:.2f} s, {generated / seconds:.2f} tokens/s", file=sys.stderr)
    stock, patched = (common.summarize(times[m]) for m in ("stock", "patched"))
    identical = tokens["stock"] == tokens["patched"]
    row = {"requests": len(requests), "prompts": args.prompts, "new_tokens": args.new_tokens,
           "stock_s": stock["median_s"], "patched_s": patched["median_s"],
           "stock_tokens_per_s": generated / stock["median_s"], "patched_tokens_per_s": generated / patched["median_s"],
           "patched_over_stock": stock["median_s"] / patched["median_s"], "tokens_identical": identical,
           "fused_calls": calls[0], "varlen_calls": calls[1], "stock": stock, "patched": patched}
    shown = dict(row, stock_tokens_per_s=f"{row['stock_tokens_per_s']:.2f}",
                 patched_tokens_per_s=f"{row['patched_tokens_per_s']:.2f}",
                 patched_over_stock=f"{row['patched_over_stock']:.2f}x")
    print(common.format_table([shown], ["requests", "new_tokens", "stock_tokens_per_s", "patched_tokens_per_s",
                                        "patched_over_stock", "tokens_identical", "fused_calls", "varlen_calls"]))
    common.write_json(args.output, {"environment": environment, "args": vars(args) | {"output": None},
                                    "results": [row]})
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
