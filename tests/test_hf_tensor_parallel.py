"""``patch_model`` under Hugging Face's tensor parallelism (torch_qwen_fused/hf/tensor_parallel.py).

Small Qwen3 and Qwen3-MoE models are saved with ``save_pretrained``; ``torchrun`` launches 2 CPU ranks (gloo)
that load them with ``DistributedConfig(tp_plan="auto")`` and generate from a left-padded batch, stock and
patched (tests/tp_worker.py). Every rank's tokens must be those of one stock process, every decode step of
every layer must go through ``fa_fused`` on every rank, and each rank's cache must hold only its kv heads.
A model with fewer kv heads than ranks fails in HF's own forward; ``patch_model`` refuses it up front.
"""

import copy
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="HF tensor parallelism loads through accelerate (the [tp] extra)")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)

from test_hf_patch import CountFusedCalls, moe_model, prompts, qwen3_model  # noqa: E402
from torch_qwen_fused.hf import PagedKVCache, patch_model  # noqa: E402
from torch_qwen_fused.hf.tensor_parallel import local_head_counts  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402

RANKS = 2
NEW_TOKENS = 10
WORKER = pathlib.Path(__file__).with_name("tp_worker.py")
# name -> (model, its kv heads); the batch is PROMPTS["padded"] of test_hf_patch (real lengths 125, 121, 99).
MODELS = {
    "qwen3": lambda: qwen3_model((8, 4, 32, 64)),
    "qwen3_moe": moe_model,
    "one_kv_head": lambda: qwen3_model((4, 1, 32, 64)),
}


def one_process_tokens(model, ids, mask):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (one stock process's tokens, [rank 0 report, rank 1 report])}: one torchrun for all models."""
    root = tmp_path_factory.mktemp("tensor_parallel")
    ids, mask = prompts("padded")
    torch.save({"input_ids": ids, "attention_mask": mask, "new_tokens": NEW_TOKENS}, root / "prompts.pt")
    expected = {}
    for name, build in MODELS.items():
        model = build()
        model.save_pretrained(root / name)
        expected[name] = one_process_tokens(model, ids, mask) if name != "one_kv_head" else None
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [
        str(pathlib.Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
               str(WORKER), str(root / "prompts.pt"), str(root), *(str(root / name) for name in MODELS)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return {name: (expected[name], [json.loads((root / f"{name}.rank{rank}.json").read_text())
                                    for rank in range(RANKS)])
            for name in MODELS}


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_every_rank_generates_the_tokens_of_one_process(runs, name):
    expected, reports = runs[name]
    for report in reports:
        assert report["world_size"] == RANKS
        assert report["stock_tokens"] == expected, f"rank {report['rank']}: stock HF TP differs from one process"
        assert report["patched_tokens"] == expected, f"rank {report['rank']}: patched TP differs from one process"


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_every_decode_step_of_every_layer_is_fused_on_every_rank(runs, name):
    layers = MODELS[name]().config.num_hidden_layers
    for report in runs[name][1]:
        assert report["fused_calls"] == (NEW_TOKENS - 1) * layers, f"rank {report['rank']}"
        assert report["varlen_calls"] == 0


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_each_rank_caches_its_share_of_the_kv_heads(runs, name):
    config = MODELS[name]().config
    real_lengths = prompts("padded")[1].sum(1)
    for report in runs[name][1]:
        local = config.num_key_value_heads // RANKS
        assert report["q_proj_local_rows"] == config.num_attention_heads // RANKS * config.head_dim
        assert report["handle_kv_heads"] == report["cache_kv_heads"] == local
        assert report["k_cache_shape"][2:] == [local, config.head_dim]
        # Every rank sees every token: the same lengths (the last generated token is never written).
        assert report["seq_lens"] == (real_lengths + NEW_TOKENS - 1).tolist()


def test_fewer_kv_heads_than_ranks_is_refused_where_hf_fails(runs):
    for report in runs["one_kv_head"][1]:
        assert "stock_tokens" not in report and "shape" in report["stock_error"]   # HF's own reshape to heads
        assert "patched_tokens" not in report
        message = report["patch_error"]
        assert "num_key_value_heads=1" in message and "tensor-parallel size 2" in message
        assert "16 k_proj output features" in message


# ---------------------------------------------------------------- one process: what the ranks rely on
def test_one_process_holds_all_heads():
    model = qwen3_model((8, 4, 32, 64))
    assert all(local_head_counts(layer.self_attn) == (8, 4) for layer in model.model.layers)
    assert PagedKVCache(model.config).num_kv_heads == 4
    with patch_model(model) as handle:
        assert handle.num_kv_heads == 4


def test_a_distributed_config_gives_the_rank_its_share_of_the_kv_heads():
    config = copy.deepcopy(qwen3_model((8, 4, 32, 64)).config)
    config.distributed_config = DistributedConfig(tp_size=2, tp_plan="auto")
    assert PagedKVCache(config).num_kv_heads == 2
    assert PagedKVCache(config, num_kv_heads=3).num_kv_heads == 3
    config.distributed_config = DistributedConfig(tp_size=3, tp_plan="auto")
    with pytest.raises(ValueError, match=r"num_key_value_heads \(4\) is not divisible by .* \(3\)"):
        PagedKVCache(config)


def test_a_cache_with_other_kv_heads_than_the_model_is_refused_before_any_write():
    model = qwen3_model((8, 4, 32, 64))
    ids, mask = prompts("padded")
    cache = PagedKVCache(model.config, num_kv_heads=2, block_size=4)
    with patch_model(model) as handle, CountFusedCalls() as calls, torch.no_grad():
        with pytest.raises(ValueError, match=r"holds 2 kv heads per layer, this model's attention has 4"):
            model(input_ids=ids, attention_mask=mask, cache=cache)
    assert handle.fused_calls == calls.calls == 0
    assert not cache.is_initialized and cache.get_seq_length() == 0
