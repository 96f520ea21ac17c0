"""Which words each object attends to: the attention maps of the paper's section 4.5 (Figure 4).

    python -m semvlp.attention_map runs/demo/export --store data/toy/features.h5 \\
        --image_id toy_valid_000000 --caption "a red dog on the grass ." --mode single --layer 4

Encodes one (image, caption) pair with an export and reads one block's attention from every
object to every text token, for one head or averaged over the heads:
- single-stream: the object rows and text columns of the block's self-attention over
  [IMG, o_1..o_K, text]. The rest of an object's attention goes to the image tokens, so a row
  sums to the object's `text_share`, reported with it.
- two-stream: the block's cross-attention (blocks L_s+1..L only), whose rows sum to 1.

The figure compares a single-stream-only model with SemVLP at the same block and head: run this
once per export. It prints the `--objects` most confident objects with the tokens each attends to
most, and `--out` receives the whole map (every object, every token) as JSON.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semvlp.data.store import ImageFeatures
from semvlp.example import (
    check_output,
    encode_text,
    load_export,
    load_vocab,
    read_images,
    report_bad_input,
    text_notes,
    visual_inputs,
    write_json,
)
from semvlp.model import SemVLPModel
from semvlp.model.modeling import MODES


@dataclass
class AttentionMap:
    mode: str
    layer: int  # 1-based block index, as in the paper
    head: int | None  # 1-based; None: the mean over heads
    tokens: list[str]  # the caption's WordPieces, [CLS] .. [SEP]
    objects: list[int]  # store slots of the image's real objects (all K unless the store is padded)
    weights: np.ndarray  # [len(objects), len(tokens)]: attention from each object to each token
    text_share: np.ndarray  # [len(objects)]: each row's sum (1 in two-stream mode)


def attention_map(
    model: SemVLPModel,
    input_ids: list[int],
    tokens: list[str],
    image: ImageFeatures,
    mode: str,
    layer: int,
    head: int | None = None,
) -> AttentionMap:
    """One block's attention from the image's objects to the caption's tokens (see the module docstring).

    `layer` counts blocks from 1; in two-stream mode it must hold cross-attention (> L_s).
    `head` counts from 1; None averages the heads. Raises ValueError naming the bad argument.
    """
    config = model.config
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: expected one of {MODES}")
    first = config.cross_attention_start_layer + 1 if mode == "two" else 1
    if not first <= layer <= config.num_hidden_layers:
        where = " (two-stream: the blocks with cross-attention, above L_s)" if mode == "two" else ""
        raise ValueError(f"--layer {layer}: expected {first}..{config.num_hidden_layers}{where}")
    if head is not None and not 1 <= head <= config.num_attention_heads:
        raise ValueError(f"--head {head}: expected 1..{config.num_attention_heads}, or 'mean'")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([input_ids]), **visual_inputs([image]), mode=mode, output_attentions=True)
    num_objects = image.features.shape[0]
    if mode == "single":  # keys [IMG, o_1..o_K, text]: object rows 1..K, text columns after them
        probs = out.attentions[layer - 1][0, :, 1 : 1 + num_objects, 1 + num_objects :]
    else:
        probs = out.cross_attentions[layer - 1 - config.cross_attention_start_layer][0, :, 1:]
    probs = probs.mean(dim=0) if head is None else probs[head - 1]
    objects = np.arange(num_objects) if image.valid_mask is None else np.flatnonzero(image.valid_mask)
    weights = probs.numpy()[objects]
    return AttentionMap(mode, layer, head, tokens, objects.tolist(), weights, weights.sum(axis=1))


def read_object_names(path: str | Path, largest_id: int) -> list[str]:
    """One label name per line (Visual Genome's objects_vocab.txt); ValueError naming the file if
    it has no line for `largest_id`."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip().split(",")[0] for line in f]  # VG lists synonyms: "person,man"
    except (OSError, UnicodeDecodeError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror or str(e)
        raise ValueError(f"--object_names {path}: {reason}") from e
    if largest_id >= len(names):
        raise ValueError(f"--object_names {path}: {len(names)} names, but the image has label id {largest_id}")
    return names


def _parse_head(value: str) -> int | None:
    if value == "mean":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a head number nor 'mean'") from None


def _report(amap: AttentionMap, image: ImageFeatures, names: list[str] | None, count: int) -> list[str]:
    """The `count` most confident objects, each with the three tokens it attends to most."""
    head = "mean over heads" if amap.head is None else f"head {amap.head}"
    what = "self-attention, object rows, text columns" if amap.mode == "single" else "cross-attention"
    lines = [f"{amap.mode}-stream block {amap.layer}, {head} ({what})", "tokens: " + " ".join(amap.tokens)]
    order = np.argsort(-image.obj_confs[amap.objects], kind="stable")[:count]
    for row in order:
        slot = amap.objects[row]
        label_id = int(image.obj_ids[slot])
        label = names[label_id] if names else f"label {label_id}"
        top = np.argsort(-amap.weights[row], kind="stable")[:3]
        attended = ", ".join(f"{amap.tokens[t]} {amap.weights[row, t]:.2f}" for t in top)
        share = f"  (text share {amap.text_share[row]:.2f})" if amap.mode == "single" else ""
        lines.append(f"object {slot:3d} {label:>12s} conf {image.obj_confs[slot]:.2f}: {attended}{share}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m semvlp.attention_map",
        description="Attention from an image's objects to a caption's tokens in one block of an export "
        "(paper section 4.5, Figure 4).",
    )
    parser.add_argument("export", help="a SemVLP export folder (OUTPUT_DIR/export, or python -m semvlp.export)")
    parser.add_argument("--store", required=True, help="the feature store (.h5) holding the image")
    parser.add_argument("--image_id", required=True, help="the image's id in the store")
    parser.add_argument("--caption", required=True, help="the text, as a user would write it")
    parser.add_argument("--mode", choices=MODES, default="single", help="stream mode (default: single)")
    parser.add_argument("--layer", type=int, help="block 1..L (two-stream: L_s+1..L); default: the last")
    parser.add_argument("--head", type=_parse_head, default=None, help="head 1..heads, or 'mean' (the default)")
    parser.add_argument("--vocab", help="vocab.txt (default: the export's)")
    parser.add_argument("--object_names", help="label names, one per line (Visual Genome's objects_vocab.txt)")
    parser.add_argument("--objects", type=int, default=10, help="objects to print, most confident first")
    parser.add_argument("--out", help="write the whole map (every object, every token) here as JSON")
    args = parser.parse_args(argv)
    try:
        if args.out:
            check_output(args.out)
        model = load_export(args.export)
        tokenizer = load_vocab(args.vocab, args.export, model)
        input_ids = encode_text(tokenizer, args.caption, "--caption", model)
        if args.objects < 0:
            raise ValueError(f"--objects {args.objects}: expected a count >= 0")
        [image] = read_images(args.store, [args.image_id], model)
        names = read_object_names(args.object_names, int(image.obj_ids.max())) if args.object_names else None
        layer = model.config.num_hidden_layers if args.layer is None else args.layer
        tokens = tokenizer.convert_ids_to_tokens(input_ids)
        amap = attention_map(model, input_ids, tokens, image, args.mode, layer, args.head)
    except (ValueError, KeyError, OSError) as e:
        return report_bad_input(e)
    for line in _report(amap, image, names, args.objects):
        print(line)
    for note in text_notes(tokenizer, input_ids, "--caption"):
        print(note)
    if args.out:
        record = {
            "export": str(args.export),
            "store": str(args.store),
            "image_id": args.image_id,
            "caption": args.caption,
            "mode": amap.mode,
            "layer": amap.layer,
            "head": amap.head if amap.head is not None else "mean",
            "tokens": amap.tokens,
            "objects": [
                {
                    "slot": slot,
                    "label_id": int(image.obj_ids[slot]),
                    "label": names[int(image.obj_ids[slot])] if names else None,
                    "confidence": float(image.obj_confs[slot]),
                    "box": image.boxes[slot].tolist(),
                    "text_share": float(amap.text_share[row]),
                    "attention": amap.weights[row].tolist(),
                }
                for row, slot in enumerate(amap.objects)
            ],
        }
        try:
            write_json(args.out, record)
        except ValueError as e:
            return report_bad_input(e)
        print(f"map written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
