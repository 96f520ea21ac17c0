"""Check a data.json before a run: every file it names, read as the launchers read it.

    python -m semvlp.data.check /data/semvlp/data.json

Reads the feature stores (images, K, feature size, padding; detector label ids against
num_object_labels / num_attribute_labels), the vocab, and every section the file has: the
pre-training splits (sentences, sources, QA targets), VQA and GQA (questions, labels outside the
answer table), NLVR2 and Flickr30K, each with the images no store holds. It prints a line per store
and split, then every problem found, where a launcher stops at the first one; the exit status is 1
when there is any. No GPU and no process group: a login node will do.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from semvlp.data.annotations import load_flickr30k, load_gqa, load_nlvr2, load_pretrain_annotations, load_vqa
from semvlp.data.config import DataConfig
from semvlp.data.pretrain_dataset import check_label_counts, check_train_corpus, load_pretrain_answer_table
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

    def attempt(self, what: str, read: Callable[[], T]) -> T | None:
        """`read()`, or None with its error recorded as a problem of `what`."""
        try:
            return read()
        except (ValueError, OSError, KeyError) as e:  # the data errors the readers raise, naming the file
            self.problems.append(f"{what}: {e}")
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
    for split in ("train", "valid"):
        files = getattr(section, split)
        if not files:
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
    for split in SPLITS:
        files = getattr(section, split)
        examples = report.attempt(f"{name} {split}", lambda files=files: load(files)) if files else None
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


def _check_nlvr2(report: DataReport, cfg: DataConfig, stores: FeatureStoreSet | None) -> None:
    for split in SPLITS:
        files = getattr(cfg.nlvr2, split)
        examples = report.attempt(f"nlvr2 {split}", lambda files=files: load_nlvr2(files)) if files else None
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
