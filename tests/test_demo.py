"""The demo (torch_qwen_fused/demo.py), cut small: one process, and ``--tp`` over 2 torchrun ranks."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from torch_qwen_fused import demo  # noqa: E402

SMALL = ["--layers", "1", "--vocab", "512", "--prompt-len", "16", "--new-tokens", "3", "--batch", "2"]
# The long-context row cut small too (the continuous-batching row follows the prompts).
SMALL_ROWS = ["--long-context", "64"]


def test_demo_exits_0_with_tokens_identical_and_every_step_fused(capsys):
    assert demo.main(SMALL + SMALL_ROWS) == 0
    printed = capsys.readouterr().out
    assert "6/6 generated tokens identical" in printed
    assert "2 torch.ops.qwen.fa_fused calls = 2 decode steps x 1 layers" in printed
    assert "== decode from one 64-token context" in printed
    assert "tokens identical: True; 8 fa_fused calls = 8 steps x 1 layers" in printed
    assert "== continuous batching: model.generate_batch of the 2 prompts (up to their last 16 tokens), 3 new tokens " \
           "each" in printed
    assert "tokens identical: True; 2 fa_fused + 1 fa_fused_varlen calls" in printed


def test_tp_outside_torchrun_is_refused_with_the_command(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        demo.parse_args(["--tp"])
    assert "torchrun --nproc-per-node 2 -m torch_qwen_fused.demo --tp" in capsys.readouterr().err


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="this torch build has no torch.distributed gloo backend")
def test_tp_demo_on_two_ranks():
    pytest.importorskip("accelerate", reason="HF tensor parallelism loads through accelerate (the [tp] extra)")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "torch_qwen_fused.demo", "--tp", *SMALL]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    assert done.stdout.count("== results") == 1                     # rank 0 prints
    assert "6/6 generated tokens identical" in done.stdout
    assert "2 torch.ops.qwen.fa_fused calls on each of 2 ranks" in done.stdout
    assert "kv heads cached per rank [4, 4] of 8; tokens identical to stock on every rank: True" in done.stdout
