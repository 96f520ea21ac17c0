"""One example from the command line (semvlp.attention_map, semvlp.predict): an export loaded
quietly on the CPU, a text tokenized as in training, and images read from a feature store as the
model's visual inputs. Bad input raises ValueError (KeyError for an image not in the store) naming
the option at fault; the command-line tools turn it into exit status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import BertTokenizerFast, PreTrainedModel

from semvlp.checkpoint import weights_file
from semvlp.config import is_semvlp_export
from semvlp.data.store import BadRecordError, FeatureStore, ImageFeatures, check_image
from semvlp.data.tokenizer import MAX_TEXT_LEN, load_tokenizer
from semvlp.model import SemVLPModel
from semvlp.model.modeling import quiet_transformers
from semvlp.paths import nearest_existing


def check_export(folder: str | Path) -> None:
    """ValueError naming `folder` unless it holds a SemVLP model's config.json."""
    if not is_semvlp_export(folder):
        raise ValueError(
            f"{folder}: not a SemVLP export (no config.json of model_type 'semvlp'); expected OUTPUT_DIR/export or a "
            "folder written by python -m semvlp.export"
        )


def load_export(folder: str | Path, model_class: type[PreTrainedModel] = SemVLPModel) -> PreTrainedModel:
    """`model_class` from a SemVLP export (pre-training or fine-tuned), in eval mode on the CPU; by
    default the encoder, which any export holds. The export must hold every weight of the class."""
    folder = Path(folder)
    check_export(folder)
    weights_file(folder)  # a missing or damaged file named (from_pretrained's errors may not)
    try:
        with quiet_transformers():  # the heads a class leaves unused are expected
            model, info = model_class.from_pretrained(folder, output_loading_info=True)
    except OSError as e:
        raise ValueError(f"{folder}: not a loadable SemVLP export ({e})") from e
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])[:5]
        raise ValueError(f"{folder}: the export lacks {model_class.__name__} weights {missing}")
    return model.eval()


def load_vocab(vocab: str | Path | None, export: str | Path, model: PreTrainedModel) -> BertTokenizerFast:
    """The tokenizer of `vocab` (--vocab), by default the export's own vocab.txt; it must have as many
    tokens as the model has word embeddings, or a token past them would fail in the embedding lookup."""
    tokenizer = load_tokenizer(vocab or Path(export))
    if len(tokenizer) != model.config.vocab_size:
        source = f"--vocab {vocab}" if vocab else f"{Path(export) / 'vocab.txt'}"
        raise ValueError(
            f"{source} holds {len(tokenizer)} tokens, but the export's model has vocab_size={model.config.vocab_size}: "
            "use the vocab it was trained with"
        )
    return tokenizer


def encode_text(tokenizer: BertTokenizerFast, text: str, option: str, model: PreTrainedModel) -> list[int]:
    """`[CLS] ... [SEP]` ids of `text`, at most as many as the model has positions."""
    input_ids = tokenizer(text.strip())["input_ids"]
    if len(input_ids) == 2:  # [CLS] [SEP]: blank, or only characters the tokenizer deletes (zero-width)
        raise ValueError(f"{option} is empty")
    positions = model.config.max_position_embeddings
    if len(input_ids) > positions:
        raise ValueError(
            f"{option} is {len(input_ids)} tokens with [CLS] and [SEP]; the model has {positions} positions: shorten it"
        )
    return input_ids


def text_notes(tokenizer: BertTokenizerFast, input_ids: list[int], option: str) -> list[str]:
    """What the user should know about how the model reads the text: unknown words, and a length
    training never shows the model (it cuts texts to data.json's max_text_len, by default 20)."""
    notes = []
    unknown = tokenizer.convert_ids_to_tokens(input_ids).count(tokenizer.unk_token)
    if unknown:
        notes.append(f"note: {unknown} word(s) of {option} are not in the vocab and read as {tokenizer.unk_token}")
    if len(input_ids) > MAX_TEXT_LEN:
        notes.append(
            f"note: {option} is {len(input_ids)} tokens with [CLS] and [SEP]; training cuts texts to data.json's "
            f"max_text_len ({MAX_TEXT_LEN} by default, the paper's), so unless the export was trained with a larger "
            "one, its positions past that were never trained"
        )
    return notes


def check_output(path: str | Path) -> None:
    """Before any work: --out can be written as a file (not a folder, no file among its parents)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; name a file")
    if not (existing := nearest_existing(path.parent)).is_dir():
        raise ValueError(f"--out {path}: {existing} is a file, not a folder")


def write_json(path: str | Path, record: dict) -> None:
    """`record` as JSON at `path` (--out), its folder created."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
    except OSError as e:
        raise ValueError(f"--out {path}: {e.strerror or e}") from e


def report_bad_input(error: Exception) -> int:
    """Print a bad-input error on one line; exit status 2. (A KeyError's str() is quoted: use its message.)"""
    print(f"error: {error.args[0] if isinstance(error, KeyError) else error}", file=sys.stderr)
    return 2


def read_images(store_path: str | Path, image_ids: list[str], model: PreTrainedModel) -> list[ImageFeatures]:
    """The images, each checked as the converters check what they write (a store made by other means
    may hold NaN features or unnormalized boxes: a prediction of NaN otherwise), from a store whose
    features have the size the model takes."""
    store = FeatureStore(store_path)
    try:
        if store.feature_dim != model.config.visual_feat_dim:
            raise ValueError(
                f"--store {store_path} holds {store.feature_dim}-d features; the export {model.config.name_or_path} "
                f"takes {model.config.visual_feat_dim}-d (visual_feat_dim): use a store of the detector it learned from"
            )
        images = [store.read(image_id) for image_id in image_ids]
    finally:
        store.close()
    for image in images:
        fields = {k: v for k, v in vars(image).items() if k != "image_id"}
        try:
            check_image(**fields, num_objects=store.num_objects, feature_dim=store.feature_dim)
        except BadRecordError as e:
            raise ValueError(f"{store_path}: image {image.image_id!r}: {e}") from e
    return images


def visual_inputs(images: list[ImageFeatures]) -> dict[str, torch.Tensor | None]:
    """visual_feats [N, K, D] and visual_pos [N, K, 4] (fp32) of images from one store, and their
    visual_attention_mask [N, K] where that store is padded (None otherwise)."""
    stack = lambda arrays: torch.stack([torch.from_numpy(a) for a in arrays])
    return {
        "visual_feats": stack([image.features for image in images]).float(),
        "visual_pos": stack([image.boxes for image in images]).float(),
        "visual_attention_mask": None
        if images[0].valid_mask is None
        else stack([image.valid_mask for image in images]).long(),
    }
