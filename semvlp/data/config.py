"""The data configuration: which stores, annotation files, sources, answer table and vocab to use.

A JSON file (the toy world writes one as DIR/data.json) maps onto `DataConfig`:

    {
      "stores": ["features.h5"],
      "vocab": "vocab.txt",
      "max_text_len": 20,
      "num_object_labels": 1600, "num_attribute_labels": 400,
      "pretrain": {"train": ["mscoco_train.json", ...], "valid": ["mscoco_minival.json"],
                   "sources": ["mscoco", "vg", "vqa", "gqa", "visual7w"],
                   "answer_table": "all_ans.json", "answer_dsets": null},
      "vqa": {"train": [...], "valid": [...], "test": [...],
              "ans2label": "trainval_ans2label.json", "label2ans": "trainval_label2ans.json"},
      "gqa": {...same keys...},
      "nlvr2": {"train": [...], "valid": [...], "test": [...]},
      "flickr30k": {"annotations": "dataset_flickr30k.json",
                    "train_splits": ["train"], "valid_splits": ["val"], "test_splits": ["test"]}
    }

Every section except stores/vocab is optional. Unknown keys are errors (a typo must not
silently drop a file), values are type-checked, and relative paths resolve against the folder
of the JSON file, so a data folder can be moved as a whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from semvlp.data.annotations import LXMERT_SOURCES, AnnotationError, AnswerTable, read_utf8

# The splits a training run cannot do without: it trains on train and keeps the weights that do best
# on valid (the dev split), so both need files, and (fine-tuning) labels. A test split may have neither.
TRAINING_SPLITS = ("train", "valid")


def require_files(files: tuple[str, ...], what: str) -> tuple[str, ...]:
    """`files`, the data configuration's list for `what` (e.g. "vqa train"); ValueError when it is empty."""
    if not files:
        raise ValueError(f"the data configuration lists no {what} files")
    return files


def _path(default: object = dataclasses.MISSING) -> typing.Any:
    """A field holding a file path (or a tuple of paths) that resolves against the JSON folder."""
    if default is dataclasses.MISSING:
        return field(metadata={"path": True})
    return field(default=default, metadata={"path": True})


@dataclass(frozen=True)
class PretrainData:
    """LXMERT pre-training annotation files and how to read them."""

    train: tuple[str, ...] = _path()
    valid: tuple[str, ...] = _path(())
    sources: tuple[str, ...] = LXMERT_SOURCES  # sentf keys to use
    answer_table: str | None = _path(None)  # all_ans.json layout; None: no QA task targets
    answer_dsets: tuple[str, ...] | None = None  # LXMERT's qa_sets filter on all_ans "dsets"


@dataclass(frozen=True)
class QAData:
    """VQA or GQA fine-tuning files (LXMERT layout) and the answer table."""

    train: tuple[str, ...] = _path(())
    valid: tuple[str, ...] = _path(())
    test: tuple[str, ...] = _path(())
    ans2label: str | None = _path(None)
    label2ans: str | None = _path(None)

    def load_answer_table(self, section_name: str) -> AnswerTable:
        """The answer table: label2ans (LXMERT's list) and/or ans2label; when both are named they
        must agree, as LXMERT's fine-tuning asserts."""
        if self.label2ans is None and self.ans2label is None:
            raise ValueError(
                f"the data configuration's {section_name!r} section names no answer table (label2ans / ans2label)"
            )
        if self.ans2label is None:
            return AnswerTable.from_label2ans(self.label2ans)
        table = AnswerTable.from_ans2label(self.ans2label)
        if self.label2ans is not None:
            listed, ours = AnswerTable.from_label2ans(self.label2ans).answers, table.answers
            if listed != ours:
                longest = max(len(listed), len(ours))
                label = next(i for i in range(longest) if i >= min(len(listed), len(ours)) or listed[i] != ours[i])
                says = [repr(answers[label]) if label < len(answers) else "nothing" for answers in (listed, ours)]
                raise AnnotationError(
                    f"the data configuration's {section_name!r} section: {self.label2ans} and {self.ans2label} "
                    f"disagree at label {label} ({says[0]} and {says[1]}; {len(listed)} and {len(ours)} "
                    "answers): name one of them, or the two files written together"
                )
        return table


@dataclass(frozen=True)
class NLVR2Data:
    train: tuple[str, ...] = _path(())
    valid: tuple[str, ...] = _path(())
    test: tuple[str, ...] = _path(())


@dataclass(frozen=True)
class RetrievalData:
    """A Karpathy-split file (dataset_flickr30k.json) and which of its splits play which role."""

    annotations: str = _path()
    train_splits: tuple[str, ...] = ("train",)
    valid_splits: tuple[str, ...] = ("val",)
    test_splits: tuple[str, ...] = ("test",)


@dataclass(frozen=True)
class DataConfig:
    stores: tuple[str, ...] = _path()  # HDF5 feature stores, all with the same K
    vocab: str = _path()  # WordPiece vocab.txt (or a checkpoint folder holding one)
    max_text_len: int = 20  # tokens including [CLS] and [SEP]
    num_object_labels: int = 1600  # detector object classes (1600 for Visual Genome)
    num_attribute_labels: int = 400  # detector attribute classes (400 for Visual Genome)
    pretrain: PretrainData | None = None
    vqa: QAData | None = None
    gqa: QAData | None = None
    nlvr2: NLVR2Data | None = None
    flickr30k: RetrievalData | None = None

    def __post_init__(self):
        if not self.stores:
            raise ValueError("DataConfig.stores: at least one feature store is needed")
        if self.max_text_len < 3:
            raise ValueError(f"DataConfig.max_text_len must be >= 3, got {self.max_text_len}")
        for name in ("num_object_labels", "num_attribute_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict, base_dir: str | os.PathLike | None = None) -> DataConfig:
        """Build from plain data; relative paths resolve against base_dir (if given)."""
        return _from_dict(cls, data, Path(base_dir) if base_dir is not None else None, "")

    @staticmethod
    def check_path(path: str | os.PathLike) -> None:
        """Raise ValueError when `path` is a folder, naming the folder's data.json when it holds one.

        `load` checks this itself; the launchers check it while parsing --data, before anything is written.
        """
        path = Path(path)
        if path.is_dir():  # open() would fail with an IsADirectoryError that names no option
            inside = path / "data.json"
            hint = f" (this folder holds {inside})" if inside.is_file() else ""
            raise ValueError(f"{path} is a folder; the data configuration (--data) must be a data.json file{hint}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> DataConfig:
        """Read a JSON file; relative paths resolve against its folder."""
        path = Path(path)
        cls.check_path(path)
        try:
            data = json.loads(read_utf8(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        try:
            return cls.from_dict(data, path.resolve().parent)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        return _to_dict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON; paths under the file's folder are written relative to it."""
        path = Path(path)
        data = _to_dict(self, path.resolve().parent)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)


def _from_dict(cls: type, data: object, base: Path | None, where: str) -> typing.Any:
    if not isinstance(data, dict):
        raise TypeError(f"{where or cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(where + k for k in unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        kwargs[name] = _convert(hints[name], value, base if f.metadata.get("path") else None, base, where + name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing required key(s) {', '.join(where + m for m in missing)}")
    return cls(**kwargs)


def _convert(tp: typing.Any, value: object, path_base: Path | None, base: Path | None, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise TypeError(f"{where}: null is not allowed")
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path_base, base, where)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, base, where + ".")
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
        (inner, _) = typing.get_args(tp)
        return tuple(_convert(inner, v, path_base, base, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {type(value).__name__}")
        if path_base is not None:
            return str(path_base / value) if not os.path.isabs(value) else value
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{where}: expected an integer, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported field type {tp}")


def _to_dict(obj: object, base: Path | None = None) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = _to_dict(value, base)
        elif f.metadata.get("path") and base is not None and value is not None:
            value = tuple(_relative(v, base) for v in value) if isinstance(value, tuple) else _relative(value, base)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _relative(p: str, base: Path) -> str:
    if not os.path.isabs(p):
        return p
    try:
        return str(Path(p).resolve().relative_to(base))
    except ValueError:
        return p
