"""WordPiece tokenization from a local vocab.txt, done once per corpus into flat numpy arrays.

transformers 5 quirk (DESIGN.md section 6): `BertTokenizerFast(vocab=path)` loads the file,
while `vocab_file=path` is silently ignored and yields a 5-token vocabulary. `load_tokenizer`
checks for exactly that failure, and that the file itself holds the special tokens (transformers
adds absent ones as extra tokens, so the tokenizer's vocabulary always has them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import BertTokenizerFast

MAX_TEXT_LEN = 20  # tokens including [CLS] and [SEP] (paper, section 4.1)
LOWER_CASE = True  # uncased, as bert-base-uncased
_REQUIRED_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def vocab_file(vocab_path: str | os.PathLike) -> Path:
    """The vocab.txt a vocab option names: the file itself, or the one in a (HuggingFace) folder."""
    path = Path(vocab_path)
    return path / "vocab.txt" if path.is_dir() else path


def _check_unique(path: Path, tokens: Sequence[str], shown: int = 5) -> None:
    """ValueError naming the tokens that are on more than one line: a token's id is its line number,
    so a repeat leaves the largest id past the tokenizer's size (an IndexError in the embedding)."""
    lines: dict[str, list[int]] = {}
    for number, token in enumerate(tokens, 1):
        lines.setdefault(token, []).append(number)
    repeated = [f"{t!r} on lines {', '.join(map(str, numbers))}" for t, numbers in lines.items() if len(numbers) > 1]
    if repeated:
        more = f" (and {len(repeated) - shown} more)" if len(repeated) > shown else ""
        raise ValueError(
            f"vocab {path} repeats tokens (each must be on one line only): {'; '.join(repeated[:shown])}{more}"
        )


def load_tokenizer(vocab_path: str | os.PathLike) -> BertTokenizerFast:
    """An uncased BERT WordPiece tokenizer from a vocab.txt (one token per line).

    Also accepts a folder holding vocab.txt (a HuggingFace checkpoint folder).
    Raises FileNotFoundError or ValueError with the path when the vocab is missing or not real.
    """
    path = vocab_file(vocab_path)
    if not path.is_file():
        raise FileNotFoundError(f"vocab file not found: {path}")
    # The file's own lines: transformers adds absent special tokens to the tokenizer itself, which
    # then fails at the first unknown word ("WordPiece error: Missing [UNK] token"). utf-8-sig: a
    # byte-order mark (Windows editors write one) is not part of the first token.
    try:
        with open(path, encoding="utf-8-sig") as f:
            tokens = [line.rstrip("\n") for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"vocab {path} is not UTF-8 text ({e})") from e
    missing = [t for t in _REQUIRED_TOKENS if t not in tokens]
    if missing:
        raise ValueError(f"vocab {path} lacks the special tokens {missing}")
    _check_unique(path, tokens)
    # The tokens as read here (the tokenizer would read the file again, byte-order mark included).
    tok = BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)}, do_lower_case=LOWER_CASE)
    if len(tok) <= 5:
        raise ValueError(
            f"tokenizer from {path} has only {len(tok)} tokens: the vocab was not loaded "
            "(is it a WordPiece vocab.txt with one token per line?)"
        )
    return tok


def tokenizer_config(model_max_length: int) -> dict:
    """The tokenizer_config.json of a model folder holding vocab.txt (semvlp.export writes one), so
    that HuggingFace's AutoTokenizer.from_pretrained(folder) builds the tokenizer load_tokenizer does."""
    return {
        "tokenizer_class": BertTokenizerFast.__name__,
        "do_lower_case": LOWER_CASE,
        "model_max_length": model_max_length,
    }


def tokenize_texts(
    tokenizer: BertTokenizerFast, texts: Sequence[str], max_len: int = MAX_TEXT_LEN, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of many texts as (flat int32 ids, int64 offsets of length n+1).

    Each text becomes [CLS] tokens [SEP], truncated to max_len tokens (as LXMERT: tokens cut
    to max_len - 2 before adding the special tokens). Flat numpy arrays rather than lists keep
    the memory shared between DataLoader workers after fork (no per-object refcount writes).
    """
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 to hold [CLS] x [SEP], got {max_len}")
    lengths = np.empty(len(texts), np.int64)
    pieces = []
    for start in range(0, len(texts), chunk):
        batch = [t.strip() for t in texts[start : start + chunk]]
        enc = tokenizer(
            batch,
            add_special_tokens=True,
            truncation=True,
            max_length=max_len,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        lengths[start : start + len(enc)] = [len(e) for e in enc]
        pieces.append(np.fromiter((t for e in enc for t in e), np.int32))
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return ids, offsets


def replacement_token_ids(tokenizer: BertTokenizerFast) -> np.ndarray:
    """Ids a masked token may be replaced with (the 10% random case): not special, not [unused*]."""
    special = set(tokenizer.all_special_ids)
    ids = [
        i for t, i in tokenizer.get_vocab().items() if i not in special and not (t.startswith("[") and t.endswith("]"))
    ]
    if not ids:
        raise ValueError("the vocab has no ordinary tokens")
    return np.array(sorted(ids), np.int64)
