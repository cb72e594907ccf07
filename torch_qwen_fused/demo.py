"""Stock Hugging Face Qwen3 vs the same model patched to decode through ``torch.ops.qwen.fa_fused``.

    python -m torch_qwen_fused.demo                      # Qwen3-0.6B shape, random weights
    python -m torch_qwen_fused.demo --preset 14b --layers 2   # the Qwen3-14B attention (40/8/128)
    torchrun --nproc-per-node 2 -m torch_qwen_fused.demo --tp # HF tensor parallelism over 2 ranks

Builds a seeded random-weight model from a Qwen3 config (no download), generates greedily from one left-padded
batch of prompts of different lengths with stock HF (``attn_implementation="sdpa"``, ``DynamicCache``), then
with ``patch_model(model)`` (``PagedKVCache``; every decode step of every layer one ``fa_fused`` call), and
prints the token agreement, decode tokens/s of both runs and the number of fused calls. Two more rows, where the
op matters more than at ~110 tokens: decode from one ``--long-context`` (2048) token context (random K/V of that
length, batch 1: a prefill of it would take the demo's whole budget), and HF's continuous batching
(``generate_batch``) of the same prompts, stock vs patched.

With ``--tp`` (under ``torchrun``; gloo on CPUs) rank 0 builds the model and saves it with ``save_pretrained``,
every rank loads it with HF's tensor parallelism (``DistributedConfig(tp_plan="auto")``: each rank holds its
slice of the heads and of the MLP, HF all-reduces) and runs both generations; each rank's paged cache holds its
own kv heads. Rank 0 prints; the fused calls and kv heads are reported per rank.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

PRESETS = {
    # Qwen3-0.6B: hidden 1024, 16 q / 8 kv heads of 128, 28 layers, tied embeddings.
    "0.6b": dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128, num_hidden_layers=28,
                 intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    # Qwen3-14B: hidden 5120, 40 q / 8 kv heads of 128 (GQA 5), 40 layers.
    "14b": dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, head_dim=128, num_hidden_layers=40,
                intermediate_size=17408, vocab_size=151936, tie_word_embeddings=False),
}
# What the 14b preset runs by default to stay within minutes on a small CPU (each override is printed).
# The vocabulary only sizes the embedding and lm_head; all 28 layers of 0.6b keep their real shape.
DEMO_CUTS = {"0.6b": dict(vocab_size=32768), "14b": dict(num_hidden_layers=2, vocab_size=32768)}
# Default run per preset. 0.6b: the longest row (120 + 15 cached tokens) crosses a 128-token block boundary.
RUN_DEFAULTS = {"0.6b": dict(prompt_len=120, new_tokens=16), "14b": dict(prompt_len=48, new_tokens=16)}
# The continuous-batching row serves at most this many tokens of each prompt (its last ones) and generates at most
# this many: on 2 cores a 28-layer prefill of the full prompts alone took ~9 s per run.
CB_MAX_PROMPT, CB_MAX_NEW_TOKENS = 32, 8


def is_first_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(message: str) -> None:
    if is_first_rank():
        print(message, flush=True)


class StepClock:
    """A stopping criterion that never stops: it stamps each generated token and shows progress."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.stamps = label, total, []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        if is_first_rank():
            sys.stdout.write(f"\r  {self.label}: token {len(self.stamps)}/{self.total}")
            if len(self.stamps) == self.total:
                sys.stdout.write("\n")
            sys.stdout.flush()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def decode_tokens_per_s(self, batch: int) -> float:
        """Decode steps only: from the first generated token (the prefill's) to the last."""
        return batch * (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="0.6b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: 28 for 0.6b, 2 for 14b)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default 32768; Qwen3 has 151936)")
    parser.add_argument("--batch", type=int, default=4, help="prompts, left-padded to the longest (default 4)")
    parser.add_argument("--prompt-len", type=int, help="longest prompt, the others 1/8 shorter each "
                                                        "(default: 120 for 0.6b, 48 for 14b)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per prompt (default 16)")
    parser.add_argument("--block-size", type=int, default=128, help="paged KV cache block size (default 128)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeat", type=int, default=1, help="timed stock/patched pairs (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-context", type=int, default=2048,
                        help="context of the long-context decode row (default 2048; 0: skip the row)")
    parser.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=True,
                        help="the generate_batch row (default on)")
    parser.add_argument("--tp", action="store_true", help="HF tensor parallelism over the ranks of torchrun: "
                                                          "torchrun --nproc-per-node 2 -m torch_qwen_fused.demo --tp")
    args = parser.parse_args(argv)
    for name, value in RUN_DEFAULTS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.new_tokens < 2 or args.prompt_len < 1 or args.batch < 1 or args.repeat < 1:
        parser.error("--new-tokens must be >= 2, --prompt-len, --batch and --repeat >= 1")
    if args.tp and "WORLD_SIZE" not in os.environ:
        parser.error("--tp runs under torchrun: torchrun --nproc-per-node 2 -m torch_qwen_fused.demo --tp")
    return args


def random_model(model_class, config, seed: int, dtype: torch.dtype = torch.float32):
    """The model with seeded random weights, built without HF's slow two-pass init: on the meta device, then
    filled once. Linear and embedding weights are uniform with HF's std (``initializer_range``), norm weights 1."""
    with torch.device("meta"):
        model = model_class(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()                             # to_empty gives tied parameters separate storage
    generator = torch.Generator().manual_seed(seed)
    bound = config.initializer_range * 3 ** 0.5
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.uniform_(-bound, bound, generator=generator)
    model = model.to(dtype)
    # Its inv_freq buffer is computed, not a parameter, and stays fp32 as in a checkpoint loaded with
    # dtype=bf16 (model.to(dtype) would round it).
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config)
    return model


def build_model(args):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = dict(PRESETS[args.preset], **DEMO_CUTS[args.preset])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    if args.vocab is not None:
        shape["vocab_size"] = args.vocab
    config = Qwen3Config(**shape, max_position_embeddings=40960, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, attn_implementation="sdpa")
    full = PRESETS[args.preset]
    cuts = [f"{key}={shape[key]} (Qwen3 has {full[key]})" for key in full if shape[key] != full[key]]
    log(f"model: Qwen3 {args.preset} shape: hidden {config.hidden_size}, heads {config.num_attention_heads}/"
        f"{config.num_key_value_heads} (q/kv) x {config.head_dim}, {config.num_hidden_layers} layers, intermediate "
        f"{config.intermediate_size}, vocab {config.vocab_size}; random weights, seed {args.seed}, {args.dtype}")
    if cuts:
        log(f"       cut for the demo's time budget: {', '.join(cuts)}")
    start = time.perf_counter()
    model = random_model(Qwen3ForCausalLM, config, args.seed, getattr(torch, args.dtype)).eval()
    params = sum(p.numel() for p in model.parameters())
    log(f"       {params / 1e6:.0f}M parameters, built in {time.perf_counter() - start:.1f} s")
    return fixed_length(model)


def fixed_length(model):
    """Random weights: no EOS, so that each run generates exactly --new-tokens tokens."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tensor_parallel_model(args):
    """The demo model on every rank, loaded by HF's tensor parallelism from rank 0's ``save_pretrained``."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    folder = [tempfile.mkdtemp(prefix="torch_qwen_fused_demo_") if is_first_rank() else None]
    dist.broadcast_object_list(folder)
    try:
        if is_first_rank():
            build_model(args).save_pretrained(folder[0])
            log(f"       saved to {folder[0]}")
        dist.barrier()
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder[0], dtype=getattr(torch, args.dtype),
                                                     attn_implementation="sdpa",
                                                     distributed_config=DistributedConfig(tp_plan="auto"))
        dist.barrier()
    finally:
        if is_first_rank():
            shutil.rmtree(folder[0], ignore_errors=True)
    log(f"tensor parallel: {dist.get_world_size()} ranks ({dist.get_backend()}), tp_plan='auto', loaded in "
        f"{time.perf_counter() - start:.1f} s")
    return fixed_length(model.eval())


def per_rank(value) -> list:
    """``value`` of every rank (only this rank's without torch.distributed)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def make_prompts(args, vocab_size):
    """Left-padded random prompts, the longest ``--prompt-len``, each next one 1/8 shorter."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    lengths = [max(1, args.prompt_len - row * max(1, args.prompt_len // 8)) for row in range(args.batch)]
    ids = torch.randint(1, vocab_size, (args.batch, args.prompt_len), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, args.prompt_len - length:] = 1
    return ids.masked_fill(mask == 0, 0), mask, lengths


def run(model, ids, mask, new_tokens, label):
    clock = StepClock(label, new_tokens)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             stopping_criteria=[clock], return_dict_in_generate=True, output_logits=True)
    return out, clock, clock.stamps[0] - start


def paged_copy(handle, dense_cache, capacity: int):
    """A PagedKVCache (from the patch handle) holding exactly what ``dense_cache`` (a DynamicCache) holds, with room
    for ``capacity`` tokens per row."""
    first = dense_cache.layers[0].keys
    batch, _, context, _ = first.shape
    paged = handle.new_cache(batch_size=batch, max_length=capacity)
    paged.begin_forward(batch, context, dtype=first.dtype, device=first.device)
    for index, layer in enumerate(dense_cache.layers):
        paged.update(layer.keys, layer.values, index)
    paged.end_forward()
    return paged


def long_context_row(model, args, steps: int = 8) -> dict:
    """Decode tokens/s from one ``args.long_context``-token context of random K/V (decode time does not depend on
    what the context holds), stock DynamicCache vs patched PagedKVCache: ``steps`` greedy steps each."""
    from transformers import DynamicCache

    from .hf import patch_model

    config = model.config
    generator = torch.Generator().manual_seed(args.seed + 2)
    shape = (1, config.num_key_value_heads, args.long_context, config.head_dim)
    dtype = next(model.parameters()).dtype
    stock_cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        stock_cache.update(torch.randn(shape, generator=generator).to(dtype),
                           torch.randn(shape, generator=generator).to(dtype), layer)
    first = torch.randint(1, config.vocab_size, (1, 1), generator=generator)

    def decode(cache):
        token, tokens = first, []
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
        return steps / (time.perf_counter() - start), torch.cat(tokens, 1)

    with patch_model(model, block_size=args.block_size) as handle:
        paged_cache = paged_copy(handle, stock_cache, args.long_context + steps)
        patched, patched_tokens = decode(paged_cache)
        calls = handle.fused_calls
    stock, stock_tokens = decode(stock_cache)
    return {"stock": stock, "patched": patched, "identical": bool(torch.equal(stock_tokens, patched_tokens)),
            "calls": calls, "steps": steps}


def continuous_batching_row(model, ids, mask, args) -> dict:
    """HF's continuous batching (``generate_batch``) of the demo's prompts (unpadded, their last ``CB_MAX_PROMPT``
    tokens), ``CB_MAX_NEW_TOKENS`` new tokens at most, stock vs patched: generated tokens/s (wall time of the call,
    prefill included), identical tokens, fused calls."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from .hf import patch_model

    requests = [row[m.bool()].tolist()[-CB_MAX_PROMPT:] for row, m in zip(ids, mask)]
    new_tokens = min(args.new_tokens, CB_MAX_NEW_TOKENS)
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1)
    # HF sizes the cache from the free memory by default (GiBs to zero on a CPU): enough pages for these requests.
    pages = len(requests) * -(-(args.prompt_len + args.new_tokens) // 256) + len(requests)

    def serve():
        start = time.perf_counter()
        outputs = model.generate_batch(requests, generation_config=generation,
                                       continuous_batching_config=ContinuousBatchingConfig(num_blocks=pages))
        seconds = time.perf_counter() - start
        return len(requests) * new_tokens / seconds, [output.generated_tokens for output in outputs.values()]

    stock, stock_tokens = serve()
    with patch_model(model, block_size=args.block_size) as handle:
        patched, patched_tokens = serve()
    return {"stock": stock, "patched": patched, "identical": stock_tokens == patched_tokens,
            "calls": (handle.fused_calls, handle.varlen_calls), "prompt": max(map(len, requests)),
            "new_tokens": new_tokens}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.tp:
        dist.init_process_group("gloo")
    import transformers

    import torch_qwen_fused
    from torch_qwen_fused.hf import patch_model

    log(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"torch_qwen_fused from {torch_qwen_fused.__file__}")
    model = tensor_parallel_model(args) if args.tp else build_model(args)
    ids, mask, lengths = make_prompts(args, model.config.vocab_size)
    log(f"prompts: batch {args.batch}, real lengths {lengths} (left-padded to {args.prompt_len}), "
        f"{args.new_tokens} new tokens each, greedy")

    # The first large prefill pays for cold memory; warm both paths so neither timed run does.
    log("warm-up: 2 tokens on each path (the stock one on the full batch)")
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
        with patch_model(model, block_size=args.block_size):
            model.generate(input_ids=ids[:, -8:], max_new_tokens=2, do_sample=False)

    stock_speeds, fused_speeds, fused_calls = [], [], []
    for rep in range(args.repeat):
        tag = f" (repeat {rep + 1}/{args.repeat})" if args.repeat > 1 else ""
        log(f"stock HF: sdpa attention, DynamicCache{tag}")
        stock, stock_clock, stock_prefill = run(model, ids, mask, args.new_tokens, "stock  ")
        log(f"patched: patch_model(model, block_size={args.block_size}), PagedKVCache + fa_fused{tag}")
        with patch_model(model, block_size=args.block_size) as handle:
            fused, fused_clock, fused_prefill = run(model, ids, mask, args.new_tokens, "patched")
            cache = fused.cache
        stock_speeds.append(stock_clock.decode_tokens_per_s(args.batch))
        fused_speeds.append(fused_clock.decode_tokens_per_s(args.batch))
        fused_calls.append(handle.fused_calls)

    new_stock = stock.sequences[:, args.prompt_len:]
    new_fused = fused.sequences[:, args.prompt_len:]
    agree = (new_stock == new_fused)
    first_diff = [int(row.logical_not().nonzero()[0]) if not row.all() else None for row in agree]
    same_prefix = min([d for d in first_diff if d is not None], default=args.new_tokens)
    logit_diff = max((a - b).abs().max().item() for a, b in zip(stock.logits[:same_prefix + 1],
                                                                  fused.logits[:same_prefix + 1]))
    stock_tps, fused_tps = max(stock_speeds), max(fused_speeds)
    decode_steps = args.new_tokens - 1
    layers = model.config.num_hidden_layers
    used_blocks = sum(len(blocks) for blocks in cache.row_blocks)
    ranks_calls = per_rank(fused_calls)                            # one list of repeats per rank
    ranks_kv_heads = per_rank(cache.num_kv_heads)
    ranks_agree = per_rank(bool(agree.all()))
    threads = f"{torch.get_num_threads()} threads" + (f" per rank x {len(ranks_calls)} ranks" if args.tp else "")

    log("")
    log("== results")
    log(f"token agreement     : {int(agree.sum())}/{agree.numel()} generated tokens identical "
        f"({100.0 * agree.float().mean().item():.1f}%); rows fully identical: {int(agree.all(1).sum())}/{args.batch}"
        + ("" if all(d is None for d in first_diff) else f"; first difference per row at token {first_diff}"))
    log(f"max |logit diff|    : {logit_diff:.3g} (steps before any token differs; max |logit| "
        f"{max(x.abs().max().item() for x in stock.logits):.3g})")
    best = " (best of each)" if args.repeat > 1 else ""
    log(f"decode tokens/s     : stock {stock_tps:.2f}, patched {fused_tps:.2f}{best} "
        f"(x{fused_tps / stock_tps:.2f}; batch {args.batch} x {decode_steps} decode steps; "
        f"{threads}, shared machine: a few % is noise)")
    log(f"prefill seconds     : stock {stock_prefill:.2f}, patched {fused_prefill:.2f} (same stock attention math)")
    expected = decode_steps * layers
    all_fused = all(set(calls) == {expected} for calls in ranks_calls)
    per_rank_calls = f" on each of {len(ranks_calls)} ranks" if args.tp else ""
    log(f"fused calls         : {handle.fused_calls} torch.ops.qwen.fa_fused calls{per_rank_calls} = {decode_steps} "
        f"decode steps x {layers} layers" + ("" if all_fused else f" (MISMATCH: {ranks_calls})"))
    if args.tp:
        log(f"tensor parallel     : kv heads cached per rank {ranks_kv_heads} of {model.config.num_key_value_heads}; "
            f"tokens identical to stock on every rank: {all(ranks_agree)}")
    log(f"paged cache         : block_size {cache.block_size}, {used_blocks}/{cache.num_blocks} blocks used, "
        f"real tokens per row {cache.seq_lens.tolist()} (padding not stored)")
    extra_ok = True
    if args.long_context and not args.tp:
        log("")
        log(f"== decode from one {args.long_context}-token context (batch 1, random K/V context)")
        row = long_context_row(model, args)
        log(f"decode tokens/s     : stock {row['stock']:.2f}, patched {row['patched']:.2f} "
            f"(x{row['patched'] / row['stock']:.2f}); tokens identical: {row['identical']}; "
            f"{row['calls']} fa_fused calls = {row['steps']} steps x {layers} layers")
        extra_ok &= row["identical"] and row["calls"] == row["steps"] * layers
    if args.continuous_batching and not args.tp:
        log("")
        row = continuous_batching_row(model, ids, mask, args)
        log(f"== continuous batching: model.generate_batch of the {args.batch} prompts (up to their last "
            f"{row['prompt']} tokens), {row['new_tokens']} new tokens each")
        log(f"generated tokens/s  : stock {row['stock']:.2f}, patched {row['patched']:.2f} "
            f"(x{row['patched'] / row['stock']:.2f}, prefill included); tokens identical: {row['identical']}; "
            f"{row['calls'][0]} fa_fused + {row['calls'][1]} fa_fused_varlen calls")
        extra_ok &= row["identical"] and row["calls"][0] > 0
    log(f"total time          : {time.perf_counter() - started:.1f} s")
    return 0 if all_fused and all(ranks_agree) and extra_ok else 1


if __name__ == "__main__":
    sys.exit(main())
