"""One rank of tests/test_hf_tensor_parallel.py, run under ``torchrun``.

    torchrun --standalone --nproc-per-node 2 tests/tp_worker.py PROMPTS.pt OUT_DIR MODEL_DIR [MODEL_DIR ...]

For each saved model: load it with HF's tensor parallelism (``DistributedConfig(tp_plan="auto")``, gloo on the
CPU), generate greedily from the left-padded prompts with the stock model, then with ``patch_model``, and write
what this rank saw to ``OUT_DIR/<model dir name>.rank<r>.json``: both runs' tokens, the handle's fused calls and
the cache's kv heads, or the errors the stock run and ``patch_model`` raised.
"""

import json
import pathlib
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from torch_qwen_fused.hf import patch_model

BLOCK_SIZE = 4   # small blocks: the rows cross block boundaries during decode


def one_model(model_dir: pathlib.Path, ids, mask, new_tokens) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(tp_plan="auto"),
                                                 dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    attention = model.model.layers[0].self_attn
    report = {"rank": dist.get_rank(), "world_size": dist.get_world_size(),
              "q_proj_local_rows": attention.q_proj.weight.to_local().shape[0]}
    with torch.no_grad():
        try:
            stock = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
            report["stock_tokens"] = stock[:, ids.shape[1]:].tolist()
        except RuntimeError as error:   # what HF's own forward does with a shard that is not whole heads
            report["stock_error"] = str(error)
        try:
            handle = patch_model(model, block_size=BLOCK_SIZE)
        except NotImplementedError as error:
            report["patch_error"] = str(error)
            return report
        with handle:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 return_dict_in_generate=True)
    cache = out.cache
    report.update(patched_tokens=out.sequences[:, ids.shape[1]:].tolist(), fused_calls=handle.fused_calls,
                  varlen_calls=handle.varlen_calls, handle_kv_heads=handle.num_kv_heads,
                  cache_kv_heads=cache.num_kv_heads, k_cache_shape=list(cache.layers[0].k_cache.shape),
                  seq_lens=cache.seq_lens.tolist())
    return report


def main(prompts_file: str, out_dir: str, *model_dirs: str) -> None:
    dist.init_process_group("gloo")
    prompts = torch.load(prompts_file)
    ids, mask, new_tokens = prompts["input_ids"], prompts["attention_mask"], prompts["new_tokens"]
    for model_dir in map(pathlib.Path, model_dirs):
        report = one_model(model_dir, ids, mask, new_tokens)
        path = pathlib.Path(out_dir) / f"{model_dir.name}.rank{dist.get_rank()}.json"
        path.write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
