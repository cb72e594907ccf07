"""``python -m torch_qwen_fused.serve`` (``transformers serve`` with the patch): a chat completion posted to it on
127.0.0.1 must carry the tokens stock ``generate()`` gives for the same chat, and every step must have been fused.

The model and its tokenizer are built here (a random-weight Qwen3 and a word-level tokenizer with a chat template,
saved to a temporary directory: no hub access); the server runs in this process (transformers' ``--non-blocking``),
with continuous batching.
"""

import json
import socket
import time
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_hf_patch import qwen3_model  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from torch_qwen_fused import serve  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
NEW_TOKENS = 12


def save_model_and_tokenizer(directory):
    model = qwen3_model((4, 2, 32, 64))
    words = SPECIAL + ["user", "assistant", "system"] + [f"w{i}" for i in range(model.config.vocab_size - 6)]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url, body, timeout):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until_up(url, seconds):
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_chat_completion_from_the_patched_server_matches_stock_generate(tmp_path):
    model, tokenizer = save_model_and_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "w5 w17 w3 w250 w42 w9"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        stock = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids["input_ids"].shape[1]:]
    expected = tokenizer.decode(stock, skip_special_tokens=True)

    port = free_port()
    server = serve.main([str(tmp_path), "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1",
                         "--port", str(port), "--cb-num-blocks", "64", "--non-blocking"])
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", seconds=30)
        reply = post(f"http://127.0.0.1:{port}/v1/chat/completions",
                     {"model": str(tmp_path), "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0},
                     timeout=60)
    finally:
        server.kill_server()
    # One word per token. The reply's text starts with the generation prompt's tail (HF's incremental decoding with
    # this decoder-less word-level tokenizer), then the generated words.
    assert len(expected.split()) == NEW_TOKENS
    assert reply["choices"][0]["message"]["content"].endswith(expected)
    assert reply["usage"]["completion_tokens"] == len(stock)
    handle = serve.PATCHED[-1]
    assert handle.fused_calls > 0 and handle.varlen_calls > 0
