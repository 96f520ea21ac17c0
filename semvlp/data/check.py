"""Check a data.json before a run: every file it names, read as the launchers read it.

    python -m semvlp.data.check /data/semvlp/data.json

Reads the feature stores (images, K, feature size, padding; detector label ids against
num_object_labels / num_attribute_labels; every value: non-finite features or confidences, boxes not
normalized or inverted, which the converters refuse but a store made by other means may hold), the
vocab, and every section the file has: the pre-training splits (sentences, sources, QA targets), VQA
and GQA (questions, labels outside the answer table), NLVR2 and Flickr30K, each with the images no
store holds. The train and valid splits of a section it has are checked as a training run reads
them: files listed, labels (VQA, GQA, NLVR2), two images or more (Flickr30K train). It prints a line
per store and split, then every problem found, where a launcher stops at the first one; the exit
status is 1 when there is any. No GPU and no process group: a login node will do.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from semvlp.data.annotations import (
    load_flickr30k,
    load_gqa,
    load_nlvr2,
    load_pretrain_annotations,
    load_vqa,
    require_labels,
)
from semvlp.data.config import TRAINING_SPLITS, DataConfig, require_files
from semvlp.data.pretrain_dataset import (
    check_label_counts,
    check_train_corpus,
    load_pretrain_answer_table,
    unlabeled_store_notes,
)
from semvlp.data.store import FeatureStoreSet, open_stores
from semvlp.data.tokenizer import load_tokenizer
from semvlp.metrics import answer_coverage

T = TypeVar("T")
SPLITS = ("train", "valid", "test")


class DataReport:
    """What was read (`lines`) and what is wrong (`problems`), each naming its section and split."""

    def __init__(self):
        self.lines: list[str] = []
        self.problems: list[str] = []

    def attempt(self, what: str | None, read: Callable[[], T]) -> T | None:
        """`read()`, or None with its error recorded as a problem of `what` (None: an error that names
        its section and split itself)."""
        try:
            return read()
        except (ValueError, OSError, KeyError) as e:  # the data errors the readers raise, naming the file
            self.problems.append(f"{what}: {e}" if what is not None else str(e))
            return None

    def check_images(self, what: str, image_ids: Iterable[str], stores: FeatureStoreSet | None, files) -> None:
        if stores is None:
            return
        wanted = list(dict.fromkeys(image_ids))
        missing = [i for i in wanted if i not in stores]
        if missing:
            self.problems.append(
                f"{what} ({', '.join(map(str, files))}): {len(missing)} of {len(wanted)} images are in no feature "
                f"store, e.g. {missing[:5]} (the launchers stop on them; --skip_missing drops them)"
            )


def check_data(path: str | os.PathLike) -> DataReport:
    """Read everything `path` (a data.json) names; see the module docstring."""
    report = DataReport()
    cfg = report.attempt("data.json", lambda: DataConfig.load(path))
    if cfg is None:
        return report
    stores = report.attempt("stores", lambda: open_stores(cfg.stores))
    if stores is not None:
        padded = ", padded (visual_attention_mask)" if stores.padded else ""
        report.lines.append(
            f"stores: {len(stores)} images, K={stores.num_objects}, D={stores.feature_dim}{padded}: "
            f"{', '.join(cfg.stores)}"
        )
        report.attempt("stores", lambda: check_label_counts(cfg, stores))
        if cfg.pretrain is not None:  # the labels only pre-training reads
            report.lines += report.attempt("stores", lambda: unlabeled_store_notes(stores)) or []
        for store in stores.stores:  # values the converters refuse, in a store made by other means
            report.problems += report.attempt("stores", store.value_problems) or []
    tokenizer = report.attempt("vocab", lambda: load_tokenizer(cfg.vocab))
    if tokenizer is not None:
        report.lines.append(f"vocab: {len(tokenizer)} tokens: {cfg.vocab}")
    if cfg.pretrain is not None:
        _check_pretrain(report, cfg, stores)
    for name, load in (("vqa", load_vqa), ("gqa", load_gqa)):
        if getattr(cfg, name) is not None:
            _check_qa(report, cfg, name, load, stores)
    if cfg.nlvr2 is not None:
        _check_nlvr2(report, cfg, stores)
    if cfg.flickr30k is not None:
        _check_flickr30k(report, cfg, stores)
    return report


def _check_pretrain(report: DataReport, cfg: DataConfig, stores: FeatureStoreSet | None) -> None:
    section = cfg.pretrain
    table = report.attempt("pretrain.answer_table", lambda: load_pretrain_answer_table(cfg))
    for split in TRAINING_SPLITS:
        files, listed = getattr(section, split), f"pre-training {split}"  # the launcher's words
        if not report.attempt(f"pretrain {split}", lambda files=files, listed=listed: require_files(files, listed)):
            continue
        corpus = report.attempt(
            f"pretrain {split}", lambda files=files: load_pretrain_annotations(files, section.sources, table)
        )
        if corpus is None:
            continue
        with_qa = int((corpus.qa_offsets[1:] > corpus.qa_offsets[:-1]).sum())
        report.lines.append(
            f"pretrain {split}: {len(corpus)} sentences on {len(corpus.image_ids)} images, {with_qa} with a QA "
            f"target; by source {dict(sorted(corpus.source_counts.items()))}"
        )
        if split == "train":
            report.attempt("pretrain train", lambda corpus=corpus, files=files: check_train_corpus(cfg, corpus, files))
        report.check_images(f"pretrain {split}", corpus.image_ids, stores, files)


def _check_qa(
    report: DataReport,
    cfg: DataConfig,
    name: str,
    load: Callable[[Sequence[str]], list],
    stores: FeatureStoreSet | None,
) -> None:
    section = getattr(cfg, name)
    table = report.attempt(f"{name} answer table", lambda: section.load_answer_table(name))
    training = _trains(report, name, section)
    for split in SPLITS:
        files = getattr(section, split)
        examples = _read_examples(report, f"{name} {split}", files, split, load, "question", training)
        if examples is None:
            continue
        labels = [e.label for e in examples if e.label is not None]
        line = f"{name} {split}: {len(examples)} questions, {len(labels)} labelled"
        if labels and table is not None:
            coverage = answer_coverage(labels, table, soft=name == "vqa")
            line += (f"; {coverage.questions_with_outside_answers} with answers outside the {len(table)}-answer "
                     f"table, score capped at {coverage.score_cap:.4f}")  # fmt: skip
        report.lines.append(line)
        report.check_images(f"{name} {split}", [e.img_id for e in examples], stores, files)


def _trains(report: DataReport, name: str, section) -> bool:
    """Whether a fine-tuning section is for training (it lists train or dev files); one with test
    files only is for --predict_only, which needs neither."""
    if any(getattr(section, split) for split in TRAINING_SPLITS):
        return True
    report.lines.append(f"{name}: test files only (predictions with --predict_only)")
    return False


def _read_examples(
    report: DataReport,
    what: str,
    files: tuple[str, ...],
    split: str,
    load: Callable[[Sequence[str]], list],
    noun: str,
    training: bool,
) -> list | None:
    """The questions or statements of one split (None when there are none to summarize), with what the
    fine-tuning launchers stop on: a split without a `noun`; in a section for `training`, a train or
    dev split without files or without labels."""
    needs_labels = training and split in TRAINING_SPLITS
    if needs_labels:
        report.attempt(what, lambda: require_files(files, what))
    examples = report.attempt(what, lambda: load(files)) if files else None
    if examples is not None and not examples:
        report.problems.append(f"{what} ({', '.join(files)}): no {noun}s")
    elif examples is not None and needs_labels:
        report.attempt(None, lambda: require_labels(examples, what, noun))
    return examples


def _check_nlvr2(report: DataReport, cfg: DataConfig, stores: FeatureStoreSet | None) -> None:
    training = _trains(report, "nlvr2", cfg.nlvr2)
    for split in SPLITS:
        files = getattr(cfg.nlvr2, split)
        examples = _read_examples(report, f"nlvr2 {split}", files, split, load_nlvr2, "statement", training)
        if examples is not None:
            report.lines.append(f"nlvr2 {split}: {len(examples)} statements")
            images = [i for e in examples for i in (e.img0, e.img1)]
            report.check_images(f"nlvr2 {split}", images, stores, files)


def _check_flickr30k(report: DataReport, cfg: DataConfig, stores: FeatureStoreSet | None) -> None:
    section = cfg.flickr30k
    for split, karpathy in zip(SPLITS, (section.train_splits, section.valid_splits, section.test_splits), strict=True):
        data = report.attempt(
            f"flickr30k {split}", lambda karpathy=karpathy: load_flickr30k(section.annotations, karpathy)
        )
        if data is not None:
            report.lines.append(
                f"flickr30k {split} {list(karpathy)}: {len(data.image_ids)} images, {len(data.captions)} captions"
            )
            if split == "train":
                report.attempt(None, lambda data=data: data.require_two_images("flickr30k train"))
            report.check_images(f"flickr30k {split}", data.image_ids, stores, [section.annotations])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m semvlp.data.check",
        description="Read every file a data.json names, as the launchers do, and list every problem found.",
    )
    parser.add_argument("data", help="the data.json to check")
    args = parser.parse_args(argv)
    report = check_data(args.data)
    for line in report.lines:
        print(line)
    if report.problems:
        print(f"\n{len(report.problems)} problem(s):", file=sys.stderr)
        for problem in report.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"\n{args.data}: no problems found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
