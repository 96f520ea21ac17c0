"""The one place that decides which implementation of each fused op runs.

For kernel_backend="auto", what was measured to pay (benchmarks/fused_ops.py; H100 bf16, batch 64,
forward+backward, benchmarks/results/kernels_NVIDIA_H100_80GB_HBM3_bfloat16_*.json):

| device                 | attention                       | bias+GELU, residual+LN  | linear CE (masked LM) |
|------------------------|---------------------------------|-------------------------|-----------------------|
| CPU                    | eager reference                 | eager, bias in the GEMM | eager reference       |
| CUDA, bf16 or fp32     | SDPA (cuDNN / flash / mem-eff.) | eager, bias in the GEMM | Triton (1.04-1.13x)   |
| CUDA, fp16 (V100)      | SDPA (cuDNN / flash / mem-eff.) | eager, bias in the GEMM | eager reference       |

fp16 keeps the reference masked-LM loss: the fused one stores d loss / d logits (softmax - onehot)
in the logits' dtype during the forward, before DeepSpeed's loss scale reaches it in the backward,
so in fp16 the softmax tails sit in fp16's subnormals or below them (the reference's gradient is
scaled first): an interpreter emulation at 30,522 words put the fused op's weight-gradient rows
~7x further from fp32 than the reference's under a loss scale of only 1,024. bf16 has fp32's range.
"triton" keeps the fused op in fp16 too (every Triton kernel, as asked).

Packed text (KernelOps.varlen_attention, sequences end to end without padding): the Triton varlen
kernel wherever the Triton attention is chosen ("triton"); everywhere else the packed tokens are
scattered into a padded batch, run through that backend's padded attention with a key mask, and
gathered back (`varlen_attention_via_padding`): correct, but it does the padded work. Not yet
measured against padded attention on a GPU, so "auto" keeps SDPA here too.

Why not more Triton on "auto": on the H100 the Triton forwards win (attention 1.5x cuDNN at 121
masked tokens and 2.4x on 101x20 cross-attention; bias+GELU 2.2x and residual+LayerNorm 2.6x eager),
but forward+backward loses (attention 0.14-0.76x the best SDPA backend, the elementwise fusions
0.4-0.5x eager), so training would be slower. The linear cross-entropy needs no tl.dot (its GEMM
is cuBLAS), so it would suit a V100, where tl.dot has no tensor cores (DESIGN.md section 5), but
for its fp16 gradient above.

GEMMs are always cuBLAS (F.linear; the two ops after a GEMM take its inputs, so that the eager
versions can leave the bias to the GEMM's epilogue). Explicit backends override "auto":
"eager" (references everywhere), "sdpa" (SDPA attention + references), "triton" (all Triton
kernels; on sm_7x all but attention, which is SDPA's there, as DESIGN.md 5 plans; on CPU only
under TRITON_INTERPRET=1, for tests). The Triton attention supports head dims 16/32/64/128,
up to MAX_KEYS keys and, with dropout, fewer than 2**31 attention probabilities per call (int32
Philox positions); other calls go to SDPA (or the reference on CPU) one by one. Likewise a residual
LayerNorm with dropout over 2**31 elements or more goes to its eager version.

Every Triton launch passes enable_fp_fusion=True (FMA contraction): Triton's default until 3.9,
which warns at every compile that 3.10 turns it off; pinned, the kernels keep the numerics and
speed they were tested and measured with.

Attention-probability dropout is implemented in the Triton attention (Philox, regenerated in the
backward), so training with dropout stays on the Triton path. The choice is logged once per
(backend, device, dtype), at the first eager call; under torch.compile the choice is a constant
of the graph (tests/test_dispatch.py compiles the model with fullgraph=True).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from semvlp_kernels.attention import MAX_KEYS, attention, attention_reference, attention_sdpa
from semvlp_kernels.bias_gelu import bias_gelu
from semvlp_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from semvlp_kernels.philox import stream_positions_fit
from semvlp_kernels.residual_layer_norm import residual_layer_norm, residual_layer_norm_reference
from semvlp_kernels.tuning import INTERPRETED
from semvlp_kernels.varlen_attention import HEAD_DIMS, sequence_positions, varlen_attention

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelOps:
    """The model's fusion sites. Signatures: attention and linear_cross_entropy as their
    `<op>_reference` functions; the two below as `linear_gelu_eager` / `linear_residual_layer_norm_eager`."""

    name: str
    attention: Callable[..., torch.Tensor]
    linear_gelu: Callable[..., torch.Tensor]  # (x, weight, bias): gelu(x W^T + b), the FFN up-projection
    linear_residual_layer_norm: Callable[..., torch.Tensor]  # every sub-layer's output projection + Add & Norm
    linear_cross_entropy: Callable[..., torch.Tensor]
    varlen_attention: Callable[..., torch.Tensor]  # (q, k, v, cu_seqlens, max_seqlen, dropout_p), [T, H, D]


# The GEMM is part of these two ops so that each implementation puts the bias where it is free:
# the eager ones in the GEMM (cuBLAS adds it in its epilogue: no elementwise pass of its own), the
# Triton ones in the fused kernel after a bias-free GEMM.
def linear_gelu_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias))


def linear_gelu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bias_gelu(F.linear(x, weight), bias)


def linear_residual_layer_norm_eager(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """LayerNorm(residual + dropout(x W^T + b))."""
    return residual_layer_norm_reference(F.linear(x, weight, bias), None, residual, ln_weight, ln_bias, eps, dropout_p)


def linear_residual_layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    if dropout_p > 0 and not stream_positions_fit(residual.numel()):  # int32 Philox positions, as attention
        return linear_residual_layer_norm_eager(x, weight, bias, residual, ln_weight, ln_bias, eps, dropout_p)
    return residual_layer_norm(F.linear(x, weight), bias, residual, ln_weight, ln_bias, eps, dropout_p)


def _triton_attention_supports(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    shape_fits = k.shape[-2] <= MAX_KEYS and q.shape[-1] in (16, 32, 64, 128) and q.shape[-2] >= 1 and k.shape[-2] >= 1
    return shape_fits and (dropout_p == 0 or stream_positions_fit(q.shape[:-1].numel() * k.shape[-2]))


def attention_triton_or_fallback(q, k, v, key_padding_mask=None, dropout_p=0.0):
    """Triton attention where its limits allow, else SDPA (CUDA) or the reference (CPU)."""
    if _triton_attention_supports(q, k, dropout_p):
        return attention(q, k, v, key_padding_mask, dropout_p)
    fallback = attention_sdpa if q.is_cuda else attention_reference
    return fallback(q, k, v, key_padding_mask, dropout_p)


def varlen_attention_via_padding(padded_attention: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Packed self-attention through `padded_attention` (q [B, H, L, D], key padding mask).

    Scatters the T packed tokens into [B, max_seqlen] slots, attends with a key mask, gathers the
    T rows back: no host sync, any max_seqlen. Every sequence must have at least one token.
    """

    def varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0):
        total, heads, dim = q.shape
        batch = cu_seqlens.numel() - 1
        sequence, position = sequence_positions(cu_seqlens, total)
        slots = sequence * max_seqlen + position  # [T], row of each token in [B * max_seqlen]
        pad = lambda t: t.new_zeros(batch * max_seqlen, heads, dim).index_copy(0, slots, t)
        heads_first = lambda t: pad(t).view(batch, max_seqlen, heads, dim).transpose(1, 2)  # (B, H, L, D)
        mask = torch.zeros(batch * max_seqlen, dtype=torch.bool, device=q.device).index_fill(0, slots, True)
        out = padded_attention(heads_first(q), heads_first(k), heads_first(v), mask.view(batch, max_seqlen), dropout_p)
        return out.transpose(1, 2).reshape(batch * max_seqlen, heads, dim).index_select(0, slots)

    return varlen


def varlen_attention_triton_or_fallback(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0):
    """Triton varlen attention where its limits allow, else padded SDPA (CUDA) or the reference (CPU).

    cu_seqlens is not re-read here (check_offsets=False): the model validates it once per batch."""
    draws = (cu_seqlens.numel() - 1) * q.shape[1] * max_seqlen**2
    if max_seqlen <= MAX_KEYS and q.shape[-1] in HEAD_DIMS and (dropout_p == 0 or stream_positions_fit(draws)):
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, check_offsets=False)
    fallback = attention_sdpa if q.is_cuda else attention_reference
    return varlen_attention_via_padding(fallback)(q, k, v, cu_seqlens, max_seqlen, dropout_p)


EAGER = KernelOps(
    "eager", attention_reference, linear_gelu_eager, linear_residual_layer_norm_eager, linear_cross_entropy_reference,
    varlen_attention_via_padding(attention_reference),
)  # fmt: skip
SDPA = KernelOps(
    "sdpa", attention_sdpa, linear_gelu_eager, linear_residual_layer_norm_eager, linear_cross_entropy_reference,
    varlen_attention_via_padding(attention_sdpa),
)  # fmt: skip
CUDA_AUTO = KernelOps(
    "sdpa+triton-ce", attention_sdpa, linear_gelu_eager, linear_residual_layer_norm_eager, linear_cross_entropy,
    varlen_attention_via_padding(attention_sdpa),
)  # fmt: skip
TRITON = KernelOps(
    "triton", attention_triton_or_fallback, linear_gelu_triton, linear_residual_layer_norm_triton,
    linear_cross_entropy, varlen_attention_triton_or_fallback,
)  # fmt: skip
# "triton" on sm_7x (V100): the memory-bound kernels, SDPA's attention. tl.dot has no tensor cores
# there (DESIGN.md 5), and the attention's resident 128-key tiles need more shared memory than a
# V100 has: its backward at 121 keys does not fit, and its forward spills ~20 KB per thread
# (benchmarks/kernel_resources.py --arch 70 --dtype fp16).
TRITON_SM7X = KernelOps(
    "triton+sdpa-attention", attention_sdpa, linear_gelu_triton, linear_residual_layer_norm_triton,
    linear_cross_entropy, varlen_attention_via_padding(attention_sdpa),
)  # fmt: skip


def _resolve_auto(device: torch.device, dtype: torch.dtype) -> KernelOps:
    if device.type != "cuda":
        return EAGER
    if torch.cuda.get_device_capability(device)[0] < 7:
        return SDPA  # Triton does not support pre-Volta GPUs
    if dtype == torch.float16:
        return SDPA  # the fused masked-LM loss's gradient would lose fp16's small values (module docstring)
    return CUDA_AUTO


def _check_triton_usable(device: torch.device) -> None:
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] < 7:
            raise ValueError(f"kernel_backend='triton' on {device}: Triton needs sm_70 or newer")
        return
    if not INTERPRETED:
        raise ValueError(
            f"kernel_backend='triton' on {device} needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before semvlp_kernels is imported (tests do this in their conftest)"
        )


def _select(backend: str, device: torch.device, dtype: torch.dtype) -> KernelOps:
    if backend == "auto":
        ops = _resolve_auto(device, dtype)
    elif backend == "triton" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        ops = TRITON_SM7X
    elif backend in ("eager", "sdpa", "triton"):
        ops = {"eager": EAGER, "sdpa": SDPA, "triton": TRITON}[backend]
    else:
        raise ValueError(f"kernel_backend={backend!r}; expected 'auto', 'eager', 'sdpa' or 'triton'")
    if ops not in (EAGER, SDPA):
        _check_triton_usable(device)
    return ops


# What select_ops chose, per (backend, device type, device index, dtype). A plain dict rather than
# functools.cache: torch.compile traces through a cache wrapper, with a warning, on every compile.
_selected: dict[tuple, KernelOps] = {}


def select_ops(backend: str, device: torch.device, dtype: torch.dtype) -> KernelOps:
    """Return the implementations to use for `backend` ("auto", "eager", "sdpa", "triton")."""
    key = (backend, device.type, device.index, dtype)
    if key in _selected:
        return _selected[key]
    ops = _select(backend, device, dtype)
    # Logged and remembered at the first eager call: a logging call would break a compiled graph.
    if not torch.compiler.is_compiling():
        logger.info("kernel backend %r -> %s on %s (%s)", backend, ops.name, device, dtype)
        _selected[key] = ops
    return ops
