"""kernels/dispatch.py: which implementation "auto" and the explicit backends choose."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from semvlp.config import config_from_preset
from semvlp.model import SemVLPModel
from semvlp_kernels import dispatch
from semvlp_kernels.attention import attention_reference, attention_sdpa
from semvlp_kernels.bias_gelu import bias_gelu_reference
from semvlp_kernels.linear_cross_entropy import linear_cross_entropy
from semvlp_kernels.residual_layer_norm import residual_layer_norm_reference


def select_on_gpu(
    capability: tuple[int, int], backend: str = "auto", dtype: torch.dtype = torch.bfloat16
) -> dispatch.KernelOps:
    gpu = mock.patch("torch.cuda.get_device_capability", return_value=capability)
    with gpu, mock.patch.dict(dispatch._selected, clear=True):  # the choice is remembered: forget it after
        return dispatch.select_ops(backend, torch.device("cuda", 0), dtype)


def test_cpu_auto_uses_the_references():
    ops = dispatch.select_ops("auto", torch.device("cpu"), torch.float32)
    assert ops is dispatch.EAGER and ops.attention is attention_reference


@pytest.mark.parametrize("capability", [(7, 0), (8, 0), (9, 0)], ids=["V100", "A100", "H100"])
def test_gpu_auto_uses_what_was_measured_to_pay(capability):
    ops = select_on_gpu(capability)
    assert ops.attention is attention_sdpa  # SDPA beats the Triton attention forward+backward
    assert ops.linear_cross_entropy is linear_cross_entropy  # the one fused op that wins end to end


@pytest.mark.parametrize("capability", [(7, 0), (8, 0)], ids=["V100", "A100"])
def test_gpu_auto_in_fp16_keeps_the_reference_masked_lm_loss(capability):
    """The fused loss stores its gradient in fp16 before the loss scale applies: small values are lost."""
    assert select_on_gpu(capability, dtype=torch.float16) is dispatch.SDPA
    assert select_on_gpu(capability, "triton", dtype=torch.float16).linear_cross_entropy is linear_cross_entropy


def test_explicit_backends_override_auto():
    assert select_on_gpu((9, 0), "eager") is dispatch.EAGER
    assert select_on_gpu((9, 0), "triton") is dispatch.TRITON
    assert select_on_gpu((8, 0), "triton") is dispatch.TRITON
    with pytest.raises(ValueError, match="kernel_backend='fast'"):
        dispatch.select_ops("fast", torch.device("cpu"), torch.float32)


def test_triton_on_a_v100_keeps_the_memory_bound_kernels_and_uses_sdpa_attention():
    """The Triton attention does not fit a V100 at the model's 121 keys (kernel_resources --arch 70)."""
    ops = select_on_gpu((7, 0), "triton")
    assert ops.attention is attention_sdpa
    assert ops.linear_gelu is dispatch.linear_gelu_triton
    assert ops.linear_residual_layer_norm is dispatch.linear_residual_layer_norm_triton
    assert ops.linear_cross_entropy is linear_cross_entropy
    with pytest.raises(ValueError, match="Triton needs sm_70 or newer"):
        select_on_gpu((6, 1), "triton")


def test_dropout_beyond_the_int32_philox_positions_falls_back_instead_of_raising(monkeypatch):
    """The Triton attentions key each probability's dropout draw by its flat index, an int32. A call
    with 2**31 probabilities or more (12 heads x 121 x 121 at a batch of 12,300) and dropout goes to
    the fallback; without dropout it stays on Triton. Meta tensors: shapes only, nothing allocated."""
    calls = []
    for name in ("attention", "attention_reference", "varlen_attention"):
        monkeypatch.setattr(dispatch, name, lambda *args, name=name, **kwargs: calls.append(name))
    monkeypatch.setattr(dispatch, "varlen_attention_via_padding", lambda padded: lambda *args: calls.append("padded"))
    q = torch.empty(12_300, 12, 121, 64, device="meta")
    dispatch.attention_triton_or_fallback(q, q, q, None, dropout_p=0.1)
    dispatch.attention_triton_or_fallback(q, q, q, None, dropout_p=0.0)
    dispatch.attention_triton_or_fallback(q[:12_200], q[:12_200], q[:12_200], None, dropout_p=0.1)
    assert calls == ["attention_reference", "attention", "attention"]
    calls.clear()
    sequences, max_seqlen = 450_000, 20  # x 12 heads x 20 x 20 > 2**31
    packed, cu_seqlens = torch.empty(sequences * 8, 12, 64, device="meta"), torch.empty(sequences + 1, device="meta")
    dispatch.varlen_attention_triton_or_fallback(packed, packed, packed, cu_seqlens, max_seqlen, dropout_p=0.1)
    dispatch.varlen_attention_triton_or_fallback(packed, packed, packed, cu_seqlens, max_seqlen, dropout_p=0.0)
    assert calls == ["padded", "varlen_attention"]


def test_a_residual_layer_norm_beyond_the_int32_philox_positions_falls_back_only_with_dropout(monkeypatch):
    """The same for the residual LayerNorm's dropout, keyed by each element's flat index; its other
    offsets are int64, so without dropout there is no limit."""
    from semvlp_kernels.residual_layer_norm import _check

    calls = []
    monkeypatch.setattr(dispatch, "residual_layer_norm", lambda *args: calls.append("triton"))
    monkeypatch.setattr(dispatch, "residual_layer_norm_reference", lambda *args: calls.append("eager"))
    x = torch.empty(2**31 // 768 + 1, 768, device="meta")  # 2**31 elements or more; x[1:] fewer
    weight, vector = torch.empty(768, 768, device="meta"), torch.empty(768, device="meta")
    for dropout_p in (0.1, 0.0):
        dispatch.linear_residual_layer_norm_triton(x, weight, vector, x, vector, vector, 1e-12, dropout_p)
        dispatch.linear_residual_layer_norm_triton(x[1:], weight, vector, x[1:], vector, vector, 1e-12, dropout_p)
    assert calls == ["eager", "triton", "triton", "triton"]
    _check(x, vector, x, vector, vector, dropout_p=0.0)
    with pytest.raises(ValueError, match=r"with dropout, x.numel\(\) must stay below 2\*\*31"):
        _check(x, vector, x, vector, vector, dropout_p=0.1)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_eager_ops_after_a_gemm_leave_the_bias_to_the_gemm():
    """Same math as bias-free GEMM + the bias-adding references, with the bias added by the GEMM
    itself (addmm: cuBLAS's epilogue on a GPU), not by an elementwise pass of its own."""
    torch.manual_seed(0)
    x, residual = torch.randn(2, 7, 32), torch.randn(2, 7, 48)
    w_up, b_up, w_out, b_out = torch.randn(48, 32), torch.randn(48), torch.randn(48, 48), torch.randn(48)
    ln_w, ln_b = torch.randn(48), torch.randn(48)
    with _RecordOps() as gelu:
        h = dispatch.linear_gelu_eager(x, w_up, b_up)
    torch.testing.assert_close(h, bias_gelu_reference(F.linear(x, w_up), b_up))
    with _RecordOps() as norm:
        y = dispatch.linear_residual_layer_norm_eager(h, w_out, b_out, residual, ln_w, ln_b, 1e-12)
    expected = residual_layer_norm_reference(F.linear(h, w_out), b_out, residual, ln_w, ln_b, 1e-12)
    torch.testing.assert_close(y, expected)
    assert gelu.ops.count("addmm") == 1 and "add" not in gelu.ops, gelu.ops
    assert norm.ops.count("addmm") == 1 and norm.ops.count("add") == 1, norm.ops  # the residual's


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_every_backends_add_and_norm_drops_what_it_adds_to_the_residual(backend):
    """LayerNorm(residual + dropout(x W^T + b)), with p = 0.5: where x W^T + b is one constant and the
    residual zero, the kept half of each row normalizes to +1 and the dropped half to -1."""
    torch.manual_seed(0)
    ops = dispatch.select_ops(backend, torch.device("cpu"), torch.float32)
    x, residual = torch.zeros(64, 9, 256), torch.zeros(64, 9, 256)
    weight, bias, ln_weight, ln_bias = torch.zeros(256, 256), torch.full((256,), 3.0), torch.ones(256), torch.zeros(256)
    y = ops.linear_residual_layer_norm(x, weight, bias, residual, ln_weight, ln_bias, 1e-12, 0.5)
    assert set(y.round().unique().tolist()) == {-1.0, 1.0} and abs((y > 0).float().mean().item() - 0.5) < 0.01
    without = ops.linear_residual_layer_norm(x, weight, bias, residual, ln_weight, ln_bias, 1e-12, 0.0)
    assert without.abs().max() == 0  # a constant row normalizes to 0


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_every_backends_attention_is_masked_softmax_attention_with_dropout(backend):
    """softmax(q k^T / sqrt(D)) v over the keys the mask keeps (True = a real key); with dropout p the
    probabilities are dropped and scaled by 1 / (1 - p). Uniform attention over ones shows it: each
    output is (kept keys / keys) / (1 - p), 1 on average, exactly 1 without dropout."""
    torch.manual_seed(0)
    ops = dispatch.select_ops(backend, torch.device("cpu"), torch.float32)
    q, k, v = torch.randn(3, 4, 21, 16), torch.randn(3, 4, 37, 16), torch.randn(3, 4, 37, 16)
    keep = torch.ones(3, 37, dtype=torch.bool)
    keep[1, 20:], keep[2, 5:] = False, False
    scores = (q @ k.transpose(-1, -2) / 4).masked_fill(~keep[:, None, None, :], float("-inf"))
    torch.testing.assert_close(ops.attention(q, k, v, keep, 0.0), scores.softmax(-1) @ v, rtol=1e-5, atol=1e-5)

    zeros, ones = torch.zeros(8, 4, 64, 16), torch.ones(8, 4, 64, 16)
    keep = torch.ones(8, 64, dtype=torch.bool)
    assert torch.equal(ops.attention(zeros, zeros, ones, keep, 0.0), ones)
    dropped = ops.attention(zeros, zeros, ones, keep, 0.5)
    assert abs(dropped.mean().item() - 1) < 0.02 and 0.1 < dropped.std().item() < 0.15  # std 1 / sqrt(64)


def test_the_model_compiles_to_one_graph_per_mode():
    """select_ops runs in every forward: torch.compile must trace it to a constant (no graph break at
    its cache or its logging call; fullgraph=True raises on any break). Dynamo only: backend="eager"."""
    torch.manual_seed(0)
    model = SemVLPModel(config_from_preset("tiny")).eval()
    inputs = dict(
        input_ids=torch.randint(1, 100, (2, 9)),
        attention_mask=torch.ones(2, 9, dtype=torch.long),
        visual_feats=torch.randn(2, 100, 2048),
        visual_pos=torch.rand(2, 100, 4),
    )
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for mode in ("single", "two"):
        torch.testing.assert_close(compiled(**inputs, mode=mode).pooled, model(**inputs, mode=mode).pooled)
