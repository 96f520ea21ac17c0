"""Packed variable-length self-attention: sequences laid end to end, no padding tokens at all.

Shapes (FlashAttention's varlen convention): q, k, v [total_tokens, num_heads, head_dim] (any
token and head strides, last dim contiguous: slices of a fused [T, 3, H, D] projection work),
cu_seqlens int32 [B + 1] with sequence b at tokens cu_seqlens[b]:cu_seqlens[b + 1] (so
cu_seqlens[0] == 0 and cu_seqlens[-1] == total_tokens), max_seqlen an upper bound on the
longest sequence. Self-attention only (q and k share the offsets), no causal mask. A sequence
of length 0 owns no tokens, so it simply produces nothing.

Design (as in attention.py, whose helpers this file imports): every key of one (sequence,
head) fits in one tile (max_seqlen <= MAX_KEYS = 128, which covers SemVLP's <= 20 text tokens
and its 121 single-stream tokens), so the forward is one exact softmax per query tile, and the
backward is attention.py's, in either of its layouts (one program per (sequence, head) holding
all its keys, or split into key-block and query-tile programs; no atomics either way). Tiles
start at each sequence's first token, so a program never mixes two sequences; the grid is sized
by max_seqlen, the rows past a sequence's end are masked, and programs past it return at once.

Dropout on the attention probabilities reuses attention.py's Philox keep mask, keyed by
(b * H + h, i, j) with i, j the query/key positions *within* sequence b and max_seqlen as the
padded length. That is exactly the mask the padded `attention` draws for the same seed on the
same batch padded to max_seqlen, so `attention_dropout_mask(B, H, max_seqlen, max_seqlen, p,
seed, device)` materialises it for tests, and switching between the padded and the packed
path keeps the dropout pattern. (It also means the mask depends on max_seqlen.)

Longer sequences (> MAX_KEYS) raise: they would need an online softmax over key tiles and a
dQ reduction across them, which SemVLP's shapes never call for. dispatch.py routes the model's
packed text here (KernelOps.varlen_attention) and sends longer sequences, other head dims and
the non-Triton backends through padded attention instead.

References: Dao et al., FlashAttention-2 (2023), varlen interface (`flash_attn_varlen_func`,
cu_seqlens / max_seqlen); backward math as in attention.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from semvlp_kernels.attention import (
    BACKWARD_CONFIGS,
    FORWARD_CONFIGS,
    LOG2E,
    MAX_KEYS,
    _backward_program,
    _backward_programs,
    _forward_tile,
    _load_key_block,
    _prune_key_blocks,
    attention_reference,
)
from semvlp_kernels.philox import philox_seed, stream_positions_fit
from semvlp_kernels.tuning import tuned

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Tuned per key-tile width (the power of two above max_seqlen) rather than per max_seqlen, so
# that batches whose longest caption is 17, 19 or 20 tokens share one tuning run.
@triton.autotune(configs=tuned(FORWARD_CONFIGS), key=["BLOCK_N", "HEAD_DIM", "HAS_DROPOUT"])
@triton.jit
def _varlen_attention_forward_kernel(
    q_ptr,  # [T, H, D], T = total tokens of the packed batch
    k_ptr,  # [T, H, D]
    v_ptr,  # [T, H, D]
    cu_seqlens_ptr,  # [B + 1] int32
    out_ptr,  # [T, H, D]
    lse_ptr,  # [H, T] fp32, log2-domain logsumexp of the scaled scores
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    H, TOTAL, MAX_SEQLEN,
    qk_scale,  # softmax scale * log2(e)
    dropout_p,
    seed_ptr,  # [1] int32 Philox seed (read only if HAS_DROPOUT; philox.py)
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    pid_bh = tl.program_id(0).to(tl.int64)  # axis 0: B*H can pass axis 1's limit of 65,535
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start = tl.load(cu_seqlens_ptr + b).to(tl.int64)  # int64: start * stride can pass 2**31
    seqlen = tl.load(cu_seqlens_ptr + b + 1) - tl.load(cu_seqlens_ptr + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions within sequence b
    offs_n = tl.arange(0, BLOCK_N)  # key positions within sequence b
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen

    q = tl.load(q_ptr + (start + offs_m[:, None]) * stride_qt + h * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    # No key mask: cu_seqlens_ptr fills the unused mask pointer.
    k, v, _, key_ok = _load_key_block(k_ptr + start * stride_kt + h * stride_kh,
                                      v_ptr + start * stride_vt + h * stride_vh, cu_seqlens_ptr, offs_n, offs_d,
                                      stride_kt, stride_vt, 0, seqlen, False)  # fmt: skip

    # Every stored row has a key (itself); only a zero-length sequence has rows without any, and
    # those are never stored. Dropout is keyed as if padded to MAX_SEQLEN (module docstring).
    out, lse = _forward_tile(q, k, v, key_ok, qk_scale, seed, pid_bh, offs_m, offs_n, MAX_SEQLEN, MAX_SEQLEN,
                             dropout_p, HAS_DROPOUT, DOT_PRECISION)  # fmt: skip

    tl.store(out_ptr + (start + offs_m[:, None]) * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip
    tl.store(lse_ptr + h * TOTAL + start + offs_m, lse, mask=row_ok)


# Backward: attention.py's, in either of its layouts (fused or split, timed against each other),
# on the rows of sequence b; the grid is sized by max_seqlen and a shorter sequence's spare
# programs return at once.
@triton.autotune(
    configs=tuned(BACKWARD_CONFIGS),
    key=["BLOCK_N", "HEAD_DIM", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": _prune_key_blocks},
)
@triton.jit
def _varlen_attention_backward_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [T, H, D]
    v_ptr,  # [T, H, D]
    cu_seqlens_ptr,  # [B + 1] int32
    out_ptr,  # [T, H, D] forward output
    dout_ptr,  # [T, H, D] upstream gradient
    lse_ptr,  # [H, T] fp32 from the forward
    dq_ptr,  # [T, H, D]
    dk_ptr,  # [T, H, D]
    dv_ptr,  # [T, H, D], same strides as dk
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    stride_dkt, stride_dkh,
    H, TOTAL, MAX_SEQLEN,
    sm_scale, qk_scale,
    dropout_p,
    seed_ptr,  # [1] int32 Philox seed (read only if HAS_DROPOUT)
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, KEY_BLOCK: tl.constexpr,
):  # fmt: skip
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    pid_bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start = tl.load(cu_seqlens_ptr + b).to(tl.int64)
    seqlen = tl.load(cu_seqlens_ptr + b + 1) - tl.load(cu_seqlens_ptr + b)
    # Positions within sequence b; dropout is keyed as if padded to MAX_SEQLEN (module docstring).
    # No key mask: cu_seqlens_ptr fills the unused mask pointer.
    _backward_program(pid, q_ptr + start * stride_qt + h * stride_qh, k_ptr + start * stride_kt + h * stride_kh,
                      v_ptr + start * stride_vt + h * stride_vh, out_ptr + start * stride_ot + h * stride_oh,
                      dout_ptr + start * stride_dot + h * stride_doh, lse_ptr + h * TOTAL + start, cu_seqlens_ptr,
                      dq_ptr + start * stride_dqt + h * stride_dqh, dk_ptr + start * stride_dkt + h * stride_dkh,
                      dv_ptr + start * stride_dkt + h * stride_dkh,
                      stride_qt, stride_kt, stride_vt, stride_ot, stride_dot, stride_dqt, stride_dkt, 0,
                      seqlen, seqlen, MAX_SEQLEN, MAX_SEQLEN, sm_scale, qk_scale, seed, pid_bh, dropout_p,
                      False, HAS_DROPOUT, DOT_PRECISION, HEAD_DIM, BLOCK_N, BLOCK_M, KEY_BLOCK)  # fmt: skip


def check_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int, max_seqlen: int) -> None:
    """Raise ValueError unless cu_seqlens starts at 0, never decreases, ends at total_tokens, and
    no sequence is longer than max_seqlen. Reads cu_seqlens on the host: a device sync on CUDA."""
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0; got cu_seqlens[0] = {offsets[0]}")
    lengths = [end - begin for begin, end in zip(offsets[:-1], offsets[1:], strict=True)]
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens must be non-decreasing; got {offsets}")
    if offsets[-1] != total_tokens:
        raise ValueError(f"cu_seqlens must end at total_tokens = q.shape[0] = {total_tokens}; got {offsets[-1]}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen = {max_seqlen} but cu_seqlens holds a sequence of {max(lengths)} tokens")


def sequence_positions(cu_seqlens: torch.Tensor, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, position within the sequence) of every packed token, both int64 [T].

    Computed on cu_seqlens' device without reading it on the host (no sync); total_tokens is the
    packed tensor's length, cu_seqlens[-1]."""
    tokens = torch.arange(total_tokens, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    sequence = torch.searchsorted(cu_seqlens[1:], tokens, right=True)  # [T]
    return sequence, (tokens - cu_seqlens[sequence]).long()


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float
) -> None:
    """Checks that need no device sync: shapes, dtypes, devices, layout and the kernel's limits."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        raise ValueError(f"q, k and v must all be [total_tokens, num_heads, head_dim] of one shape; got {shapes}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype in {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] not in HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[2]} not supported by the Triton varlen attention (one of {HEAD_DIMS})")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k and v must have a contiguous last (head_dim) dimension")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        devices = f"q {q.device}, k {k.device}, v {v.device}, cu_seqlens {cu_seqlens.device}"
        raise ValueError(f"q, k, v and cu_seqlens must be on one device; got {devices}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32 (FlashAttention's varlen convention); got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [batch + 1]; got shape {tuple(cu_seqlens.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or not 0 <= max_seqlen <= MAX_KEYS:
        raise ValueError(f"max_seqlen must be a Python int in [0, MAX_KEYS={MAX_KEYS}]; got {max_seqlen!r}")
    if dropout_p > 0 and not stream_positions_fit((cu_seqlens.numel() - 1) * q.shape[1] * max_seqlen**2):
        raise ValueError("with dropout, batch * num_heads * max_seqlen**2 must stay below 2**31 (int32 Philox offsets)")


def _dot_precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32


def _block_n(max_seqlen: int) -> int:
    return max(16, triton.next_power_of_2(max_seqlen))  # tl.dot needs tiles of at least 16


def varlen_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    dropout_p: float, seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the forward (inputs already checked).

    Returns:
        out [T, H, D] contiguous, in q's dtype, and lse [H, T] fp32 (log2-domain logsumexp).
    """
    total, heads, dim = q.shape
    batch = cu_seqlens.numel() - 1
    out = torch.empty(total, heads, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(heads, total, dtype=torch.float32, device=q.device)
    if total == 0:  # only empty sequences: nothing to compute, and no zero-size launch
        return out, lse
    grid = lambda meta: (batch * heads, triton.cdiv(max_seqlen, meta["BLOCK_M"]))
    _varlen_attention_forward_kernel[grid](
        q, k, v, cu_seqlens, out, lse,
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
        heads, total, max_seqlen, LOG2E / math.sqrt(dim), float(dropout_p), seed,
        HAS_DROPOUT=dropout_p > 0.0, DOT_PRECISION=_dot_precision(q), HEAD_DIM=dim, BLOCK_N=_block_n(max_seqlen),
        enable_fp_fusion=True,
    )  # fmt: skip
    return out, lse


def varlen_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    max_seqlen: int, out: torch.Tensor, lse: torch.Tensor, dropout_p: float, seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the backward. Returns (dq, dk, dv), each [T, H, D] contiguous."""
    total, heads, dim = q.shape
    batch = cu_seqlens.numel() - 1
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = (torch.empty(total, heads, dim, dtype=q.dtype, device=q.device) for _ in range(3))
    if total == 0:
        return dq, dk, dv
    grid = lambda meta: (batch * heads, _backward_programs(max_seqlen, max_seqlen, meta))
    _varlen_attention_backward_kernel[grid](
        q, k, v, cu_seqlens, out, dout, lse, dq, dk, dv,
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2], *dout.stride()[:2],
        *dq.stride()[:2], *dk.stride()[:2],
        heads, total, max_seqlen, 1.0 / math.sqrt(dim), LOG2E / math.sqrt(dim), float(dropout_p), seed,
        HAS_DROPOUT=dropout_p > 0.0, DOT_PRECISION=_dot_precision(q), HEAD_DIM=dim, BLOCK_N=_block_n(max_seqlen),
        enable_fp_fusion=True,
    )  # fmt: skip
    return dq, dk, dv


class VarlenAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, dropout_p, seed):
        out, lse = varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, dropout_p, seed)
        ctx.save_for_backward(q, k, v, cu_seqlens, out, lse, seed)
        ctx.max_seqlen, ctx.dropout_p = max_seqlen, dropout_p
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cu_seqlens, out, lse, seed = ctx.saved_tensors
        dq, dk, dv = varlen_attention_backward(dout, q, k, v, cu_seqlens, ctx.max_seqlen, out, lse, ctx.dropout_p, seed)
        return dq, dk, dv, None, None, None, None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    seed: int | None = None,
    check_offsets: bool = True,
) -> torch.Tensor:
    """Fused Triton self-attention over packed sequences (max_seqlen <= MAX_KEYS).

    Args:
        q, k, v: [total_tokens, num_heads, head_dim], last dim contiguous.
        cu_seqlens: int32 [B + 1] cumulative sequence offsets on q's device.
        max_seqlen: a bound on the longest sequence (a Python int: it sizes the launch grid).
        dropout_p: attention-probability dropout, in [0, 1).
        seed: fixes the dropout mask (tests); drawn from torch's generator for q's device when
            None (philox.py).
        check_offsets: validate cu_seqlens' values (check_cu_seqlens). That reads cu_seqlens on
            the host, a device sync on CUDA; a training loop that validates once per batch (all
            layers share cu_seqlens) passes False here.

    Returns:
        [total_tokens, num_heads, head_dim] contiguous, in q's dtype.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    _check(q, k, v, cu_seqlens, max_seqlen, dropout_p)
    if check_offsets:
        check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    seed_tensor = philox_seed(dropout_p, seed, q.device)
    return VarlenAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, float(dropout_p), seed_tensor)


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager attention, one sequence at a time through attention_reference (softmax in fp32).

    `keep_mask` [B, H, max_seqlen, max_seqlen] replaces random dropout (tests): position (b, h,
    i, j) is query i and key j of sequence b, the layout `attention_dropout_mask` produces.
    """
    offsets = cu_seqlens.tolist()
    if keep_mask is not None and keep_mask.shape[2:] != (max_seqlen, max_seqlen):
        raise ValueError(f"keep_mask must be [B, H, max_seqlen, max_seqlen]; got {tuple(keep_mask.shape)}")
    outs = []
    for b, (begin, end) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        n = end - begin
        qb, kb, vb = (t[begin:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, n, D]
        keep = None if keep_mask is None else keep_mask[b : b + 1, :, :n, :n]
        outs.append(attention_reference(qb, kb, vb, None, dropout_p, keep)[0].transpose(0, 1))  # [n, H, D]
    return torch.cat(outs) if outs else torch.zeros_like(q)
