"""``fa_fused`` written with pypto 0.2.0's front end (``@pypto.frontend.jit``).

One kernel, three phases, in the structure of the upstream pypto-lib Qwen3 kernel:

phase 0, per row b: q and k go through per-head RMSNorm and rotate-half RoPE at positions[b], in
    fp32; the roped q is kept (in the cache dtype, the matmul operand) in a workspace; the roped k
    and the raw v are rounded to the cache dtype and written into the paged cache at
    slot_mapping[b] (no write where it is -1). Every write happens here, before any read of the
    cache, so the attention phases only read it and their tasks do not depend on one another.
phase 1, per (row, kv head, block of the row's context): the partial attention of the head's
    G = Hq / Hkv query heads over that block: scores = q K^T * scale (fp32 accumulation), its row
    max m, p = exp(scores - m), its row sum l and o = p V (fp32 accumulation). The last block of a
    row is read with ``valid_shape`` = the tokens that exist. The partials go to workspaces; these
    tasks are independent, so the runtime spreads them over every core.
phase 2, per (row, kv head): the exact flash-decoding merge of the row's partials,
    M = max_j m_j, L = sum_j exp(m_j - M) l_j, out = sum_j exp(m_j - M) o_j / L, cast to q's dtype.

Batch, max_blocks, num_blocks and the cos/sin table length are dynamic axes, so one compile serves
every batch and context length on the NPU; head counts, head_dim and block_size are compile-time
constants of a kernel (one kernel per model config, see ``build_kernel``).

Numerics (docs/contract.md, section 4): norm, RoPE, softmax and both accumulations are fp32. The two matmuls
take their operands in the cache dtype (q is rounded to it, as is p before P V), the way the
upstream kernel and the NPU's cube unit work; for an fp32 cache everything is fp32.

Tile shapes (``KernelTiles``), chosen for Qwen3-14B (Hq 40, Hkv 8, D 128, block 128, G 5):
- vector tiles of phase 0 cover a whole row of heads at once ([Hq or Hkv, D] = [40, 128] fp32
  is 20 KiB, well inside a 192 KiB UB), so each row's norm+RoPE is one tile per op;
- phase 1 scores of a task are [G, kv_blocks_per_task * block] = [5, 16 * 128]; the softmax works
  on [16, 512] fp32 vector tiles (``score_cols``; G padded to the 16-row fractal; 32 KiB, so an op's
  input and output fit the UB with room for double buffering); the cube tiles are M 16 (G padded),
  K = D = 128 and N = 128 for q K^T, and M 16, K = 128, N = D for p V;
- phase 2 works on [G, D] = [5, 128] fp32 tiles.
``kv_blocks_per_task`` groups that many cache blocks into one phase-1 task (fewer, larger tasks) and
``task_unroll`` is the ``unroll_list`` of the task loop (pypto then emits one root function for 2
tasks). ``RUNTIME_OPTIONS`` enlarges pypto's stitch memory pools so that many loop iterations are in
flight at once. ``vec_merge`` / ``cube_merge`` (pass options ``vec_nbuffer_setting`` /
``cube_nbuffer_setting``) merge 16 identical leaf subgraphs into one task: the cost model shows the
schedulers dispatching one task every ~200-250 cycles, so with ~3.7k-cycle block copies only ~15 of
48 vector cores were ever busy; fewer, larger tasks lift that cap.
Cost-model estimates (pypto 0.2.0 SIM, Qwen3-14B B=16 ctx 4096 bf16; not measurements):
4 blocks/task, pypto's default pools: 4644 us; + pools 1024: ~2x faster at small shapes; 16 blocks/task,
512-column softmax tiles: 2252 us; + unroll (2, 1): 2079 us (32 blocks/task: 2072 us); + merges
vec 8 / cube 8: 1621 us; vec 16 / cube 8: 1235 us; vec 16 / cube 16: 1222 us (the default; vec 24: 1220,
vec 32 or 64: 2062, cube 32: 1251; without the unroll: 1314; 32 blocks/task: 1326).
See benchmarks/bench_pypto_costmodel.py and benchmarks/results/bench_pypto_costmodel.json.
"""

import dataclasses
import math
from typing import Optional

from . import compat

__all__ = ["KernelConfig", "KernelTiles", "build_kernel"]


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """Tile shapes of the kernel (see the module docstring)."""

    norm_rows: int = 64          # vector tile rows of phase 0 ([heads, D] ops)
    score_rows: int = 16         # vector tile rows of phase 1/2 ([G, *] ops; G padded)
    cube_m: int = 16             # cube tile M (G padded to the fractal)
    cube_k: int = 128            # cube tile K
    cube_n: int = 128            # cube tile N
    kv_blocks_per_task: int = 16  # cache blocks per phase-1 task (see benchmarks/bench_pypto_costmodel.py)
    task_unroll: tuple = (2, 1)  # unroll_list of the phase-1 task loop (cost model: 506 vs 549 us at B=4 ctx 4096)
    score_cols: int = 512         # vector tile columns of the phase-1 softmax (0: all of a task's blocks)
    vec_merge: int = 16           # pass option vec_nbuffer_setting: identical AIV subgraphs merged per task
    cube_merge: int = 16          # pass option cube_nbuffer_setting: identical AIC subgraphs merged per task


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Everything a compiled kernel is specialised on."""

    dtype: str            # q/k/v/out dtype: "float32", "float16", "bfloat16"
    cache_dtype: str      # k_cache/v_cache dtype
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    eps: float
    scale: float
    tiles: KernelTiles = KernelTiles()


# pypto's runtime stitches loop iterations ("root functions") into device tasks; its default memory pools
# for their intermediate results (stitch_function_inner_memory 10, stitch_function_outcast_memory 50)
# keep only a few phase-1 iterations in flight. The upstream GLM attention example uses 1024 for both
# (its stitch_function_num_initial 128 is pypto's default; 512 or more crashes pypto 0.2.0's SIM run).
RUNTIME_OPTIONS = {"stitch_function_inner_memory": 1024, "stitch_function_outcast_memory": 1024}

_PYPTO_DTYPES = {"float32": "DT_FP32", "float16": "DT_FP16", "bfloat16": "DT_BF16"}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def build_kernel(config: KernelConfig, run_mode: str, verify_options: Optional[dict] = None,
                 runtime_options: Optional[dict] = None):
    """A ``@pypto.frontend.jit`` kernel for ``config``.

    run_mode: "npu" (CANN + torch_npu: launched on the current NPU stream) or "sim" (pypto's cost
    model; with ``verify_options=compat.REPLAY_VERIFY_OPTIONS`` its graph interpreter).

    The kernel's arguments, all tensors of one device, in this order:
    q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, D] (dtype); q_norm_weight [D], k_norm_weight [D],
    cos [P, D], sin [P, D] (fp32); k_cache, v_cache [NB, block_size, Hkv, D] (cache_dtype, written);
    block_table [B, MB], seq_lens [B], positions [B], slot_mapping [B] (int32); out [B, Hq, D]
    (dtype, written).
    """
    pypto = compat.import_pypto()

    dt = getattr(pypto, _PYPTO_DTYPES[config.dtype])
    cdt = getattr(pypto, _PYPTO_DTYPES[config.cache_dtype])
    f32, i32 = pypto.DT_FP32, pypto.DT_INT32
    hq, hkv, d, bs = config.num_heads, config.num_kv_heads, config.head_dim, config.block_size
    group = hq // hkv
    half = d // 2
    eps, scale = float(config.eps), float(config.scale)
    tiles = config.tiles
    kvb = max(1, tiles.kv_blocks_per_task)
    norm_rows = min(tiles.norm_rows, _round_up(hq, 8))
    score_rows = max(tiles.score_rows, _round_up(group, 8))
    cube_m = max(tiles.cube_m, _round_up(group, 16))
    cube_k, cube_n = min(tiles.cube_k, d), min(tiles.cube_n, _round_up(bs * kvb, 16))
    # a vector tile's last dim must span >= 32 bytes
    score_cols = _round_up(bs * kvb, 16)
    if tiles.score_cols > 0:
        score_cols = min(score_cols, _round_up(tiles.score_cols, 16))
    dyn = pypto.DYNAMIC
    mode = pypto.RunMode.NPU if run_mode == "npu" else pypto.RunMode.SIM
    rt = {"run_mode": mode}
    rt.update(RUNTIME_OPTIONS)
    rt.update(runtime_options or {})

    def _norm_rope(x, weight, cos_p, sin_p, rows):
        # x: [rows, D] in any float dtype -> RMSNorm * weight, then rotate-half RoPE, fp32 [rows, D]
        pypto.set_vec_tile_shapes(norm_rows, d)
        xf = pypto.cast(x, f32)
        ms = pypto.sum(xf * xf, -1, keepdim=True) * (1.0 / d)
        xn = xf / pypto.sqrt(ms + eps) * weight
        x1 = pypto.view(xn, [rows, half], [0, 0])
        x2 = pypto.view(xn, [rows, half], [0, half])
        rotated = pypto.concat([pypto.neg(x2), x1], -1)
        return xn * cos_p + rotated * sin_p

    # pypto's graph-merging pass: fold this many structurally identical leaf subgraphs (the per-block
    # cache gathers on the vector cores, the per-block q K^T tiles on the cube cores) into one task
    passes = {"vec_nbuffer_setting": {-1: max(1, tiles.vec_merge)},
              "cube_nbuffer_setting": {-1: max(1, tiles.cube_merge)}}

    @pypto.frontend.jit(runtime_options=rt, pass_options=passes, verify_options=verify_options)
    def fa_fused_kernel(
        q: pypto.Tensor([dyn, hq, d], dt),
        k: pypto.Tensor([dyn, hkv, d], dt),
        v: pypto.Tensor([dyn, hkv, d], dt),
        q_norm_weight: pypto.Tensor([1, d], f32),
        k_norm_weight: pypto.Tensor([1, d], f32),
        cos: pypto.Tensor([dyn, d], f32),
        sin: pypto.Tensor([dyn, d], f32),
        k_cache: pypto.Tensor([dyn, bs, hkv, d], cdt),
        v_cache: pypto.Tensor([dyn, bs, hkv, d], cdt),
        block_table: pypto.Tensor([dyn, dyn], i32),
        seq_lens: pypto.Tensor([dyn], i32),
        positions: pypto.Tensor([dyn], i32),
        slot_mapping: pypto.Tensor([dyn], i32),
        out: pypto.Tensor([dyn, hq, d], dt),
    ):
        batch = q.shape[0]
        max_blocks = block_table.shape[1]
        q_ws = pypto.tensor([batch * hq, d], cdt, "q_roped")
        part_rows = batch * hkv * max_blocks * group
        o_ws = pypto.tensor([part_rows, d], f32, "part_out")
        m_ws = pypto.tensor([part_rows, 1], f32, "part_max")
        l_ws = pypto.tensor([part_rows, 1], f32, "part_sum")

        # ---- phase 0: qk-norm, RoPE, cache write -------------------------------------------
        for b in pypto.loop(batch, name="LOOP_p0_b", idx_name="b"):
            pypto.set_vec_tile_shapes(norm_rows, d)
            pos = positions[b]
            slot = slot_mapping[b]
            cos_p = pypto.view(cos, [1, d], [pos, 0])
            sin_p = pypto.view(sin, [1, d], [pos, 0])
            q_b = pypto.reshape(pypto.view(q, [1, hq, d], [b, 0, 0]), [hq, d])
            q_r = _norm_rope(q_b, q_norm_weight, cos_p, sin_p, hq)
            pypto.assemble(pypto.cast(q_r, cdt), [b * hq, 0], q_ws)
            if slot >= 0:
                pypto.set_vec_tile_shapes(norm_rows, d)
                k_b = pypto.reshape(pypto.view(k, [1, hkv, d], [b, 0, 0]), [hkv, d])
                k_r = _norm_rope(k_b, k_norm_weight, cos_p, sin_p, hkv)
                v_b = pypto.view(v, [1, hkv, d], [b, 0, 0])
                blk = slot // bs
                off = slot % bs
                # (a vector tile list applies to the leading dims: set one of the op's own rank)
                k_c = pypto.cast(k_r, cdt)
                pypto.set_vec_tile_shapes(1, norm_rows, d)
                v_c = pypto.cast(v_b, cdt)
                pypto.set_vec_tile_shapes(1, 1, norm_rows, d)
                pypto.assemble(pypto.reshape(k_c, [1, 1, hkv, d]), [blk, off, 0, 0], k_cache)
                pypto.assemble(pypto.reshape(v_c, [1, 1, hkv, d]), [blk, off, 0, 0], v_cache)

        # ---- phase 1: partial attention per (row, kv head, block) --------------------------
        # The cache is read through views of the 4-D arguments themselves: an inplace reshape of a
        # tensor written in phase 0 makes pypto insert a copy of the whole cache.
        for b in pypto.loop(batch, name="LOOP_p1_b", idx_name="b"):
            seq_len = seq_lens[b]
            n_tasks = (seq_len + bs * kvb - 1) // (bs * kvb)
            for h in pypto.loop(hkv, name="LOOP_p1_h", idx_name="h"):
                for t in pypto.loop(n_tasks, name="LOOP_p1_t", idx_name="t", unroll_list=list(tiles.task_unroll)):
                    pypto.set_vec_tile_shapes(score_rows, d)
                    valid = (seq_len - t * (bs * kvb)).min(bs * kvb)
                    q_g = pypto.view(q_ws, [group, d], [b * hq + h * group, 0])
                    if kvb == 1:
                        blk = block_table[b, t]
                        pypto.set_vec_tile_shapes(1, bs, 1, d)
                        k_j = pypto.reshape(pypto.view(k_cache, [1, bs, 1, d], [blk, 0, h, 0],
                                                       valid_shape=[1, valid, 1, d]), [bs, d], valid_shape=[valid, d])
                        v_j = pypto.reshape(pypto.view(v_cache, [1, bs, 1, d], [blk, 0, h, 0],
                                                       valid_shape=[1, valid, 1, d]), [bs, d], valid_shape=[valid, d])
                    else:
                        k_j = pypto.tensor([bs * kvb, d], cdt, "k_gather")
                        v_j = pypto.tensor([bs * kvb, d], cdt, "v_gather")
                        for i in range(kvb):
                            # blocks past the row's context are never used (valid_shape): read block 0 there
                            blk_i = block_table[b, (t * kvb + i).min(max_blocks - 1)].max(0)
                            pypto.set_vec_tile_shapes(1, bs, 1, d)
                            k_j[i * bs:(i + 1) * bs, 0:] = pypto.reshape(
                                pypto.view(k_cache, [1, bs, 1, d], [blk_i, 0, h, 0]), [bs, d])
                            v_j[i * bs:(i + 1) * bs, 0:] = pypto.reshape(
                                pypto.view(v_cache, [1, bs, 1, d], [blk_i, 0, h, 0]), [bs, d])
                        k_j = pypto.view(k_j, [bs * kvb, d], [0, 0], valid_shape=[valid, d])
                        v_j = pypto.view(v_j, [bs * kvb, d], [0, 0], valid_shape=[valid, d])
                    pypto.set_cube_tile_shapes([cube_m, cube_m], [cube_k, cube_k], [cube_n, cube_n])
                    s = pypto.matmul(q_g, k_j, f32, b_trans=True)
                    s = pypto.view(s, [group, bs * kvb], [0, 0], valid_shape=[group, valid])
                    pypto.set_vec_tile_shapes(score_rows, score_cols)
                    s = s * scale
                    m = pypto.amax(s, -1, keepdim=True)
                    p = pypto.exp(s - m)
                    l_sum = pypto.sum(p, -1, keepdim=True)
                    pypto.set_cube_tile_shapes([cube_m, cube_m], [cube_n, cube_n], [cube_k, cube_k])
                    o = pypto.matmul(pypto.cast(p, cdt), v_j, f32)
                    row = ((b * hkv + h) * max_blocks + t) * group
                    pypto.set_vec_tile_shapes(score_rows, d)
                    pypto.assemble(o, [row, 0], o_ws)
                    pypto.assemble(m, [row, 0], m_ws)
                    pypto.assemble(l_sum, [row, 0], l_ws)

        # ---- phase 2: exact merge of the partial (max, sum, out) ---------------------------
        for b in pypto.loop(batch, name="LOOP_p2_b", idx_name="b"):
            seq_len = seq_lens[b]
            n_tasks = (seq_len + bs * kvb - 1) // (bs * kvb)
            for h in pypto.loop(hkv, name="LOOP_p2_h", idx_name="h"):
                acc_o = pypto.tensor([group, d], f32, "acc_out")
                acc_m = pypto.tensor([group, 1], f32, "acc_max")
                acc_l = pypto.tensor([group, 1], f32, "acc_sum")
                for t in pypto.loop(n_tasks, name="LOOP_p2_t", idx_name="t"):
                    pypto.set_vec_tile_shapes(score_rows, d)
                    row = ((b * hkv + h) * max_blocks + t) * group
                    o_t = pypto.view(o_ws, [group, d], [row, 0])
                    m_t = pypto.view(m_ws, [group, 1], [row, 0])
                    l_t = pypto.view(l_ws, [group, 1], [row, 0])
                    if pypto.is_loop_begin(t):
                        acc_o[:] = o_t
                        acc_m[:] = m_t
                        acc_l[:] = l_t
                    else:
                        m_new = pypto.maximum(acc_m, m_t)
                        alpha = pypto.exp(acc_m - m_new)
                        beta = pypto.exp(m_t - m_new)
                        acc_l[:] = acc_l * alpha + l_t * beta
                        acc_o[:] = acc_o * alpha + o_t * beta
                        acc_m[:] = m_new
                    if pypto.is_loop_end(t):
                        res = pypto.cast(acc_o / acc_l, dt)
                        pypto.set_vec_tile_shapes(1, score_rows, d)
                        res = pypto.reshape(res, [1, group, d])
                        pypto.assemble(res, [b, h * group, 0], out)

    return fa_fused_kernel


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
