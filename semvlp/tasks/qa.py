"""Question answering fine-tuning: VQA v2 and GQA, one task with a small difference object.

Both classify over an answer table with SemVLPForQuestionAnswering (BCE against the label's
scores, as LXMERT). They differ only in what `QAVariant` holds:

|                | VQA                                  | GQA                                   |
|----------------|--------------------------------------|---------------------------------------|
| data section   | `vqa`                                | `gqa`                                 |
| metric         | soft score (`score`)                 | exact match (`accuracy`)              |
| prediction file| `[{"question_id", "answer"}]`        | `[{"questionId", "prediction"}]`      |

Label answers are looked up in the table as they are written (LXMERT's fine-tuning does the
same); answers outside the table are dropped from the targets, counted per split, and the score
they cap is reported (semvlp.metrics.answer_coverage).

The answer head starts fresh, or with --answer_head_from_qa from the pre-training QA head of the
--init_from export, as LXMERT's published fine-tuning runs do (its --loadLXMERTQA).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semvlp import checkpoint, dist
from semvlp.config import is_semvlp_export, read_config_json
from semvlp.data.annotations import AnswerTable, QAExample, load_gqa, load_vqa
from semvlp.data.batching import gather_tokens, text_batch, visual_batch
from semvlp.data.config import DataConfig, QAData
from semvlp.data.loader import KeyedBatchDataset
from semvlp.data.store import FeatureStoreSet
from semvlp.data.tokenizer import tokenize_texts
from semvlp.metrics import answer_coverage, exact_match, predicted_answers, vqa_score
from semvlp.model import SemVLPForQuestionAnswering
from semvlp.run_config import ConfigError, option
from semvlp.tasks.finetune import (
    SKIPPED,
    FinetuneConfig,
    FinetuneTask,
    image_rows,
    labelled_splits,
    model_inputs,
)


@dataclass(frozen=True)
class QAConfig(FinetuneConfig):
    """The options of both question-answering launchers."""

    answer_head_from_qa: bool = option(
        False,
        "start the answer head from the --init_from export's pre-training QA head (LXMERT's --loadLXMERTQA): "
        "its transform, and its rows of the answers both tables hold",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.answer_head_from_qa and (self.init_from is None or self.predict_only):
            raise ConfigError("--answer_head_from_qa starts training from --init_from, a pre-training export")


def pretraining_qa_head(folder: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A pre-training export's QA head (tensor names without "qa_head.") and the answer table it was
    trained on, row by row (config.id2label); ConfigError naming the folder where there is none."""
    if not is_semvlp_export(folder):
        raise ConfigError(f"--answer_head_from_qa: --init_from {folder} is not a SemVLP export")
    config = read_config_json(Path(folder) / checkpoint.CONFIG)
    labels = config.get("id2label") or {}
    qa_head = checkpoint.read_weights(folder, "qa_head.")
    if not qa_head or len(labels) != config.get("num_qa_labels"):
        raise ConfigError(
            f"--answer_head_from_qa: {folder} holds no pre-training QA head with its answer table "
            "(a pre-training export of a run whose data.json named one)"
        )
    return qa_head, [labels[i] for i in sorted(labels, key=int)]


@dataclass(frozen=True)
class QAVariant:
    name: str  # the DataConfig section
    metric: str  # the dev metric's name
    soft_score: bool  # VQA soft score (True) or exact match (False)
    id_key: str  # prediction file: question id key
    answer_key: str  # prediction file: answer key
    loader: object  # annotations reader

    def section(self, data: DataConfig, path: str | None) -> QAData:
        """The variant's section of `data`, read from `path` (--data)."""
        section = getattr(data, self.name)
        if section is None:
            raise ConfigError(f"--data {path}: no {self.name!r} section (docs/data_format.md)")
        return section

    def score(self, predictions: list[str], labels: list[dict[str, float]]) -> float:
        return vqa_score(predictions, labels) if self.soft_score else exact_match(predictions, labels)

    def record(self, question_id: int | str, answer: str) -> dict:
        return {self.id_key: question_id if self.soft_score else str(question_id), self.answer_key: answer}


VQA = QAVariant("vqa", "score", True, "question_id", "answer", load_vqa)
GQA = QAVariant("gqa", "accuracy", False, "questionId", "prediction", load_gqa)


class QADataset(KeyedBatchDataset):
    """Questions of one split; a batch holds text, visual inputs, `index` and (labelled splits)
    `answer_targets` [B, num_answers] float32 scores."""

    def __init__(self, examples: list[QAExample], stores: FeatureStoreSet, tokenizer, table: AnswerTable,
                 max_text_len: int, skip_missing: bool, what: str):  # fmt: skip
        rows = image_rows([e.img_id for e in examples], stores, what, skip_missing, [e.file for e in examples])
        self.num_skipped = int((rows < 0).sum())
        self.examples = [e for e, r in zip(examples, rows, strict=True) if r >= 0]
        if not self.examples:
            raise ValueError(f"{what}: no questions")
        self.rows = rows[rows >= 0]
        self.stores = stores
        self.num_answers = len(table)
        self.num_unlabeled = sum(e.label is None for e in self.examples)
        self.labeled = self.num_unlabeled == 0  # a test split may mix files with and without labels: no metrics
        self.token_ids, self.token_offsets = tokenize_texts(tokenizer, [e.sent for e in self.examples], max_text_len)
        # Targets as (example, answer id, score) triples: a dense [n, A] table would be 630K x 3129 for VQA.
        triples = [(i, a, s) for i, e in enumerate(self.examples) if e.label
                   for a, s in table.label_ids(e.label, normalize=False).items()]  # fmt: skip
        triples.sort()
        self.target_offsets = np.searchsorted([t[0] for t in triples], np.arange(len(self.examples) + 1))
        self.target_answers = np.array([t[1] for t in triples], np.int64)
        self.target_scores = np.array([t[2] for t in triples], np.float32)

    def __len__(self) -> int:
        return len(self.examples)

    def make_batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        input_ids, lengths = gather_tokens(self.token_ids, self.token_offsets, indices)
        batch = text_batch(input_ids, lengths)
        batch.update(visual_batch(self.stores, self.rows[indices]))
        batch["index"] = torch.from_numpy(indices.copy())
        if self.labeled:
            targets = torch.zeros(len(indices), self.num_answers)
            for j, i in enumerate(indices.tolist()):
                a, z = self.target_offsets[i], self.target_offsets[i + 1]
                targets[j, self.target_answers[a:z]] = torch.from_numpy(self.target_scores[a:z])
            batch["answer_targets"] = targets
        return batch


class QATask(FinetuneTask):
    model_class = SemVLPForQuestionAnswering

    def __init__(self, run: QAConfig, variant: QAVariant, data: DataConfig, tokenizer, stores: FeatureStoreSet,
                 splits: tuple[str, ...]):  # fmt: skip
        self.variant = variant
        self.qa_head = pretraining_qa_head(run.init_from) if run.answer_head_from_qa else None
        self.metric = variant.metric
        section = variant.section(data, run.data)
        self.table = section.load_answer_table(variant.name)
        datasets = {}
        notes = []
        read = labelled_splits(run, section, variant.name, splits, variant.loader, "question", notes)
        for split, what, examples in read:
            ds = QADataset(examples, stores, tokenizer, self.table, data.max_text_len, run.skip_missing, what)
            datasets[split] = ds
            if ds.num_skipped:
                notes.append(f"{what}: {ds.num_skipped} questions skipped (image in no store): {SKIPPED}")
            if ds.labeled:
                cov = answer_coverage([e.label for e in ds.examples], self.table, variant.soft_score)
                notes.append(
                    f"{what}: {cov.questions} questions, {cov.questions_with_outside_answers} with answers outside "
                    f"the {len(self.table)}-answer table ({cov.outside_answers} distinct), {cov.unanswerable} "
                    f"unanswerable: the {variant.metric} is capped at {cov.score_cap:.4f}"
                )
            else:
                some = "" if ds.num_unlabeled == len(ds) else f", {ds.num_unlabeled} of them"
                notes.append(f"{what}: {len(ds)} questions{some} without labels (predictions only)")
        super().__init__(run, datasets)
        self.notes = notes

    def model_fields(self) -> dict:
        # id2label (HuggingFace's name) keeps the answer strings in the export's config.json, so a
        # fine-tuned export names its answers on its own, and --predict_only can check the data's table.
        return {"num_qa_labels": len(self.table), "id2label": dict(enumerate(self.table.answers))}

    def initialize(self, model: SemVLPForQuestionAnswering) -> None:
        super().initialize(model)
        if self.qa_head is not None:
            tensors, answers = self.qa_head
            try:
                shared = model.start_from_qa_head(tensors, answers)
            except RuntimeError as e:  # a QA head of another hidden size
                raise ConfigError(
                    f"--answer_head_from_qa: the QA head of {self.run.init_from} does not fit: {e}"
                ) from e
            if dist.is_main():
                print(
                    f"--answer_head_from_qa: the answer head's transform, and its rows of the {shared} of "
                    f"{len(self.table)} answers that the {len(answers)}-answer QA table holds, are now those of the "
                    f"QA head of {self.run.init_from}",
                    flush=True,
                )

    def loss(self, engine, batch: dict, mode: str, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = engine(**model_inputs(batch), answer_targets=batch["answer_targets"], mode=mode)
        return out.loss, {"qa_bce": out.loss.detach()}

    def predictions(self, engine, split: str, limit: int) -> dict[int, str]:
        def predict(batch: dict) -> list[str]:
            logits = engine(**model_inputs(batch), mode=self.run.mode).logits
            return [self.table.id2ans(i) for i in predicted_answers(logits).tolist()]

        return self.classify(engine, split, limit, predict)

    def metrics(self, split: str, predictions: dict[int, str]) -> dict[str, float]:
        examples = self.datasets[split].examples
        labels = [examples[i].label for i in predictions]
        out = {self.variant.metric: self.variant.score(list(predictions.values()), labels)}
        # over the questions evaluated: with --eval_batches N that is a part of the split
        out[f"{self.variant.metric}_cap"] = answer_coverage(labels, self.table, self.variant.soft_score).score_cap
        out["questions"] = len(labels)
        return out

    def write_predictions(self, split: str, predictions: dict[int, str], out_dir: Path) -> Path:
        examples = self.datasets[split].examples
        records = [self.variant.record(examples[i].question_id, answer) for i, answer in predictions.items()]
        path = out_dir / f"{self.variant.name}_{split}.json"
        path.write_text(json.dumps(records))
        return path
