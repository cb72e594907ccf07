"""Bad input (docs/contract.md, section 5): a ValueError naming the argument, raised before anything is written.

The checks are one C++ routine (csrc/validation.cpp). Every case runs through each way a user reaches a kernel:
the CPU kernel (``torch.ops.qwen.fa_fused``), the eager backend (``backend="eager"``) and the op dispatched to
the eager kernel (what CUDA, MPS, ... run). Each must refuse it with the same message and leave the caches
byte-for-byte unchanged.
"""

import contextlib

import pytest
import torch

import torch_qwen_fused
from torch_qwen_fused.backends.eager import fa_fused_eager
from torch_qwen_fused.testing import assert_same_bytes, make_case


@contextlib.contextmanager
def cpu_dispatched_to_eager():
    """CPU calls of the op reach the eager kernel, as calls on a device without a kernel of its own do."""
    with torch.library._scoped_library("qwen", "IMPL") as lib:
        lib.impl("fa_fused", fa_fused_eager, "CPU", allow_override=True)
        yield


def call_dispatched_to_eager(case):
    with cpu_dispatched_to_eager():
        return torch.ops.qwen.fa_fused(*case.args())


BACKEND_CALLS = {
    "cpu kernel": lambda c: torch.ops.qwen.fa_fused(*c.args()),
    "eager": lambda c: torch_qwen_fused.fa_fused(*c.args(), backend="eager"),
    "op -> eager": call_dispatched_to_eager,
}


def base_case():
    # 2 rows of 20 and 33 tokens, block 16: block_table has 3 + 1 columns, 5 + 3 blocks (128 slots) in all.
    return make_case([20, 33], num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16,
                     explicit_slots=True)


def replace(**changes):
    def mutate(case):
        for name, value in changes.items():
            setattr(case, name, value(case) if callable(value) else value)
    return mutate


def set_item(name, index, value):
    def mutate(case):
        getattr(case, name)[index] = value
    return mutate


def non_contiguous_cache(case):
    case.k_cache = case.k_cache.transpose(0, 1).contiguous().transpose(0, 1)


def blocks_closer_than_a_block(case):
    # Blocks 1024 elements apart, each 2048 long: block i's second half is block i + 1's first.
    buffer = torch.zeros(case.k_cache.numel(), dtype=case.k_cache.dtype)
    case.k_cache = buffer.as_strided(case.k_cache.shape, (1024, 128, 64, 1))


def v_cache_with_another_block_stride(case):
    # v_cache's blocks every other block of a buffer twice its size; k_cache stays contiguous.
    buffer = torch.zeros((case.v_cache.shape[0], 2) + tuple(case.v_cache.shape[1:]), dtype=case.v_cache.dtype)
    case.v_cache = buffer[:, 0]


def interleaved_caches_half_a_block_apart(case):
    # K and V pages interleaved in one buffer, but V starts half a page after K: each V block straddles two K blocks.
    pages = torch.zeros((2 * case.k_cache.shape[0] + 1,) + tuple(case.k_cache.shape[1:]), dtype=case.k_cache.dtype)
    case.k_cache = pages[0:-1:2]
    case.v_cache = pages.view(-1)[pages[0].numel() // 2:].as_strided(case.k_cache.shape, case.k_cache.stride())


def overlapping_caches(case):
    # Two views of one buffer, one block apart: v_cache's first blocks are k_cache's last ones.
    buffer = torch.cat((case.k_cache, case.v_cache[:1]))
    case.k_cache, case.v_cache = buffer[:-1], buffer[1:]


def inference_caches(case):
    with torch.inference_mode():
        case.k_cache, case.v_cache = case.k_cache.clone(), case.v_cache.clone()


def colliding_default_slots(case):
    # Row 1 becomes row 0's twin (same blocks, same length): both default slots are row 0's next one.
    case.slot_mapping = None
    case.seq_lens[1] = case.seq_lens[0]
    case.block_table[1, :2] = case.block_table[0, :2]


BAD_INPUTS = {
    "q not 3-D": (replace(q=lambda c: c.q[0]), "q must be 3-D"),
    "q integer": (replace(q=lambda c: c.q.to(torch.int32)), "q must be float32, float16 or bfloat16"),
    "head_dim not a multiple of 16": (
        replace(q=lambda c: c.q[..., :24], k=lambda c: c.k[..., :24], v=lambda c: c.v[..., :24]),
        "q.shape[2] (head_dim) must be a multiple of 16"),
    "head_dim above 256": (replace(q=lambda c: torch.zeros(2, 8, 272, dtype=torch.bfloat16)),
                           "q.shape[2] (head_dim) must be a multiple of 16 in [16, 256], got 272"),
    "heads not a multiple of kv heads": (replace(q=lambda c: c.q[:, :7]), "must be a multiple of num_kv_heads"),
    "k batch": (replace(k=lambda c: c.k[:1]), "k must have shape [2, 2, 64], got [1, 2, 64]"),
    "v dtype": (replace(v=lambda c: c.v.float()), "v must have q's dtype"),
    "k not 3-D": (replace(k=lambda c: c.k[0]), "k must be 3-D"),
    "q_norm_weight shape": (replace(q_norm_weight=lambda c: c.q_norm_weight[:32]),
                            "q_norm_weight must have shape [64], got [32]"),
    "k_norm_weight dtype": (replace(k_norm_weight=lambda c: c.k_norm_weight.long()),
                            "k_norm_weight must be float32, float16, bfloat16 or float64, got torch.int64"),
    "cos head_dim": (replace(cos=lambda c: c.cos[:, :32]), "cos must have shape [max_position, 64]"),
    "sin shape": (replace(sin=lambda c: c.sin[:10]), "sin must have cos's shape"),
    "k_cache 3-D": (replace(k_cache=lambda c: c.k_cache[0]), "k_cache must be 4-D"),
    "v_cache shape": (replace(v_cache=lambda c: c.v_cache[:, :8]), "v_cache must have shape"),
    "k_cache non-contiguous": (non_contiguous_cache, "k_cache must hold each block contiguous ([block_size, "
                                                     "num_kv_heads, head_dim] row-major)"),
    "k_cache blocks overlap each other": (blocks_closer_than_a_block,
                                          "k_cache must hold each block contiguous ([block_size, num_kv_heads, "
                                          "head_dim] row-major) and its blocks at least 2048 elements apart (stride(0))"
                                          ", got strides [1024, 128, 64, 1]"),
    "v_cache block stride": (v_cache_with_another_block_stride,
                             "v_cache must have k_cache's block stride (stride(0)) 2048, got 4096"),
    "v_cache dtype": (replace(v_cache=lambda c: c.v_cache.half()), "v_cache must have k_cache's dtype"),
    "cache integer": (replace(k_cache=lambda c: c.k_cache.to(torch.int16), v_cache=lambda c: c.v_cache.to(torch.int16)),
                      "k_cache must be float32, float16, bfloat16, float8_e4m3fn or float8_e5m2, got torch.int16"),
    "block_table int64": (replace(block_table=lambda c: c.block_table.long()), "block_table must be int32"),
    "block_table rows": (replace(block_table=lambda c: c.block_table[:1]),
                         "block_table must have shape [2, max_blocks]"),
    "seq_lens int64": (replace(seq_lens=lambda c: c.seq_lens.long()), "seq_lens must be int32"),
    "seq_lens shape": (replace(seq_lens=lambda c: c.seq_lens[:1]), "seq_lens must have shape [2]"),
    "seq_len 0": (set_item("seq_lens", 1, 0), "seq_lens[1] must be >= 1 (it counts the new token), got 0"),
    "seq_len negative": (set_item("seq_lens", 0, -5), "seq_lens[0] must be >= 1"),
    "seq_len beyond the table": (set_item("seq_lens", 1, 65),
                                 "seq_lens[1] = 65 needs 5 blocks of 16, but block_table has 4 columns"),
    "block id past the cache": (set_item("block_table", (1, 2), 8),
                                "block_table[1, 2] = 8 is outside the cache's blocks [0, 8)"),
    "block id negative": (set_item("block_table", (0, 0), -1), "block_table[0, 0] = -1 is outside"),
    "positions dtype": (replace(positions=lambda c: c.positions.float()), "positions must be int64 (or int32)"),
    "positions shape": (replace(positions=lambda c: c.positions[:1]), "positions must have shape [2]"),
    "position past the table": (set_item("positions", 1, 10_000), "positions[1] = 10000 is outside the cos/sin table"),
    "position negative": (set_item("positions", 0, -1), "positions[0] = -1 is outside the cos/sin table"),
    "default position past the table": (replace(positions=None, cos=lambda c: c.cos[:20], sin=lambda c: c.sin[:20]),
                                        "the default position of row 1 (its context index) = 32 is outside the "
                                        "cos/sin table [0, 20)"),
    "slot past the cache": (set_item("slot_mapping", 0, 128),
                            "slot_mapping[0] = 128 is outside the cache's slots [0, 128)"),
    "slot below -1": (set_item("slot_mapping", 1, -2), "slot_mapping[1] = -2 is outside"),
    "slot_mapping dtype": (replace(slot_mapping=lambda c: c.slot_mapping.float()), "slot_mapping must be int64"),
    "cos float8": (replace(cos=lambda c: c.cos.to(torch.float8_e5m2)),
                   "cos must be float32, float16, bfloat16 or float64, got torch.float8_e5m2"),
    "q_norm_weight float8": (replace(q_norm_weight=lambda c: c.q_norm_weight.to(torch.float8_e4m3fn)),
                             "q_norm_weight must be float32, float16, bfloat16 or float64, got torch.float8_e4m3fn"),
    # Contract section 5: writes whose result would depend on the kernel's order.
    "k_cache is v_cache": (replace(v_cache=lambda c: c.k_cache),
                           "v_cache shares memory with k_cache; both are written in place"),
    "v_cache overlaps k_cache": (overlapping_caches, "v_cache shares memory with k_cache"),
    "interleaved blocks overlap": (interleaved_caches_half_a_block_apart, "v_cache shares memory with k_cache"),
    "q inside k_cache": (replace(q=lambda c: c.k_cache.view(-1)[: 2 * 8 * 64].view(2, 8, 64)),
                         "q overlaps k_cache, which is written in place; pass a copy"),
    "v inside v_cache": (replace(v=lambda c: c.v_cache.view(-1)[-2 * 2 * 64:].view(2, 2, 64)),
                         "v overlaps v_cache, which is written in place"),
    "two rows write one slot": (set_item("slot_mapping", slice(None), 77),
                                "slot_mapping[1] = 77 is also the slot of row 0; two rows cannot write the same "
                                "cache slot"),
    "default slots collide": (colliding_default_slots,
                              "the default slot of row 1 (its context index through block_table) = "),
    "caches from inference_mode": (inference_caches,
                                   "k_cache is an inference tensor (created under torch.inference_mode()) and is "
                                   "written in place"),
}


def refuse(case, call):
    """Runs ``call`` on ``case``; returns the ValueError message after checking the caches kept every byte."""
    k_before, v_before = case.k_cache.clone(), case.v_cache.clone()
    with pytest.raises(ValueError) as error:
        call(case)
    if k_before.shape == case.k_cache.shape and k_before.dtype == case.k_cache.dtype:
        assert_same_bytes(case.k_cache, k_before)
    if v_before.shape == case.v_cache.shape and v_before.dtype == case.v_cache.dtype:
        assert_same_bytes(case.v_cache, v_before)
    return str(error.value).splitlines()[0]


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_refused_before_any_write(name):
    mutate, expected = BAD_INPUTS[name]
    messages = {}
    for backend, call in BACKEND_CALLS.items():
        case = base_case()
        mutate(case)
        messages[backend] = refuse(case, call)
        assert expected in messages[backend], f"{backend}: {messages[backend]!r}"
    assert len(set(messages.values())) == 1, f"the backends disagree: {messages}"


def test_base_case_is_valid():
    # The cases above differ from this one by one argument each.
    for call in BACKEND_CALLS.values():
        call(base_case())


def test_device_mismatch_is_named():
    case = base_case()
    case.block_table = case.block_table.to("meta")
    with pytest.raises(ValueError, match="block_table must be on the device of the other arguments, cpu, got meta"):
        torch.ops.qwen.fa_fused_check(*case.args())


def meta_case(varlen: bool):
    return make_case([20, 33], 8, 2, 64, 16, torch.float32, explicit_slots=True, new_tokens=[2, 1] if varlen else None)


META_ARGUMENTS = ["q", "k_cache", "block_table", "seq_lens", "positions", "slot_mapping", "v_scale"]


@pytest.mark.parametrize("varlen, name", [(False, name) for name in META_ARGUMENTS] +
                         [(True, name) for name in META_ARGUMENTS + ["query_start_loc"]])
def test_one_meta_argument_through_the_dispatcher_is_refused(name, varlen):
    """One meta tensor among CPU tensors makes the dispatcher pick the Meta (fake) kernel: it must refuse, naming
    the argument, not return uninitialized memory."""
    case = meta_case(varlen)
    case.v_scale = torch.ones(1)
    setattr(case, name, getattr(case, name).to("meta"))
    k_before, v_before = case.k_cache.clone(), case.v_cache.clone()
    with pytest.raises(ValueError, match=f"{name} must be on the device of the other arguments, cpu, got meta"):
        case.run_op()
    if name != "k_cache":
        assert_same_bytes(case.k_cache, k_before)
    assert_same_bytes(case.v_cache, v_before)


@pytest.mark.parametrize("varlen", [False, True])
def test_fake_kernel_checks_shapes_and_dtypes_as_the_cpu_kernel_does(varlen):
    """The same message from the fake kernel (all-meta arguments) as from the CPU kernel, for a wrong shape and a
    wrong dtype; and the right output shape when nothing is wrong."""
    case = meta_case(varlen)
    meta = case.clone()
    for field in ("q", "k", "v", "q_norm_weight", "k_norm_weight", "cos", "sin", "k_cache", "v_cache", "block_table",
                  "seq_lens", "query_start_loc", "slot_mapping"):
        if getattr(meta, field) is not None:
            setattr(meta, field, getattr(meta, field).to("meta"))
    meta.positions = None
    case.positions = None
    assert meta.run_op().shape == case.q.shape
    for mutate in (lambda c: setattr(c, "v", c.v[:, :1]), lambda c: setattr(c, "seq_lens", c.seq_lens.long()),
                   lambda c: setattr(c, "k_norm_weight", c.k_norm_weight.to(torch.int32))):
        messages = []
        for working in (case.clone(), meta.clone()):
            mutate(working)
            with pytest.raises(ValueError) as error:
                working.run_op()
            messages.append(str(error.value).splitlines()[0])
        assert messages[0] == messages[1]


def test_eager_on_meta_tensors_says_why_it_refuses():
    """Not the misleading "v_cache shares memory with k_cache" (meta tensors have no memory to share)."""
    case = base_case()
    meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in case.args()]
    with pytest.raises(ValueError, match="meta device, which holds no values"):
        torch_qwen_fused.fa_fused(*meta_args, backend="eager")


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_empty_varlen_batch_needs_query_start_loc_to_end_at_zero(backend):
    case = make_case([5], 8, 2, 64, 16, torch.float32, new_tokens=[1])
    empty = {name: getattr(case, name)[:0] for name in ("q", "k", "v", "seq_lens", "block_table")}
    args = (empty["q"], empty["k"], empty["v"], case.q_norm_weight, case.k_norm_weight, case.cos, case.sin,
            case.k_cache, case.v_cache, empty["block_table"], empty["seq_lens"])
    assert torch_qwen_fused.fa_fused_varlen(*args, torch.tensor([0], dtype=torch.int32), backend=backend).shape[0] == 0
    with pytest.raises(ValueError, match=r"query_start_loc\[0\] must be 0, got 5"):
        torch_qwen_fused.fa_fused_varlen(*args, torch.tensor([5], dtype=torch.int32), backend=backend)


def test_a_later_row_error_leaves_earlier_rows_unwritten():
    # Row 0 is valid and would be written first; row 1's bad slot must stop the call before that.
    case = base_case()
    case.slot_mapping[1] = 10_000
    refuse(case, lambda c: torch.ops.qwen.fa_fused(*c.args()))


def test_unused_block_table_entries_are_not_checked():
    # Columns past a row's context may hold anything (vLLM pads with arbitrary ids).
    case = base_case()
    case.block_table[0, 3] = 123456
    out = torch.ops.qwen.fa_fused(*case.clone().args())
    torch.testing.assert_close(out.float(), torch_qwen_fused.fa_fused(*case.args(), backend="eager").float(),
                               atol=2e-2, rtol=5e-3)


def test_skipped_rows_may_share_slot_minus_one():
    case = base_case()
    case.slot_mapping[:] = -1
    torch.ops.qwen.fa_fused(*case.clone().args())
    torch_qwen_fused.fa_fused(*case.args(), backend="eager")


def test_caches_that_do_not_overlap_may_share_a_buffer():
    # vLLM-style: K and V of a layer as two halves of one allocation.
    case = base_case()
    expected = torch.ops.qwen.fa_fused(*case.clone().args())
    buffer = torch.stack((case.k_cache, case.v_cache))
    case.k_cache, case.v_cache = buffer[0], buffer[1]
    torch.testing.assert_close(torch.ops.qwen.fa_fused(*case.args()), expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", list(BACKEND_CALLS))
def test_caches_interleaved_with_other_pages_give_the_contiguous_result(backend):
    """HF continuous batching's layout: one buffer of blocks, each holding every layer's K page then V page, so one
    layer's k_cache / v_cache are views with a block stride of 2 * layers pages and V one page after K. Their spans
    overlap, their blocks do not: the call must write exactly the contiguous call's slots and nothing else."""
    layers, layer = 3, 1
    case = base_case()
    call = BACKEND_CALLS[backend]
    expected_case = case.clone()
    expected = call(expected_case)
    buffer = torch.randn((case.k_cache.shape[0], 2 * layers) + tuple(case.k_cache.shape[1:])).to(case.k_cache.dtype)
    buffer[:, 2 * layer], buffer[:, 2 * layer + 1] = case.k_cache, case.v_cache
    others = torch.cat((buffer[:, : 2 * layer], buffer[:, 2 * layer + 2:]), dim=1).clone()
    case.k_cache, case.v_cache = buffer[:, 2 * layer], buffer[:, 2 * layer + 1]
    assert case.k_cache.stride(0) == 2 * layers * case.k_cache[0].numel()
    torch.testing.assert_close(call(case), expected, atol=0, rtol=0)
    assert_same_bytes(buffer[:, 2 * layer].contiguous(), expected_case.k_cache)
    assert_same_bytes(buffer[:, 2 * layer + 1].contiguous(), expected_case.v_cache)
    assert_same_bytes(torch.cat((buffer[:, : 2 * layer], buffer[:, 2 * layer + 2:]), dim=1), others)


def test_inference_caches_are_written_inside_inference_mode():
    case = base_case()
    expected_case = case.clone()
    expected = torch.ops.qwen.fa_fused(*expected_case.args())
    for call in (lambda c: torch.ops.qwen.fa_fused(*c.args()),
                 lambda c: torch_qwen_fused.fa_fused(*c.args(), backend="eager")):
        working = case.clone()
        inference_caches(working)
        with torch.inference_mode():
            out = call(working)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=5e-3)
        slots = case.slots()
        assert not torch.equal(working.k_cache.flatten(0, 1)[slots], case.k_cache.flatten(0, 1)[slots])


GRAD_INPUTS = ["q", "k", "v", "q_norm_weight", "k_norm_weight", "cos", "sin", "k_cache", "v_cache"]


@pytest.mark.parametrize("name", GRAD_INPUTS)
def test_inputs_that_require_grad_are_refused(name):
    """Contract section 4: inference-only. Without the refusal the output claimed requires_grad and backward() left the
    gradient None."""
    messages = {}
    for backend, call in BACKEND_CALLS.items():
        case = base_case()
        case.q_norm_weight, case.k_norm_weight = case.q_norm_weight.bfloat16(), case.k_norm_weight.bfloat16()
        setattr(case, name, getattr(case, name).float().requires_grad_().to(getattr(case, name).dtype))
        k_before, v_before = case.k_cache.detach().clone(), case.v_cache.detach().clone()
        with pytest.raises(RuntimeError) as error:
            call(case)
        messages[backend] = str(error.value).splitlines()[0]
        assert f"fa_fused: {name} requires grad, but fa_fused is inference-only" in messages[backend]
        assert_same_bytes(case.k_cache.detach(), k_before)
        assert_same_bytes(case.v_cache.detach(), v_before)
        with torch.no_grad():
            out = call(case)
        assert not out.requires_grad
    assert len(set(messages.values())) == 1, f"the backends disagree: {messages}"


@pytest.mark.parametrize("backend", list(BACKEND_CALLS))
def test_a_non_tensor_argument_is_named_with_its_expected_type(backend):
    case = base_case()
    case.positions = case.positions.tolist()   # was an AttributeError ('list' has no 'long') in eager
    with pytest.raises(RuntimeError, match="Expected a value of type 'Optional\\[Tensor\\]' for argument 'positions'"):
        BACKEND_CALLS[backend](case)
