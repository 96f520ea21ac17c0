"""Multi-head attention with a key padding mask and attention-probability dropout.

Shapes: q [B, H, Tq, D], k and v [B, H, Tk, D] (any strides, last dim contiguous: the model
passes transposed views of [B, T, H, D]), key_padding_mask [B, Tk] bool (True = attend) or None.
A query row whose keys are all masked returns zeros and gets zero gradients (defined behaviour,
not NaN).

The Triton kernels are specialised for SemVLP's short sequences (121 single-stream tokens, 101
image / <= 20 text tokens in two-stream mode, 101 x <= 20 cross-attention): every key of one
(batch, head) fits in one tile (Tk <= 128), so
- the forward is one exact softmax per query tile (no online rescaling);
- the backward is one kernel launch with no atomics and no delta pre-pass (delta = rowsum(dO * O)
  is computed where it is needed), in one of two layouts that the autotuner times against each
  other (its KEY_BLOCK config):
  * fused (KEY_BLOCK >= all keys): one program per (batch, head) keeps all its keys resident while
    it sweeps the query tiles, accumulating dK/dV and writing each tile's dQ directly. Least work,
    but only B*H programs, each holding 128 keys' K, V, dK and dV: few resident warps per SM;
  * split (KEY_BLOCK < keys; tutorial 06's two sweeps, in separate programs): per (batch, head),
    one program per KEY_BLOCK keys sweeps the query tiles for their dK/dV, and one program per
    query tile sweeps the key blocks for its dQ. P and dP are computed twice, for several times
    the programs at a fraction of the registers each.
Longer key sequences raise; `dispatch` routes them to SDPA instead.

Dropout on the attention probabilities uses Philox (`tl.rand`) keyed by a per-call seed (a
device tensor: philox.py) and the element's flat index (b*H + h)*Tq*Tk + i*Tk + j; the backward
regenerates the same keep mask, so no mask is stored. `attention_dropout_mask()` materialises that mask for tests.

References: Dao et al., FlashAttention-2 (2023), backward in their notation; Triton tutorial
06-fused-attention.py (log2-domain softmax, K/V-resident dK/dV sweep, separate dQ sweep).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from semvlp_kernels.philox import philox_seed, stream_positions_fit
from semvlp_kernels.tuning import tuned

MAX_KEYS = 128  # keys of one (batch, head) held in one tile; see module docstring
LOG2E = 1.4426950408889634


def _configs(block_ms: list[int], key_blocks: tuple[int, ...] | None = None) -> list[triton.Config]:
    """Every BLOCK_M (x KEY_BLOCK) x warps config, in that order."""
    if key_blocks is None:
        blocks = [{"BLOCK_M": m} for m in block_ms]
    else:
        blocks = [{"BLOCK_M": m, "KEY_BLOCK": n} for n in key_blocks for m in block_ms]
    return [triton.Config(b, num_warps=w, num_stages=1) for b in blocks for w in (4, 8)]


@triton.jit
def _keep_mask(seed, pid_bh, offs_m, offs_n, TQ, TK, dropout_p):
    # Philox stream position = flat index of P[b, h, i, j]; int32 is checked on the host.
    rng_offsets = ((pid_bh * TQ + offs_m[:, None]) * TK + offs_n[None, :]).to(tl.int32)
    return tl.rand(seed, rng_offsets) >= dropout_p


@triton.jit
def _load_key_block(k_bh, v_bh, mask_b, offs_n, offs_d, stride_kt, stride_vt, stride_mt, TK, HAS_MASK: tl.constexpr):
    """K, V [N, D] of keys offs_n (zeros past TK), `key_in` (< TK) and `key_ok` (in and not masked)."""
    key_in = offs_n < TK
    k = tl.load(k_bh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_in[:, None], other=0.0)
    v = tl.load(v_bh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_in[:, None], other=0.0)
    key_ok = key_in
    if HAS_MASK:
        key_ok = key_in & (tl.load(mask_b + offs_n * stride_mt, mask=key_in, other=0) != 0)
    return k, v, key_in, key_ok


# The per-tile math below is shared with varlen_attention.py: the padded and the packed kernels
# differ only in where a (batch, head)'s rows live (pointers, masks) and in the (TQ, TK) that key
# the dropout stream, so both pass those in and keep identical numerics.
@triton.jit
def _forward_tile(
    q, k, v,  # [M, D] query tile; [N, D] all keys and values of its (batch, head)
    key_ok,  # [N] bool, False for padding / masked keys
    qk_scale,  # softmax scale * log2(e)
    seed, pid_bh, offs_m, offs_n, TQ, TK, dropout_p,  # dropout key, as for _keep_mask
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Exact softmax attention of one query tile over all its keys.

    Returns out [M, D] fp32 = dropout(softmax(S)) V and lse [M], the log2-domain logsumexp of
    the scaled scores S (0, with out = 0, for a row without any valid key).
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N], log2 domain
    s = tl.where(key_ok[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # row without keys: keep exp2(-inf - 0) = 0, not NaN
    p = tl.exp2(s - m[:, None])
    denom = tl.sum(p, 1)
    denom_safe = tl.where(denom == 0.0, 1.0, denom)
    p = p / denom_safe[:, None]
    lse = tl.where(denom == 0.0, 0.0, m + tl.log2(denom_safe))
    if HAS_DROPOUT:
        keep = _keep_mask(seed, pid_bh, offs_m, offs_n, TQ, TK, dropout_p)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    out = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return out, lse


# Backward, per (b, h), with P = softmax(S) (S = scale * Q K^T, masked), Z = keep / (1 - p_drop),
# O = (P * Z) V and upstream dO:
#   dV    = (P * Z)^T dO
#   dP    = (dO V^T) * Z
#   delta = rowsum(P * dP) = rowsum(dO * O)
#   dS    = P * (dP - delta)
#   dQ    = scale * dS K,   dK = scale * dS^T Q
# P is recomputed from the saved log2-domain logsumexp: P = exp2(S * log2(e) - lse).
@triton.jit
def _backward_scores(
    q, do, delta, lse, row_ok,  # one query tile: [M, D] x 2, [M] fp32 x 2, [M] bool
    k, v, key_ok,  # a block of its keys: [N, D] x 2, [N] bool
    qk_scale,
    seed, pid_bh, offs_m, offs_n, TQ, TK, dropout_p,  # dropout key, as for _keep_mask
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """P * Z [M, N] in dO's dtype (dV += its transpose times dO) and dS [M, N] in Q's dtype, for
    one query tile against one block of keys (formulas above)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
    valid = row_ok[:, None] & key_ok[None, :]
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [M, N]
    pz = p
    if HAS_DROPOUT:
        keep = _keep_mask(seed, pid_bh, offs_m, offs_n, TQ, TK, dropout_p)
        z = tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)
        pz = p * z
        dp = dp * z
    ds = p * (dp - delta[:, None])
    return pz.to(do.dtype), ds.to(q.dtype)


@triton.jit
def _backward_tile(
    q, do, o, lse, row_ok,  # one query tile: [M, D] x 3, [M] fp32, [M] bool
    k, v, key_ok,  # keys of its (batch, head): [N, D] x 2, [N] bool
    dk, dv,  # [N, D] fp32 accumulators over the query tiles
    sm_scale, qk_scale,
    seed, pid_bh, offs_m, offs_n, TQ, TK, dropout_p,  # dropout key, as for _keep_mask
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One query tile's share of the backward over the keys k, v (formulas above).

    Returns dq [M, D] fp32 (complete when k holds every key; the split layout does not use it)
    and dk, dv with this tile's contributions added; dk still lacks the final factor sm_scale.
    """
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    pz, ds = _backward_scores(q, do, delta, lse, row_ok, k, v, key_ok, qk_scale,
                              seed, pid_bh, offs_m, offs_n, TQ, TK, dropout_p, HAS_DROPOUT, DOT_PRECISION)  # fmt: skip
    dv += tl.dot(tl.trans(pz), do, input_precision=DOT_PRECISION)
    dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
    dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * sm_scale
    return dq, dk, dv


FORWARD_CONFIGS = _configs([64, 128, 32])


@triton.autotune(configs=tuned(FORWARD_CONFIGS), key=["TQ", "TK", "HEAD_DIM", "HAS_MASK", "HAS_DROPOUT"])
@triton.jit
def _attention_forward_kernel(
    q_ptr,  # [B, H, Tq, D]
    k_ptr,  # [B, H, Tk, D]
    v_ptr,  # [B, H, Tk, D]
    mask_ptr,  # [B, Tk] uint8, 1 = attend (read only if HAS_MASK)
    out_ptr,  # [B, H, Tq, D]
    lse_ptr,  # [B, H, Tq] fp32, log2-domain logsumexp of the scaled scores (0 for all-masked rows)
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_mb, stride_mt,
    stride_ob, stride_oh, stride_ot,
    H, TQ, TK,
    qk_scale,  # softmax scale * log2(e)
    dropout_p,
    seed_ptr,  # [1] int32 Philox seed (read only if HAS_DROPOUT; philox.py)
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    pid_bh = tl.program_id(0).to(tl.int64)  # axis 0: B*H can pass axis 1's limit of 65,535
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < TQ

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    k, v, _, key_ok = _load_key_block(k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
                                      mask_ptr + b * stride_mb, offs_n, offs_d, stride_kt, stride_vt, stride_mt, TK,
                                      HAS_MASK)  # fmt: skip

    out, lse = _forward_tile(q, k, v, key_ok, qk_scale, seed, pid_bh, offs_m, offs_n, TQ, TK, dropout_p,
                             HAS_DROPOUT, DOT_PRECISION)  # fmt: skip

    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip
    tl.store(lse_ptr + pid_bh * TQ + offs_m, lse, mask=row_ok)


@triton.jit
def _load_query_tile(q_bh, do_bh, o_bh, lse_bh, offs_m, offs_d, stride_qt, stride_dot, stride_ot, TQ):
    """Q, dO, O [M, D] and lse [M] of query rows offs_m (zeros past TQ), and `row_ok` (< TQ)."""
    row_ok = offs_m < TQ
    rows = offs_m[:, None]
    q = tl.load(q_bh + rows * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_bh + rows * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    o = tl.load(o_bh + rows * stride_ot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_bh + offs_m, mask=row_ok, other=0.0)
    return q, do, o, lse, row_ok


@triton.jit
def _key_block_backward(
    q_bh, k_bh, v_bh, o_bh, do_bh, lse_bh, mask_b, dq_bh, dk_bh, dv_bh,  # one (batch, head)'s rows
    stride_qt, stride_kt, stride_vt, stride_ot, stride_dot, stride_dqt, stride_dkt, stride_mt,
    key_start, n_rows, n_keys, TQ, TK, sm_scale, qk_scale, seed, pid_bh, dropout_p,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, KEYS: tl.constexpr, BLOCK_M: tl.constexpr, STORE_DQ: tl.constexpr,
):  # fmt: skip
    """dK, dV of keys [key_start, key_start + KEYS) of n_keys, sweeping every query tile of the
    n_rows; with STORE_DQ (the block holds every key) also each tile's complete dQ."""
    offs_n = key_start + tl.arange(0, KEYS)
    offs_d = tl.arange(0, HEAD_DIM)
    k, v, key_in, key_ok = _load_key_block(k_bh, v_bh, mask_b, offs_n, offs_d, stride_kt, stride_vt, stride_mt,
                                           n_keys, HAS_MASK)  # fmt: skip
    dk = tl.zeros([KEYS, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([KEYS, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, n_rows, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, o, lse, row_ok = _load_query_tile(q_bh, do_bh, o_bh, lse_bh, offs_m, offs_d,
                                                 stride_qt, stride_dot, stride_ot, n_rows)  # fmt: skip
        dq, dk, dv = _backward_tile(q, do, o, lse, row_ok, k, v, key_ok, dk, dv, sm_scale, qk_scale,
                                    seed, pid_bh, offs_m, offs_n, TQ, TK, dropout_p,
                                    HAS_DROPOUT, DOT_PRECISION)  # fmt: skip
        if STORE_DQ:
            tl.store(dq_bh + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(dq_bh.dtype.element_ty),
                     mask=row_ok[:, None])  # fmt: skip
    dk_offs = offs_n[:, None] * stride_dkt + offs_d[None, :]
    tl.store(dk_bh + dk_offs, (dk * sm_scale).to(dk_bh.dtype.element_ty), mask=key_in[:, None])
    tl.store(dv_bh + dk_offs, dv.to(dv_bh.dtype.element_ty), mask=key_in[:, None])


@triton.jit
def _query_tile_dq(
    q_bh, k_bh, v_bh, o_bh, do_bh, lse_bh, mask_b, dq_bh,  # one (batch, head)'s rows
    stride_qt, stride_kt, stride_vt, stride_ot, stride_dot, stride_dqt, stride_mt,
    query_start, n_rows, n_keys, TQ, TK, sm_scale, qk_scale, seed, pid_bh, dropout_p,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, KEYS: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dQ of query rows [query_start, query_start + BLOCK_M) of n_rows, sweeping the n_keys keys
    KEYS at a time."""
    offs_m = query_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q, do, o, lse, row_ok = _load_query_tile(q_bh, do_bh, o_bh, lse_bh, offs_m, offs_d,
                                             stride_qt, stride_dot, stride_ot, n_rows)  # fmt: skip
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, n_keys, KEYS):
        offs_n = start_n + tl.arange(0, KEYS)
        k, v, _, key_ok = _load_key_block(k_bh, v_bh, mask_b, offs_n, offs_d, stride_kt, stride_vt, stride_mt,
                                          n_keys, HAS_MASK)  # fmt: skip
        _, ds = _backward_scores(q, do, delta, lse, row_ok, k, v, key_ok, qk_scale,
                                 seed, pid_bh, offs_m, offs_n, TQ, TK, dropout_p,
                                 HAS_DROPOUT, DOT_PRECISION)  # fmt: skip
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION)
    tl.store(dq_bh + offs_m[:, None] * stride_dqt + offs_d[None, :], (dq * sm_scale).to(dq_bh.dtype.element_ty),
             mask=row_ok[:, None])  # fmt: skip


@triton.jit
def _backward_program(
    pid, q_bh, k_bh, v_bh, o_bh, do_bh, lse_bh, mask_b, dq_bh, dk_bh, dv_bh,  # one (batch, head)'s rows
    stride_qt, stride_kt, stride_vt, stride_ot, stride_dot, stride_dqt, stride_dkt, stride_mt,
    n_rows, n_keys, TQ, TK, sm_scale, qk_scale, seed, pid_bh, dropout_p,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, KEY_BLOCK: tl.constexpr,
):  # fmt: skip
    """Program `pid` of one (batch, head)'s backward, in the layout KEY_BLOCK selects (module
    docstring; `_backward_programs` sizes the grid). n_rows, n_keys: its valid queries and keys;
    TQ, TK: the grid's, which also key the dropout stream (they differ for packed sequences)."""
    if KEY_BLOCK >= BLOCK_N:  # fused: the only program of its (batch, head)
        _key_block_backward(q_bh, k_bh, v_bh, o_bh, do_bh, lse_bh, mask_b, dq_bh, dk_bh, dv_bh,
                            stride_qt, stride_kt, stride_vt, stride_ot, stride_dot, stride_dqt, stride_dkt, stride_mt,
                            0, n_rows, n_keys, TQ, TK, sm_scale, qk_scale, seed, pid_bh, dropout_p,
                            HAS_MASK, HAS_DROPOUT, DOT_PRECISION, HEAD_DIM, BLOCK_N, BLOCK_M, True)  # fmt: skip
    else:
        n_key_blocks = tl.cdiv(TK, KEY_BLOCK)
        if pid < n_key_blocks:
            key_start = pid * KEY_BLOCK
            if key_start < n_keys:
                _key_block_backward(q_bh, k_bh, v_bh, o_bh, do_bh, lse_bh, mask_b, dq_bh, dk_bh, dv_bh,
                                    stride_qt, stride_kt, stride_vt, stride_ot, stride_dot, stride_dqt, stride_dkt,
                                    stride_mt, key_start, n_rows, n_keys, TQ, TK, sm_scale, qk_scale, seed, pid_bh,
                                    dropout_p, HAS_MASK, HAS_DROPOUT, DOT_PRECISION, HEAD_DIM, KEY_BLOCK, BLOCK_M,
                                    False)  # fmt: skip
        else:
            query_start = (pid - n_key_blocks) * BLOCK_M
            if query_start < n_rows:
                _query_tile_dq(q_bh, k_bh, v_bh, o_bh, do_bh, lse_bh, mask_b, dq_bh,
                               stride_qt, stride_kt, stride_vt, stride_ot, stride_dot, stride_dqt, stride_mt,
                               query_start, n_rows, n_keys, TQ, TK, sm_scale, qk_scale, seed, pid_bh, dropout_p,
                               HAS_MASK, HAS_DROPOUT, DOT_PRECISION, HEAD_DIM, KEY_BLOCK, BLOCK_M)  # fmt: skip


def _prune_key_blocks(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    # Every KEY_BLOCK >= the keys' tile runs the fused layout: time it once, as KEY_BLOCK=MAX_KEYS.
    return [c for c in configs if c.kwargs["KEY_BLOCK"] < kwargs["BLOCK_N"] or c.kwargs["KEY_BLOCK"] == MAX_KEYS]


def _backward_programs(tq: int, tk: int, meta: dict) -> int:
    """Programs per (batch, head): 1 fused, else one per key block plus one per query tile."""
    if meta["KEY_BLOCK"] >= meta["BLOCK_N"]:
        return 1
    return triton.cdiv(tk, meta["KEY_BLOCK"]) + triton.cdiv(tq, meta["BLOCK_M"])


# Backward configs (benchmarks/kernel_resources.py compiles them all offline). Fused: at 128 keys
# the resident K, V and fp32 dK, dV leave few registers; on an A100 only 16-row query tiles run
# without spilling, on an H100 16- and 32-row tiles at 8 warps (64-row tiles spilled on both, up
# to 1.5 KB with dropout, and are gone), and one program per SM fits.
# Split: 32-key blocks compile to 66-136 registers on an H100 and 72-128 on an A100, without
# spills (16-24 warps per SM at 8 warps); 64-key blocks to 92-240 on an H100, 235-255 on an A100.
# The first config (fused, 32 rows) is the one tests pin.
BACKWARD_CONFIGS = _configs([32, 16], key_blocks=(MAX_KEYS, 64, 32))


@triton.autotune(
    configs=tuned(BACKWARD_CONFIGS),
    key=["TQ", "TK", "HEAD_DIM", "HAS_MASK", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune_key_blocks},
)
@triton.jit
def _attention_backward_kernel(
    q_ptr,  # [B, H, Tq, D]
    k_ptr,  # [B, H, Tk, D]
    v_ptr,  # [B, H, Tk, D]
    mask_ptr,  # [B, Tk] uint8 (read only if HAS_MASK)
    out_ptr,  # [B, H, Tq, D] forward output
    dout_ptr,  # [B, H, Tq, D] upstream gradient
    lse_ptr,  # [B, H, Tq] fp32 from the forward
    dq_ptr,  # [B, H, Tq, D]
    dk_ptr,  # [B, H, Tk, D]
    dv_ptr,  # [B, H, Tk, D], same strides as dk
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_mb, stride_mt,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_dkb, stride_dkh, stride_dkt,
    H, TQ, TK,
    sm_scale, qk_scale,
    dropout_p,
    seed_ptr,  # [1] int32 Philox seed (read only if HAS_DROPOUT)
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, KEY_BLOCK: tl.constexpr,
):  # fmt: skip
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    pid_bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)  # which key block or query tile of this (batch, head); see _backward_programs
    b = pid_bh // H
    h = pid_bh % H
    q_bh = q_ptr + b * stride_qb + h * stride_qh
    k_bh = k_ptr + b * stride_kb + h * stride_kh
    v_bh = v_ptr + b * stride_vb + h * stride_vh
    o_bh = out_ptr + b * stride_ob + h * stride_oh
    do_bh = dout_ptr + b * stride_dob + h * stride_doh
    lse_bh = lse_ptr + pid_bh * TQ
    mask_b = mask_ptr + b * stride_mb
    dq_bh = dq_ptr + b * stride_dqb + h * stride_dqh
    dk_bh = dk_ptr + b * stride_dkb + h * stride_dkh
    dv_bh = dv_ptr + b * stride_dkb + h * stride_dkh
    _backward_program(pid, q_bh, k_bh, v_bh, o_bh, do_bh, lse_bh, mask_b, dq_bh, dk_bh, dv_bh,
                      stride_qt, stride_kt, stride_vt, stride_ot, stride_dot, stride_dqt, stride_dkt, stride_mt,
                      TQ, TK, TQ, TK, sm_scale, qk_scale, seed, pid_bh, dropout_p,
                      HAS_MASK, HAS_DROPOUT, DOT_PRECISION, HEAD_DIM, BLOCK_N, BLOCK_M, KEY_BLOCK)  # fmt: skip


@triton.jit
def _attention_dropout_mask_kernel(
    keep_ptr,  # [B, H, Tq, Tk] uint8, contiguous
    TQ, TK, dropout_p,
    seed_ptr,  # [1] int32 Philox seed
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seed = tl.load(seed_ptr)
    pid_bh = tl.program_id(0).to(tl.int64)  # axis 0: B*H can pass axis 1's limit of 65,535
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    keep = _keep_mask(seed, pid_bh, offs_m, offs_n, TQ, TK, dropout_p)
    ok = (offs_m[:, None] < TQ) & (offs_n[None, :] < TK)
    tl.store(keep_ptr + (pid_bh * TQ + offs_m[:, None]) * TK + offs_n[None, :], keep.to(tl.uint8), mask=ok)


def _new_like_heads(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised [B, H, T, D] tensor laid out as [B, T, H, D], which the model's
    `transpose(1, 2).reshape(B, T, H * D)` then views without a copy."""
    batch, heads, length, dim = x.shape
    return torch.empty(batch, length, heads, dim, dtype=x.dtype, device=x.device).transpose(1, 2)


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, dropout_p: float
) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"expected q [B,H,Tq,D], k/v [B,H,Tk,D]; got {shapes}")
    if q.shape[3] not in (16, 32, 64, 128):
        raise ValueError(f"head dim {q.shape[3]} not supported by the Triton attention (16, 32, 64 or 128)")
    if not 1 <= k.shape[2] <= MAX_KEYS:
        raise ValueError(f"{k.shape[2]} keys: the Triton attention holds at most MAX_KEYS={MAX_KEYS} keys per tile")
    if q.shape[2] < 1:
        raise ValueError("empty query sequence")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k and v must have a contiguous last (head) dimension")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if dropout_p > 0 and not stream_positions_fit(q.shape[:-1].numel() * k.shape[2]):
        raise ValueError("with dropout, B*H*Tq*Tk must stay below 2**31 (int32 Philox offsets)")
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (k.shape[0], k.shape[2])
    ):
        got = f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        raise ValueError(f"key_padding_mask must be bool [B, Tk]; got {got}")


def _launch_args(q, k, key_padding_mask):
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q.new_empty(0, dtype=torch.uint8)
    mask_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32
    block_n = max(16, triton.next_power_of_2(k.shape[2]))
    return mask, mask_strides, dot_precision, block_n


def attention_forward(q, k, v, key_padding_mask, dropout_p, seed):
    """Launch the forward (`seed`: philox.philox_seed's tensor). Returns (out [B,H,Tq,D] in
    [B,Tq,H,D] memory, lse [B,H,Tq] fp32)."""
    _check(q, k, v, key_padding_mask, dropout_p)
    batch, heads, tq, dim = q.shape
    tk = k.shape[2]
    mask, mask_strides, dot_precision, block_n = _launch_args(q, k, key_padding_mask)
    out = _new_like_heads(q)
    lse = torch.empty(batch, heads, tq, dtype=torch.float32, device=q.device)
    grid = lambda meta: (batch * heads, triton.cdiv(tq, meta["BLOCK_M"]))
    _attention_forward_kernel[grid](
        q, k, v, mask, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *out.stride()[:3],
        heads, tq, tk, LOG2E / math.sqrt(dim), float(dropout_p), seed,
        HAS_MASK=key_padding_mask is not None, HAS_DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision,
        HEAD_DIM=dim, BLOCK_N=block_n, enable_fp_fusion=True,
    )  # fmt: skip
    return out, lse


def attention_backward(dout, q, k, v, key_padding_mask, out, lse, dropout_p, seed):
    """Launch the backward. Returns (dq, dk, dv)."""
    batch, heads, tq, dim = q.shape
    tk = k.shape[2]
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    mask, mask_strides, dot_precision, block_n = _launch_args(q, k, key_padding_mask)
    dq, dk, dv = _new_like_heads(q), _new_like_heads(k), _new_like_heads(v)
    assert dk.stride() == dv.stride()
    grid = lambda meta: (batch * heads, _backward_programs(tq, tk, meta))
    _attention_backward_kernel[grid](
        q, k, v, mask, out, dout, lse, dq, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *out.stride()[:3], *dout.stride()[:3],
        *dq.stride()[:3], *dk.stride()[:3],
        heads, tq, tk, 1.0 / math.sqrt(dim), LOG2E / math.sqrt(dim), float(dropout_p), seed,
        HAS_MASK=key_padding_mask is not None, HAS_DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision,
        HEAD_DIM=dim, BLOCK_N=block_n, enable_fp_fusion=True,
    )  # fmt: skip
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, dropout_p, seed):
        out, lse = attention_forward(q, k, v, key_padding_mask, dropout_p, seed)
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse, seed)
        ctx.dropout_p = dropout_p
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, key_padding_mask, out, lse, seed = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, key_padding_mask, out, lse, ctx.dropout_p, seed)
        return dq, dk, dv, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Fused Triton attention (Tk <= MAX_KEYS). `seed` fixes the dropout mask (tests only)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    return AttentionFunction.apply(q, k, v, key_padding_mask, float(dropout_p), philox_seed(dropout_p, seed, q.device))


def attention_dropout_mask(
    batch: int, heads: int, tq: int, tk: int, dropout_p: float, seed: int, device: torch.device
) -> torch.Tensor:
    """The bool keep-mask [B, H, Tq, Tk] that `attention(..., dropout_p, seed)` applies."""
    keep = torch.empty(batch, heads, tq, tk, dtype=torch.uint8, device=device)
    block_n = max(16, triton.next_power_of_2(tk))
    _attention_dropout_mask_kernel[(batch * heads, triton.cdiv(tq, 32))](
        keep,
        tq,
        tk,
        float(dropout_p),
        philox_seed(dropout_p, seed, device),
        BLOCK_M=32,
        BLOCK_N=block_n,
        enable_fp_fusion=True,
    )
    return keep.bool()


def attention_probs(q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) in fp32, [B, H, Tq, Tk]: zero at masked keys, and all zero in a
    row whose keys are all masked."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_padding_mask is None:
        return torch.softmax(scores, dim=-1)
    # All-masked rows: softmax over zeros, then zeroed, so both values and gradients are 0.
    any_key = key_padding_mask.any(dim=-1)[:, None, None, None]
    mask = key_padding_mask[:, None, None, :] | ~any_key
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) * any_key


def attention_with_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    keep_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention and its probabilities (before dropout, fp32). `keep_mask` [B,H,Tq,Tk]
    replaces random dropout (tests)."""
    probs = attention_probs(q, k, key_padding_mask)
    dropped = probs
    if keep_mask is not None:
        dropped = probs * keep_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        dropped = F.dropout(probs, p=dropout_p)
    return torch.matmul(dropped, v.float()).to(q.dtype), probs


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager attention, softmax in fp32. `keep_mask` [B,H,Tq,Tk] replaces random dropout (tests)."""
    return attention_with_probs(q, k, v, key_padding_mask, dropout_p, keep_mask)[0]


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """torch's scaled_dot_product_attention; every row must have at least one valid key."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
