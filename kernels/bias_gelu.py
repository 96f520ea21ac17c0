"""gelu(x + bias), exact (erf) GELU: the op after the FFN up-projection (cuBLAS GEMM without bias).

x [..., N] contiguous, bias [N]. Forward reads x once and writes y once. The backward recomputes
x + bias (cheaper than saving the GELU input), writes dx, and reduces dbias from per-tile fp32
partials (one row per tile-row of the grid, summed by torch: no atomics, fixed order).

Tiles: each program holds a [BLOCK_ROWS, BLOCK_COLS] tile in fp32 registers. The first configs
(32 x 256 at 4 warps, 64 elements a thread) are the ones first measured on an H100; Triton 3.9
compiles them for sm_90 to 147 (forward) and 175 (backward) registers a thread, which leaves 12
and 8 resident warps per SM. The autotuner also times tiles of 16-32 elements a thread (48-101
registers, 16-40 warps per SM; benchmarks/kernel_resources.py), keyed on N. The backward keeps
BLOCK_ROWS = 32 in every config: it sizes the dbias partials, allocated before the autotuner picks.

Math, with u = x + bias, Phi the standard normal CDF and phi its density:
  y  = u * Phi(u) = 0.5 * u * (1 + erf(u / sqrt(2)))
  dy/du = Phi(u) + u * phi(u) = 0.5 * (1 + erf(u / sqrt(2))) + u * exp(-u^2 / 2) / sqrt(2 pi)
  dx = dy * dy/du,   dbias = sum over rows of dx
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from semvlp_kernels.tuning import tuned

BLOCK_ROWS = 32  # the backward's, in every config: one dbias partial row per 32 rows
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # jit globals must be constexpr
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


FORWARD_CONFIGS = [
    triton.Config({"BLOCK_ROWS": rows, "BLOCK_COLS": cols}, num_warps=warps)
    for rows, cols, warps in ((32, 256, 4), (16, 256, 4), (32, 256, 8), (4, 1024, 4))
]
BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_COLS": cols}, num_warps=warps) for cols, warps in ((256, 4), (256, 8), (128, 8), (64, 4))
]


@triton.autotune(configs=tuned(FORWARD_CONFIGS), key=["N"])
@triton.jit
def _bias_gelu_forward_kernel(
    x_ptr,  # [M, N]
    bias_ptr,  # [N]
    y_ptr,  # [M, N]
    M, N,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    b = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) + b[None, :]
    y = 0.5 * u * (1.0 + tl.math.erf(u * _SQRT1_2))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=tuned(BACKWARD_CONFIGS), key=["N"])
@triton.jit
def _bias_gelu_backward_kernel(
    dy_ptr,  # [M, N]
    x_ptr,  # [M, N]
    bias_ptr,  # [N]
    dx_ptr,  # [M, N]
    dbias_partial_ptr,  # [cdiv(M, BLOCK_ROWS), N] fp32
    M, N,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0).to(tl.int64)
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    b = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) + b[None, :]
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dgelu = 0.5 * (1.0 + tl.math.erf(u * _SQRT1_2)) + u * tl.exp(-0.5 * u * u) * _INV_SQRT_2PI
    dx = dy * dgelu  # 0 outside the tile's valid region because dy was loaded as 0 there
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dbias_partial_ptr + pid_r * N + cols, tl.sum(dx, 0), mask=cols < N)


def _check(x: torch.Tensor, bias: torch.Tensor) -> None:
    if bias.dim() != 1 or x.shape[-1] != bias.shape[0]:
        raise ValueError(f"bias {tuple(bias.shape)} does not match the last dim of x {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (it is a GEMM output in the model)")
    if not bias.is_contiguous():
        raise ValueError("bias must be contiguous")


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Args: x [..., N] contiguous, bias [N]. Returns gelu(x + bias) in x's dtype."""
    _check(x, bias)
    n = x.shape[-1]
    m = x.numel() // n
    y = torch.empty_like(x)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_ROWS"]), triton.cdiv(n, meta["BLOCK_COLS"]))
    _bias_gelu_forward_kernel[grid](x, bias, y, m, n, enable_fp_fusion=True)
    return y


def bias_gelu_backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx like x, dbias like bias)."""
    dy = dy.contiguous()  # autograd may hand an expanded or strided gradient
    n = x.shape[-1]
    m = x.numel() // n
    dx = torch.empty_like(x)
    partial = torch.empty(triton.cdiv(m, BLOCK_ROWS), n, dtype=torch.float32, device=x.device)
    grid = lambda meta: (partial.shape[0], triton.cdiv(n, meta["BLOCK_COLS"]))
    _bias_gelu_backward_kernel[grid](dy, x, bias, dx, partial, m, n, BLOCK_ROWS=BLOCK_ROWS, enable_fp_fusion=True)
    return dx, partial.sum(0).to(bias.dtype)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return bias_gelu_forward(x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        return bias_gelu_backward(dy, x, bias)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return BiasGeluFunction.apply(x, bias)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias)
