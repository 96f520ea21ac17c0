"""Cross-entropy of linear(hidden, weight, bias) against labels: the masked-LM decoder and loss.

Called only on masked rows (hidden [N, H], weight [V, H] = the tied word embeddings, bias [V],
labels [N] int64; ignore_index -100). The reference materializes fp32 logits [N, V] and autograd
keeps them plus their gradient. The fused path (after Liger's fused_linear_cross_entropy):
- rows are processed in chunks of at most CHUNK_ROWS; per chunk, cuBLAS computes logits in the
  input dtype (exactly what the reference rounds before `.float()`), and one Triton program per
  row computes logsumexp, the row loss, and overwrites the chunk's logits IN PLACE with
  d(row loss)/d logits = softmax - onehot (the buffer is private to this op);
- the chunk's gradients for hidden, weight and bias are then two GEMMs and a column sum, so the
  backward only scales the stored gradients by grad_output / n_valid. No fp32 [N, V] tensor
  exists at any point and at most one [CHUNK_ROWS, V] logits buffer is alive.
Gradients are computed in the forward only when some input requires them and grad mode is on (not in
eval). Under autocast the op runs in autocast's dtype, as F.linear would (the hidden states arrive in
fp32 from autocast's LayerNorm). Labels must lie in [0, V) or equal ignore_index; this is not checked
(no host sync in the op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

CHUNK_ROWS = 2048  # a [2048, 30522] bf16 logits chunk is 125 MB; MLM batches have ~200 rows
BLOCK_V = 4096
IGNORE_INDEX = -100


@triton.jit
def _linear_cross_entropy_forward_kernel(
    logits_ptr,  # [C, V] chunk logits; overwritten with d loss_row / d logits if COMPUTE_GRAD
    stride_logits,
    labels_ptr,  # [C] int64
    loss_ptr,  # [C] fp32 per-row loss, 0 for ignored rows
    V, IGNORE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_logits
    label = tl.load(labels_ptr + row)
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    ignored = label == IGNORE
    safe_label = tl.where(ignored, 0, label)
    x_label = tl.load(base + safe_label).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - x_label))
    if COMPUTE_GRAD:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + offs, mask=offs < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(offs == label, 1.0, 0.0)
            g = tl.where(ignored, 0.0, g)
            tl.store(base + offs, g.to(logits_ptr.dtype.element_ty), mask=offs < V)


def linear_cross_entropy_forward(hidden, weight, bias, labels, compute_grad: bool, chunk_rows: int | None = None):
    """Returns (loss [] fp32, dhidden, dweight, dbias), gradients unscaled by grad_output (None if not
    compute_grad; dbias None without bias). `chunk_rows`: CHUNK_ROWS when None."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H], weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [N] for hidden {tuple(hidden.shape)}")
    n, v = hidden.shape[0], weight.shape[0]
    chunk_rows = chunk_rows or CHUNK_ROWS
    labels = labels.contiguous()  # the kernel reads one label per row at stride 1
    w = weight.to(hidden.dtype)  # a copy only under mixed precision (fp32 master weight, bf16 hidden)
    b = bias.to(hidden.dtype) if bias is not None else None
    row_loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dhidden = torch.empty_like(hidden) if compute_grad else None
    dweight = dbias = None
    for start in range(0, n, chunk_rows):
        h = hidden[start : start + chunk_rows]
        logits = F.linear(h, w, b)  # [C, V] in the input dtype
        _linear_cross_entropy_forward_kernel[(h.shape[0],)](
            logits, logits.stride(0), labels[start : start + chunk_rows], row_loss[start : start + chunk_rows],
            v, IGNORE=IGNORE_INDEX, COMPUTE_GRAD=compute_grad, BLOCK_V=BLOCK_V, enable_fp_fusion=True,
        )  # fmt: skip
        if compute_grad:  # logits now holds d loss_rows / d logits
            torch.mm(logits, w, out=dhidden[start : start + chunk_rows])
            dw = torch.mm(logits.t(), h).float()
            dweight = dw if dweight is None else dweight.add_(dw)
            if bias is not None:
                db = logits.sum(0, dtype=torch.float32)  # fp32 accumulation without an fp32 copy of the chunk
                dbias = db if dbias is None else dbias.add_(db)
    n_valid = (labels != IGNORE_INDEX).sum().clamp_(min=1)  # device tensor: no host sync
    return row_loss.sum() / n_valid, dhidden, dweight, dbias, n_valid


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        compute_grad = any(ctx.needs_input_grad[:3])
        loss, *grads = linear_cross_entropy_forward(hidden, weight, bias, labels, compute_grad=compute_grad)
        dhidden, dweight, dbias, n_valid = grads
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if compute_grad:
            ctx.save_for_backward(dhidden, dweight, dbias, n_valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dhidden, dweight, dbias, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid  # grad_output is not assumed to be 1 (STYLE.md (e))
        dhidden = (dhidden * scale).to(dhidden.dtype)
        dweight = (dweight * scale).to(ctx.weight_dtype)
        dbias = None if dbias is None else (dbias * scale).to(ctx.bias_dtype)
        return dhidden, dweight, dbias, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of linear(hidden, weight, bias) over rows with labels != -100; 0 if none."""
    if hidden.shape[0] == 0:
        return linear_cross_entropy_reference(hidden, weight, bias, labels)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # the op's GEMMs write into buffers of one dtype
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy(hidden, weight, bias, labels)
    if not torch.is_grad_enabled():  # needs_input_grad would still ask for gradients of parameters
        return linear_cross_entropy_forward(hidden, weight, bias, labels, compute_grad=False)[0]
    return LinearCrossEntropyFunction.apply(hidden, weight, bias, labels)


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over rows (labels >= 0); 0 when no row has a label."""
    logits = F.linear(hidden, weight, bias).float()
    n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)  # sum / count: no host sync, 0 if none
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / n_valid
