"""Model FLOPs of a training step, the standard MFU convention (mosaicml/llm-foundry, PaLM appendix B).

Per token: 6 * N_matmul (forward 2N, backward 4N) + 12 * L * d * s for attention scores and
weighted values (forward 4*L*d*s, backward twice that), where N_matmul counts the parameters of
the matrix multiplies the token passes through and s is the length of the sequence it attends over.

SemVLP runs the same blocks in two ways, so the count is per mode:
- single-stream: every token (1+K visual, m text) goes through all L blocks over s = 1+K+m;
- two-stream: text tokens go through L blocks over s = m; visual tokens go through L blocks over
  s = 1+K, plus cross-attention in the L - L_s upper blocks: query/output projections per visual
  token, key/value projections per text token, and scores over m keys.
Embedding lookups are not matmuls; the visual projection (2052 x d) is. The heads are small and
ignored (the masked-LM decoder runs on masked rows only).
"""

from __future__ import annotations

from semvlp.config import SemVLPConfig


def block_matmul_params(config: SemVLPConfig) -> int:
    d, ff = config.hidden_size, config.intermediate_size
    return 4 * d * d + 2 * d * ff


def training_flops_per_sample(config: SemVLPConfig, text_len: int, mode: str, num_objects: int | None = None) -> float:
    """FLOPs of forward + backward for one (image, text) pair."""
    d, layers = config.hidden_size, config.num_hidden_layers
    visual_len = 1 + (num_objects if num_objects is not None else config.num_objects)
    block = block_matmul_params(config)
    projection = (config.visual_feat_dim + config.visual_pos_dim) * d
    flops = 6 * projection * (visual_len - 1)
    if mode == "single":
        seq = visual_len + text_len
        flops += seq * (6 * layers * block + 12 * layers * d * seq)
    elif mode == "two":
        cross_layers = layers - config.cross_attention_start_layer
        flops += text_len * (6 * layers * block + 12 * layers * d * text_len)
        flops += visual_len * (6 * layers * block + 12 * layers * d * visual_len)
        flops += visual_len * (6 * cross_layers * 2 * d * d + 12 * cross_layers * d * text_len)
        flops += text_len * 6 * cross_layers * 2 * d * d
    else:
        raise ValueError(f"mode={mode!r}; expected 'single' or 'two'")
    return float(flops)
