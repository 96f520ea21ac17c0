"""Triton attention vs the eager reference: output and dq/dk/dv, at SemVLP's shapes.

Cases (Tq x Tk, head dim): single-stream self-attention 121 x 121 with mixed visual/text
padding; image self-attention 101 x 101 unmasked; text self-attention 20 x 20 with mixed
lengths; cross-attention 101 x 20 (image queries over text keys); a single token 1 x 1; rows
whose keys are all masked (zeros, zero gradients). fp32 and fp16 everywhere; bf16 only compiled
on CUDA (the interpreter's bf16 tl.dot is wrong, DESIGN.md 6). Inputs arrive as the model passes
them: transposed views of [B, T, H, D]. The backward's two layouts (attention.py's docstring) are
each tested: the fused one is the config the suite pins, the split one is pinned below
(conftest's split_backward).
"""

import math
from functools import partial

import pytest
import torch
from _checks import assert_matches_reference, autotune_choices, skip_bf16_in_interpreter, value_and_grads

from semvlp_kernels import attention as module
from semvlp_kernels.attention import MAX_KEYS, attention, attention_dropout_mask, attention_reference

# (name, B, H, Tq, Tk, D, key lengths per batch row or None for no mask)
CASES = [
    ("single_121", 2, 2, 121, 121, 64, [121, 110]),
    ("image_101", 1, 2, 101, 101, 64, None),
    ("text_20_mixed", 2, 2, 20, 20, 64, [20, 7]),
    ("cross_101x20", 2, 2, 101, 20, 64, [13, 20]),
    ("one_token", 2, 1, 1, 1, 32, [1, 1]),
    ("all_masked_rows", 2, 2, 37, 20, 32, [0, 9]),
]
NAMES = ("out", "dq", "dk", "dv")
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def _inputs(b, h, tq, tk, d, lengths, dtype, device):
    def heads(t):  # [B, T, H, D] -> transposed [B, H, T, D] view, non-zero mean
        x = 0.3 + torch.randn(b, t, h, d, device=device)
        return x.to(dtype).transpose(1, 2).requires_grad_()

    q, k, v = heads(tq), heads(tk), heads(tk)
    mask = None
    if lengths is not None:
        mask = torch.arange(tk, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return q, k, v, mask


def _lowp_eager(q, k, v, mask):
    """Unfused attention computed entirely in the input dtype: torch's own low-precision error."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        any_key = mask.any(-1)[:, None, None, None]
        scores = scores.masked_fill(~(mask[:, None, None, :] | ~any_key), float("-inf"))
        return (torch.softmax(scores, -1) * any_key) @ v
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention_matches_reference(case, dtype, device):
    skip_bf16_in_interpreter(dtype, device)
    _, b, h, tq, tk, d, lengths = case
    q, k, v, mask = _inputs(b, h, tq, tk, d, lengths, dtype, device)
    before = [t.detach().clone() for t in (q, k, v)]
    dout = (0.1 * torch.randn(b, h, tq, d, device=device)).to(dtype)

    out, *grads = ours = value_and_grads(partial(attention, key_padding_mask=mask), (q, k, v), dout)
    assert out.dtype == dtype and out.shape == (b, h, tq, d)
    for name, t, t0 in zip("qkv", (q, k, v), before, strict=True):
        assert torch.equal(t.detach(), t0), f"attention modified its input {name}"
    reference = partial(attention_reference, key_padding_mask=mask)
    assert_matches_reference(NAMES, ours, reference, (q, k, v), dout, lowp_reference=partial(_lowp_eager, mask=mask))

    if lengths is not None and 0 in lengths:  # defined behaviour for rows without any key
        empty = torch.tensor(lengths, device=device) == 0
        assert torch.all(out[empty] == 0) and torch.all(grads[0][empty] == 0)


# Key blocks smaller than the keys, so every dQ sums several blocks and the last block is partial.
SPLIT_CASES = [("single_121", 32), ("cross_101x20", 16), ("text_20_mixed", 16), ("all_masked_rows", 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, key_block", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_split_backward_matches_reference(name, key_block, dtype, device, split_backward):
    skip_bf16_in_interpreter(dtype, device)
    split_backward(key_block)
    _, b, h, tq, tk, d, lengths = next(c for c in CASES if c[0] == name)
    q, k, v, mask = _inputs(b, h, tq, tk, d, lengths, dtype, device)
    dout = (0.1 * torch.randn(b, h, tq, d, device=device)).to(dtype)
    ours = value_and_grads(partial(attention, key_padding_mask=mask), (q, k, v), dout)
    reference = partial(attention_reference, key_padding_mask=mask)
    assert_matches_reference(NAMES, ours, reference, (q, k, v), dout, lowp_reference=partial(_lowp_eager, mask=mask))


@pytest.mark.parametrize("kernel, config", autotune_choices(module, "forward", "backward"))
def test_every_config_the_autotuner_may_pick_matches_reference(kernel, config, device, monkeypatch):
    """Single-stream 121 x 121 tokens with padding, fp32: partial query tiles and key blocks in
    every layout."""
    monkeypatch.setattr(kernel, "configs", [config])
    _, b, h, tq, tk, d, lengths = CASES[0]
    q, k, v, mask = _inputs(b, h, tq, tk, d, lengths, torch.float32, device)
    dout = 0.1 * torch.randn(b, h, tq, d, device=device)
    ours = value_and_grads(partial(attention, key_padding_mask=mask), (q, k, v), dout)
    assert_matches_reference(NAMES, ours, partial(attention_reference, key_padding_mask=mask), (q, k, v), dout)


def test_split_backward_equals_fused_with_dropout(device, split_backward):
    """Both layouts regenerate the same dropout mask from the seed, so they agree to rounding."""
    b, h, tq, tk, d, p = 2, 2, 101, 20, 32, 0.1
    q, k, v, mask = _inputs(b, h, tq, tk, d, [20, 11], torch.float32, device)
    dout = 0.1 * torch.randn(b, h, tq, d, device=device)
    fused = value_and_grads(partial(attention, key_padding_mask=mask, dropout_p=p, seed=7), (q, k, v), dout)
    split_backward(16)
    split = value_and_grads(partial(attention, key_padding_mask=mask, dropout_p=p, seed=7), (q, k, v), dout)
    for name, a, e in zip(NAMES, split, fused, strict=True):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_attention_dropout_matches_reference_with_same_mask(device):
    b, h, tq, tk, d, p = 2, 2, 101, 20, 32, 0.1
    q, k, v, mask = _inputs(b, h, tq, tk, d, [20, 11], torch.float32, device)
    dout = 0.1 * torch.randn(b, h, tq, d, device=device)
    ours = value_and_grads(partial(attention, key_padding_mask=mask, dropout_p=p, seed=42), (q, k, v), dout)
    out = ours[0]
    keep = attention_dropout_mask(b, h, tq, tk, p, 42, q.device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.02, "keep fraction far from 1 - p"
    reference = partial(attention_reference, key_padding_mask=mask, dropout_p=p, keep_mask=keep)
    assert_matches_reference(NAMES, ours, reference, (q, k, v), dout)
    # Seeds: the same seed repeats the mask, a new one changes it.
    assert torch.equal(attention(q, k, v, mask, dropout_p=p, seed=42), out)
    assert not torch.equal(attention(q, k, v, mask, dropout_p=p, seed=43), out)


def test_attention_accepts_contiguous_heads(device):
    """Strides of a contiguous [B, H, T, D] tensor differ from the model's views."""
    q = (0.3 + torch.randn(1, 2, 20, 32, device=device)).requires_grad_()
    k = torch.randn(1, 2, 20, 32, device=device).requires_grad_()
    v = torch.randn(1, 2, 20, 32, device=device).requires_grad_()
    dout = 0.1 * torch.randn(1, 2, 20, 32, device=device)
    ours = value_and_grads(attention, (q, k, v), dout)
    assert_matches_reference(NAMES, ours, attention_reference, (q, k, v), dout)


def test_attention_rejects_unsupported_shapes(device):
    q = torch.randn(1, 1, 4, 32, device=device)
    k = torch.randn(1, 1, MAX_KEYS + 1, 32, device=device)
    with pytest.raises(ValueError, match="MAX_KEYS"):
        attention(q, k, k)
    with pytest.raises(ValueError, match="head dim 48"):
        attention(torch.randn(1, 1, 4, 48, device=device), *[torch.randn(1, 1, 4, 48, device=device)] * 2)


def test_the_int32_offset_limit_applies_with_dropout_only():
    """Philox offsets are int32, so B*H*Tq*Tk must stay below 2**31 with dropout; without it (every
    evaluation) a batch that large is fine: it raised, e.g. single-stream scoring of 13,000 pairs."""
    q = torch.empty(13_000, 12, 121, 64, device="meta")
    module._check(q, q, q, None, dropout_p=0.0)
    with pytest.raises(ValueError, match="with dropout, B\\*H\\*Tq\\*Tk must stay below 2\\*\\*31"):
        module._check(q, q, q, None, dropout_p=0.1)


@pytest.mark.gpu
def test_more_batch_heads_than_a_grid_axis_1_launch():
    """(batch, head) is grid axis 0: on axis 1 (CUDA's limit 65,535) 5,462 pairs x 12 heads, e.g. an
    --eval_batch_size of retrieval scoring, failed to launch. Compiled only: the interpreter runs the
    programs one by one. The varlen kernel too, on sequences of 3 tokens (the padded layout, packed)."""
    from semvlp_kernels.varlen_attention import varlen_attention

    batch, heads, length, dim = 5_462, 12, 3, 16
    q, k, v = (torch.randn(batch, heads, length, dim, device="cuda", requires_grad=True) for _ in range(3))
    dout = torch.randn(batch, heads, length, dim, device="cuda")
    cu_seqlens = torch.arange(0, batch * length + 1, length, dtype=torch.int32, device="cuda")

    def packed_attention(q, k, v):
        pack = lambda t: t.transpose(1, 2).reshape(batch * length, heads, dim)
        out = varlen_attention(pack(q), pack(k), pack(v), cu_seqlens, length)
        return out.view(batch, length, heads, dim).transpose(1, 2)

    for fn in (attention, packed_attention):
        assert_matches_reference(NAMES, value_and_grads(fn, (q, k, v), dout), attention_reference, (q, k, v), dout)
