"""NLVR2 fine-tuning: is a statement true of an ordered pair of images?

SemVLPForNLVR2 encodes (statement, img0) and (statement, img1) separately, concatenates the two
pooled vectors and classifies (LXMERT). Metrics: accuracy, and consistency when statements have
several image pairs (semvlp.metrics.nlvr2_metrics). Prediction file: CSV lines
`identifier,True|False`, no header, as the official evaluation script reads them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from semvlp.data.annotations import NLVR2Example, load_nlvr2
from semvlp.data.batching import gather_tokens, text_batch, visual_batch
from semvlp.data.config import DataConfig
from semvlp.data.loader import KeyedBatchDataset
from semvlp.data.store import FeatureStoreSet
from semvlp.data.tokenizer import tokenize_texts
from semvlp.metrics import nlvr2_metrics
from semvlp.model import SemVLPForNLVR2
from semvlp.run_config import ConfigError
from semvlp.tasks.finetune import (
    SKIPPED,
    FinetuneConfig,
    FinetuneTask,
    image_rows,
    labelled_splits,
    model_inputs,
)


class NLVR2Dataset(KeyedBatchDataset):
    """Statements of one split; visual tensors are [B, 2, K, ...] (img0, img1); `labels` [B] when labelled."""

    def __init__(self, examples: list[NLVR2Example], stores: FeatureStoreSet, tokenizer, max_text_len: int,
                 skip_missing: bool, what: str):  # fmt: skip
        ids = [e.img0 for e in examples] + [e.img1 for e in examples]
        files = [e.file for e in examples] * 2
        rows = image_rows(ids, stores, what, skip_missing, files).reshape(2, -1).T  # [n, 2]
        keep = (rows >= 0).all(1)
        self.num_skipped = int((~keep).sum())
        self.examples = [e for e, k in zip(examples, keep, strict=True) if k]
        if not self.examples:
            raise ValueError(f"{what}: no statements")
        self.rows = rows[keep]
        self.stores = stores
        self.num_unlabeled = sum(e.label is None for e in self.examples)
        self.labeled = self.num_unlabeled == 0  # a test split may mix files with and without labels: no metrics
        self.token_ids, self.token_offsets = tokenize_texts(tokenizer, [e.sent for e in self.examples], max_text_len)

    def __len__(self) -> int:
        return len(self.examples)

    def make_batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        input_ids, lengths = gather_tokens(self.token_ids, self.token_offsets, indices)
        batch = text_batch(input_ids, lengths)
        batch.update(visual_batch(self.stores, self.rows[indices]))
        batch["index"] = torch.from_numpy(indices.copy())
        if self.labeled:
            batch["labels"] = torch.tensor([self.examples[i].label for i in indices.tolist()], dtype=torch.int64)
        return batch


class NLVR2Task(FinetuneTask):
    model_class = SemVLPForNLVR2
    metric = "accuracy"
    pairs_per_sample = 2  # the statement is encoded with each image

    def __init__(self, run: FinetuneConfig, data: DataConfig, tokenizer, stores: FeatureStoreSet,
                 splits: tuple[str, ...]):  # fmt: skip
        if data.nlvr2 is None:
            raise ConfigError(f"--data {run.data}: no 'nlvr2' section (docs/data_format.md)")
        datasets, notes = {}, []
        for split, what, examples in labelled_splits(run, data.nlvr2, "nlvr2", splits, load_nlvr2, "statement", notes):
            ds = NLVR2Dataset(examples, stores, tokenizer, data.max_text_len, run.skip_missing, what)
            datasets[split] = ds
            some = "" if ds.num_unlabeled == len(ds) else f", {ds.num_unlabeled} of them"
            unlabeled = f"{some} without labels" if ds.num_unlabeled else ""
            skipped = f", {ds.num_skipped} skipped (an image in no store): {SKIPPED}" if ds.num_skipped else ""
            notes.append(f"{what}: {len(ds)} statements{unlabeled}{skipped}")
        super().__init__(run, datasets)
        self.notes = notes

    def model_fields(self) -> dict:
        return {"id2label": {0: "false", 1: "true"}}  # the classifier's outputs, not an init's answer table

    def loss(self, engine, batch: dict, mode: str, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = engine(**model_inputs(batch), labels=batch["labels"], mode=mode)
        return out.loss, {"ce": out.loss.detach()}

    def predictions(self, engine, split: str, limit: int) -> dict[int, int]:
        def predict(batch: dict) -> list[int]:
            return engine(**model_inputs(batch), mode=self.run.mode).logits.argmax(-1).tolist()

        return self.classify(engine, split, limit, predict)

    def metrics(self, split: str, predictions: dict[int, int]) -> dict[str, float]:
        examples = self.datasets[split].examples
        chosen = [examples[i] for i in predictions]
        out = nlvr2_metrics([e.identifier for e in chosen], list(predictions.values()), [e.label for e in chosen])
        out["statements"] = len(chosen)
        return out

    def write_predictions(self, split: str, predictions: dict[int, int], out_dir: Path) -> Path:
        examples = self.datasets[split].examples
        path = out_dir / f"nlvr2_{split}.csv"
        path.write_text("".join(f"{examples[i].identifier},{bool(p)}\n" for i, p in predictions.items()))
        return path
