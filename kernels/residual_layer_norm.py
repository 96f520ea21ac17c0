"""LayerNorm(residual + dropout(x + bias)): the sub-layer output of every Transformer block.

x, residual [..., N] contiguous (x is the bias-free output projection GEMM); bias, weight,
ln_bias [N]. The output has the dtype of x + bias + residual, as the reference's: under autocast a
half-precision x on an fp32 residual stream gives fp32, as eager autocast's LayerNorm does. One
program per row in the forward (the whole row in one block, N <= 65536 / 4 elements as tutorial 05
caps it), saving only fp32 mean and rstd per row. Dropout uses Philox
(`tl.rand`) keyed by a per-call seed (a device tensor: philox.py) and the element's flat index
row * N + col, so the backward regenerates the keep mask instead of storing it, and recomputes
h = residual + dropout(x + bias) from x and residual (no pre-norm tensor is saved).

Backward, per row, with xhat = (h - mean) * rstd, wdy = weight * dy (05's c1/c2):
  c1 = sum(xhat * wdy) / N,   c2 = sum(wdy) / N
  dh = (wdy - (xhat * c1 + c2)) * rstd          -> d residual
  dx = dh * Z,  Z = keep / (1 - p)              -> d x   (dh itself when p = 0)
  dweight = sum_rows dy * xhat,  dln_bias = sum_rows dy,  dbias = sum_rows dx
The column sums follow Liger: a fixed number of programs, each owning a contiguous run of rows
with private fp32 partials, then one torch `sum` (no locks, fixed order).

The backward works on [ROWS, BLOCK] tiles, ROWS rows per loop iteration so that enough loads are in
flight (a one-row loop was latency-bound on an H100). Its first config (8 rows, 8 warps) is the one
first measured; Triton 3.9 compiles it for sm_90 to 198 registers a thread (244 with dropout): one
8-warp program per SM. The autotuner also times 4, 2 and 1 rows at 4-8 warps (72-128 registers
without dropout, 16-28 warps per SM by registers; benchmarks/kernel_resources.py), keyed on N and
dropout. A tile never holds more than MAX_TILE fp32 elements: wider rows take fewer of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from semvlp_kernels.philox import philox_seed, stream_positions_fit
from semvlp_kernels.tuning import tuned

MAX_COLS = 65536 // 4  # one fp32 row per block, as tutorial 05
MAX_TILE = tl.constexpr(8192)  # fp32 elements of a backward tile, whatever ROWS asks (jit globals are constexpr)
BACKWARD_CONFIGS = [
    triton.Config({"ROWS": rows}, num_warps=warps, num_stages=stages)
    for rows, warps, stages in ((8, 8, 3), (4, 8, 1), (2, 4, 1), (1, 4, 1))
]


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


@triton.jit
def _residual_layer_norm_forward_kernel(
    x_ptr,  # [M, N]
    bias_ptr,  # [N]
    residual_ptr,  # [M, N]
    weight_ptr,  # [N]
    ln_bias_ptr,  # [N]
    y_ptr,  # [M, N]
    mean_ptr,  # [M] fp32
    rstd_ptr,  # [M] fp32
    N, eps, dropout_p,
    seed_ptr,  # [1] int32 Philox seed (read only if HAS_DROPOUT; philox.py)
    HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    offs = row * N + cols
    h = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    h += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(seed, offs.to(tl.int32)) >= dropout_p
        h = tl.where(keep, h * (1.0 / (1.0 - dropout_p)), 0.0)
    h += tl.load(residual_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(h, 0) / N
    centered = tl.where(ok, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 0) / N + eps)
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(ln_bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (centered * rstd * w + b).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.autotune(configs=tuned(BACKWARD_CONFIGS), key=["N", "HAS_DROPOUT"])
@triton.jit
def _residual_layer_norm_backward_kernel(
    dy_ptr,  # [M, N]
    x_ptr,  # [M, N]
    bias_ptr,  # [N]
    residual_ptr,  # [M, N]
    weight_ptr,  # [N]
    mean_ptr,  # [M] fp32
    rstd_ptr,  # [M] fp32
    dh_ptr,  # [M, N] gradient of residual
    dx_ptr,  # [M, N] gradient of x (written only if HAS_DROPOUT; else it equals dh)
    partial_ptr,  # [3, num_programs, N] fp32: dweight, dln_bias, dbias partials
    M, N, rows_per_program, num_programs, dropout_p,
    seed_ptr,  # [1] int32 Philox seed (read only if HAS_DROPOUT)
    HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    # Each iteration handles TILE_ROWS rows at once: ROWS, or fewer where a [ROWS, BLOCK] tile
    # would exceed MAX_TILE elements (BLOCK and MAX_TILE are powers of two).
    TILE_ROWS: tl.constexpr = ROWS if ROWS * BLOCK <= MAX_TILE else (MAX_TILE // BLOCK if MAX_TILE > BLOCK else 1)
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    bias = tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dweight = tl.zeros([BLOCK], dtype=tl.float32)
    dln_bias = tl.zeros([BLOCK], dtype=tl.float32)
    dbias = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for first in range(row_start, row_end, TILE_ROWS):
        rows = first + tl.arange(0, TILE_ROWS)
        row_ok = rows < row_end
        tile_ok = row_ok[:, None] & ok[None, :]
        offs = rows[:, None] * N + cols[None, :]
        h = tl.load(x_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32) + bias[None, :]
        if HAS_DROPOUT:
            z = tl.where(tl.rand(seed, offs.to(tl.int32)) >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)
            h = h * z
        h += tl.load(residual_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(tile_ok, (h - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(dy_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, 1) / N
        c2 = tl.sum(wdy, 1) / N
        dh = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=tile_ok)
        if HAS_DROPOUT:
            dx = dh * z
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        else:
            dx = dh
        dweight += tl.sum(dy * xhat, 0)
        dln_bias += tl.sum(dy, 0)
        dbias += tl.sum(tl.where(tile_ok, dx, 0.0), 0)
    tl.store(partial_ptr + pid * N + cols, dweight, mask=ok)
    tl.store(partial_ptr + (num_programs + pid) * N + cols, dln_bias, mask=ok)
    tl.store(partial_ptr + (2 * num_programs + pid) * N + cols, dbias, mask=ok)


def _check(x, bias, residual, weight, ln_bias, dropout_p: float) -> None:
    n = x.shape[-1]
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
    for name, t in (("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        if t.shape != (n,) or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous [{n}]; got {tuple(t.shape)}")
    if not (x.is_contiguous() and residual.is_contiguous()):
        raise ValueError("x and residual must be contiguous")
    if n > MAX_COLS:
        raise ValueError(f"rows of {n} features exceed MAX_COLS={MAX_COLS}")
    if dropout_p > 0 and not stream_positions_fit(x.numel()):  # the other offsets are int64
        raise ValueError("with dropout, x.numel() must stay below 2**31 (int32 Philox offsets)")


def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device; 1 for the interpreter (few programs, each looping over rows)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _num_programs(m: int, device: torch.device) -> int:
    return max(1, min(m, 4 * multiprocessor_count(device)))


def _sum_dtype(x, bias, residual) -> torch.dtype:
    """The dtype of x + bias + residual: the output's, and that of the gradient of the sum."""
    return torch.promote_types(torch.promote_types(x.dtype, bias.dtype), residual.dtype)


def residual_layer_norm_forward(x, bias, residual, weight, ln_bias, eps, dropout_p, seed):
    """Returns (y, mean [M] fp32, rstd [M] fp32); y in _sum_dtype."""
    _check(x, bias, residual, weight, ln_bias, dropout_p)
    n = x.shape[-1]
    m = x.numel() // n
    block = triton.next_power_of_2(n)
    y = torch.empty_like(x, dtype=_sum_dtype(x, bias, residual))
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    _residual_layer_norm_forward_kernel[(m,)](
        x, bias, residual, weight, ln_bias, y, mean, rstd, n, float(eps), float(dropout_p), seed,
        HAS_DROPOUT=dropout_p > 0.0, BLOCK=block, num_warps=_num_warps(block), enable_fp_fusion=True,
    )  # fmt: skip
    return y, mean, rstd


def residual_layer_norm_backward(dy, x, bias, residual, weight, mean, rstd, dropout_p, seed):
    """Returns (dx, dbias, dresidual, dweight, dln_bias)."""
    dy = dy.contiguous()
    n = x.shape[-1]
    m = x.numel() // n
    block = triton.next_power_of_2(n)
    programs = _num_programs(m, x.device)
    rows_per_program = triton.cdiv(m, programs)
    dh = torch.empty_like(x, dtype=_sum_dtype(x, bias, residual))
    dx = torch.empty_like(x) if dropout_p > 0.0 else dh
    partial = torch.empty(3, programs, n, dtype=torch.float32, device=x.device)
    _residual_layer_norm_backward_kernel[(programs,)](
        dy, x, bias, residual, weight, mean, rstd, dh, dx, partial,
        m, n, rows_per_program, programs, float(dropout_p), seed,
        HAS_DROPOUT=dropout_p > 0.0, BLOCK=block, enable_fp_fusion=True,
    )  # fmt: skip
    dweight, dln_bias, dbias = partial.sum(1)
    # Without dropout dx == dh: the same tensor goes to both inputs, as autograd's AddBackward does
    # (autograd casts it to x's and residual's dtypes where they are others).
    return dx, dbias.to(bias.dtype), dh, dweight.to(weight.dtype), dln_bias.to(weight.dtype)


class ResidualLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual, weight, ln_bias, eps, dropout_p, seed):
        y, mean, rstd = residual_layer_norm_forward(x, bias, residual, weight, ln_bias, eps, dropout_p, seed)
        ctx.save_for_backward(x, bias, residual, weight, mean, rstd, seed)
        ctx.dropout_p = dropout_p
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias, residual, weight, mean, rstd, seed = ctx.saved_tensors
        grads = residual_layer_norm_backward(dy, x, bias, residual, weight, mean, rstd, ctx.dropout_p, seed)
        return *grads, None, None, None


def residual_layer_norm(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Fused LayerNorm(residual + dropout(x + bias)). `seed` fixes the dropout mask (tests only)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    seed_tensor = philox_seed(dropout_p, seed, x.device)
    return ResidualLayerNormFunction.apply(
        x, bias, residual, weight, ln_bias, float(eps), float(dropout_p), seed_tensor
    )


@triton.jit
def _residual_dropout_mask_kernel(keep_ptr, numel, dropout_p, seed_ptr, BLOCK: tl.constexpr):
    seed = tl.load(seed_ptr)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(seed, offs.to(tl.int32)) >= dropout_p
    tl.store(keep_ptr + offs, keep.to(tl.uint8), mask=offs < numel)


def residual_dropout_mask(shape: tuple[int, ...], dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The bool keep-mask that `residual_layer_norm(..., dropout_p, seed)` applies to x + bias."""
    keep = torch.empty(shape, dtype=torch.uint8, device=device)
    grid = (triton.cdiv(keep.numel(), 1024),)
    seed_tensor = philox_seed(dropout_p, seed, device)
    _residual_dropout_mask_kernel[grid](
        keep, keep.numel(), float(dropout_p), seed_tensor, BLOCK=1024, enable_fp_fusion=True
    )
    return keep.bool()


def residual_layer_norm_reference(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager composition. `bias` None: x already has it (added in its GEMM). `keep_mask` (same
    shape as x) replaces random dropout (tests)."""
    h = x if bias is None else x + bias
    if keep_mask is not None:
        h = h * keep_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        h = F.dropout(h, p=dropout_p)
    return F.layer_norm(h + residual, (x.shape[-1],), weight, ln_bias, eps)
