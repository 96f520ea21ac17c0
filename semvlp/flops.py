"""Model FLOPs of a SemVLP pre-training step: the MFU convention of nanoGPT / llm-foundry, exact per matmul.

A matmul [rows, n_in] x [n_in, n_out] costs 2 * rows * n_in * n_out forward and twice that backward,
6 * rows * n_in * n_out per step; attention (scores and weighted sum) costs 12 * s_q * s_k * d per
layer per sequence. For one stream of s tokens through L blocks of N_block matmul weights this is
the usual 6 * N + 12 * L * d * s per token. Here:
- single-stream: s = 1 + K + m tokens ([IMG], objects, text) through all L blocks;
- two-stream, per stream: the text (s = m) through all L blocks; the image (s = 1 + K) through all L
  blocks, plus in each of the L - L_s cross blocks a query/output projection on the image rows, a
  key/value projection on the text rows, and cross attention with s_q = 1 + K, s_k = m;
- the rest at 6x per row through it: pooler (B rows), masked-LM transform and decoder (masked text
  rows of matched pairs only, which is all the model computes), object transform and feature /
  label / attribute heads (masked objects of matched pairs), ITM and QA heads (B rows); the visual
  projection at 4x, because its input needs no gradient.
Only real tokens count (m = unpadded text length): padding is never credited as useful work.
tests/test_benchmarks.py checks this against torch.utils.flop_counter on the model itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from semvlp.config import SemVLPConfig


def training_step_flops(
    config: SemVLPConfig,
    text_lengths: Sequence[int],
    mode: str,
    num_masked_tokens: int = 0,
    num_masked_objects: int = 0,
    num_objects: int | None = None,
) -> float:
    """FLOPs of forward + backward of SemVLPForPreTraining on one batch.

    Args:
        config: the model's config.
        text_lengths: real (unpadded) token count of each example; len() is the batch size.
        mode: "single", "two", or "alternate" (the mean of the two, what a step costs on average).
        num_masked_tokens: masked-LM rows (masked tokens of matched pairs).
        num_masked_objects: masked objects of matched pairs.
        num_objects: K per image (default: config.num_objects).
    """
    if mode == "alternate":
        args = (text_lengths, num_masked_tokens, num_masked_objects, num_objects)
        return (training_step_flops(config, args[0], "single", *args[1:]) +
                training_step_flops(config, args[0], "two", *args[1:])) / 2  # fmt: skip
    d, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    cross_layers = layers - config.cross_attention_start_layer
    n_block = 4 * d * d + 2 * d * ffn  # qkv (3d^2) + output (d^2) + FFN up and down (2 d ffn)
    objects = config.num_objects if num_objects is None else num_objects
    size, visual, text = len(text_lengths), 1 + objects, list(text_lengths)
    if mode == "single":
        seqs = [visual + m for m in text]
        encoder = 6 * layers * n_block * sum(seqs) + 12 * layers * d * sum(s * s for s in seqs)
    elif mode == "two":
        text_stream = 6 * layers * n_block * sum(text) + 12 * layers * d * sum(m * m for m in text)
        image_stream = 6 * layers * n_block * size * visual + 12 * layers * d * size * visual * visual
        cross = cross_layers * (
            6 * 2 * d * d * size * visual  # query and output projections on image rows
            + 6 * 2 * d * d * sum(text)  # fused key/value projection on text rows
            + 12 * d * visual * sum(text)  # cross attention, s_q = 1 + K, s_k = m
        )
        encoder = text_stream + image_stream + cross
    else:
        raise ValueError(f"mode={mode!r}; expected 'single', 'two' or 'alternate'")
    projection = 4 * size * objects * (config.visual_feat_dim + config.visual_pos_dim) * d
    pooler = 6 * size * d * d
    mlm = 6 * num_masked_tokens * (d * d + d * config.vocab_size)
    object_heads = config.visual_feat_dim + config.num_object_labels + config.num_attribute_labels
    object_rows = 6 * num_masked_objects * (d * d + d * object_heads)
    pooled_heads = 6 * size * (2 * d + 2 * d * d + 2 * d * config.num_qa_labels)  # ITM; QA transform + classifier
    return float(encoder + projection + pooler + mlm + object_rows + pooled_heads)
