"""Readers for the annotation layouts users already have (DESIGN.md section 4).

- LXMERT pre-training JSON (`data/lxmert/mscoco_train.json` etc.): one record per image,
  `{"img_id", "sentf": {source: [sent, ...]}, "labelf": {source: [{answer: score}, ...]}}`.
- The answer table: LXMERT's `all_ans.json` (a list of `{"ans": str, "dsets": [...], ...}`) or
  a fine-tuning pair `trainval_ans2label.json` / `trainval_label2ans.json`, with LXMERT's answer
  normalization (`airsplay/lxmert src/pretrain/qa_answer_table.py`, `AnswerTable.convert_ans`).
- VQA / GQA fine-tuning JSON (LXMERT): `{"question_id", "img_id", "sent", "label": {ans: score}}`
  (no "label" in test files). The VQA label values are already soft scores (1 annotator 0.3,
  2 -> 0.6, 3 -> 0.9, >= 4 -> 1.0) and are used as the targets as they are.
- NLVR2 (LXMERT): `{"identifier", "img0", "img1", "sent", "label": 0|1}`.
- Flickr30K retrieval, Karpathy split `dataset_flickr30k.json`:
  `{"images": [{"filename", "imgid", "split", "sentences": [{"raw", "tokens"}, ...]}, ...]}`;
  the image id is the filename stem.

Malformed input raises AnnotationError naming the file, the record and the field: a file that is
not UTF-8, a blank question or statement, a file whose questions (statements) have labels only in part. Annotations
that reference images absent from the feature stores raise MissingImagesError (the files holding
them, how many, the first few ids) unless the caller passes skip_missing=True, which drops and
reports them.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

LXMERT_SOURCES = ("mscoco", "vg", "vqa", "gqa", "visual7w")

# LXMERT's AnswerTable.ANS_CONVERT, applied after lower-casing and stripping articles.
ANSWER_CONVERT = {
    "a man": "man",
    "the man": "man",
    "a woman": "woman",
    "the woman": "woman",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "grey": "gray",
}


# What check_images suggests by default: the fine-tuning launchers' option (pre-training says its own).
SKIP_MISSING_HINT = "pass --skip_missing (skip_missing=True in code) to drop them"


class AnnotationError(ValueError):
    """A malformed annotation file or record."""


class MissingImagesError(ValueError):
    """Annotations reference images that no feature store holds."""


def normalize_answer(ans: str) -> str:
    """LXMERT's answer normalization: lower case, strip a final '.', a leading article, map
    number words to digits and 'grey' to 'gray'."""
    if len(ans) == 0:
        return ""
    ans = ans.lower()
    if ans[-1] == ".":
        ans = ans[:-1].strip()
    if ans.startswith("a "):
        ans = ans[2:].strip()
    if ans.startswith("an "):
        ans = ans[3:].strip()
    if ans.startswith("the "):
        ans = ans[4:].strip()
    return ANSWER_CONVERT.get(ans, ans)


def read_utf8(path: str | os.PathLike) -> str:
    """The text of `path`; AnnotationError naming the file, the byte offset and line when it is not UTF-8
    (Python's UnicodeDecodeError names neither the file nor the line)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise AnnotationError(
            f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line}): {e.reason}; "
            "save the file as UTF-8"
        ) from e


def _load_json(path: str | os.PathLike) -> object:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    text = read_utf8(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def _field(record: object, key: str, path: Path, where: str, types: type | tuple[type, ...]) -> object:
    if not isinstance(record, dict):
        raise AnnotationError(f"{path}: {where} is a {type(record).__name__}, expected an object")
    if key not in record:
        raise AnnotationError(f"{path}: {where} has no field {key!r}")
    value = record[key]
    if not isinstance(value, types):
        raise AnnotationError(f"{path}: {where} field {key!r} is a {type(value).__name__}")
    return value


def _blank(text: str) -> bool:
    """Nothing but white space and the characters BERT's tokenizer deletes (control and format
    characters such as a zero-width space): the text would tokenize to [CLS] [SEP] alone."""
    return all(c.isspace() or unicodedata.category(c).startswith("C") for c in text)


def _text(record: object, key: str, path: Path, where: str) -> str:
    """A string field holding text to train on, not blank."""
    value = _field(record, key, path, where, str)
    if _blank(value):
        raise AnnotationError(f"{path}: {where} field {key!r} holds no text ({value!r})")
    return value


def _one_labeling(path: Path, first: dict[bool, str], noun: str) -> None:
    """`first[True]` / `first[False]`: the first record of the file with / without a label. A file holding
    both is neither a train or dev file (every label needed) nor a test file (none)."""
    if len(first) == 2:
        raise AnnotationError(
            f"{path}: {first[True]} has a label but {first[False]} has none; a file's {noun}s must all have one "
            "(train and dev files) or none (test files)"
        )


def _answer_scores(label: object, path: Path, where: str, key: str) -> dict[str, float]:
    """An {answer: score} label as floats; every score must be a soft score, a number in [0, 1].

    Scores become BCE targets (fine-tuning) or sampling weights (pre-training): an annotator count,
    a negative or a NaN would train on nonsense, or fail only when first drawn.
    """
    if not isinstance(label, dict):
        raise AnnotationError(f"{path}: {where} field {key!r} must be an {{answer: score}} object")
    scores = {}
    for ans, score in label.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise AnnotationError(
                f"{path}: {where} field {key!r} answer {ans!r} has score {score!r}; scores must be numbers in [0, 1]"
            )
        scores[ans] = float(score)
    return scores


class AnswerTable:
    """Answer string <-> class index. Answers are stored normalized (see normalize_answer)."""

    def __init__(self, answers: Sequence[str]):
        self.answers = list(answers)
        self._ids = {a: i for i, a in enumerate(self.answers)}
        if len(self._ids) != len(self.answers):
            dup = sorted({a for a in self.answers if self.answers.count(a) > 1})[:5]
            raise AnnotationError(f"answer table has duplicate answers, e.g. {dup}")

    @classmethod
    def from_all_ans(cls, path: str | os.PathLike, dsets: Iterable[str] | None = None) -> AnswerTable:
        """LXMERT `all_ans.json`; with `dsets`, keep answers used by any of those datasets."""
        path = Path(path)
        data = _load_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a list of {{'ans': ...}} records")
        keep = set(dsets) if dsets is not None else None
        answers = []
        found: set[str] = set()
        for i, rec in enumerate(data):
            ans = _field(rec, "ans", path, f"record {i}", str)
            if keep is not None:
                used = _field(rec, "dsets", path, f"record {i}", list)
                found.update(used)
                if not keep & set(used):
                    continue
            answers.append(ans)
        unknown = [d for d in dsets or () if d not in found]
        if unknown:  # a typo would silently drop that dataset's answers (all of them: an empty table)
            known = sorted(found)
            raise AnnotationError(f"{path}: answer_dsets {unknown} match no answer's 'dsets'; dsets found: {known}")
        return cls(answers)

    @classmethod
    def from_label2ans(cls, path: str | os.PathLike) -> AnswerTable:
        """`trainval_label2ans.json` (a list of answers, index = label)."""
        path = Path(path)
        data = _load_json(path)
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
            raise AnnotationError(f"{path}: expected a list of answer strings")
        return cls(data)

    @classmethod
    def from_ans2label(cls, path: str | os.PathLike) -> AnswerTable:
        """`trainval_ans2label.json` ({answer: label}); labels must be 0..n-1."""
        path = Path(path)
        data = _load_json(path)
        if not isinstance(data, dict):
            raise AnnotationError(f"{path}: expected an object {{answer: label}}")
        answers = [None] * len(data)
        for ans, label in data.items():
            if not isinstance(label, int) or not 0 <= label < len(data) or answers[label] is not None:
                raise AnnotationError(
                    f"{path}: answer {ans!r} has label {label!r}; labels must be distinct integers 0..{len(data) - 1}"
                )
            answers[label] = ans
        return cls(answers)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnswerTable:
        """Any of the three layouts, told apart by content."""
        data = _load_json(path)
        if isinstance(data, dict):
            return cls.from_ans2label(path)
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return cls.from_all_ans(path)
        return cls.from_label2ans(path)

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, ans: object) -> bool:
        return ans in self._ids

    def ans2id(self, ans: str) -> int:
        return self._ids[ans]

    def id2ans(self, i: int) -> str:
        return self.answers[i]

    def label_ids(self, label: dict[str, float], normalize: bool = True) -> dict[int, float]:
        """A {answer: score} label as {answer id: score}, dropping answers not in the table."""
        out: dict[int, float] = {}
        for ans, score in label.items():
            a = normalize_answer(ans) if normalize else ans
            if a in self._ids:
                i = self._ids[a]
                out[i] = max(out.get(i, 0.0), float(score))
        return out

    def save(self, ans2label_path: str | os.PathLike, label2ans_path: str | os.PathLike) -> None:
        with open(ans2label_path, "w") as f:
            json.dump({a: i for i, a in enumerate(self.answers)}, f)
        with open(label2ans_path, "w") as f:
            json.dump(self.answers, f)


@dataclass
class PretrainCorpus:
    """All selected sentences of LXMERT pre-training files, one entry per sentence.

    Columns are numpy arrays (shared, not copied, by forked DataLoader workers); `texts` is
    only needed until tokenization. QA targets: sentence i has answers
    qa_answers[qa_offsets[i]:qa_offsets[i+1]] with scores qa_scores[...] (answer-table ids).
    """

    sources: tuple[str, ...]
    image_ids: list[str]  # distinct images, in first-seen order
    sent_image: np.ndarray  # [n] int64 index into image_ids
    sent_source: np.ndarray  # [n] int8 index into sources
    sent_index: np.ndarray  # [n] int32 position in its record's sentf[source] list
    texts: list[str]
    qa_offsets: np.ndarray  # [n + 1] int64
    qa_answers: np.ndarray  # int32
    qa_scores: np.ndarray  # float32
    source_counts: dict[str, int] = field(default_factory=dict)
    found_sources: tuple[str, ...] = ()  # sentf keys of the files, selected or not, in first-seen order
    files: tuple[str, ...] = ()  # the annotation files read
    image_file: np.ndarray | None = None  # [len(image_ids)] index into files: the first file naming each image

    def __len__(self) -> int:
        return len(self.sent_image)

    def uid(self, i: int) -> str:
        """LXMERT's sentence uid: '{img_id}_{source}_{index:03d}'."""
        return f"{self.image_ids[self.sent_image[i]]}_{self.sources[self.sent_source[i]]}_{self.sent_index[i]:03d}"

    def answers(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.qa_offsets[i], self.qa_offsets[i + 1]
        return self.qa_answers[a:b], self.qa_scores[a:b]

    def select(self, keep: np.ndarray) -> PretrainCorpus:
        """The sentences where `keep` (bool [n]) is true."""
        idx = np.flatnonzero(keep)
        counts = np.diff(self.qa_offsets)
        offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(counts[idx], out=offsets[1:])
        take = keep[np.repeat(np.arange(len(counts)), counts)]  # QA entries of kept sentences
        return PretrainCorpus(
            sources=self.sources,
            image_ids=self.image_ids,
            sent_image=self.sent_image[idx],
            sent_source=self.sent_source[idx],
            sent_index=self.sent_index[idx],
            texts=[self.texts[i] for i in idx],
            qa_offsets=offsets,
            qa_answers=self.qa_answers[take],
            qa_scores=self.qa_scores[take],
            source_counts=self.source_counts,
            found_sources=self.found_sources,
            files=self.files,
            image_file=self.image_file,
        )


def load_pretrain_annotations(
    paths: Sequence[str | os.PathLike],
    sources: Sequence[str] = LXMERT_SOURCES,
    answer_table: AnswerTable | None = None,
) -> PretrainCorpus:
    """Sentences of the given LXMERT pre-training files from the selected `sources`.

    QA labels are normalized (normalize_answer) and kept only if in `answer_table`, as LXMERT
    does; without a table there are no QA targets (and the labels are not read). Scores must be
    numbers in [0, 1] (AnnotationError naming the file, record and sentence); answers scored 0 are
    dropped, so a label scored all 0 gives its sentence no QA target. Blank sentences are left out,
    with a warning.
    """
    sources = tuple(sources)
    if not sources:
        raise ValueError("no pre-training sources selected")
    src_index = {s: i for i, s in enumerate(sources)}
    image_index: dict[str, int] = {}
    image_file: list[int] = []
    sent_image, sent_source, sent_index, texts = [], [], [], []
    qa_counts, qa_answers, qa_scores = [], [], []
    counts = dict.fromkeys(sources, 0)
    found: dict[str, None] = {}
    blank: list[str] = []  # where the blank sentences were
    for file_number, p in enumerate(paths):
        path = Path(p)
        data = _load_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a list of image records (LXMERT pre-training layout)")
        for r, rec in enumerate(data):
            where = f"record {r}"
            img_id = _field(rec, "img_id", path, where, str)
            sentf = _field(rec, "sentf", path, where, dict)
            labelf = rec.get("labelf", {})
            if not isinstance(labelf, dict):
                raise AnnotationError(f"{path}: {where} (img_id {img_id}) field 'labelf' is not an object")
            found.update(dict.fromkeys(sentf))
            for src, sents in sentf.items():
                if src not in src_index:
                    continue
                if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
                    raise AnnotationError(
                        f"{path}: {where} (img_id {img_id}) field 'sentf.{src}' is not a list of strings"
                    )
                labels = labelf.get(src)
                if labels is not None and (not isinstance(labels, list) or len(labels) != len(sents)):
                    raise AnnotationError(
                        f"{path}: {where} (img_id {img_id}) field 'labelf.{src}' must be a "
                        f"list with one answer dict per sentence ({len(sents)})"
                    )
                img = image_index.setdefault(img_id, len(image_index))
                if img == len(image_file):  # first seen
                    image_file.append(file_number)
                for k, sent in enumerate(sents):
                    if _blank(sent):  # nothing to train on; noisy sources (region descriptions) have a few
                        blank.append(f"{path} {where} (img_id {img_id}) sentf.{src}[{k}]")
                        continue
                    sent_image.append(img)
                    sent_source.append(src_index[src])
                    sent_index.append(k)
                    texts.append(sent)
                    ids: dict[int, float] = {}
                    if labels is not None and answer_table is not None:
                        label = _answer_scores(labels[k], path, f"{where} (img_id {img_id})", f"labelf.{src}[{k}]")
                        # Answers are drawn in proportion to their scores, so one scored 0 is never a
                        # target; a label whose table answers all score 0 (LXMERT divides by zero on it)
                        # leaves the sentence without one, like a label whose answers are all outside.
                        ids = {i: score for i, score in answer_table.label_ids(label).items() if score > 0}
                    qa_counts.append(len(ids))
                    qa_answers.extend(ids.keys())
                    qa_scores.extend(ids.values())
                    counts[src] += 1
    if blank:
        logger.warning("%d blank pre-training sentence(s) left out, e.g. %s", len(blank), ", ".join(blank[:3]))
    offsets = np.zeros(len(qa_counts) + 1, np.int64)
    np.cumsum(qa_counts, out=offsets[1:])
    logger.info("pre-training sentences per source: %s", counts)
    return PretrainCorpus(
        sources=sources,
        image_ids=list(image_index),
        sent_image=np.array(sent_image, np.int64),
        sent_source=np.array(sent_source, np.int8),
        sent_index=np.array(sent_index, np.int32),
        texts=texts,
        qa_offsets=offsets,
        qa_answers=np.array(qa_answers, np.int32),
        qa_scores=np.array(qa_scores, np.float32),
        source_counts=counts,
        found_sources=tuple(found),
        files=tuple(str(p) for p in paths),
        image_file=np.array(image_file, np.int32),
    )


def check_images(
    image_ids: Sequence[str],
    available: Container[str],
    what: str,
    skip_missing: bool = False,
    skip_hint: str = SKIP_MISSING_HINT,
    files: Sequence[str] | None = None,
) -> np.ndarray:
    """Bool mask of the ids found in `available`.

    Raises MissingImagesError with `what`, the annotation files that hold the missing images (when
    `files`, the file of each entry, is given), the count, the first few missing ids and `skip_hint`
    (how the caller's user drops them) unless skip_missing, in which case the same is logged (a
    warning) and the caller drops the masked entries.
    """
    keep = np.fromiter((i in available for i in image_ids), np.bool_, len(image_ids))
    n_missing = int((~keep).sum())
    if n_missing:
        missing = list(dict.fromkeys(i for i, k in zip(image_ids, keep, strict=True) if not k))
        if files is not None:
            what += f" ({', '.join(dict.fromkeys(files[i] for i in np.flatnonzero(~keep)))})"
        msg = (
            f"{what}: {len(missing)} images missing from the feature stores "
            f"({n_missing} of {len(image_ids)} entries), e.g. {missing[:5]}"
        )
        if not skip_missing:
            raise MissingImagesError(f"{msg} ({skip_hint})")
        logger.warning("%s; skipped", msg)
    return keep


@dataclass
class QAExample:
    """One VQA or GQA question; `label` is {answer: soft score}, None in test files."""

    question_id: int | str
    img_id: str
    sent: str
    label: dict[str, float] | None
    file: str  # the annotation file it was read from, named when its image is in no store


@dataclass
class NLVR2Example:
    identifier: str
    img0: str
    img1: str
    sent: str
    label: int | None
    file: str  # the annotation file it was read from, named when an image is in no store


def _load_qa(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> list[QAExample]:
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(p)
        file = str(path)  # one string shared by the file's records
        data = _load_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a list of question records")
        first: dict[bool, str] = {}
        for r, rec in enumerate(data):
            where = f"record {r}"
            qid = _field(rec, "question_id", path, where, (int, str))
            where = f"record {r} (question_id {qid})"
            label = rec.get("label")
            first.setdefault(label is not None, where)
            out.append(
                QAExample(
                    question_id=qid,
                    img_id=_field(rec, "img_id", path, where, str),
                    sent=_text(rec, "sent", path, where),
                    label=None if label is None else _answer_scores(label, path, where, "label"),
                    file=file,
                )
            )
        _one_labeling(path, first, "question")
    return out


def load_vqa(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> list[QAExample]:
    """LXMERT's VQA JSON (train.json, nominival.json, minival.json, test.json)."""
    return _load_qa(paths)


def load_gqa(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> list[QAExample]:
    """LXMERT's GQA JSON (train.json, valid.json, testdev.json, submit.json)."""
    return _load_qa(paths)


def load_nlvr2(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> list[NLVR2Example]:
    """LXMERT's NLVR2 JSON (train.json, valid.json, test.json)."""
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(p)
        file = str(path)  # one string shared by the file's records
        data = _load_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a list of NLVR2 records")
        first: dict[bool, str] = {}
        for r, rec in enumerate(data):
            ident = _field(rec, "identifier", path, f"record {r}", str)
            where = f"record {r} (identifier {ident})"
            label = rec.get("label")
            if label is not None and label not in (0, 1):
                raise AnnotationError(f"{path}: {where} field 'label' must be 0 or 1, got {label!r}")
            first.setdefault(label is not None, where)
            out.append(
                NLVR2Example(
                    identifier=ident,
                    img0=_field(rec, "img0", path, where, str),
                    img1=_field(rec, "img1", path, where, str),
                    sent=_text(rec, "sent", path, where),
                    label=None if label is None else int(label),
                    file=file,
                )
            )
        _one_labeling(path, first, "statement")
    return out


def require_labels(examples: Sequence[QAExample] | Sequence[NLVR2Example], what: str, noun: str) -> None:
    """A train or dev split (`what`) must have labels: AnnotationError naming its files without them
    (each file has labels for all its `noun`s or for none: the readers check that). Without, training
    fails at its first step and a dev split at its first evaluation."""
    unlabeled = list(dict.fromkeys(e.file for e in examples if e.label is None))
    if unlabeled:
        raise AnnotationError(
            f"{what} ({', '.join(unlabeled)}): no {noun} has a label; train and dev files need them (only test "
            "files may have none)"
        )


@dataclass
class RetrievalSplit:
    """Images and captions of a retrieval split; caption c describes image caption_image[c]."""

    image_ids: list[str]
    captions: list[str]
    caption_image: np.ndarray  # [num_captions] int64
    file: str  # the annotation file, named when an image is in no store

    def select_images(self, keep: np.ndarray) -> RetrievalSplit:
        """Drop the images where `keep` is false, and their captions."""
        new_index = np.cumsum(keep) - 1
        cap_keep = keep[self.caption_image]
        return RetrievalSplit(
            image_ids=[i for i, k in zip(self.image_ids, keep, strict=True) if k],
            captions=[c for c, k in zip(self.captions, cap_keep, strict=True) if k],
            caption_image=new_index[self.caption_image[cap_keep]].astype(np.int64),
            file=self.file,
        )

    def require_two_images(self, what: str) -> None:
        """Training pairs each caption with other images (negatives): AnnotationError naming the
        split `what` and its file unless it holds two images or more."""
        if len(self.image_ids) < 2:
            raise AnnotationError(
                f"{what} ({self.file}): {len(self.image_ids)} image(s); retrieval training needs at least two "
                "(a caption's negatives are the other images)"
            )


def load_flickr30k(path: str | os.PathLike, splits: Sequence[str] | str = "test") -> RetrievalSplit:
    """Karpathy-split `dataset_flickr30k.json`, images whose "split" is in `splits`
    (Flickr30K uses train / val / test; COCO adds restval). Image id = filename stem."""
    path = Path(path)
    wanted = {splits} if isinstance(splits, str) else set(splits)
    data = _load_json(path)
    images = _field(data, "images", path, "top level", list)
    image_ids, captions, caption_image = [], [], []
    for r, rec in enumerate(images):
        filename = _field(rec, "filename", path, f"images[{r}]", str)
        split = _field(rec, "split", path, f"images[{r}] ({filename})", str)
        if split not in wanted:
            continue
        sents = _field(rec, "sentences", path, f"images[{r}] ({filename})", list)
        img = len(image_ids)
        image_ids.append(Path(filename).stem)
        for s, sent in enumerate(sents):
            captions.append(_text(sent, "raw", path, f"images[{r}] ({filename}) sentences[{s}]"))
            caption_image.append(img)
    if not image_ids:
        raise AnnotationError(f"{path}: no images in split(s) {sorted(wanted)}")
    return RetrievalSplit(image_ids, captions, np.array(caption_image, np.int64), str(path))
