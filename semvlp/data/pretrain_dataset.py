"""Pre-training batches: masked LM, masked objects, image-text matching and image QA targets.

Entry point (launch/pretrain.py takes its two steps apart, build_pretrain_dataset then pretrain_loader,
to read the data before the process group starts):

    from semvlp.data import build_pretrain_loader
    loader = build_pretrain_loader(
        data_config,            # DataConfig or path to data.json (e.g. ensure_toy_world(dir))
        tokenizer=None,         # None: load_tokenizer(data_config.vocab)
        batch_size=32,          # per rank
        rank=0, world_size=1,   # shards: rank r sees every world_size-th example
        seed=0,                 # with the epoch, fixes order, masks, negatives
        num_workers=0,          # DataLoader worker processes (0: build batches in-process)
        split="train",          # "train" (shuffled, full batches) or "valid" (fixed, everything)
        pin_memory=None,        # None: when CUDA is available
        masking=MaskingConfig(),
        skip_missing=False,     # drop sentences whose image is in no store instead of failing
        reuse_buffers=False,    # True: workers write into the same few shared-memory batches (3x
    )                           # faster); a batch is then valid until the next is asked for
    loader.dataset.answer_table          # QA classes (len() = size of the QA head), or None
    for batch in loader: ...             # one epoch of this rank's batches, then the next epoch
    state = loader.state_dict()          # save in the checkpoint; loader.load_state_dict(state)

It returns a ResumableLoader (semvlp/data/loader.py): len(loader) is the number of batches
per epoch on this rank; iteration continues from the saved position and moves to the next
epoch by itself; state_dict() is the position after the last batch handed out.

A batch (B examples, T = longest text <= max_text_len, K objects, D = 2048):
    input_ids [B,T] int64       masked-LM corruption already applied (80% [MASK], 10% random, 10% kept)
    attention_mask [B,T] int64  1 = real token;  token_type_ids [B,T] int64 zeros
    mlm_labels [B,T] int64      original id at masked positions, -100 elsewhere
    visual_feats [B,K,D] f16    the ORIGINAL features (the model zeroes masked objects on the device,
                                and they are the regression targets)
    visual_pos [B,K,4] f32      normalized boxes
    visual_attention_mask [B,K] int64   only when a store was built with padding
    obj_mask [B,K] bool         masked objects (15%; never a padding object), in EVERY pair: the
                                model zeroes them in matched and mismatched pairs alike and
                                computes object losses only where itm_labels == 1
    obj_labels / attr_labels [B,K] int64, obj_confs / attr_confs [B,K] f32   detector outputs
    itm_labels [B] int64        1 matched, 0 caption taken from another image (50%)
    qa_labels [B] int64         answer-table index, -100 if not a question with a known answer
    packed_input_ids, packed_token_type_ids, packed_mlm_labels [sum_len] int64,
    cu_seqlens [B+1] int32, max_seqlen (python int): the same text without padding.
For mismatched pairs mlm_labels is all -100 and qa_labels -100, so those losses skip them; the
object losses must skip them through itm_labels. The corruption itself (masked tokens in
input_ids, masked objects in obj_mask) is applied to every pair regardless of the ITM label:
if only matched pairs carried [MASK] tokens or zeroed objects, "is anything masked?" would
reveal the ITM label (a tiny model reaches 100% held-out ITM accuracy from that leak alone).

Sampling follows LXMERT (`src/pretrain/lxmert_pretrain.py`, `lxmert_data.py`): one example per
sentence; a negative takes the sentence of a random example of a different image; a QA label
with several answers is drawn in proportion to their scores.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from semvlp.data.annotations import (
    LXMERT_SOURCES,
    AnswerTable,
    PretrainCorpus,
    check_images,
    load_pretrain_annotations,
)
from semvlp.data.batching import IGNORE_INDEX, gather_tokens, text_batch, visual_batch
from semvlp.data.config import DataConfig, require_files
from semvlp.data.loader import KeyedBatchDataset, ResumableLoader
from semvlp.data.store import FeatureStoreSet, open_stores
from semvlp.data.tokenizer import load_tokenizer, replacement_token_ids, tokenize_texts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskingConfig:
    """Pre-training corruption rates (paper section 3.3, as LXMERT/BERT)."""

    mlm_prob: float = 0.15  # per text token, [CLS]/[SEP] excluded
    mask_token_frac: float = 0.8  # of masked tokens -> [MASK]
    random_token_frac: float = 0.1  # of masked tokens -> a random token (the rest stay)
    obj_mask_prob: float = 0.15  # per object
    mismatch_prob: float = 0.5  # pairs whose caption comes from another image
    max_text_len: int = 20

    def __post_init__(self):
        for name in ("mlm_prob", "obj_mask_prob", "mismatch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"MaskingConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mask_token_frac + self.random_token_frac > 1.0:
            raise ValueError("MaskingConfig: mask_token_frac + random_token_frac must be <= 1")


_PRETRAIN_SKIP_HINT = (
    "add the images to a feature store or remove their records: launch/pretrain.py has no option to skip them "
    "(build_pretrain_loader(skip_missing=True) does)"
)


class PretrainDataset(KeyedBatchDataset):
    """Sentences paired with their images; `dataset[BatchKey]` is a whole masked batch.

    Args:
        corpus: sentences from load_pretrain_annotations (answer ids must index answer_table).
        stores: the feature stores holding the images.
        tokenizer: a BERT tokenizer; used once here to tokenize every sentence.
        answer_table: the QA answer table the corpus labels refer to (None: no QA targets).
        masking: rates; see MaskingConfig.
        skip_missing: drop sentences whose image is in no store (else MissingImagesError).
    """

    def __init__(
        self,
        corpus: PretrainCorpus,
        stores: FeatureStoreSet,
        tokenizer,
        answer_table: AnswerTable | None = None,
        masking: MaskingConfig | None = None,
        skip_missing: bool = False,
    ):
        self.masking = masking or MaskingConfig()
        self.stores = stores
        self.answer_table = answer_table
        image_rows = stores.rows(corpus.image_ids)
        # the file of each image, named if the image is missing
        files = None if corpus.image_file is None else [corpus.files[f] for f in corpus.image_file.tolist()]
        # Checked per image, not per sentence: 9M sentences share 180K images.
        keep_image = check_images(
            corpus.image_ids, stores, "pre-training annotations", skip_missing, _PRETRAIN_SKIP_HINT, files
        )
        keep = keep_image[corpus.sent_image]
        self.num_skipped = int((~keep).sum())
        if self.num_skipped:
            corpus = corpus.select(keep)
        if len(corpus) == 0:
            raise ValueError("no pre-training sentences left (empty files, sources or stores?)")
        self.corpus_sources = corpus.sources
        self.sent_image_row = image_rows[corpus.sent_image]  # [n] global store row per sentence
        self.qa_offsets, self.qa_answers, self.qa_scores = corpus.qa_offsets, corpus.qa_answers, corpus.qa_scores
        self.token_ids, self.token_offsets = tokenize_texts(tokenizer, corpus.texts, self.masking.max_text_len)
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.mask_id = tokenizer.mask_token_id
        self.replacement_ids = replacement_token_ids(tokenizer)
        if self.masking.mismatch_prob > 0 and len(np.unique(self.sent_image_row)) < 2:
            raise ValueError("image-text matching needs sentences of at least two images")

    def __len__(self) -> int:
        return len(self.sent_image_row)

    def _negatives(self, indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """For each example, a random sentence of another image (LXMERT's retry loop)."""
        n = len(self)
        own = self.sent_image_row[indices]
        other = rng.integers(0, n, size=len(indices))
        for j in np.flatnonzero(self.sent_image_row[other] == own):
            while self.sent_image_row[other[j]] == own[j]:
                other[j] = rng.integers(0, n)
        return other

    def make_batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict:
        m = self.masking
        b, k = len(indices), self.stores.num_objects
        matched = rng.random(b) >= m.mismatch_prob
        negatives = self._negatives(indices, rng)
        sents = np.where(matched, indices, negatives)

        # Masked LM. The corruption hits matched and mismatched pairs alike (otherwise "has a
        # [MASK]" would give the ITM label away); only matched pairs get targets. [CLS] and
        # [SEP] are never masked.
        input_ids, lengths = gather_tokens(self.token_ids, self.token_offsets, sents)
        t = input_ids.shape[1]
        col = np.arange(t)[None, :]
        maskable = (col >= 1) & (col < lengths[:, None] - 1)
        u = rng.random((b, t))
        masked = maskable & (rng.random((b, t)) < m.mlm_prob)
        mlm_labels = np.where(masked & matched[:, None], input_ids, IGNORE_INDEX)
        random_ids = self.replacement_ids[rng.integers(0, len(self.replacement_ids), (b, t))]
        to_mask = masked & (u < m.mask_token_frac)
        to_random = masked & (u >= m.mask_token_frac) & (u < m.mask_token_frac + m.random_token_frac)
        input_ids = np.where(to_mask, self.mask_id, np.where(to_random, random_ids, input_ids))

        batch = text_batch(input_ids, lengths, mlm_labels)
        rows = self.sent_image_row[indices]  # the image stays; a negative only swaps the sentence
        batch.update(visual_batch(self.stores, rows, labels=True))

        # Masked objects, in every pair for the same reason: a matched image whose objects are
        # zeroed must look like a mismatched one. The object losses skip mismatched pairs.
        obj_mask = rng.random((b, k)) < m.obj_mask_prob
        if "visual_attention_mask" in batch:
            obj_mask &= batch["visual_attention_mask"].numpy().astype(bool)
        batch["obj_mask"] = torch.from_numpy(obj_mask)
        batch["itm_labels"] = torch.from_numpy(matched.astype(np.int64))
        batch["qa_labels"] = torch.from_numpy(self._qa_labels(indices, matched, rng))
        return batch

    def _qa_labels(self, indices: np.ndarray, matched: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.full(len(indices), IGNORE_INDEX, np.int64)
        for j, i in enumerate(indices.tolist()):
            a, z = self.qa_offsets[i], self.qa_offsets[i + 1]
            if z == a or not matched[j]:
                continue
            if z - a == 1:
                out[j] = self.qa_answers[a]
            else:
                scores = self.qa_scores[a:z].astype(np.float64)
                out[j] = self.qa_answers[a + rng.choice(z - a, p=scores / scores.sum())]
        return out


def _resolve_config(data_config: DataConfig | str | os.PathLike) -> DataConfig:
    if isinstance(data_config, DataConfig):
        return data_config
    return DataConfig.load(data_config)


def load_pretrain_answer_table(cfg: DataConfig) -> AnswerTable | None:
    """The pre-training QA answer table named by the config (None if it names none)."""
    p = cfg.pretrain
    if p is None or p.answer_table is None:
        return None
    table = AnswerTable.from_all_ans(p.answer_table, p.answer_dsets)
    if not len(table):  # no sentence would get a QA target: the QA head would be silently untrained
        dsets = f" of answer_dsets {list(p.answer_dsets)}" if p.answer_dsets is not None else ""
        raise ValueError(f"the data configuration's pretrain.answer_table {p.answer_table} holds no answers{dsets}")
    return table


def check_train_corpus(cfg: DataConfig, corpus: PretrainCorpus, files: tuple[str, ...]) -> None:
    """Sources and QA labels that the train files do not have: a typo would silently drop data.

    A held-out split need not hold every source, so only the train files are checked. The default
    sources, LXMERT's five, take whichever of them the files hold.
    """
    where = f"the train files ({', '.join(files)})"
    if cfg.pretrain.sources != LXMERT_SOURCES:
        absent = [s for s in corpus.sources if not corpus.source_counts[s]]
        if absent:
            raise ValueError(
                f"the data configuration's pretrain.sources lists {absent}, which no record of {where} has; "
                f"sources found: {sorted(corpus.found_sources)}"
            )
    if cfg.pretrain.answer_table is not None and not len(corpus.qa_answers):
        raise ValueError(
            f"no sentence of {where}, sources {list(corpus.sources)}, has an answer in pretrain.answer_table "
            f"{cfg.pretrain.answer_table}: the QA head would never be trained (without QA, leave answer_table out)"
        )


# Detector label datasets of a store, the data configuration key that counts their classes, and their name.
_DETECTOR_LABELS = (("obj_ids", "num_object_labels", "object"), ("attr_ids", "num_attribute_labels", "attribute"))


def check_label_counts(cfg: DataConfig, stores: FeatureStoreSet) -> None:
    """Every detector label id in the stores must be a class of the data configuration's counts.

    A larger id fails the object or attribute loss at the first step, as an index out of bounds deep
    in the model. Reads the two label datasets once (FeatureStore.label_id_range).
    """
    for store in stores.stores:
        for name, key, kind in _DETECTOR_LABELS:
            (low, low_image), (high, high_image) = store.label_id_range(name)
            count = getattr(cfg, key)
            if low < 0:
                raise ValueError(f"{store.path} holds a negative {kind} label id {low} (image {low_image})")
            if high >= count:
                raise ValueError(
                    f"the data configuration's {key} is {count}, but {store.path} holds {kind} label id {high} "
                    f"(image {high_image}): {key} must be above every id in the stores"
                )


def unlabeled_store_notes(stores: FeatureStoreSet) -> list[str]:
    """A note for each store whose detector labels are all id 0, as the converters store a source
    without labels (bottom-up-attention's TSVs; .npz files without them). Their confidences are 0,
    so their images teach the masked-object label and attribute losses nothing: a user who meant to
    pre-train with those losses should know before the run, not from its flat object-label accuracy."""
    return [
        f"note: {store.path} holds no detector labels (every object and attribute id is 0): its images train "
        "the masked-object label and attribute losses with weight 0 (docs/data_format.md section 2)"
        for store in stores.stores
        if all(store.label_id_range(name)[1][0] == 0 for name, _, _ in _DETECTOR_LABELS)
    ]


def pretraining_model_fields(cfg: DataConfig, tokenizer=None) -> dict:
    """The model config fields the data fixes: vocabulary size, the stores' feature size and K, label counts,
    QA answers (>= 1) and, with an answer table, their names (`id2label`, HuggingFace's name: the export
    names the image-QA head's answers on its own, as a VQA export does; `python -m semvlp.predict` lists them).

    The label counts are checked against the label ids in the stores (check_label_counts).
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.vocab)
    stores = open_stores(cfg.stores)
    check_label_counts(cfg, stores)
    answers = load_pretrain_answer_table(cfg)
    fields = dict(
        vocab_size=len(tokenizer),
        visual_feat_dim=stores.feature_dim,
        num_objects=stores.num_objects,
        num_object_labels=cfg.num_object_labels,
        num_attribute_labels=cfg.num_attribute_labels,
        num_qa_labels=max(len(answers) if answers is not None else 0, 1),
    )
    if answers is not None:
        fields["id2label"] = dict(enumerate(answers.answers))
    return fields


def build_pretrain_dataset(
    data_config: DataConfig | str | os.PathLike,
    tokenizer=None,
    split: str = "train",
    masking: MaskingConfig | None = None,
    skip_missing: bool = False,
) -> PretrainDataset:
    """The PretrainDataset of one split ("train" or "valid") of a data configuration."""
    cfg = _resolve_config(data_config)
    if cfg.pretrain is None:
        raise ValueError("the data configuration has no 'pretrain' section")
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    files = require_files(cfg.pretrain.train if split == "train" else cfg.pretrain.valid, f"pre-training {split}")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.vocab)
    answer_table = load_pretrain_answer_table(cfg)
    corpus = load_pretrain_annotations(files, cfg.pretrain.sources, answer_table)
    if split == "train":
        check_train_corpus(cfg, corpus, files)
    masking = masking or MaskingConfig(max_text_len=cfg.max_text_len)
    return PretrainDataset(corpus, open_stores(cfg.stores), tokenizer, answer_table, masking, skip_missing)


def build_pretrain_loader(
    data_config: DataConfig | str | os.PathLike,
    tokenizer=None,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    split: str = "train",
    *,
    pin_memory: bool | None = None,
    masking: MaskingConfig | None = None,
    skip_missing: bool = False,
    reuse_buffers: bool = False,
) -> ResumableLoader:
    """The pre-training loader of one rank; see the module docstring for the batch layout."""
    dataset = build_pretrain_dataset(data_config, tokenizer, split, masking, skip_missing)
    return pretrain_loader(
        dataset, split, batch_size, rank, world_size, seed, num_workers, pin_memory=pin_memory,
        reuse_buffers=reuse_buffers,
    )  # fmt: skip


def pretrain_loader(
    dataset: PretrainDataset,
    split: str,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int,
    *,
    pin_memory: bool | None = None,
    reuse_buffers: bool = False,
) -> ResumableLoader:
    """The loader of one rank over a dataset already built (the launcher reads the data before it
    starts the process group and writes the run folder). reuse_buffers: see ResumableLoader."""
    train = split == "train"
    loader = ResumableLoader(
        dataset,
        batch_size,
        rank,
        world_size,
        seed,
        num_workers,
        shuffle=train,
        drop_last=train,
        repeatable=not train,
        pin_memory=pin_memory,
        reuse_buffers=reuse_buffers,
    )
    logger.info(
        "pre-training %s: %d sentences, %d batches of %d per epoch on rank %d/%d",
        split,
        len(dataset),
        len(loader),
        batch_size,
        rank,
        world_size,
    )
    return loader
