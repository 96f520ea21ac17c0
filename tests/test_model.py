"""The model as the paper describes it: shapes, parameter sharing, the two-stream equations,
BERT compatibility, the masked-LM shortcut, save/load, and bad-input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForPreTraining, BertModel

from semvlp import SemVLPConfig, SemVLPForNLVR2, SemVLPForPreTraining, SemVLPForQuestionAnswering, SemVLPModel
from semvlp.config import config_from_preset
from semvlp.model import SemVLPForRetrieval, enable_activation_checkpointing, init_from_bert
from semvlp.model.bert_init import config_from_bert
from semvlp.model.modeling import PackedText

VOCAB, K = 97, 100


def tiny_config(**overrides) -> SemVLPConfig:
    fields = dict(vocab_size=VOCAB, num_qa_labels=11, num_object_labels=13, num_attribute_labels=7)
    return config_from_preset("tiny", **{**fields, **overrides})


def make_inputs(batch: int = 3, length: int = 9, num_objects: int = K, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, length - 3 :] = 0  # one padded text
    return dict(
        input_ids=torch.randint(1, VOCAB, (batch, length), generator=g),
        attention_mask=attention_mask,
        token_type_ids=torch.zeros(batch, length, dtype=torch.long),
        visual_feats=torch.randn(batch, num_objects, 2048, generator=g),
        visual_pos=torch.rand(batch, num_objects, 4, generator=g),
    )


def pretraining_targets(inputs: dict, num_masked_objects: int = 15, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch, length = inputs["input_ids"].shape
    num_objects = inputs["visual_feats"].shape[1]
    mlm_labels = torch.full((batch, length), -100)
    mlm_labels[:, 1:4] = torch.randint(VOCAB, (batch, 3), generator=g)
    obj_mask = torch.zeros(batch, num_objects, dtype=torch.bool)
    obj_mask[:, :num_masked_objects] = True
    return dict(
        mlm_labels=mlm_labels,
        obj_mask=obj_mask,
        obj_labels=torch.randint(13, (batch, num_objects), generator=g),
        obj_confs=torch.rand(batch, num_objects, generator=g),
        attr_labels=torch.randint(7, (batch, num_objects), generator=g),
        attr_confs=torch.rand(batch, num_objects, generator=g),
        itm_labels=torch.tensor([1, 0, 1][:batch]),
        qa_labels=torch.tensor([2, 5, -100][:batch]),
    )


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every parameter moved by noise (seeded): LayerNorm weights and biases away
    from their 1 and 0, which a reference computation could otherwise get away with skipping."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def paper_forward(model: SemVLPModel, inputs: dict, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text states, image states, pooled) by the paper's equations (section 3), in plain torch ops on
    the model's weights, without dropout: BERT's text embeddings and post-LayerNorm blocks; an object
    is LayerNorm(W [feature; box] + b), with [IMG] in front. Single-stream runs [IMG, objects, text]
    through every block and pools h_CLS; two-stream runs the text through every block, then the
    image, which from block L_s + 1 on attends to the final text states after its self-attention,
    and pools o_IMG."""
    cfg, w = model.config, dict(model.named_parameters())
    heads = cfg.num_attention_heads
    norm = lambda x, name: F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], cfg.layer_norm_eps)
    linear = lambda x, name: F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])

    def attention(x, context, keep, name):  # keep: [B, keys] bool
        if context is x:
            q, k, v = linear(x, f"{name}.qkv").chunk(3, -1)
        else:
            q, (k, v) = linear(x, f"{name}.query"), linear(context, f"{name}.key_value").chunk(2, -1)
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)
        scores = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5
        probs = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
        return norm(x + linear((probs @ split(v)).transpose(1, 2).flatten(2), f"{name}.out"), f"{name}.norm")

    def block(x, keep, layer, text=None, text_keep=None):
        name = f"encoder.layers.{layer}"
        x = attention(x, x, keep, f"{name}.attention")
        if text is not None:
            x = attention(x, text, text_keep, f"{name}.cross_attention")
        return norm(x + linear(F.gelu(linear(x, f"{name}.ffn.up")), f"{name}.ffn.down"), f"{name}.ffn.norm")

    ids, batch = inputs["input_ids"], inputs["input_ids"].shape[0]
    text = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][: ids.shape[1]]
            + w["embeddings.token_type_embeddings.weight"][inputs["token_type_ids"]])  # fmt: skip
    text, text_keep = norm(text, "embeddings.norm"), inputs["attention_mask"].bool()
    boxed = torch.cat([inputs["visual_feats"], inputs["visual_pos"]], -1)
    objects = norm(linear(boxed, "visual_embeddings.projection"), "visual_embeddings.norm")
    image = torch.cat([w["visual_embeddings.img_token"].expand(batch, 1, -1), objects], 1)
    image_keep = torch.cat([torch.ones(batch, 1, dtype=torch.bool), inputs["visual_attention_mask"].bool()], 1)
    if mode == "single":
        x, keep = torch.cat([image, text], 1), torch.cat([image_keep, text_keep], 1)
        for layer in range(cfg.num_hidden_layers):
            x = block(x, keep, layer)
        image, text = x[:, : image.shape[1]], x[:, image.shape[1] :]
        return text, image, torch.tanh(linear(text[:, 0], "pooler.dense"))
    for layer in range(cfg.num_hidden_layers):
        text = block(text, text_keep, layer)
    for layer in range(cfg.num_hidden_layers):  # 0-based: blocks L_s + 1..L are layer >= L_s
        cross = layer >= cfg.cross_attention_start_layer
        image = block(image, image_keep, layer, text if cross else None, text_keep)
    return text, image, torch.tanh(linear(image[:, 0], "pooler.dense"))


@pytest.fixture
def model() -> SemVLPModel:
    torch.manual_seed(0)
    return SemVLPModel(tiny_config()).eval()


@pytest.mark.parametrize("mode", ["single", "two"])
def test_both_modes_compute_the_papers_equations(model, mode):
    """The model against paper_forward, a from-scratch reading of the paper, with padded text and
    padded objects: embeddings, masks, block order, which states the image attends to and from
    which block, and which token is pooled."""
    perturbed(model)
    inputs = make_inputs()
    inputs["visual_attention_mask"] = torch.ones(3, K, dtype=torch.long)
    inputs["visual_attention_mask"][1, K - 30 :] = 0
    inputs["token_type_ids"][2, 4:] = 1
    out = model(**inputs, mode=mode)
    text, image, pooled = paper_forward(model, inputs, mode)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.text_states[real], text[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.visual_states, image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pooled, pooled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["single", "two"])
def test_output_shapes_and_dtypes(model, mode):
    out = model(**make_inputs(), mode=mode)
    assert out.text_states.shape == (3, 9, 128)
    assert out.visual_states.shape == (3, 1 + K, 128)
    assert out.pooled.shape == (3, 128)
    assert {out.text_states.dtype, out.visual_states.dtype, out.pooled.dtype} == {torch.float32}


@pytest.mark.parametrize("mode", ["single", "two"])
def test_visual_attention_mask_hides_padded_objects(model, mode):
    inputs = make_inputs()
    mask = torch.ones(3, K, dtype=torch.long)
    mask[:, 60:] = 0
    base = model(**inputs, visual_attention_mask=mask, mode=mode)
    changed = dict(inputs, visual_feats=inputs["visual_feats"].clone())
    changed["visual_feats"][:, 60:] += 5.0
    other = model(**changed, visual_attention_mask=mask, mode=mode)
    torch.testing.assert_close(other.pooled, base.pooled)
    torch.testing.assert_close(other.visual_states[:, :61], base.visual_states[:, :61])
    unmasked = model(**changed, mode=mode)
    assert not torch.allclose(unmasked.pooled, base.pooled)


def test_text_padding_is_ignored(model):
    inputs = make_inputs()
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][0, -3:] = 5  # padded positions of the first example
    for mode in ("single", "two"):
        a, b = model(**inputs, mode=mode), model(**changed, mode=mode)
        torch.testing.assert_close(a.pooled, b.pooled)
        torch.testing.assert_close(a.text_states[0, :-3], b.text_states[0, :-3])


def _probabilities(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over the valid keys, written out: [B, heads, T_q, T_k]."""
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5
    return scores.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(dim=-1)


def test_output_attentions_returns_the_probabilities_each_block_uses(model):
    """Single-stream block 1 and two-stream's first cross-attention, recomputed from the weights;
    shapes and counts of every map; zero weight on padded keys; the outputs unchanged."""
    cfg, inputs = model.config, make_inputs()
    visual_mask = torch.ones(3, K, dtype=torch.long)
    visual_mask[2, 70:] = 0
    inputs["visual_attention_mask"] = visual_mask
    keys_single = torch.cat(
        [torch.ones(3, 1, dtype=torch.bool), visual_mask.bool(), inputs["attention_mask"].bool()], 1
    )
    heads, m, start = cfg.num_attention_heads, inputs["input_ids"].shape[1], cfg.cross_attention_start_layer

    single = model(**inputs, mode="single", output_attentions=True, output_hidden_states=True)
    assert [a.shape for a in single.attentions] == [(3, heads, 1 + K + m, 1 + K + m)] * cfg.num_hidden_layers
    assert single.text_attentions is single.visual_attentions is single.cross_attentions is None
    embedded = torch.cat(
        [single.visual_hidden_states[0], model.embeddings(inputs["input_ids"], inputs["token_type_ids"])], 1
    )
    q, k, _ = model.encoder.layers[0].attention.qkv(embedded).chunk(3, dim=-1)
    torch.testing.assert_close(single.attentions[0], _probabilities(q, k, keys_single, heads))

    two = model(**inputs, mode="two", output_attentions=True, output_hidden_states=True)
    assert two.attentions is None
    assert [a.shape for a in two.text_attentions] == [(3, heads, m, m)] * cfg.num_hidden_layers
    assert [a.shape for a in two.visual_attentions] == [(3, heads, 1 + K, 1 + K)] * cfg.num_hidden_layers
    assert [a.shape for a in two.cross_attentions] == [(3, heads, 1 + K, m)] * (cfg.num_hidden_layers - start)
    block = model.encoder.layers[start]  # block L_s + 1: self-attention, then cross-attention to the final text
    keys_image = keys_single[:, : 1 + K]
    after_self = block.attention(two.visual_hidden_states[start], keys_image, model.kernel_ops(two.pooled))
    q = block.cross_attention.query(after_self)
    k, _ = block.cross_attention.key_value(two.text_states).chunk(2, dim=-1)
    torch.testing.assert_close(two.cross_attentions[0], _probabilities(q, k, inputs["attention_mask"].bool(), heads))

    for maps, key_mask in (
        (single.attentions, keys_single),
        (two.text_attentions, inputs["attention_mask"].bool()),
        (two.visual_attentions, keys_image),
        (two.cross_attentions, inputs["attention_mask"].bool()),
    ):
        for probs in maps:
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
            assert not probs.masked_select(~key_mask[:, None, None, :]).any()
    for out, mode in ((single, "single"), (two, "two")):
        plain = model(**inputs, mode=mode)
        torch.testing.assert_close(out.pooled, plain.pooled, rtol=0, atol=0)
        torch.testing.assert_close(out.visual_states, plain.visual_states, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["single", "two"])
def test_hidden_states_enter_and_leave_every_block(model, mode):
    inputs = make_inputs()
    out = model(**inputs, mode=mode, output_hidden_states=True)
    text, visual = out.text_hidden_states, out.visual_hidden_states
    assert len(text) == len(visual) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(text[0], model.embeddings(inputs["input_ids"], inputs["token_type_ids"]))
    torch.testing.assert_close(text[-1], out.text_states, rtol=0, atol=0)
    torch.testing.assert_close(visual[-1], out.visual_states, rtol=0, atol=0)
    ops, block = model.kernel_ops(out.pooled), model.encoder.layers[0]
    keys = torch.cat([torch.ones(3, 1 + K, dtype=torch.bool), inputs["attention_mask"].bool()], dim=1)
    if mode == "single":  # block 1 maps the concatenation of the two inputs to that of the two outputs
        joint = block(torch.cat([visual[0], text[0]], dim=1), keys, ops)
        torch.testing.assert_close(joint, torch.cat([visual[1], text[1]], dim=1))
    else:  # each stream through block 1 alone
        torch.testing.assert_close(block(text[0], keys[:, 1 + K :], ops), text[1])
        torch.testing.assert_close(block(visual[0], None, ops), visual[1])


def test_output_attentions_needs_padded_text(model):
    inputs = make_inputs(batch=2)
    text = PackedText(torch.randint(1, VOCAB, (12,)), torch.tensor([0, 5, 12], dtype=torch.int32), 7)
    with pytest.raises(ValueError, match="output_attentions needs padded text"):
        model(text, visual_feats=inputs["visual_feats"], visual_pos=inputs["visual_pos"], output_attentions=True)


def test_both_modes_share_the_same_block_parameters():
    model = SemVLPModel(tiny_config())
    used = {}
    for mode in ("single", "two"):
        model.zero_grad(set_to_none=True)
        model(**make_inputs(), mode=mode).pooled.sum().backward()
        used[mode] = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    blocks = {name for name, _ in model.named_parameters() if name.startswith("encoder.")}
    self_and_ffn = {name for name in blocks if ".attention." in name or ".ffn." in name}
    cross = blocks - self_and_ffn
    assert self_and_ffn <= used["single"] and self_and_ffn <= used["two"]  # one tensor set, both modes
    assert cross <= used["two"] and not cross & used["single"]
    start = model.config.cross_attention_start_layer
    for i, layer in enumerate(model.encoder.layers):
        assert (layer.cross_attention is not None) == (i >= start)  # blocks L_s+1..L (1-based)


def test_base_parameter_counts_match_the_paper(capsys):
    model = SemVLPModel(config_from_preset("base"))
    cross = sum(p.numel() for n, p in model.named_parameters() if "cross_attention" in n)
    visual = sum(p.numel() for p in model.visual_embeddings.parameters())
    shared = sum(p.numel() for p in model.parameters()) - cross - visual
    with capsys.disabled():
        print(
            f"\nbase: shared {shared / 1e6:.1f}M, visual embedding {visual / 1e6:.2f}M, "
            f"cross-attention {cross / 1e6:.1f}M"
        )
    assert 108e6 < shared < 111e6  # BERT-base: 109.5M with the pooler
    assert cross == 6 * (4 * 768 * 768 + 4 * 768 + 2 * 768)  # L - L_s = 6 blocks of Q, K, V, O, LayerNorm
    # The paper quotes 110M single-stream and 140M two-stream parameter sets.
    assert 125e6 < shared + visual + cross < 145e6


def test_two_stream_text_ignores_the_image(model):
    inputs = make_inputs()
    other_image = dict(inputs, visual_feats=torch.randn_like(inputs["visual_feats"]), visual_pos=torch.rand(3, K, 4))
    a, b = model(**inputs, mode="two"), model(**other_image, mode="two")
    torch.testing.assert_close(a.text_states, b.text_states, rtol=0, atol=0)
    single_a, single_b = model(**inputs, mode="single"), model(**other_image, mode="single")
    assert not torch.allclose(single_a.text_states, single_b.text_states)


def test_two_stream_image_ignores_text_up_to_cross_attention_start(model):
    start = model.config.cross_attention_start_layer
    inputs = make_inputs()
    other_text = dict(inputs, input_ids=torch.randint(1, VOCAB, inputs["input_ids"].shape))
    a = model(**inputs, mode="two", output_hidden_states=True)
    b = model(**other_text, mode="two", output_hidden_states=True)
    for layer in range(start + 1):  # embeddings and blocks 1..L_s
        torch.testing.assert_close(a.visual_hidden_states[layer], b.visual_hidden_states[layer], rtol=0, atol=0)
    assert not torch.allclose(a.visual_hidden_states[start + 1], b.visual_hidden_states[start + 1])
    assert not torch.allclose(a.pooled, b.pooled)


def test_retrieval_logits_are_computed_in_fp32_under_bf16():
    """The ITM head of a bf16 model runs in fp32: its logits keep more than bf16's 8 significant bits,
    so a retrieval ranking over thousands of pairs has fewer ties (which count against the true item)."""
    torch.manual_seed(0)
    model = SemVLPForRetrieval(tiny_config()).eval().to(torch.bfloat16)
    inputs = make_inputs(batch=16, seed=3)
    inputs.update(visual_feats=inputs["visual_feats"].bfloat16(), visual_pos=inputs["visual_pos"].bfloat16())
    with torch.no_grad():
        logits = model(**inputs, mode="single").logits
        pooled = model.semvlp(**inputs, mode="single").pooled
    head = model.itm_head
    assert pooled.dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(logits, pooled.float() @ head.weight.float().T + head.bias.float())
    assert not torch.equal(logits, logits.bfloat16().float())  # not rounded to bf16


def test_two_stream_pieces_score_pairs_as_the_full_forward():
    """Retrieval's two-stream scoring: 4 captions and 2 images encoded once each (text stream; image
    blocks below L_s), then only the blocks from L_s on per pair, gives forward(mode="two")'s scores."""
    torch.manual_seed(0)
    model = SemVLPForRetrieval(tiny_config()).eval()
    text = make_inputs(batch=4, seed=1)  # caption 0 padded
    images = make_inputs(batch=2, seed=2)
    images["visual_attention_mask"] = torch.ones(2, K, dtype=torch.long)
    images["visual_attention_mask"][1, 60:] = 0  # a padded image
    image_keys = ("visual_feats", "visual_pos", "visual_attention_mask")
    caption_rows, image_rows = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    with torch.no_grad():
        full = model(
            **{k: text[k][caption_rows] for k in ("input_ids", "attention_mask", "token_type_ids")},
            **{k: images[k][image_rows] for k in image_keys},
            mode="two",
        )  # fmt: skip
        text_states = model.semvlp.two_stream_text(text["input_ids"], text["attention_mask"], text["token_type_ids"])
        image_states = model.semvlp.two_stream_image(*(images[k] for k in image_keys))
        pieces = model.score_pairs(image_states.rows(image_rows), text_states.rows(caption_rows))
    torch.testing.assert_close(pieces, SemVLPForRetrieval.score(full.logits), rtol=1e-5, atol=1e-6)
    assert pieces[:4].unique().numel() == 4 and not torch.equal(pieces[:4], pieces[4:])  # scores vary
    with pytest.raises(ValueError, match="2 images for 4 texts: pair them row by row"):
        model.semvlp.two_stream_pairs(image_states, text_states)


def test_bert_initialization_reproduces_bert_text_states(tmp_path):
    torch.manual_seed(0)
    bert_config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=40,
    )  # fmt: skip
    bert = BertForPreTraining(bert_config).eval()
    bert.save_pretrained(tmp_path)

    config = config_from_bert(tmp_path, cross_attention_start_layer=1, num_qa_labels=5)
    model = SemVLPForPreTraining(config).eval()
    report = init_from_bert(model, tmp_path)
    assert "semvlp.encoder.layers.0.attention.qkv.weight" in report.loaded
    assert "mlm_transform.dense.weight" in report.loaded and "mlm_bias" in report.loaded
    assert "semvlp.visual_embeddings.projection.weight" in report.new
    assert "semvlp.encoder.layers.1.cross_attention.query.weight" in report.new
    assert not any(name.startswith("semvlp.encoder.layers.0.attention") for name in report.new)
    assert any("seq_relationship" in name for name in report.unused)

    inputs = make_inputs(batch=2, length=11)
    inputs["input_ids"] = inputs["input_ids"][:2]
    ours = model.semvlp(**{k: v[:2] for k, v in inputs.items()}, mode="two").text_states
    reference = BertModel.from_pretrained(tmp_path).eval()(
        input_ids=inputs["input_ids"][:2], attention_mask=inputs["attention_mask"][:2]
    )
    mask = inputs["attention_mask"][:2].bool()
    torch.testing.assert_close(ours[mask], reference.last_hidden_state[mask], rtol=0, atol=1e-5)
    # BERT's masked-LM head too: transform (dense -> GELU -> LayerNorm), tied decoder, bias.
    logits = F.linear(model.mlm_transform(ours), model.semvlp.embeddings.word_embeddings.weight, model.mlm_bias)
    bert_logits = bert(input_ids=inputs["input_ids"][:2], attention_mask=inputs["attention_mask"][:2]).prediction_logits
    torch.testing.assert_close(logits[mask], bert_logits[mask], rtol=0, atol=1e-4)


def test_bert_initialization_rejects_a_different_shape(tmp_path):
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match=r"BERT tensor for \S+ has shape \(\d+, ?\d*\); the model expects"):
        init_from_bert(SemVLPModel(tiny_config()), tmp_path)


def test_masked_lm_loss_on_masked_rows_equals_the_full_vocabulary_computation():
    torch.manual_seed(0)
    model = SemVLPForPreTraining(tiny_config()).eval()
    inputs = make_inputs()
    targets = pretraining_targets(inputs)
    out = model(**inputs, **targets, mode="single")

    states = model.semvlp(
        **dict(
            inputs,
            visual_feats=inputs["visual_feats"].masked_fill(
                targets["obj_mask"][..., None] & targets["itm_labels"].bool()[:, None, None], 0
            ),
        ),
        mode="single",
    ).text_states
    logits = F.linear(model.mlm_transform(states), model.semvlp.embeddings.word_embeddings.weight, model.mlm_bias)
    labels = targets["mlm_labels"].masked_fill(~targets["itm_labels"].bool()[:, None], -100)
    naive = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(out.losses["mlm"], naive)


@pytest.mark.parametrize("mode", ["single", "two"])
def test_every_pretraining_loss_is_the_papers_example_by_example(mode):
    """Each loss against a per-example computation in plain torch (paper 3.3.1, LXMERT's definitions):
    heads are dense -> GELU -> LayerNorm; masked LM over the masked tokens of matched pairs; masked
    objects (zeroed in every pair) predicted from their states (not [IMG]) in matched pairs only:
    SmoothL1 to the original feature averaged over its dimensions, object and attribute labels by
    cross-entropy weighted by their own detector confidence; ITM (class 1 = matched) on every pair;
    QA on the labelled matched pairs; the loss is their sum."""
    torch.manual_seed(0)
    model = perturbed(SemVLPForPreTraining(tiny_config()).eval())
    inputs = make_inputs()
    targets = pretraining_targets(inputs)
    targets["qa_labels"] = torch.tensor([2, 5, 3])
    targets["itm_labels"] = torch.tensor([1, 0, 1])
    out = model(**inputs, **targets, mode=mode)

    w = dict(model.named_parameters())
    eps = model.config.layer_norm_eps
    linear = lambda x, name: F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])

    def transform(x, name):  # dense -> GELU -> LayerNorm
        norm = w[f"{name}.norm.weight"]
        return F.layer_norm(F.gelu(linear(x, f"{name}.dense")), norm.shape, norm, w[f"{name}.norm.bias"], eps)

    zeroed = inputs["visual_feats"].masked_fill(targets["obj_mask"][..., None], 0)  # every pair's masked objects
    states = model.semvlp(**dict(inputs, visual_feats=zeroed), mode=mode)
    decoder, t = w["semvlp.embeddings.word_embeddings.weight"], targets
    mlm, feat, obj, attr, qa = [], [], [], [], []
    for b in t["itm_labels"].nonzero().flatten().tolist():  # the matched pairs
        for i in (t["mlm_labels"][b] != -100).nonzero().flatten().tolist():
            logits = transform(states.text_states[b, i], "mlm_transform") @ decoder.T + w["mlm_bias"]
            mlm.append(F.cross_entropy(logits, t["mlm_labels"][b, i]))
        for k in t["obj_mask"][b].nonzero().flatten().tolist():
            h = transform(states.visual_states[b, 1 + k], "obj_transform")  # object k is token 1 + k, after [IMG]
            feat.append(F.smooth_l1_loss(linear(h, "obj_feat_head"), inputs["visual_feats"][b, k]))
            obj.append(F.cross_entropy(linear(h, "obj_label_head"), t["obj_labels"][b, k]) * t["obj_confs"][b, k])
            attr.append(F.cross_entropy(linear(h, "attr_label_head"), t["attr_labels"][b, k]) * t["attr_confs"][b, k])
        answer_logits = linear(transform(states.pooled[b], "qa_head.transform"), "qa_head.classifier")
        qa.append(F.cross_entropy(answer_logits, t["qa_labels"][b]))
    expected = {
        "mlm": torch.stack(mlm).mean(), "obj_feat": torch.stack(feat).mean(), "obj_label": torch.stack(obj).mean(),
        "attr_label": torch.stack(attr).mean(), "qa": torch.stack(qa).mean(),
        "itm": F.cross_entropy(linear(states.pooled, "itm_head"), targets["itm_labels"]),
    }  # fmt: skip
    for name, value in expected.items():
        torch.testing.assert_close(out.losses[name], value, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(out.loss, sum(expected.values()), rtol=1e-4, atol=1e-5)


def test_mismatched_pairs_contribute_no_mlm_object_or_qa_loss():
    torch.manual_seed(0)
    model = SemVLPForPreTraining(tiny_config()).eval()
    inputs = make_inputs()
    targets = pretraining_targets(inputs)
    base = model(**inputs, **targets, mode="two")
    # Change every target of the mismatched example (index 1): only the ITM loss may notice.
    changed = {k: v.clone() for k, v in targets.items()}
    changed["mlm_labels"][1, 1:4] = (changed["mlm_labels"][1, 1:4] + 1) % VOCAB
    changed["obj_labels"][1] = (changed["obj_labels"][1] + 1) % 13
    changed["qa_labels"][1] = 7
    other = model(**inputs, **changed, mode="two")
    for name in ("mlm", "obj_feat", "obj_label", "attr_label", "qa"):
        torch.testing.assert_close(other.losses[name], base.losses[name])
    torch.testing.assert_close(base.loss, sum(base.losses.values()))


@pytest.mark.parametrize("mode", ["single", "two"])
def test_all_pretraining_losses_are_finite_and_reach_all_heads(mode):
    torch.manual_seed(0)
    model = SemVLPForPreTraining(tiny_config())
    inputs = make_inputs()
    out = model(**inputs, **pretraining_targets(inputs), mode=mode)
    assert set(out.losses) == {"mlm", "obj_feat", "obj_label", "attr_label", "itm", "qa"}
    assert all(torch.isfinite(v) and v > 0 for v in out.losses.values())
    out.loss.backward()
    for head in ("mlm_transform", "obj_feat_head", "obj_label_head", "attr_label_head", "itm_head", "qa_head"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, head).parameters()), head
    cross_grads = [p.grad for n, p in model.named_parameters() if "cross_attention" in n]
    assert all((g is not None) == (mode == "two") for g in cross_grads)


@pytest.mark.parametrize("mode", ["single", "two"])
def test_pooled_vector_learns_a_label_of_the_image_text_pair(mode):
    """Each of 6 images is paired with its own caption (label 1) and with the next image's (label 0),
    so neither the image nor the caption alone tells the label: fitting all 12 pairs needs a pooled
    vector that reads both (single-stream: h_CLS attending to the objects; two-stream: o_IMG through
    the cross-attention). The pre-training demo's single-stream ITM takes off too late, and too
    chaotically, for its test to assert on (tests/test_demo.py); this checks the path itself."""
    torch.manual_seed(0)
    model = SemVLPModel(tiny_config(visual_feat_dim=32))
    head = torch.nn.Linear(model.config.hidden_size, 2)
    g = torch.Generator().manual_seed(3)
    images = dict(visual_feats=torch.randn(6, 20, 32, generator=g), visual_pos=torch.rand(6, 20, 4, generator=g))
    captions = torch.randint(1, VOCAB, (6, 8), generator=g)
    image_of_pair = torch.arange(12) % 6
    caption_of_pair = torch.cat([torch.arange(6), (torch.arange(6) + 1) % 6])
    labels = torch.tensor([1] * 6 + [0] * 6)
    pairs = dict(
        input_ids=captions[caption_of_pair], **{name: t[image_of_pair] for name, t in images.items()}, mode=mode
    )
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    for _ in range(150):
        loss = F.cross_entropy(head(model(**pairs).pooled), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = head(model.eval()(**pairs).pooled)
    assert (logits.argmax(-1) == labels).all() and F.cross_entropy(logits, labels) < 0.1, logits


@pytest.mark.parametrize(
    "model_class", [SemVLPModel, SemVLPForPreTraining, SemVLPForQuestionAnswering, SemVLPForNLVR2, SemVLPForRetrieval]
)
def test_save_and_load_pretrained_round_trip(tmp_path, model_class):
    torch.manual_seed(0)
    model = model_class(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = model_class.from_pretrained(tmp_path).eval()
    assert loaded.config.cross_attention_start_layer == model.config.cross_attention_start_layer
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    inputs = make_inputs()
    if model_class is SemVLPModel:
        torch.testing.assert_close(loaded(**inputs, mode="two").pooled, model(**inputs, mode="two").pooled)


def test_resized_vocabulary_trains_and_round_trips(tmp_path):
    """HF's resize_token_embeddings (e.g. after adding tokens to the tokenizer) resizes the word
    embeddings, which are the masked-LM decoder, and the masked-LM bias with them."""
    torch.manual_seed(0)
    model = SemVLPForPreTraining(tiny_config())
    old_embeddings = model.get_input_embeddings().weight.detach().clone()
    old_bias = model.mlm_bias.detach().clone()
    model.resize_token_embeddings(VOCAB + 3)
    assert model.config.vocab_size == VOCAB + 3
    assert torch.equal(model.get_input_embeddings().weight[:VOCAB], old_embeddings)
    assert torch.equal(model.mlm_bias[:VOCAB], old_bias) and not model.mlm_bias[VOCAB:].any()
    inputs = make_inputs()
    inputs["input_ids"][0, 1] = VOCAB + 2  # a new token, also as a masked-LM target
    targets = pretraining_targets(inputs)
    targets["mlm_labels"][1, 1] = VOCAB + 1
    loss = model(**inputs, **targets, mode="single").loss
    loss.backward()
    assert torch.isfinite(loss) and model.mlm_bias.grad[VOCAB + 1] != 0
    model.save_pretrained(tmp_path)
    loaded = SemVLPForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(loaded.mlm_bias, model.mlm_bias)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_pretraining_heads_from_an_encoder_export_are_initialized(tmp_path):
    """from_pretrained builds what an export lacks empty and leaves it to _init_weights: the bare
    masked-LM bias held whatever memory it got (a masked-LM loss of 1e18 in one run, NaN in another)."""
    SemVLPModel(tiny_config()).save_pretrained(tmp_path)
    model, loading = SemVLPForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert "mlm_bias" in loading["missing_keys"]
    assert not model.mlm_bias.any()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_auto_classes_load_exports(tmp_path):
    """Once semvlp is imported, HuggingFace's Auto classes know its model type, as users of
    transformers expect: AutoModel gives any export's encoder, the task Auto classes its whole model."""
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForVisualQuestionAnswering

    torch.manual_seed(0)
    for model_class, auto_class in (
        (SemVLPForQuestionAnswering, AutoModelForVisualQuestionAnswering),
        (SemVLPForPreTraining, AutoModelForPreTraining),
    ):
        model = model_class(tiny_config())
        model.save_pretrained(tmp_path / model_class.__name__)
        assert isinstance(AutoConfig.from_pretrained(tmp_path / model_class.__name__), SemVLPConfig)
        loaded = auto_class.from_pretrained(tmp_path / model_class.__name__)
        assert type(loaded) is model_class
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        encoder = AutoModel.from_pretrained(tmp_path / model_class.__name__)
        assert type(encoder) is SemVLPModel
        for name, tensor in model.semvlp.state_dict().items():
            assert torch.equal(encoder.state_dict()[name], tensor), name


@pytest.mark.parametrize("mode", ["single", "two"])
def test_finetuning_heads_and_losses_are_lxmerts(mode):
    """QA: BCE against the soft scores, summed over answers and averaged over questions (LXMERT's
    mean x num_answers); NLVR2: the statement with each of its two images, pooled vectors
    concatenated into the classifier; retrieval: cross-entropy of the ITM head, scored by log-odds."""
    torch.manual_seed(0)
    config = tiny_config()
    inputs = make_inputs()
    targets = torch.rand(3, 11)
    qa_model = SemVLPForQuestionAnswering(config).eval()
    qa = qa_model(**inputs, answer_targets=targets, mode=mode)
    assert qa.logits.shape == (3, 11)
    by_hand = F.binary_cross_entropy_with_logits(qa.logits, targets, reduction="sum") / 3
    torch.testing.assert_close(qa.loss, by_hand)

    images = dict(visual_feats=torch.randn(3, 2, K, 2048), visual_pos=torch.rand(3, 2, K, 4))
    nlvr2_model = SemVLPForNLVR2(config).eval()
    nlvr2 = nlvr2_model(**inputs | images, labels=torch.tensor([0, 1, 1]), mode=mode)
    text = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    pooled = [
        nlvr2_model.semvlp(**text, visual_feats=images["visual_feats"][:, i], visual_pos=images["visual_pos"][:, i],
                           mode=mode).pooled
        for i in (0, 1)
    ]  # fmt: skip
    torch.testing.assert_close(nlvr2.logits, nlvr2_model.classifier(torch.cat(pooled, -1)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nlvr2.loss, F.cross_entropy(nlvr2.logits, torch.tensor([0, 1, 1])))

    retrieval = SemVLPForRetrieval(config)(**inputs, labels=torch.tensor([1, 0, 0]), mode=mode)
    torch.testing.assert_close(retrieval.loss, F.cross_entropy(retrieval.logits, torch.tensor([1, 0, 0])))
    matched = retrieval.logits.softmax(-1)[:, 1]
    torch.testing.assert_close(SemVLPForRetrieval.score(retrieval.logits), torch.log(matched / (1 - matched)))


def activation_bytes(model: torch.nn.Module, run) -> int:
    """Bytes of the tensors autograd keeps for the backward of `run()`, parameters not counted."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(kept.values())


@pytest.mark.parametrize("backend, mode", [("eager", "single"), ("eager", "two"), ("triton", "two")])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(backend, mode):
    """HF's activation checkpointing (gradient_checkpointing_enable; activation_checkpointing_enable in
    transformers 5; --gradient_checkpointing) runs every block again in the backward, dropout
    included: the Triton kernels draw their Philox seeds from torch's generator, which checkpointing
    restores, so losses and gradients are bit-identical."""
    torch.manual_seed(0)
    dropout = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    # one block, with cross-attention, and few objects: the Triton interpreter is slow
    config = tiny_config(kernel_backend=backend, num_hidden_layers=1, cross_attention_start_layer=0, **dropout)
    model = SemVLPForPreTraining(config).train()
    inputs = make_inputs(batch=2, length=6, num_objects=5)
    targets = pretraining_targets(inputs, num_masked_objects=2)

    def gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(1)  # the dropout masks
        loss = model(**inputs, **targets, mode=mode).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = gradients()
    enable_activation_checkpointing(model)
    assert model.semvlp.encoder.gradient_checkpointing
    checkpointed_loss, checkpointed_grads = gradients()
    assert torch.equal(checkpointed_loss, plain_loss)
    assert checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.equal(checkpointed_grads[name], grad), name


@pytest.mark.parametrize("mode", ["single", "two"])
def test_activation_checkpointing_keeps_a_fraction_of_the_activations(mode):
    """At the pre-training shapes (K = 100 objects, 20 tokens), autograd keeps about a fifth of the
    tiny model's activations under checkpointing (0.21 single, 0.23 two-stream): the blocks' inputs,
    the region features and the heads'. The share falls with depth (4 blocks here, 12 in base)."""
    torch.manual_seed(0)
    model = SemVLPForPreTraining(tiny_config()).train()
    inputs = make_inputs(batch=8, length=20)
    targets = pretraining_targets(inputs)
    targets.update(itm_labels=torch.ones(8, dtype=torch.long), qa_labels=torch.full((8,), -100))
    run = lambda: model(**inputs, **targets, mode=mode).loss
    kept = activation_bytes(model, run)
    enable_activation_checkpointing(model)
    assert activation_bytes(model, run) < 0.25 * kept


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(visual_feats=torch.randn(3, K, 2047)), r"visual_feats has shape \(3, 100, 2047\); expected .*2048"),
        (dict(visual_pos=torch.rand(3, K, 5)), r"visual_pos has shape \(3, 100, 5\); expected \(3, 100, 4\)"),
        (dict(visual_pos=torch.rand(3, K, 4) * 2), r"visual_pos holds values .* normalized to \[0, 1\]"),
        (
            dict(visual_feats=torch.randn(2, K, 2048), visual_pos=torch.rand(2, K, 4)),
            r"batch size 2 but input_ids has 3",
        ),
        (dict(input_ids=torch.ones(3, 65, dtype=torch.long)), r"65 tokens; .*max_position_embeddings=64"),
        (dict(attention_mask=torch.ones(3, 4)), r"attention_mask has shape \(3, 4\); expected \(3, 9\)"),
    ],
)
def test_bad_inputs_raise_errors_naming_the_argument(model, change, message):
    with pytest.raises(ValueError, match=message):
        model(**dict(make_inputs(), **change))


def test_unknown_mode_and_bad_config_are_rejected(model):
    with pytest.raises(ValueError, match=r"mode='three'; expected one of \('single', 'two'\)"):
        model(**make_inputs(), mode="three")
    with pytest.raises(ValueError, match=r"cross_attention_start_layer=5 must be in 0..num_hidden_layers=4"):
        tiny_config(cross_attention_start_layer=5)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        config_from_preset("huge")


def test_masked_objects_are_zeroed_in_mismatched_pairs_too():
    """Otherwise "some objects are zero" would give the ITM label away (a shortcut)."""
    torch.manual_seed(0)
    model = SemVLPForPreTraining(tiny_config()).eval()
    inputs = make_inputs()
    targets = pretraining_targets(inputs)  # example 1 is mismatched, with objects 0..14 masked
    seen = {}
    model.semvlp.visual_embeddings.register_forward_hook(lambda m, args, out: seen.update(feats=args[0]))
    model(**inputs, **targets, mode="single")
    assert torch.all(seen["feats"][:, :15] == 0)
    torch.testing.assert_close(seen["feats"][:, 15:], inputs["visual_feats"][:, 15:])
