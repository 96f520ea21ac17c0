"""Fine-tuning batches for VQA, GQA, NLVR2 and Flickr30K retrieval (LXMERT / UNITER conventions).

Entry point:

    from semvlp.data import build_finetune_loader
    loader = build_finetune_loader(
        data_config,        # DataConfig or path to data.json
        task="vqa",         # "vqa" | "gqa" | "nlvr2" | "flickr30k"
        split="train",      # "train" (shuffled, full batches) | "valid" | "test" (fixed order, all)
        tokenizer=None, batch_size=32, rank=0, world_size=1, seed=0, num_workers=0,
        pin_memory=None, skip_missing=False)
    loader.dataset          # QADataset / NLVR2Dataset / RetrievalTrainDataset / RetrievalEvalDataset

Every batch has the text keys of pre-training (input_ids, attention_mask, token_type_ids [B,T]
and the packed form) and, per task:
    VQA / GQA   visual_feats [B,K,D] f16, visual_pos [B,K,4] f32, (visual_attention_mask [B,K]),
                answer_targets [B, num_answers] f32 (soft scores as given in the label dicts;
                absent for unlabelled test files), question_ids (list)
    NLVR2       visual_feats [B,2,K,D], visual_pos [B,2,K,4], (visual_attention_mask [B,2,K]),
                labels [B] int64 (absent if unlabelled), identifiers (list)
    Flickr30K   train: visual_feats [B,K,D], visual_pos, itm_labels [B] int64 (half the pairs get a
                random other image), image_index / caption_index [B] int64;
                valid/test: every (image, caption) pair, image-major (pair p = image p // C,
                caption p % C), with image_index / caption_index to fill a score matrix
                [num_images, num_captions]; dataset.split.caption_image maps captions to images.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from semvlp.data.annotations import (
    AnswerTable,
    NLVR2Example,
    QAExample,
    RetrievalSplit,
    check_images,
    load_flickr30k,
    load_gqa,
    load_nlvr2,
    load_vqa,
)
from semvlp.data.batching import gather_tokens, text_batch, visual_batch
from semvlp.data.config import DataConfig
from semvlp.data.loader import KeyedBatchDataset, ResumableLoader
from semvlp.data.store import FeatureStoreSet, open_stores
from semvlp.data.tokenizer import MAX_TEXT_LEN, load_tokenizer, tokenize_texts

logger = logging.getLogger(__name__)

TASKS = ("vqa", "gqa", "nlvr2", "flickr30k")


class QADataset(KeyedBatchDataset):
    """VQA or GQA questions; `dataset[BatchKey]` is a batch with soft answer targets.

    Answers absent from the answer table are dropped from the targets (LXMERT's GQA reader
    does the same); questions whose image is missing raise MissingImagesError unless skip_missing.
    """

    def __init__(self, examples: list[QAExample], stores: FeatureStoreSet, tokenizer,
                 answer_table: AnswerTable, max_text_len: int = MAX_TEXT_LEN, skip_missing: bool = False):
        keep = check_images([e.img_id for e in examples], stores, "QA annotations", skip_missing)
        self.examples = [e for e, k in zip(examples, keep, strict=True) if k]
        self.num_skipped = len(examples) - len(self.examples)
        self.stores, self.answer_table = stores, answer_table
        self.rows = stores.rows([e.img_id for e in self.examples])
        self.token_ids, self.token_offsets = tokenize_texts(tokenizer, [e.sent for e in self.examples],
                                                            max_text_len)
        labelled = [e.label is not None for e in self.examples]
        self.has_labels = all(labelled)
        if any(labelled) and not self.has_labels:
            raise ValueError("QA annotations mix labelled and unlabelled questions; split them into files")
        self.targets = [answer_table.label_ids(e.label, normalize=False) for e in self.examples] \
            if self.has_labels else None

    def __len__(self) -> int:
        return len(self.examples)

    def make_batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        input_ids, lengths = gather_tokens(self.token_ids, self.token_offsets, indices)
        batch = text_batch(input_ids, lengths)
        batch.update(visual_batch(self.stores, self.rows[indices]))
        if self.targets is not None:
            targets = torch.zeros(len(indices), len(self.answer_table), dtype=torch.float32)
            for j, i in enumerate(indices.tolist()):
                for ans, score in self.targets[i].items():
                    targets[j, ans] = score
            batch["answer_targets"] = targets
        batch["question_ids"] = [self.examples[i].question_id for i in indices.tolist()]
        return batch


class NLVR2Dataset(KeyedBatchDataset):
    """NLVR2 statements over two images; visual tensors carry an extra axis of size 2."""

    def __init__(self, examples: list[NLVR2Example], stores: FeatureStoreSet, tokenizer,
                 max_text_len: int = MAX_TEXT_LEN, skip_missing: bool = False):
        ids = [i for e in examples for i in (e.img0, e.img1)]
        present = check_images(ids, stores, "NLVR2 annotations", skip_missing).reshape(-1, 2).all(1)
        self.examples = [e for e, k in zip(examples, present, strict=True) if k]
        self.num_skipped = len(examples) - len(self.examples)
        self.stores = stores
        self.rows = stores.rows([i for e in self.examples for i in (e.img0, e.img1)]).reshape(-1, 2)
        self.token_ids, self.token_offsets = tokenize_texts(tokenizer, [e.sent for e in self.examples],
                                                            max_text_len)
        self.has_labels = all(e.label is not None for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def make_batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        input_ids, lengths = gather_tokens(self.token_ids, self.token_offsets, indices)
        batch = text_batch(input_ids, lengths)
        batch.update(visual_batch(self.stores, self.rows[indices]))
        if self.has_labels:
            batch["labels"] = torch.tensor([self.examples[i].label for i in indices.tolist()], dtype=torch.int64)
        batch["identifiers"] = [self.examples[i].identifier for i in indices.tolist()]
        return batch


class _RetrievalBase(KeyedBatchDataset):
    def __init__(self, split: RetrievalSplit, stores: FeatureStoreSet, tokenizer,
                 max_text_len: int = MAX_TEXT_LEN, skip_missing: bool = False):
        keep = check_images(split.image_ids, stores, "retrieval annotations", skip_missing)
        self.num_skipped = int((~keep).sum())
        self.split = split.select_images(keep) if self.num_skipped else split
        self.stores = stores
        self.image_rows = stores.rows(self.split.image_ids)
        self.token_ids, self.token_offsets = tokenize_texts(tokenizer, self.split.captions, max_text_len)

    def pair_batch(self, image_index: np.ndarray, caption_index: np.ndarray,
                   itm_labels: np.ndarray | None = None) -> dict:
        """A batch of arbitrary (image, caption) pairs, e.g. hard negatives a task has mined.

        Each distinct image is read once.
        """
        image_index = np.asarray(image_index, np.int64)
        caption_index = np.asarray(caption_index, np.int64)
        input_ids, lengths = gather_tokens(self.token_ids, self.token_offsets, caption_index)
        batch = text_batch(input_ids, lengths)
        unique, inverse = np.unique(image_index, return_inverse=True)
        visual = visual_batch(self.stores, self.image_rows[unique])
        if len(unique) < len(image_index):
            inv = torch.from_numpy(inverse)
            visual = {k: v.index_select(0, inv) for k, v in visual.items()}
        batch.update(visual)
        batch["image_index"] = torch.from_numpy(image_index)
        batch["caption_index"] = torch.from_numpy(caption_index)
        if itm_labels is not None:
            batch["itm_labels"] = torch.from_numpy(np.asarray(itm_labels, np.int64))
        return batch


class RetrievalTrainDataset(_RetrievalBase):
    """One example per caption; with probability `mismatch_prob` its image is replaced by a
    random other image (itm_labels 0)."""

    def __init__(self, split: RetrievalSplit, stores: FeatureStoreSet, tokenizer,
                 max_text_len: int = MAX_TEXT_LEN, skip_missing: bool = False, mismatch_prob: float = 0.5):
        super().__init__(split, stores, tokenizer, max_text_len, skip_missing)
        if len(self.split.image_ids) < 2:
            raise ValueError("retrieval training needs at least two images")
        self.mismatch_prob = mismatch_prob

    def __len__(self) -> int:
        return len(self.split.captions)

    def make_batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        own = self.split.caption_image[indices]
        matched = rng.random(len(indices)) >= self.mismatch_prob
        n = len(self.split.image_ids)
        other = (own + rng.integers(1, n, len(indices))) % n  # uniform over the other images
        return self.pair_batch(np.where(matched, own, other), indices, matched.astype(np.int64))


class RetrievalEvalDataset(_RetrievalBase):
    """Every (image, caption) pair, image-major: pair p is image p // C with caption p % C."""

    def __len__(self) -> int:
        return len(self.split.image_ids) * len(self.split.captions)

    def make_batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        c = len(self.split.captions)
        return self.pair_batch(indices // c, indices % c)


def build_finetune_dataset(
    data_config: DataConfig | str | os.PathLike,
    task: str,
    split: str,
    tokenizer=None,
    skip_missing: bool = False,
) -> KeyedBatchDataset:
    """The dataset of one task ("vqa", "gqa", "nlvr2", "flickr30k") and split ("train", "valid", "test")."""
    cfg = data_config if isinstance(data_config, DataConfig) else DataConfig.load(data_config)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
    section = getattr(cfg, task)
    if section is None:
        raise ValueError(f"the data configuration has no {task!r} section")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.vocab)
    stores = open_stores(cfg.stores)
    kw = dict(max_text_len=cfg.max_text_len, skip_missing=skip_missing)
    if task == "flickr30k":
        names = {"train": section.train_splits, "valid": section.valid_splits, "test": section.test_splits}[split]
        data = load_flickr30k(section.annotations, names)
        cls = RetrievalTrainDataset if split == "train" else RetrievalEvalDataset
        return cls(data, stores, tokenizer, **kw)
    files = getattr(section, split)
    if not files:
        raise ValueError(f"the data configuration lists no {task} {split} files")
    if task == "nlvr2":
        return NLVR2Dataset(load_nlvr2(files), stores, tokenizer, **kw)
    if section.label2ans is not None:
        table = AnswerTable.from_label2ans(section.label2ans)
    elif section.ans2label is not None:
        table = AnswerTable.from_ans2label(section.ans2label)
    else:
        raise ValueError(f"the {task} section names no answer table (ans2label / label2ans)")
    examples = load_vqa(files) if task == "vqa" else load_gqa(files)
    return QADataset(examples, stores, tokenizer, table, **kw)


def build_finetune_loader(
    data_config: DataConfig | str | os.PathLike,
    task: str,
    split: str = "train",
    tokenizer=None,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    *,
    pin_memory: bool | None = None,
    skip_missing: bool = False,
) -> ResumableLoader:
    """A ResumableLoader over build_finetune_dataset(...); training splits are shuffled with
    full batches, the others keep their order and every example."""
    dataset = build_finetune_dataset(data_config, task, split, tokenizer, skip_missing)
    train = split == "train"
    loader = ResumableLoader(dataset, batch_size, rank, world_size, seed, num_workers,
                             shuffle=train, drop_last=train, repeatable=not train, pin_memory=pin_memory)
    logger.info("%s %s: %d examples, %d batches of %d on rank %d/%d", task, split, len(dataset),
                len(loader), batch_size, rank, world_size)
    return loader
