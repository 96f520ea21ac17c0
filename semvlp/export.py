"""Export a training checkpoint as a SemVLP model folder, for `--init_from` or `from_pretrained`.

    python -m semvlp.export runs/pretrain/checkpoints/step00500000 --out exports/step500k
    python -m semvlp.export runs/pretrain/checkpoints --out exports/newest   # its newest complete one

A checkpoint holds DeepSpeed's shards: the module in training precision, and the fp32 master
weights split over the ranks' ZeRO optimizer shards. The export gathers the fp32 weights
(DeepSpeed's zero_to_fp32, on the CPU: no GPU and no process group), loads them into the model
class that the checkpoint's config.json names, and writes what a finished run leaves in
OUTPUT_DIR/export: config.json and model.safetensors (save_pretrained), vocab.txt, and a
tokenizer_config.json for HuggingFace's AutoTokenizer. The folder
is written under a temporary name and renamed into place, so a failed or interrupted export (Ctrl-C
or SIGTERM) leaves no half-written model, and an existing export is replaced only with `--overwrite`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors import SafetensorError

from semvlp import checkpoint
from semvlp.config import SemVLPConfig, is_semvlp_export
from semvlp.data.tokenizer import tokenizer_config
from semvlp.interrupt import report_interrupt, sigterm_as_interrupt
from semvlp.model import (
    SemVLPForNLVR2,
    SemVLPForPreTraining,
    SemVLPForQuestionAnswering,
    SemVLPForRetrieval,
    SemVLPModel,
)
from semvlp.model.modeling import quiet_transformers
from semvlp.paths import nearest_existing

TOKENIZER_CONFIG = "tokenizer_config.json"

MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (SemVLPModel, SemVLPForPreTraining, SemVLPForQuestionAnswering, SemVLPForNLVR2, SemVLPForRetrieval)
}


def export_checkpoint(path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the fp32 weights of the checkpoint `path` names (see checkpoint.find_complete) to `out`.

    Returns the checkpoint folder exported. Raises ValueError naming the checkpoint or `out` at fault.
    """
    folder = checkpoint.find_complete(path)
    out = Path(out)
    source, target = folder.resolve(), out.resolve()
    if target == source or target in source.parents or source in target.parents:
        raise ValueError(f"--out {out} would replace or hold the checkpoint {folder}: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder")
    if not (existing := nearest_existing(out.parent)).is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} exists and is not empty: choose another folder, or pass --overwrite")
        if not is_semvlp_export(out):  # --overwrite replaces a model, never e.g. a run folder
            raise ValueError(f"--out {out} holds files but no SemVLP model: --overwrite replaces only a model folder")
    for name in (checkpoint.CONFIG, checkpoint.VOCAB):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: no {name}, so the model it holds is unknown (saved by an older semvlp?)")
    checkpoint.check_shards(folder)
    try:
        config = SemVLPConfig.from_json_file(folder / checkpoint.CONFIG)
    except (ValueError, OSError) as e:  # json's errors name no file
        raise ValueError(f"{folder / checkpoint.CONFIG}: not a readable model config ({e})") from e
    names = config.architectures or []
    if len(names) != 1 or names[0] not in MODEL_CLASSES:
        raise ValueError(f"{folder / checkpoint.CONFIG}: architectures {names} is not one of {sorted(MODEL_CLASSES)}")
    model = MODEL_CLASSES[names[0]](config)
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{folder}: its weights do not fit {names[0]} as config.json describes it "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )

    staging = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with quiet_transformers():
            model.save_pretrained(staging)
        shutil.copyfile(folder / checkpoint.VOCAB, staging / checkpoint.VOCAB)
        tokenizer = tokenizer_config(model_max_length=config.max_position_embeddings)
        (staging / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer, indent=2) + "\n")
        if out.is_dir():  # an empty folder, or --overwrite: the old export goes only once the new one is whole
            replaced = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, replaced)
            try:
                os.replace(staging, out)
            finally:
                if not out.exists():  # interrupted in between: the old export goes back, never neither
                    os.replace(replaced, out)
            shutil.rmtree(replaced)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m semvlp.export",
        description="Export a training checkpoint (DeepSpeed shards) as a SemVLP model folder: config.json, "
        "model.safetensors (fp32), vocab.txt, tokenizer_config.json.",
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint folder (OUTPUT_DIR/checkpoints/step00001000), or a folder of them "
        "(OUTPUT_DIR/checkpoints, a fine-tuning run's OUTPUT_DIR/best) for its newest complete one",
    )
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    args = parser.parse_args(argv)
    try:
        with sigterm_as_interrupt():  # SIGTERM deletes the half-written copy, as Ctrl-C does
            folder = export_checkpoint(args.checkpoint, args.out, args.overwrite)
    except (ValueError, OSError, SafetensorError) as e:  # OSError: no permission, a full disk...
        print(f"error: {e}", file=sys.stderr)
        print(f"nothing written at {args.out}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        status = report_interrupt(e)
        print(f"nothing written at {args.out}", file=sys.stderr)
        return status
    print(f"exported {folder} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
