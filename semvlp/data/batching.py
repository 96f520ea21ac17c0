"""Batch assembly shared by the pre-training and fine-tuning datasets.

Text is padded to the longest text in the batch (not to max_text_len) and also given in packed
form for padding-free attention: the real tokens of all rows concatenated, with cumulative
offsets `cu_seqlens` [B+1] int32 and `max_seqlen`, as flash-attention's varlen interface takes.
Visual tensors are never padded: every image has exactly K objects.
"""

from __future__ import annotations

import numpy as np
import torch

from semvlp.data.loader import allocate
from semvlp.data.store import FeatureStoreSet, ImageValueError, image_value_problems

IGNORE_INDEX = -100


def gather_tokens(ids: np.ndarray, offsets: np.ndarray, sents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows `sents` of a flat token table, padded with 0: (input_ids [B, T] int64, lengths [B])."""
    starts = offsets[sents]
    lengths = offsets[sents + 1] - starts
    b, t = len(sents), int(lengths.max()) if len(sents) else 0
    out = np.zeros((b, t), np.int64)
    mask = np.arange(t)[None, :] < lengths[:, None]
    # Row-major order of `mask` visits each row's tokens in order, so the flat source indices are
    # each row's start plus 0..len-1.
    total = int(lengths.sum())
    row_start = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    out[mask] = ids[row_start + np.arange(total)]
    return out, lengths


def text_batch(input_ids: np.ndarray, lengths: np.ndarray, mlm_labels: np.ndarray | None = None) -> dict:
    """input_ids/attention_mask/token_type_ids [B, T] plus the packed form of the same tokens."""
    b, t = input_ids.shape
    mask = np.arange(t)[None, :] < lengths[:, None]
    cu = np.zeros(b + 1, np.int32)
    np.cumsum(lengths, out=cu[1:])
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "token_type_ids": torch.zeros((b, t), dtype=torch.int64),
        "packed_input_ids": torch.from_numpy(input_ids[mask]),
        "packed_token_type_ids": torch.zeros(int(cu[-1]), dtype=torch.int64),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": int(t),
    }
    if mlm_labels is not None:
        batch["mlm_labels"] = torch.from_numpy(mlm_labels)
        batch["packed_mlm_labels"] = torch.from_numpy(mlm_labels[mask])
    return batch


# float16 bits: with the sign masked off, an exponent of all ones (inf or NaN) is at least 0x7C00
_HALF_MAGNITUDE, _HALF_EXPONENT = 0x7FFF, 0x7C00


def check_values(stores: FeatureStoreSet, rows: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
    """Raise ImageValueError naming the first image, among those `arrays` hold for `rows`, whose values
    the converters refuse (non-finite features or confidences, boxes not normalized): in a store made
    by other means, they would become NaN losses or answers without a word. The usual case, no
    problem, costs one pass over the features' bits: ~2 ms for 64 x 100 x 2048, a few % of reading them."""
    boxes = arrays["boxes"]
    if (
        (arrays["features"].view(np.uint16) & _HALF_MAGNITUDE).max(initial=0) < _HALF_EXPONENT
        and ((boxes >= 0) & (boxes <= 1)).all()
        and (boxes[..., 2:] >= boxes[..., :2]).all()
        and all(np.isfinite(arrays[name]).all() for name in ("obj_confs", "attr_confs") if name in arrays)
    ):
        return
    problems = image_value_problems(arrays)
    j, problem = min((int(np.argmax(bad)), problem) for problem, bad in problems.items() if bad.any())
    raise ImageValueError(
        f"{stores.describe(rows[j])}: {problem}; `python -m semvlp.data.check DATA_JSON` lists every such image"
    )


def visual_batch(stores: FeatureStoreSet, rows: np.ndarray, labels: bool = False) -> dict:
    """Features and boxes of store rows (any shape, e.g. [B] or [B, 2]) in batch tensors.

    Returns visual_feats [*rows.shape, K, D] float16 (as stored, never zeroed), visual_pos
    [..., K, 4] float32, visual_attention_mask [..., K] int64 only if a store is padded, and
    with labels=True the detector outputs obj_labels, obj_confs, attr_labels, attr_confs [..., K].
    """
    lead = rows.shape
    k, d = stores.num_objects, stores.feature_dim
    tensors = {"features": allocate((*lead, k, d), torch.float16), "boxes": allocate((*lead, k, 4), torch.float32)}
    if labels:
        tensors["obj_ids"] = allocate((*lead, k), torch.int64)
        tensors["obj_confs"] = allocate((*lead, k), torch.float32)
        tensors["attr_ids"] = allocate((*lead, k), torch.int64)
        tensors["attr_confs"] = allocate((*lead, k), torch.float32)
    if stores.padded:
        tensors["valid_mask"] = torch.empty((*lead, k), dtype=torch.bool)
    flat = {name: t.numpy().reshape(-1, *t.shape[len(lead) :]) for name, t in tensors.items()}
    for j, row in enumerate(rows.reshape(-1).tolist()):
        stores.read_into(row, flat, j)
    check_values(stores, rows.reshape(-1), flat)
    out = {"visual_feats": tensors["features"], "visual_pos": tensors["boxes"]}
    if stores.padded:
        out["visual_attention_mask"] = tensors["valid_mask"].to(torch.int64)
    if labels:
        out["obj_labels"] = tensors["obj_ids"]
        out["obj_confs"] = tensors["obj_confs"]
        out["attr_labels"] = tensors["attr_ids"]
        out["attr_confs"] = tensors["attr_confs"]
    return out
