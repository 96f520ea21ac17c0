"""Data: the HDF5 feature store, converters, annotation readers, batches, and the toy world.

Formats are documented in docs/data_format.md. The entry points:

    semvlp.data.toy.ensure_toy_world(folder) -> path of data.json
    DataConfig.load(path)                                     (semvlp/data/config.py)
    python -m semvlp.data.check data.json                     (semvlp/data/check.py)
    build_pretrain_loader(data_config, tokenizer, batch_size, rank, world_size, seed,
                          num_workers, split)                 (semvlp/data/pretrain_dataset.py)
    FeatureStore(path), load_tokenizer(vocab_path)
"""

from semvlp.data.annotations import (
    AnswerTable,
    MissingImagesError,
    load_flickr30k,
    load_gqa,
    load_nlvr2,
    load_pretrain_annotations,
    load_vqa,
    normalize_answer,
)
from semvlp.data.config import DataConfig
from semvlp.data.loader import BatchKey, ResumableLoader
from semvlp.data.pretrain_dataset import (
    MaskingConfig,
    PretrainDataset,
    build_pretrain_dataset,
    build_pretrain_loader,
    load_pretrain_answer_table,
)
from semvlp.data.store import FeatureStore, FeatureStoreSet, FeatureStoreWriter, ImageFeatures, open_stores
from semvlp.data.tokenizer import load_tokenizer

# Not the toy world: imported here, `python -m semvlp.data.toy` would find it imported already (a runpy warning).

__all__ = [
    "AnswerTable",
    "BatchKey",
    "DataConfig",
    "FeatureStore",
    "FeatureStoreSet",
    "FeatureStoreWriter",
    "ImageFeatures",
    "MaskingConfig",
    "MissingImagesError",
    "PretrainDataset",
    "ResumableLoader",
    "build_pretrain_dataset",
    "build_pretrain_loader",
    "load_flickr30k",
    "load_gqa",
    "load_nlvr2",
    "load_pretrain_annotations",
    "load_pretrain_answer_table",
    "load_tokenizer",
    "load_vqa",
    "normalize_answer",
    "open_stores",
]
