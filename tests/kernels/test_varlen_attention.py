"""Packed variable-length Triton attention vs the eager reference and vs the padded kernel.

Cases (sequence lengths, heads, head dim): mixed caption lengths [20, 1, 13, 7] at head dim 64
and 32; a single 121-token single-stream sequence; zero-length sequences first, in the middle and
last; max_seqlen larger than the longest sequence; a single token. fp32 and fp16 everywhere; bf16
only compiled on CUDA (the interpreter's bf16 tl.dot is wrong, DESIGN.md 6). Every output is
allocated poisoned (conftest), so a token the kernels forget to write fails the comparison.
Also: equality with the padded `attention` kernel on the same batch padded and unpadded (with
and without dropout: same Philox positions), dropout against the reference under the same keep
mask, q/k/v as slices of a fused [T, 3, H, D] projection, a batch of only empty sequences, and
one ValueError per invalid argument.
"""

import math
from functools import partial

import pytest
import torch
from _checks import assert_close, assert_matches_reference, skip_bf16_in_interpreter, value_and_grads

from semvlp_kernels.attention import MAX_KEYS, attention, attention_dropout_mask
from semvlp_kernels.varlen_attention import varlen_attention, varlen_attention_reference

# (name, heads, head dim, sequence lengths, max_seqlen or None for the longest)
CASES = [
    ("text_mixed_d64", 2, 64, [20, 1, 13, 7], None),
    ("text_mixed_d32", 2, 32, [20, 1, 13, 7], None),
    ("single_121", 2, 64, [121], None),
    ("empty_sequences", 2, 32, [0, 9, 0, 16, 0], None),
    ("loose_max_seqlen", 1, 32, [5, 3], 20),
    ("one_token", 1, 32, [1], None),
]
NAMES = ("out", "dq", "dk", "dv")
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def _cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _inputs(lengths, heads, dim, dtype, device):
    """Fresh packed q, k, v [T, H, D] with non-zero mean, and cu_seqlens."""
    total = sum(lengths)
    q, k, v = ((0.3 + torch.randn(total, heads, dim, device=device)).to(dtype).requires_grad_() for _ in range(3))
    return q, k, v, _cu_seqlens(lengths, device)


def _lowp_eager(q, k, v, cu_seqlens):
    """Unfused attention in the input dtype, one sequence at a time: torch's own low-precision error."""
    offsets = cu_seqlens.tolist()
    outs = []
    for begin, end in zip(offsets[:-1], offsets[1:], strict=True):
        qb, kb, vb = (t[begin:end].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        probs = torch.softmax((qb @ kb.transpose(-1, -2)) / math.sqrt(q.shape[-1]), -1)
        outs.append((probs @ vb).transpose(0, 1))
    return torch.cat(outs)


def _valid(lengths, max_seqlen, device):
    return torch.arange(max_seqlen, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def _pad(x, lengths, max_seqlen):
    """[T, H, D] packed -> [B, max_seqlen, H, D], zeros after each sequence's end."""
    padded = x.new_zeros(len(lengths), max_seqlen, *x.shape[1:])
    return padded.index_put((_valid(lengths, max_seqlen, x.device),), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_varlen_attention_matches_reference(case, dtype, device):
    skip_bf16_in_interpreter(dtype, device)
    _, heads, dim, lengths, max_seqlen = case
    max_seqlen = max_seqlen or max(lengths)
    q, k, v, cu_seqlens = _inputs(lengths, heads, dim, dtype, device)
    before = [t.detach().clone() for t in (q, k, v, cu_seqlens)]
    dout = (0.1 * torch.randn(sum(lengths), heads, dim, device=device)).to(dtype)

    packing = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    ours = value_and_grads(partial(varlen_attention, **packing), (q, k, v), dout)
    assert ours[0].dtype == dtype and ours[0].shape == q.shape
    for name, t, t0 in zip(("q", "k", "v", "cu_seqlens"), (q, k, v, cu_seqlens), before, strict=True):
        assert torch.equal(t.detach(), t0), f"varlen_attention modified its input {name}"
    reference = partial(varlen_attention_reference, **packing)
    lowp_eager = partial(_lowp_eager, cu_seqlens=cu_seqlens)
    assert_matches_reference(NAMES, ours, reference, (q, k, v), dout, lowp_reference=lowp_eager)


# The backward's split layout (the suite pins the fused one): key blocks shorter than the longest
# sequence, so shorter sequences leave whole key blocks and query tiles with nothing to do.
SPLIT_CASES = ["text_mixed_d64", "single_121", "empty_sequences", "loose_max_seqlen"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SPLIT_CASES)
def test_split_backward_matches_reference(name, dtype, device, split_backward):
    skip_bf16_in_interpreter(dtype, device)
    _, heads, dim, lengths, max_seqlen = next(c for c in CASES if c[0] == name)
    max_seqlen = max_seqlen or max(lengths)
    split_backward(32 if max_seqlen > 64 else 16)
    q, k, v, cu_seqlens = _inputs(lengths, heads, dim, dtype, device)
    dout = (0.1 * torch.randn(sum(lengths), heads, dim, device=device)).to(dtype)
    packing = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    ours = value_and_grads(partial(varlen_attention, **packing), (q, k, v), dout)
    reference = partial(varlen_attention_reference, **packing)
    lowp_eager = partial(_lowp_eager, cu_seqlens=cu_seqlens)
    assert_matches_reference(NAMES, ours, reference, (q, k, v), dout, lowp_reference=lowp_eager)


@pytest.mark.parametrize("layout", ["fused", "split"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["no_dropout", "dropout"])
def test_varlen_attention_equals_padded_attention(dropout_p, layout, device, split_backward):
    """The padded kernel on the same batch padded to max_seqlen (key padding mask), unpadded:
    same tiles, same arithmetic, same Philox positions, so equal to rounding, in either layout."""
    if layout == "split":
        split_backward(16)
    lengths, heads, dim, max_seqlen = [20, 1, 0, 13, 7], 2, 64, 20
    q, k, v, cu_seqlens = _inputs(lengths, heads, dim, torch.float32, device)
    dout = 0.1 * torch.randn_like(q)
    packed = partial(varlen_attention, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p, seed=7)
    ours = value_and_grads(packed, (q, k, v), dout)

    valid = _valid(lengths, max_seqlen, device)
    qp, kp, vp = (_pad(t.detach(), lengths, max_seqlen).requires_grad_() for t in (q, k, v))  # [B, T, H, D]

    # Padded query rows get a zero upstream gradient, so they add nothing to dK and dV.
    def padded_attention(*qkv):  # [B, T, H, D] in and out
        return attention(*(t.transpose(1, 2) for t in qkv), valid, dropout_p, seed=7).transpose(1, 2)

    padded = value_and_grads(padded_attention, (qp, kp, vp), _pad(dout, lengths, max_seqlen))
    for name, a, e in zip(NAMES, ours, padded, strict=True):
        assert_close(name, a, e[valid], atol=1e-6, rtol=1e-5)


def test_varlen_attention_dropout_matches_reference_with_same_mask(device):
    lengths, heads, dim, p = [20, 1, 13, 7], 2, 32, 0.1
    max_seqlen = max(lengths)
    q, k, v, cu_seqlens = _inputs(lengths, heads, dim, torch.float32, device)
    dout = 0.1 * torch.randn_like(q)
    packing = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=p)
    ours = value_and_grads(partial(varlen_attention, **packing, seed=42), (q, k, v), dout)
    out = ours[0]
    keep = attention_dropout_mask(len(lengths), heads, max_seqlen, max_seqlen, p, 42, q.device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03, "keep fraction far from 1 - p"
    reference = partial(varlen_attention_reference, **packing, keep_mask=keep)
    assert_matches_reference(NAMES, ours, reference, (q, k, v), dout)
    # Seeds: the same seed repeats the mask, a new one changes it.
    assert torch.equal(varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=p, seed=42), out)
    assert not torch.equal(varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=p, seed=43), out)


def test_varlen_attention_accepts_fused_qkv_slices(device):
    """q, k, v as slices of one [T, 3, H, D] projection: token stride 3*H*D, not H*D."""
    lengths, heads, dim = [7, 12], 2, 32
    qkv = (0.3 + torch.randn(sum(lengths), 3, heads, dim, device=device)).requires_grad_()
    cu_seqlens = _cu_seqlens(lengths, device)
    dout = 0.1 * torch.randn(sum(lengths), heads, dim, device=device)

    def sliced(attention_fn):
        return lambda qkv: attention_fn(*qkv.unbind(1), cu_seqlens, max(lengths))

    ours = value_and_grads(sliced(varlen_attention), (qkv,), dout)
    assert_matches_reference(("out", "dqkv"), ours, sliced(varlen_attention_reference), (qkv,), dout)


def test_varlen_attention_only_empty_sequences(device):
    q, k, v, cu_seqlens = _inputs([0, 0], 2, 32, torch.float32, device)
    out = varlen_attention(q, k, v, cu_seqlens, 0)
    assert out.shape == (0, 2, 32)
    assert all(g.shape == (0, 2, 32) for g in torch.autograd.grad(out, (q, k, v), torch.zeros_like(out)))


# (what is wrong, build(q [10, 2, 32], cu_seqlens for lengths [4, 6]) -> (args, kwargs), message)
BAD_INPUTS = [
    ("cu_seqlens_int64", lambda q, cu: ((q, q, q, cu.long(), 6), {}), "cu_seqlens must be int32"),
    ("cu_seqlens_2d", lambda q, cu: ((q, q, q, cu[None], 6), {}), "cu_seqlens must be 1-D"),
    ("cu_seqlens_not_from_0", lambda q, cu: ((q, q, q, cu + 1, 6), {}), "cu_seqlens must start at 0"),
    ("cu_seqlens_decreasing", lambda q, cu: ((q, q, q, cu[[0, 2, 1, 2]], 10), {}), "must be non-decreasing"),
    ("cu_seqlens_short_of_total", lambda q, cu: ((q[:9], q[:9], q[:9], cu, 6), {}), "must end at total_tokens = "),
    ("max_seqlen_too_small", lambda q, cu: ((q, q, q, cu, 5), {}), "max_seqlen = 5 but"),
    ("max_seqlen_past_limit", lambda q, cu: ((q, q, q, cu, MAX_KEYS + 1), {}), f"MAX_KEYS={MAX_KEYS}"),
    ("max_seqlen_tensor", lambda q, cu: ((q, q, q, cu, torch.tensor(6)), {}), "max_seqlen must be a Python int"),
    ("k_shape", lambda q, cu: ((q, q[:9], q[:9], cu, 6), {}), "of one shape"),
    ("q_2d", lambda q, cu: ((q[:, 0], q[:, 0], q[:, 0], cu, 6), {}), "of one shape"),
    ("dtype_mix", lambda q, cu: ((q, q.half(), q, cu, 6), {}), "share one dtype"),
    ("int_dtype", lambda q, cu: ((q.long(), q.long(), q.long(), cu, 6), {}), "share one dtype"),
    ("head_dim_48", lambda q, cu: ((*[q.new_zeros(10, 2, 48)] * 3, cu, 6), {}), "head_dim 48"),
    ("strided_head_dim", lambda q, cu: ((*[q[..., ::2]] * 3, cu, 6), {}), "contiguous last"),
    ("dropout_1", lambda q, cu: ((q, q, q, cu, 6), {"dropout_p": 1.0}), r"dropout_p=1\.0"),
]


@pytest.mark.parametrize("build, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_varlen_attention_rejects_bad_inputs(build, message, device):
    args, kwargs = build(torch.randn(10, 2, 32, device=device), _cu_seqlens([4, 6], device))
    with pytest.raises(ValueError, match=message):
        varlen_attention(*args, **kwargs)
