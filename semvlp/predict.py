"""Ask an export about one example, as one checks a model by hand:

    # a VQA or GQA export: its top answers
    python -m semvlp.predict runs/vqa/export --store coco.h5 --image_id COCO_val2014_000000000042 \\
        --text "what is the man holding ?"
    # an NLVR2 export: is the statement true of the two images?
    python -m semvlp.predict runs/nlvr2/export --store nlvr2.h5 --image_id dev-850-0-img0 dev-850-0-img1 \\
        --text "there are two dogs in the left image ."
    # a retrieval or pre-training export: do the image and the caption match (the ITM head)? A
    # pre-training export also answers a question with its image-QA head
    python -m semvlp.predict runs/demo/export --store data/toy/features.h5 --image_id toy_002000 \\
        --text "a blue cup next to a white dog by the wall ."

The export's config.json says which model it is (`architectures`, written by save_pretrained), and
so what it is asked. Answers are named from the export's answer table (config.id2label, kept by
the VQA and GQA launchers and by pre-training with an answer table) and scored as the head was
trained: a VQA/GQA head by an independent sigmoid per answer (binary cross-entropy against soft
scores, LXMERT's loss), the pre-training QA head by a softmax (its cross-entropy). NLVR2 and
image-text matching give the probability of "true" and of "matched". `--mode` is the stream mode,
as in training. Output: a few lines, and with `--out` the same as JSON. Bad input exits 2, naming
the option.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from semvlp.example import (
    check_export,
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
from semvlp.model import SemVLPForNLVR2, SemVLPForPreTraining, SemVLPForQuestionAnswering, SemVLPForRetrieval
from semvlp.model.modeling import MODES

# What each kind of export is asked, by the class its config.json names: (task, model class, images).
TASKS = {
    "SemVLPForQuestionAnswering": ("answers", SemVLPForQuestionAnswering, 1),
    "SemVLPForNLVR2": ("nlvr2", SemVLPForNLVR2, 2),
    "SemVLPForRetrieval": ("match", SemVLPForRetrieval, 1),
    "SemVLPForPreTraining": ("match", SemVLPForPreTraining, 1),
}


def export_task(export: str | Path) -> tuple[str, type, int]:
    """(task, model class, images per example) of an export, from its config.json."""
    check_export(export)
    architectures = json.loads((Path(export) / "config.json").read_text()).get("architectures") or []
    known = [TASKS[name] for name in architectures if name in TASKS]
    if not known:
        raise ValueError(
            f"{export}: its config.json names {architectures or 'no architectures'}; semvlp.predict answers for "
            f"{sorted(TASKS)} (an encoder alone has no head to ask)"
        )
    return known[0]


def predict(model, input_ids: list[int], inputs: dict, mode: str, top: int) -> dict:
    """The export's answer for one example (see the module docstring). `inputs`: visual_inputs of
    the example's images, stacked for NLVR2's pair."""
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        if isinstance(model, SemVLPForNLVR2):
            logits = model(ids, **{k: None if v is None else v[None] for k, v in inputs.items()}, mode=mode).logits
            return {"true": float(torch.softmax(logits, -1)[0, 1])}
        if isinstance(model, SemVLPForPreTraining):  # its forward computes the losses: run the heads it needs
            pooled = model.semvlp(ids, **inputs, mode=mode).pooled
            match = {"match": float(torch.softmax(model.itm_head(pooled), -1)[0, 1])}
            if len(model.config.id2label) != model.config.num_qa_labels:  # pre-trained without an answer table
                return match
            return {**match, "answers": top_answers(torch.softmax(model.qa_head(pooled)[0], -1), model.config, top)}
        logits = model(ids, **inputs, mode=mode).logits
    if isinstance(model, SemVLPForRetrieval):
        return {"match": float(torch.softmax(logits, -1)[0, 1])}
    return {"answers": top_answers(torch.sigmoid(logits[0]), model.config, top)}


def top_answers(scores: torch.Tensor, config, top: int) -> list[dict]:
    """The `top` best of one example's answer `scores`, named from config.id2label."""
    values, labels = scores.topk(min(top, len(scores)))
    names = config.id2label  # without an answer table, transformers' default names two labels
    answers = [names[label] if len(names) == len(scores) else f"answer {label}" for label in labels.tolist()]
    return [{"answer": a, "score": s} for a, s in zip(answers, values.tolist(), strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m semvlp.predict",
        description="What an export answers for one (image, text) example: VQA/GQA answers, NLVR2 true/false, "
        "or image-text matching for a pre-training (and its image-QA answers) or retrieval export.",
    )
    parser.add_argument("export", help="a SemVLP export folder (OUTPUT_DIR/export, or python -m semvlp.export)")
    parser.add_argument("--store", required=True, help="the feature store (.h5) holding the image(s)")
    parser.add_argument("--image_id", required=True, nargs="+", help="the image's id in the store (NLVR2: two)")
    parser.add_argument("--text", required=True, help="the question, statement or caption")
    parser.add_argument("--mode", choices=MODES, default="single", help="stream mode (default: single)")
    parser.add_argument("--top", type=int, default=5, help="answers to list (VQA, GQA, pre-training QA)")
    parser.add_argument("--vocab", help="vocab.txt (default: the export's)")
    parser.add_argument("--out", help="write the prediction here as JSON")
    args = parser.parse_args(argv)
    try:
        task, model_class, num_images = export_task(args.export)
        if len(args.image_id) != num_images:
            raise ValueError(f"--image_id: {len(args.image_id)} given; a {task} export takes {num_images}")
        if args.top < 1:
            raise ValueError(f"--top {args.top}: expected a count >= 1")
        if args.out:
            check_output(args.out)
        model = load_export(args.export, model_class)
        tokenizer = load_vocab(args.vocab, args.export, model)
        input_ids = encode_text(tokenizer, args.text, "--text", model)
        inputs = visual_inputs(read_images(args.store, args.image_id, model))
        prediction = predict(model, input_ids, inputs, args.mode, args.top)
    except (ValueError, KeyError, OSError) as e:
        return report_bad_input(e)
    for name, value in prediction.items():
        if name == "answers":
            print("\n".join(f"{a['score']:.3f}  {a['answer']}" for a in value))
        else:
            print(f"P({name}) = {value:.3f}")
    for note in text_notes(tokenizer, input_ids, "--text"):
        print(note)
    if args.out:
        record = {"export": str(args.export), "image_ids": args.image_id, "text": args.text, "mode": args.mode}
        try:
            write_json(args.out, {**record, "task": task, **prediction})
        except ValueError as e:
            return report_bad_input(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
