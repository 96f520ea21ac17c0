"""Image-text retrieval fine-tuning (Flickr30K, Karpathy split) on the ITM score.

Training. Every caption of a training image is a positive pair. The batch also carries, per
positive, `--negatives` N other images (pairs with its caption: image-retrieval negatives) and N
captions of other images (pairs with its image: text-retrieval negatives), sampled uniformly
without replacement.
- Sampled negatives (default): all 2N negatives are trained on.
- Hard negatives (`--hard_negatives H`, UNITER's `train_itm_hard_negatives.py`): the 2N candidates
  are scored without gradients in eval mode, and the H highest-scoring of each kind are trained on;
  N is then the pool (UNITER: 399 candidates, 31 kept, over several GPUs).
Loss: `itm` (default), binary cross-entropy of the ITM head over positives and negatives, as in
pre-training; or `rank`, UNITER's triplet loss max(0, margin + sigmoid(s_neg) - sigmoid(s_pos)),
which UNITER trains with, on sampled and hard negatives alike.

Evaluation scores every (image, caption) pair of the split: rank r takes images r, r + W, ...,
scores each against all captions in chunks of --eval_batch_size, and the rows are summed over
ranks into the full [images, captions] matrix (semvlp.metrics.retrieval_metrics). Single-stream,
that is images x captions full forward passes (1K x 5K for the Flickr30K test split). Two-stream,
each caption's text states and each image's states below L_s are computed once and only the
blocks from L_s on run per pair (SemVLPForRetrieval.score_pairs; the same scores). --eval_images
keeps the first N images of a split (and their captions) for quick checks.
The prediction file holds, per caption, the top-10 images and, per image, the top-10 captions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from semvlp import dist
from semvlp.data.annotations import RetrievalSplit, load_flickr30k
from semvlp.data.batching import gather_tokens, text_batch, visual_batch
from semvlp.data.config import DataConfig
from semvlp.data.loader import KeyedBatchDataset
from semvlp.data.store import FeatureStoreSet
from semvlp.data.tokenizer import tokenize_texts
from semvlp.metrics import rankings, retrieval_metrics
from semvlp.model import SemVLPForRetrieval
from semvlp.run_config import ConfigError, option
from semvlp.tasks.finetune import FinetuneConfig, FinetuneTask, image_rows, model_inputs

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
VISUAL_KEYS = ("visual_feats", "visual_pos", "visual_attention_mask")
LOSSES = ("itm", "rank")


@dataclass(frozen=True)
class RetrievalConfig(FinetuneConfig):
    """Flickr30K image-text retrieval fine-tuning."""

    output_dir: str = "runs/retrieval"
    negatives: int = option(1, "per positive and direction: sampled negatives, or the pool hard negatives come from")
    hard_negatives: int = option(0, "> 0: train on the H hardest of the pool per direction (UNITER)")
    loss: str = option("itm", "itm (binary cross-entropy) | rank (UNITER's triplet loss)")
    margin: float = option(0.2, "margin of the rank loss")
    eval_images: int = option(0, "> 0: evaluate and predict on the first N images of a split only")

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss {self.loss!r}; expected one of {LOSSES}")
        if self.negatives < 1 or self.hard_negatives < 0 or self.eval_images < 0:
            raise ConfigError("--negatives must be >= 1, --hard_negatives and --eval_images >= 0")
        if self.eval_batches:
            raise ConfigError(f"--eval_batches {self.eval_batches}: retrieval scores all pairs of a split's images and "
                              "captions; evaluate on fewer images with --eval_images")  # fmt: skip
        if 0 < self.negatives <= self.hard_negatives:
            raise ConfigError(f"--hard_negatives {self.hard_negatives} must be below the pool --negatives "
                              f"{self.negatives}")  # fmt: skip


def _split_rows(split: RetrievalSplit, stores: FeatureStoreSet, skip_missing: bool, what: str):
    rows = image_rows(split.image_ids, stores, what, skip_missing, [split.file] * len(split.image_ids))
    keep = rows >= 0
    return (split.select_images(keep), rows[keep], int((~keep).sum())) if not keep.all() else (split, rows, 0)


class RetrievalTrainDataset(KeyedBatchDataset):
    """One example per caption. A batch: visual tensors [B, 1+N, K, ...] (column 0 the caption's own
    image, then N others) and text [B*(1+N), T] (row b*(1+N) the caption, then N captions of other
    images), plus `index` [B]."""

    def __init__(self, split: RetrievalSplit, rows: np.ndarray, stores: FeatureStoreSet, tokenizer,
                 max_text_len: int, negatives: int, what: str):  # fmt: skip
        split.require_two_images(what)  # a caption's negatives are the other images
        # Each image's captions (sorted): a caption's negative captions are the others.
        order = np.argsort(split.caption_image, kind="stable")
        counts = np.bincount(split.caption_image, minlength=len(split.image_ids))
        self.captions_of = np.split(order, np.cumsum(counts)[:-1])
        most = min(len(split.image_ids) - 1, len(split.captions) - int(counts.max()))
        if negatives > most:
            raise ConfigError(
                f"--negatives {negatives}: {what} has {len(split.image_ids)} images and {len(split.captions)} "
                f"captions, so at most {most} distinct negatives of each kind per caption"
            )
        self.split, self.rows, self.stores, self.negatives = split, rows, stores, negatives
        self.token_ids, self.token_offsets = tokenize_texts(tokenizer, split.captions, max_text_len)

    def __len__(self) -> int:
        return len(self.split.captions)

    def make_batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        n = self.negatives
        own = self.split.caption_image[indices]  # [B]
        # Without replacement, as UNITER samples them: a pool never holds a negative twice.
        neg_images = np.stack([_draw_others(rng, len(self.split.image_ids), n, np.array([o])) for o in own])
        neg_captions = np.stack([_draw_others(rng, len(self), n, self.captions_of[o]) for o in own])
        captions = np.concatenate([indices[:, None], neg_captions], 1).reshape(-1)
        images = np.concatenate([own[:, None], neg_images], 1)
        batch = text_batch(*gather_tokens(self.token_ids, self.token_offsets, captions))
        batch.update(visual_batch(self.stores, self.rows[images]))
        batch["index"] = torch.from_numpy(indices.copy())
        return batch


def _draw_others(rng: np.random.Generator, population: int, n: int, excluded: np.ndarray) -> np.ndarray:
    """n distinct indices of range(population) outside `excluded` (sorted, distinct), uniformly."""
    drawn = rng.choice(population - len(excluded), n, replace=False)
    for index in excluded:  # ascending: shift the draws over each excluded index in turn
        drawn[drawn >= index] += 1
    return drawn


@dataclass
class RetrievalEvalSplit:
    """Images and captions of an evaluation split, captions tokenized once."""

    split: RetrievalSplit
    rows: np.ndarray
    token_ids: np.ndarray
    token_offsets: np.ndarray
    labeled = True


class RetrievalTask(FinetuneTask):
    model_class = SemVLPForRetrieval
    metric = "r_mean"

    def __init__(self, run: RetrievalConfig, data: DataConfig, tokenizer, stores: FeatureStoreSet,
                 splits: tuple[str, ...]):  # fmt: skip
        if data.flickr30k is None:
            raise ConfigError(f"--data {run.data}: no 'flickr30k' section (docs/data_format.md)")
        self.stores = stores
        datasets, notes = {}, []
        for split in splits:
            what = f"flickr30k {split}"
            names = getattr(data.flickr30k, f"{split}_splits")
            part, rows, skipped = _split_rows(load_flickr30k(data.flickr30k.annotations, names), stores,
                                              run.skip_missing, what)  # fmt: skip
            if split == "train":
                datasets[split] = RetrievalTrainDataset(part, rows, stores, tokenizer, data.max_text_len, run.negatives,
                                                        what)  # fmt: skip
            else:
                if run.eval_images:
                    keep = np.arange(len(part.image_ids)) < run.eval_images
                    part, rows = part.select_images(keep), rows[keep]
                ids, offsets = tokenize_texts(tokenizer, part.captions, data.max_text_len)
                datasets[split] = RetrievalEvalSplit(part, rows, ids, offsets)
            notes.append(f"{what}: {len(part.image_ids)} images, {len(part.captions)} captions"
                         + (f", {skipped} images skipped (in no store)" if skipped else ""))  # fmt: skip
        super().__init__(run, datasets)
        self.notes = notes
        kept = run.hard_negatives or run.negatives
        # Training pairs per positive, plus the pool's scoring forward passes (1/3 of a training pass each).
        self.pairs_per_sample = 1 + 2 * kept + (2 * run.negatives / 3 if run.hard_negatives else 0)

    def model_fields(self) -> dict:
        return {"id2label": {0: "mismatched", 1: "matched"}}  # the ITM head's outputs, not an answer table

    # -- training
    def loss(self, engine, batch: dict, mode: str, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        run = self.run
        b, m = batch["visual_feats"].shape[:2]  # m = 1 + N candidates per positive, column 0 positive
        n = m - 1
        text = {k: batch[k] for k in TEXT_KEYS}  # [B*m, T]
        visual = {k: batch[k].flatten(0, 1) for k in VISUAL_KEYS if k in batch}  # [B*m, K, ...]
        device = batch["input_ids"].device
        positive = (torch.arange(b, device=device) * m)[:, None]  # [B, 1] row of each positive
        others = positive + torch.arange(1, m, device=device)  # [B, N] rows of its candidates
        # (text row, image row) of each negative: N image negatives, then N caption negatives.
        neg_text = torch.cat([positive.expand(b, n), others], 1)  # [B, 2N]
        neg_image = torch.cat([others, positive.expand(b, n)], 1)
        if run.hard_negatives:
            engine.eval()
            with torch.no_grad():
                pool = self._score(engine, text, visual, neg_text, neg_image, mode).view(b, 2 * n)
            engine.train()
            hard = run.hard_negatives
            pick = torch.cat([pool[:, :n].topk(hard, dim=1).indices, n + pool[:, n:].topk(hard, dim=1).indices], 1)
            neg_text, neg_image = neg_text.gather(1, pick), neg_image.gather(1, pick)
        pair_text = torch.cat([positive, neg_text], 1)  # [B, 1 + 2H]
        pair_image = torch.cat([positive, neg_image], 1)
        labels = torch.zeros_like(pair_text)
        labels[:, 0] = 1
        inputs = self._pairs(text, visual, pair_text, pair_image)
        if run.loss == "itm":
            out = engine(**inputs, labels=labels.reshape(-1), mode=mode)
            return out.loss, {"itm": out.loss.detach()}
        scores = torch.sigmoid(SemVLPForRetrieval.score(engine(**inputs, mode=mode).logits)).view(pair_text.shape)
        loss = F.relu(run.margin + scores[:, 1:] - scores[:, :1]).mean()
        return loss, {"rank": loss.detach()}

    @staticmethod
    def _pairs(text: dict, visual: dict, text_rows: torch.Tensor, image_rows_: torch.Tensor) -> dict:
        t, v = text_rows.reshape(-1), image_rows_.reshape(-1)
        return {**{k: x[t] for k, x in text.items()}, **{k: x[v] for k, x in visual.items()}}

    def _score(self, engine, text, visual, text_rows, image_rows_, mode) -> torch.Tensor:
        """Scores of the (text row, image row) pairs, flattened, in chunks of --eval_batch_size pairs."""
        t, v = text_rows.reshape(-1), image_rows_.reshape(-1)
        scores = []
        for start in range(0, len(t), self.eval_batch_size):
            part = slice(start, start + self.eval_batch_size)
            logits = engine(**self._pairs(text, visual, t[part], v[part]), mode=mode).logits
            scores.append(SemVLPForRetrieval.score(logits))
        return torch.cat(scores)

    # -- evaluation
    def predictions(self, engine, split: str, limit: int) -> torch.Tensor:
        """The [images, captions] score matrix of a split (`limit` is 0: --eval_images limits it)."""
        ev: RetrievalEvalSplit = self.datasets[split]
        num_images, num_captions = len(ev.split.image_ids), len(ev.split.captions)
        scores = torch.zeros(num_images, num_captions, device=engine.device)
        chunk = self.eval_batch_size
        two_stream = self.run.mode == "two"
        # Two-stream scoring calls the model's pieces (ZeRO-1/2: every rank holds the full weights).
        model: SemVLPForRetrieval | None = engine.module if two_stream else None
        texts = []
        for start in range(0, num_captions, chunk):
            caps = np.arange(start, min(start + chunk, num_captions))
            tb = text_batch(*gather_tokens(ev.token_ids, ev.token_offsets, caps))
            text = {k: tb[k].to(engine.device) for k in TEXT_KEYS}
            texts.append((start, model.semvlp.two_stream_text(**text) if two_stream else text))
        for i in range(dist.rank(), num_images, dist.world_size()):
            image = visual_batch(self.stores, ev.rows[i : i + 1])
            image = {k: v.to(engine.device) for k, v in model_inputs(image).items()}
            if two_stream:
                image = model.semvlp.two_stream_image(**image)
            for start, text in texts:
                if two_stream:
                    size = text.states.shape[0]
                    repeated = image.rows(torch.zeros(size, dtype=torch.long, device=engine.device))
                    pair_scores = model.score_pairs(repeated, text)
                else:
                    size = text["input_ids"].shape[0]
                    pairs = {**text, **{k: v.expand(size, *v.shape[1:]) for k, v in image.items()}}
                    pair_scores = SemVLPForRetrieval.score(engine(**pairs, mode="single").logits)
                scores[i, start : start + size] = pair_scores.float()
        return dist.all_reduce_sum(scores).cpu()  # each row was filled by exactly one rank

    def metrics(self, split: str, predictions: torch.Tensor) -> dict[str, float]:
        ev: RetrievalEvalSplit = self.datasets[split]
        out = retrieval_metrics(predictions, torch.from_numpy(ev.split.caption_image))
        out.update(images=len(ev.split.image_ids), captions=len(ev.split.captions))
        return out

    def write_predictions(self, split: str, predictions: torch.Tensor, out_dir: Path) -> Path:
        ev: RetrievalEvalSplit = self.datasets[split]
        ids = ev.split.image_ids
        by_caption, by_image = rankings(predictions, k=10)
        record = {
            "split": split,
            "mode": self.run.mode,
            "image_retrieval": [
                {"caption_index": c, "caption": ev.split.captions[c], "image_id": ids[ev.split.caption_image[c]],
                 "ranked_image_ids": [ids[j] for j in top]}
                for c, top in enumerate(by_caption.tolist())
            ],
            "text_retrieval": [
                {"image_id": ids[i], "ranked_caption_indices": top,
                 "true_caption_indices": np.flatnonzero(ev.split.caption_image == i).tolist()}
                for i, top in enumerate(by_image.tolist())
            ],
        }  # fmt: skip
        path = out_dir / f"retrieval_{split}.json"
        path.write_text(json.dumps(record))
        return path
