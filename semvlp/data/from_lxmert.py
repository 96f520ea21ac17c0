"""LXMERT's data folder to feature stores and a checked data.json, in one command.

    python -m semvlp.data.from_lxmert /path/to/lxmert/data --vocab /models/bert-base-uncased --out /data/semvlp

LXMERT's README downloads everything into one folder (`data/`), which is what most users of the
field already have:

    lxmert/          mscoco_train.json mscoco_nominival.json mscoco_minival.json vgnococo.json all_ans.json
    mscoco_imgfeat/  train2014_obj36.tsv val2014_obj36.tsv [test2015_obj36.tsv]
    vg_gqa_imgfeat/  vg_gqa_obj36.tsv gqa_testdev_obj36.tsv
    nlvr2_imgfeat/   train_obj36.tsv valid_obj36.tsv test_obj36.tsv
    vqa/             train.json nominival.json minival.json test.json trainval_ans2label.json trainval_label2ans.json
    gqa/             train.json valid.json testdev.json submit.json trainval_ans2label.json trainval_label2ans.json
    nlvr2/           train.json valid.json test.json

1. Every feature TSV in the feature folders (and in the folder itself) becomes a store,
   OUT/features/<its path>.h5, through `python -m semvlp.data.convert lxmert-tsv` (K = 36, LXMERT's
   boxes per image). A store that is already there is kept: the converter renames a store into
   place only once it is complete, so a run that was stopped (a 17 GB TSV takes a while) goes on
   where it stopped when run again. One that holds another K or D (or is no store) stops the
   command before any conversion (exit status 2).
2. OUT/data.json names those stores, the vocab and, for each task whose files are there, the
   annotation files where they are, in LXMERT's splits (SECTIONS: its fine-tuning scripts' `--train`
   / `--valid` / `--test`). The files a task lacks are listed. An existing data.json that says
   something else is kept unless --overwrite (the error says what differs).
3. The data.json is checked as `python -m semvlp.data.check` does: every problem listed at once, exit
   status 1 when there is one.

A conversion error names the file and line and stops the command (exit status 1; the stores written
before it stay); --skip-bad skips such records instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from semvlp.data import check, convert
from semvlp.data.config import DataConfig
from semvlp.data.store import FeatureStore, StoreFormatError
from semvlp.data.tokenizer import load_tokenizer

NUM_OBJECTS = 36  # LXMERT's *_obj36.tsv
FEATURE_FOLDERS = (".", "mscoco_imgfeat", "vg_gqa_imgfeat", "nlvr2_imgfeat")
# LXMERT's splits (airsplay/lxmert run/*.bash): pre-training --train mscoco_train,mscoco_nominival,vgnococo
# --valid mscoco_minival; VQA --train train,nominival --valid minival; GQA --train train,valid --valid
# testdev --test submit; NLVR2 --train train --valid valid --test test. Each file relative to the folder.
SECTIONS: dict[str, dict[str, tuple[str, ...] | str]] = {
    "pretrain": {
        "train": ("lxmert/mscoco_train.json", "lxmert/mscoco_nominival.json", "lxmert/vgnococo.json"),
        "valid": ("lxmert/mscoco_minival.json",),
        "answer_table": "lxmert/all_ans.json",
    },
    "vqa": {
        "train": ("vqa/train.json", "vqa/nominival.json"),
        "valid": ("vqa/minival.json",),
        "test": ("vqa/test.json",),
        "ans2label": "vqa/trainval_ans2label.json",
        "label2ans": "vqa/trainval_label2ans.json",
    },
    "gqa": {
        "train": ("gqa/train.json", "gqa/valid.json"),
        "valid": ("gqa/testdev.json",),
        "test": ("gqa/submit.json",),
        "ans2label": "gqa/trainval_ans2label.json",
        "label2ans": "gqa/trainval_label2ans.json",
    },
    "nlvr2": {"train": ("nlvr2/train.json",), "valid": ("nlvr2/valid.json",), "test": ("nlvr2/test.json",)},
}


def feature_files(root: Path) -> list[Path]:
    """The feature TSVs (gzipped too) in `root` and its feature folders, in a stable order."""
    found: list[Path] = []
    for folder in FEATURE_FOLDERS:
        found += sorted(p for pattern in ("*.tsv", "*.tsv.gz") for p in (root / folder).glob(pattern) if p.is_file())
    return found


def store_path(root: Path, tsv: Path, out: Path) -> Path:
    """OUT/features/<the TSV's path in the folder>.h5 (nlvr2_imgfeat/train_obj36.tsv and a COCO
    train_obj36.tsv keep apart)."""
    relative = tsv.relative_to(root)
    return out / "features" / relative.parent / (relative.name.removesuffix(".gz").removesuffix(".tsv") + ".h5")


def sections(root: Path) -> tuple[dict, list[str]]:
    """data.json's task sections from the annotation files that exist, and the files that do not."""
    found: dict[str, dict] = {}
    missing: list[str] = []
    for name, layout in SECTIONS.items():
        section: dict = {}
        for key, names in layout.items():
            files = (names,) if isinstance(names, str) else names
            present = [str(root / f) for f in files if (root / f).is_file()]
            missing += [f for f in files if str(root / f) not in present]
            if present:
                section[key] = present[0] if isinstance(names, str) else present
        has_annotations = any(key in section for key in ("train", "valid", "test"))
        if has_annotations and (name != "pretrain" or "train" in section):  # pre-training needs train files
            found[name] = section
    return found, missing


def _kept_store_problem(store: Path, num_objects: int, feature_dim: int) -> str | None:
    """Why a store already at `store` cannot be kept for a run asking for K objects of dimension D
    (it was converted with other options, or is no store), or None when it can."""
    try:
        kept = FeatureStore(store)
    except (OSError, StoreFormatError) as e:
        return f"the existing store {store} cannot be read ({e})"
    if kept.num_objects != num_objects:
        return (
            f"the existing store {store} holds K={kept.num_objects} objects per image, not --num-objects {num_objects}"
        )
    if kept.feature_dim != feature_dim:
        return f"the existing store {store} holds {kept.feature_dim}-d features, not --feature-dim {feature_dim}"
    return None


def _as_json(value: object) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _differences(kept: object, new: object, where: str = "") -> list[str]:
    """How the dataclass `kept` (a data.json's DataConfig or one of its sections) differs from `new`,
    one phrase per key: the files it names, or the setting's two values."""
    found = []
    for f in dataclasses.fields(kept):
        key, a, b = where + f.name, getattr(kept, f.name), getattr(new, f.name)
        if a == b:
            continue
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            found += _differences(a, b, key + ".")
        elif a is None or b is None:  # a whole section
            found.append(f"it has no {key} section (this run writes one)" if a is None else f"{key} is only in it")
        elif f.metadata.get("path"):
            found.append(f"{key} names other files")
        else:
            found.append(f"{key} is {_as_json(a)} (this run writes {_as_json(b)})")
    return found


def _kept_config_problem(path: Path, config: DataConfig) -> str | None:
    """Why the data.json at `path` is not the one this run writes (what differs, or that it cannot
    be read), or None when it is the same."""
    try:
        kept = DataConfig.load(path)
    except (OSError, ValueError, TypeError) as e:
        return f"exists and is not a readable data configuration ({str(e).removeprefix(f'{path}: ')})"
    differences = _differences(kept, config)
    return f"exists and differs from the one this run writes: {'; '.join(differences)}" if differences else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m semvlp.data.from_lxmert",
        description="Convert LXMERT's data folder (feature TSVs and annotations) into feature stores and a "
        "checked data.json.",
    )
    parser.add_argument("folder", type=Path, help="LXMERT's data folder (holding lxmert/, mscoco_imgfeat/, vqa/, ...)")
    parser.add_argument("--vocab", required=True, help="a WordPiece vocab.txt, or a BERT folder holding one")
    parser.add_argument("--out", type=Path, required=True, help="folder for data.json and features/")
    parser.add_argument(
        "--num-objects", type=convert.positive_int, default=NUM_OBJECTS, help="K, boxes per image (LXMERT's: 36)"
    )
    parser.add_argument("--feature-dim", type=convert.positive_int, default=convert.FEATURE_DIM)
    parser.add_argument("--skip-bad", action="store_true", help="skip and count malformed feature records")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing data.json that differs (stores already converted are kept either way)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    root, out = args.folder.resolve(), args.out.resolve()
    if not root.is_dir():
        parser.error(f"{root}: no such folder")
    tsvs = feature_files(root)
    if not tsvs:
        parser.error(f"{root}: no feature TSV (*.tsv, *.tsv.gz) in it or in {', '.join(FEATURE_FOLDERS[1:])}")
    found, missing = sections(root)
    if not found:
        parser.error(f"{root}: none of LXMERT's annotation files, e.g. {SECTIONS['pretrain']['train'][0]}")
    try:  # now, not after hours of conversion
        load_tokenizer(args.vocab)
    except (OSError, ValueError) as e:
        parser.error(f"--vocab {args.vocab}: {e}")

    stores = [store_path(root, tsv, out) for tsv in tsvs]
    for tsv, store in zip(tsvs, stores, strict=True):  # all of them now, before converting any
        problem = _kept_store_problem(store, args.num_objects, args.feature_dim) if store.is_file() else None
        if problem is not None:
            parser.error(f"{problem}: choose a new --out, or delete the store to convert {tsv} again")
    for tsv, store in zip(tsvs, stores, strict=True):
        if store.is_file():
            print(f"{store}: there already (delete it to convert {tsv} again)")
            continue
        options = ["--num-objects", str(args.num_objects), "--feature-dim", str(args.feature_dim)]
        options += ["--skip-bad"] * args.skip_bad + ["--quiet"] * args.quiet
        status = convert.main(["lxmert-tsv", str(tsv), "--out", str(store), *options])
        if status != 0:
            return status

    config = DataConfig.from_dict({"stores": list(map(str, stores)), "vocab": str(Path(args.vocab).resolve()), **found})
    data_json = out / "data.json"
    problem = _kept_config_problem(data_json, config) if data_json.is_file() and not args.overwrite else None
    if problem is not None:
        print(f"error: {data_json} {problem}; --overwrite replaces it", file=sys.stderr)
        return 1
    config.save(data_json)
    print(f"\nwrote {data_json}: {', '.join(found)}")
    if missing:
        print(f"not in {root} (left out): {', '.join(missing)}")
    print()
    return check.main([str(data_json)])


if __name__ == "__main__":
    sys.exit(main())
