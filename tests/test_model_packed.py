"""Packed text (PackedText, no padding tokens) gives what padded text gives: the encoder's outputs,
their gradients and the pre-training losses, in both modes; bad packed inputs raise named errors.

"eager" runs the packed attention through padding (dispatch.varlen_attention_via_padding), so it
checks the packing itself (positions, the [IMG, objects, text_b] interleaving, unpadding);
"triton" runs the Triton varlen kernel (under the interpreter on CPU, tests/conftest.py), so it
checks the kernel inside the model. The interpreter is slow, so Triton uses 20 objects, not 100.
"""

from __future__ import annotations

import pytest
import torch

from semvlp.config import config_from_preset
from semvlp.data import build_pretrain_loader
from semvlp.data.config import DataConfig
from semvlp.data.pretrain_dataset import pretraining_model_fields
from semvlp.data.toy import ToySpec, ensure_toy_world
from semvlp.model import PackedText, SemVLPForPreTraining, SemVLPModel
from semvlp_kernels import dispatch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VOCAB = 97
LENGTHS = [2, 20, 7, 13]  # [CLS][SEP] alone, the longest caption, and two in between
NUM_OBJECTS = {"eager": 100, "triton": 20}


def make_model(backend: str) -> SemVLPModel:
    config = config_from_preset(
        "tiny", vocab_size=VOCAB, num_qa_labels=11, num_object_labels=13, num_attribute_labels=7,
        kernel_backend=backend,
    )  # fmt: skip
    torch.manual_seed(0)
    return SemVLPModel(config).to(DEVICE).eval()


def make_inputs(num_objects: int, lengths: list[int] = LENGTHS) -> tuple[dict, dict]:
    """The same batch twice: padded (input_ids [B, m] + attention_mask) and packed (PackedText)."""
    g = torch.Generator().manual_seed(0)
    batch, longest = len(lengths), max(lengths)
    attention_mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids = torch.randint(1, VOCAB, (batch, longest), generator=g) * attention_mask
    token_type_ids = torch.randint(2, (batch, longest), generator=g) * attention_mask
    visual = dict(
        visual_feats=torch.randn(batch, num_objects, 2048, generator=g).to(DEVICE),
        visual_pos=torch.rand(batch, num_objects, 4, generator=g).to(DEVICE),
    )
    real = attention_mask.bool()
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = PackedText(input_ids[real].to(DEVICE), cu_seqlens.to(DEVICE), longest, token_type_ids[real].to(DEVICE))
    padded = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    return {**{k: v.to(DEVICE) for k, v in padded.items()}, **visual}, dict(input_ids=packed, **visual)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("mode", ["single", "two"])
def test_packed_forward_and_gradients_equal_padded(backend, mode):
    model = make_model(backend)
    padded, packed = make_inputs(NUM_OBJECTS[backend])
    real = padded["attention_mask"].bool()
    outs, grads = {}, {}
    for name, inputs in (("padded", padded), ("packed", packed)):
        model.zero_grad()
        out = model(**inputs, mode=mode)
        # One loss touching every output: text states at real positions, visual states, pooled.
        loss = (out.text_states[real] ** 2).sum() + out.visual_states.sum() + out.pooled.sum()
        loss.backward()
        outs[name] = out
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    padded_out, packed_out = outs["padded"], outs["packed"]
    assert packed_out.text_states.shape == padded_out.text_states.shape == (len(LENGTHS), max(LENGTHS), 128)
    assert not packed_out.text_states[~real].any(), "padding positions of packed text_states must be zeros"
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_out.text_states[real], padded_out.text_states[real], **close)
    torch.testing.assert_close(packed_out.visual_states, padded_out.visual_states, **close)
    torch.testing.assert_close(packed_out.pooled, padded_out.pooled, **close)
    assert grads["packed"].keys() == grads["padded"].keys()
    for n, expected in grads["padded"].items():
        # fp32, but the GEMMs see [T, H] rows instead of [B * m, H]: other summation orders. Gradients
        # summed over many tokens (embedding tables, ~3 here) differ by up to ~5e-5 (as test_model_kernels).
        torch.testing.assert_close(grads["packed"][n], expected, atol=2e-5, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["single", "two"])
def test_packed_hidden_states_equal_padded(mode):
    model = make_model("eager").eval()
    padded, packed = make_inputs(NUM_OBJECTS["eager"])
    real = padded["attention_mask"].bool()
    with torch.no_grad():
        a, b = (model(**inputs, mode=mode, output_hidden_states=True) for inputs in (padded, packed))
    assert len(b.text_hidden_states) == len(b.visual_hidden_states) == model.config.num_hidden_layers + 1
    for layer, (want, got) in enumerate(zip(a.text_hidden_states, b.text_hidden_states, strict=True)):
        assert got.shape == want.shape and not got[~real].any(), layer
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5, msg=lambda m, i=layer: f"{i}: {m}")
    for want, got in zip(a.visual_hidden_states, b.visual_hidden_states, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_triton_backend_runs_the_varlen_kernel_on_packed_text(monkeypatch):
    calls = []
    real_kernel = dispatch.varlen_attention

    def spy(q, k, v, cu_seqlens, max_seqlen, *args, **kwargs):
        calls.append(max_seqlen)
        return real_kernel(q, k, v, cu_seqlens, max_seqlen, *args, **kwargs)

    monkeypatch.setattr(dispatch, "varlen_attention", spy)
    model = make_model("triton")
    _, packed = make_inputs(NUM_OBJECTS["triton"], lengths=[3, 5])
    model(**packed, mode="single")
    model(**packed, mode="two")
    layers = model.config.num_hidden_layers
    assert calls == [1 + 20 + 5] * layers + [5] * layers  # [IMG, 20 objects, text] sequences; then text alone


def test_packed_attention_falls_back_to_padding_past_the_kernel_limits():
    """Sequences longer than the Triton tile (128) or unsupported head dims go through padding."""
    g = torch.Generator().manual_seed(0)
    lengths = [130, 3]
    q, k, v = (torch.randn(sum(lengths), 2, 24, generator=g) for _ in range(3))
    cu_seqlens = torch.tensor([0, 130, 133], dtype=torch.int32)
    expected = dispatch.varlen_attention_via_padding(dispatch.attention_reference)(q, k, v, cu_seqlens, 130)
    got = dispatch.TRITON.varlen_attention(q, k, v, cu_seqlens, 130)
    torch.testing.assert_close(got, expected)
    first = dispatch.attention_reference(*(t[:130].transpose(0, 1)[None] for t in (q, k, v)))
    torch.testing.assert_close(got[:130], first[0].transpose(0, 1))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    # The folder tests/test_data_pretrain.py uses, so one generation serves both in one session.
    return ensure_toy_world(tmp_path_factory.getbasetemp() / "toy_small", spec=ToySpec.small())


@pytest.mark.parametrize("mode", ["single", "two"])
def test_pretraining_losses_equal_on_a_real_batch(toy, mode):
    config = config_from_preset("tiny", **pretraining_model_fields(DataConfig.load(toy)))
    torch.manual_seed(0)
    model = SemVLPForPreTraining(config).to(DEVICE).eval()
    batch = next(iter(build_pretrain_loader(toy, batch_size=8)))
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "the batch should mix caption lengths"
    names = ("visual_feats", "visual_pos", "obj_mask", "obj_labels", "obj_confs", "attr_labels", "attr_confs")
    targets = {k: batch[k] for k in (*names, "itm_labels", "qa_labels")}
    text = {k: batch[k] for k in ("attention_mask", "token_type_ids")}
    padded = model(batch["input_ids"], **targets, mlm_labels=batch["mlm_labels"], **text, mode=mode)
    packed = model(PackedText.from_batch(batch), **targets, mlm_labels=batch["packed_mlm_labels"], mode=mode)
    assert padded.losses["mlm"] > 0
    for task, expected in padded.losses.items():
        torch.testing.assert_close(packed.losses[task], expected, atol=1e-5, rtol=1e-5, msg=f"loss {task}")
    torch.testing.assert_close(packed.mlm_targets, padded.mlm_targets, atol=0, rtol=0)


def _packed(**change) -> PackedText:
    fields = dict(
        input_ids=torch.tensor([101, 5, 102, 101, 102]),
        cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32),
        max_seqlen=3,
        token_type_ids=None,
    )
    return PackedText(**{**fields, **change})


@pytest.mark.parametrize(
    "packed, extra, message",
    [
        (_packed(), dict(attention_mask=torch.ones(2, 3)), r"attention_mask and token_type_ids must be None"),
        (_packed(), dict(token_type_ids=torch.zeros(2, 3)), r"attention_mask and token_type_ids must be None"),
        (_packed(input_ids=torch.ones(1, 5, dtype=torch.long)), {}, r"PackedText.input_ids has shape \(1, 5\)"),
        (_packed(token_type_ids=torch.zeros(4, dtype=torch.long)), {}, r"PackedText.token_type_ids has shape \(4,\)"),
        (_packed(cu_seqlens=torch.tensor([0, 3, 5])), {}, r"PackedText.cu_seqlens must be int32"),
        (_packed(max_seqlen=torch.tensor(3)), {}, r"PackedText.max_seqlen must be a positive Python int"),
        (_packed(max_seqlen=65), {}, r"PackedText.max_seqlen is 65 tokens; .*max_position_embeddings=64"),
        (_packed(cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32)), {}, r"cu_seqlens must run from 0 to .* 5"),
        (_packed(cu_seqlens=torch.tensor([0, 5, 5], dtype=torch.int32), max_seqlen=5), {}, r"lengths \[5, 0\]"),
        (_packed(max_seqlen=2), {}, r"caption lengths \[3, 2\]; each must be in 1..max_seqlen=2"),
        (_packed(cu_seqlens=torch.tensor([0, 2, 3, 5], dtype=torch.int32)), {}, r"batch size 2 but input_ids has 3"),
        (_packed(), dict(visual_attention_mask=torch.ones(2, 4)), r"visual_attention_mask with PackedText"),
    ],
)
def test_bad_packed_inputs_raise_errors_naming_the_argument(packed, extra, message):
    model = make_model("eager").cpu()
    visual = dict(visual_feats=torch.randn(2, 4, 2048), visual_pos=torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=message):
        model(packed, **visual, **extra, mode="single")


def test_packed_mlm_labels_must_be_packed():
    config = config_from_preset("tiny", vocab_size=VOCAB, num_qa_labels=11, num_object_labels=13,
                                num_attribute_labels=7)  # fmt: skip
    model = SemVLPForPreTraining(config).eval()
    k = 4
    targets = dict(
        visual_feats=torch.randn(2, k, 2048), visual_pos=torch.rand(2, k, 4), obj_mask=torch.zeros(2, k, dtype=bool),
        obj_labels=torch.zeros(2, k, dtype=torch.long), obj_confs=torch.ones(2, k),
        attr_labels=torch.zeros(2, k, dtype=torch.long), attr_confs=torch.ones(2, k),
        itm_labels=torch.ones(2, dtype=torch.long), qa_labels=torch.full((2,), -100),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"mlm_labels has shape \(2, 3\); with PackedText it is packed"):
        model(_packed(), mlm_labels=torch.full((2, 3), -100), **targets)
