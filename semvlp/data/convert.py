"""Converters from the feature formats users have into the project's HDF5 store.

    python -m semvlp.data.convert lxmert-tsv train2014_obj36.tsv [more.tsv ...] --out coco.h5 --num-objects 36
    python -m semvlp.data.convert butd-tsv trainval_resnet101_faster_rcnn_genome_36.tsv --out coco.h5 \
        --num-objects 36 [--image-ids ids.json]
    python -m semvlp.data.convert npz-dir features_folder/ --out coco.h5 [--num-objects 100] [--allow-pickle]
    python -m semvlp.data.convert uniter-lmdb img_db/coco_train2014/feat_th0.2_max100_min10 --out coco.h5 \
        --num-objects 100 --pad
    options: --pad  --skip-bad  --compression {none,gzip,lzf}  --feature-dim 2048  --quiet  --image-ids FILE
             --overwrite

lxmert-tsv: LXMERT's feature TSV (`airsplay/lxmert src/utils.py`): tab-separated, no header,
columns img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes,
features; array columns are base64 of little-endian arrays: objects_id int64 (N,),
objects_conf float32 (N,), attrs_id int64 (N,), attrs_conf float32 (N,), boxes float32 (N, 4)
in pixels (x1, y1, x2, y2), features float32 (N, D). Files are streamed line by line (they
reach 17 GB; loading them whole is LXMERT's best-known memory problem); gzipped ones too.

butd-tsv: the TSV of bottom-up-attention's tools/generate_tsv.py: six columns image_id, image_w,
image_h (width first, unlike LXMERT's), num_boxes, boxes, features, encoded as LXMERT's. It keeps
no labels or confidences: ids 0 and confidences 0 (as npz-dir without labels), and with N > K the
first K boxes are kept. Its ids are numbers (COCO's 9 for COCO_train2014_000000000009.jpg).

npz-dir: one `<image id>.npz` per image (StructVBERT's layout), keys img_h (or image_h), img_w
(or image_w), features (N, D), boxes (or bbox) (N, 4) in pixels, optionally num_boxes (or
num_bbox) and objects_id / objects_conf / attrs_id / attrs_conf (LXMERT names; obj_ids,
obj_confs, attr_ids, attr_confs also accepted). Absent labels are stored as id 0 with
confidence 0, so confidence-weighted object losses ignore them. bottom-up-attention.pytorch's files
(x, bbox, num_bbox, image_h, image_w) keep theirs in a pickled `info` dict, read with --allow-pickle.

uniter-lmdb: a UNITER img_db LMDB folder (`scripts/convert_imgdir.py` in UNITER), one record per
image keyed by its .npz name, the value a msgpack-numpy map (or, in `*_compressed` databases, an
.npz archive) of float16 arrays: features (N, D), norm_bb (N, 6: x1, y1, x2, y2, w, h already
divided by the image size, which is not kept: the store records 0 x 0), conf (N,) and
soft_labels (N, 1601: background, then the 1,600 Visual Genome classes). Object id = the argmax
class after the background (LXMERT's objects_id), confidence = conf; no attributes (id 0,
confidence 0). Records hold N = 10 ... 100 boxes (UNITER's confidence threshold), so K above
the smallest N needs --pad. The image id is the key without .npz.

--image-ids FILE (any format): a JSON object from the ids read to the ids the annotations use
(e.g. {"9": "COCO_train2014_000000000009"}); an image missing from it is a bad record.

Objects per image: with N > K boxes the K most confident (by object confidence; UNITER: conf)
are kept, in their original order; N < K is an error naming the image unless --pad, which
appends zero objects and records the per-object validity mask. Boxes are divided by the image width and
height (coordinates up to one pixel outside the image are clipped; further out is an error).

Bad input (wrong column count, bad base64, wrong array length, non-finite values, boxes outside
the image, too few boxes, a duplicate or empty id, a label id that is not a whole number from 0
to 2**31 - 1) stops the conversion with an error naming the file, the line (TSV) and image, and
the field (as the file calls it); with --skip-bad such records are skipped, counted and listed at
the end. An input that holds no records (an empty TSV, LMDB or folder) is an error naming it. Paths
and sizes are checked before any work (an --out that is one of the inputs is refused, and an
existing one is kept unless --overwrite: exit status 2; K and D must keep every HDF5 chunk of the
store under 4 GiB). The store is written to a temporary file and renamed into place only when
complete, so a failed (a full disk: one error naming the store) or interrupted conversion (Ctrl-C
or SIGTERM) leaves no store behind, nor the folders it created for --out; a store --overwrite
would have replaced is kept, and the error says so.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import gzip
import io
import json
import os
import re
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from semvlp.data.store import FEATURE_DIM, BadRecordError, FeatureStoreWriter, check_label_ids, chunk_size_problem
from semvlp.interrupt import report_interrupt, sigterm_as_interrupt
from semvlp.paths import nearest_existing

TSV_FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
# bottom-up-attention's tools/generate_tsv.py (note: width before height; boxes and features as above)
BUTD_TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
_BOX_TOLERANCE_PX = 1.0
_BOX_TOLERANCE_NORMALIZED = 1e-3  # normalized boxes stored in float16 (UNITER) round by up to 2**-11


class ConversionError(ValueError):
    """A bad input record, with where it is (file, line or image, and field), or an unusable path."""


class OutputExistsError(ConversionError):
    """--out names an existing file and --overwrite was not given (an option error: exit status 2)."""


@dataclass
class RawImage:
    """One image as a detector wrote it: N boxes in pixels, full-precision features. A source
    without the image size (UNITER) gives boxes already divided by it, and img_h = img_w = 0."""

    image_id: str
    img_h: int
    img_w: int
    boxes: np.ndarray  # [N, 4] pixels, or [0, 1] when boxes_normalized
    features: np.ndarray  # [N, D]
    obj_ids: np.ndarray  # [N]
    obj_confs: np.ndarray
    attr_ids: np.ndarray
    attr_confs: np.ndarray
    box_scores: np.ndarray | None = None  # ranks the boxes when N > K; obj_confs when None
    boxes_normalized: bool = False  # the source gives no image size (UNITER), or the user says so (npz)
    source_may_normalize: bool = False  # the format has --boxes-normalized, which errors suggest
    # What the source calls a field where it differs from the names above (objects_id for obj_ids):
    # an error names the field as the user's file does.
    names: dict[str, str] = field(default_factory=dict)


@dataclass
class ConversionReport:
    written: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # the first few error messages


def _fit(raw: RawImage, num_objects: int, feature_dim: int, pad: bool) -> dict:
    """Check one image and bring it to exactly K objects with normalized boxes."""

    def named(name: str) -> str:  # the field as the source calls it
        return raw.names.get(name, name)

    n = len(raw.boxes)
    if raw.features.shape != (n, feature_dim):
        raise BadRecordError(named("features"), f"shape {raw.features.shape}, expected ({n}, {feature_dim})")
    scores = raw.obj_confs if raw.box_scores is None else raw.box_scores
    scores_name = "obj_confs" if raw.box_scores is None else "box_scores"
    per_box = dict(obj_ids=raw.obj_ids, obj_confs=raw.obj_confs, attr_ids=raw.attr_ids, attr_confs=raw.attr_confs)
    for name, arr in {**per_box, scores_name: scores}.items():
        if arr.shape != (n,):
            raise BadRecordError(named(name), f"shape {arr.shape}, expected ({n},)")
    normalized = raw.boxes_normalized
    if not normalized and (raw.img_h <= 0 or raw.img_w <= 0):  # 0 x 0 too: only UNITER has no size
        raise BadRecordError(named("img_h/img_w"), f"image size must be positive, got {raw.img_h}x{raw.img_w}")
    for name, arr in {"features": raw.features, "boxes": raw.boxes, "obj_confs": raw.obj_confs,
                      "attr_confs": raw.attr_confs, scores_name: scores}.items():  # fmt: skip
        if not np.isfinite(arr).all():
            raise BadRecordError(named(name), "contains NaN or infinite values")
    if np.abs(raw.features).max(initial=0.0) > np.finfo(np.float16).max:
        raise BadRecordError(named("features"), "values overflow float16")
    if normalized:
        b, w, h, tol = raw.boxes, 1, 1, _BOX_TOLERANCE_NORMALIZED
    else:
        b, w, h, tol = raw.boxes, raw.img_w, raw.img_h, _BOX_TOLERANCE_PX
    outside = (
        (b[:, 0] < -tol)
        | (b[:, 1] < -tol)
        | (b[:, 2] > w + tol)
        | (b[:, 3] > h + tol)
        | (b[:, 2] < b[:, 0])
        | (b[:, 3] < b[:, 1])
    )
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        frame = "[0, 1] (normalized)" if normalized else f"the {w}x{h} image"
        raise BadRecordError(named("boxes"), f"box {i} {b[i].tolist()} lies outside {frame} (or has x2 < x1 / y2 < y1)")
    if not normalized and n and max(w, h) > 1 and b.max() <= 1:  # divided by w and h again, they would be ~0
        raise BadRecordError(
            named("boxes"),
            f"every box lies within [0, 1] on the {w}x{h} image: normalized already? This format's boxes are in pixels"
            + (" (--boxes-normalized reads normalized ones)" if raw.source_may_normalize else ""),
        )
    if n > num_objects:
        keep = np.sort(np.argsort(-scores, kind="stable")[:num_objects])
    elif n < num_objects and not pad:
        raise BadRecordError(
            named("num_boxes"),
            f"{n} boxes, fewer than --num-objects {num_objects} (use --pad to pad and record a validity mask)",
        )
    else:
        keep = np.arange(n)
    k = len(keep)
    out = {
        "features": np.zeros((num_objects, feature_dim), np.float16),
        "boxes": np.zeros((num_objects, 4), np.float32),
        "obj_ids": np.zeros(num_objects, np.int64),
        "obj_confs": np.zeros(num_objects, np.float32),
        "attr_ids": np.zeros(num_objects, np.int64),
        "attr_confs": np.zeros(num_objects, np.float32),
    }
    out["features"][:k] = raw.features[keep]
    scale = np.array([w, h, w, h], np.float64)
    out["boxes"][:k] = np.clip(raw.boxes[keep].astype(np.float64) / scale, 0.0, 1.0)
    for name, arr in per_box.items():
        out[name][:k] = arr[keep]
    if pad:
        out["valid_mask"] = np.arange(num_objects) < k
    return dict(img_h=int(raw.img_h), img_w=int(raw.img_w), **out)


_BASE64_CHARACTERS = re.compile(r"[A-Za-z0-9+/]*=*")


def _b64_array(text: str, dtype: type, shape: tuple[int, ...], name: str) -> np.ndarray:
    try:
        buf = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        # Base64 comes in groups of 4 characters: valid ones that end in a part of a group were cut.
        if len(text) % 4 and _BASE64_CHARACTERS.fullmatch(text):
            raise BadRecordError(
                name, f"invalid base64: {len(text)} characters, not a multiple of 4 (a truncated field?)"
            ) from None
        raise BadRecordError(name, f"invalid base64 ({e})") from None
    itemsize, type_name = np.dtype(dtype).itemsize, np.dtype(dtype).name
    expected = int(np.prod(shape))
    if len(buf) % itemsize:  # not whole values: the column was cut (a file that ends mid-line)
        raise BadRecordError(
            name,
            f"decodes to {len(buf)} bytes, not a whole number of {itemsize}-byte {type_name} values (a truncated "
            f"field?); expected {expected * itemsize} bytes, {expected} values of shape {shape}",
        )
    if len(buf) != expected * itemsize:
        raise BadRecordError(
            name, f"decodes to {len(buf) // itemsize} {type_name} values, expected {expected} (shape {shape})"
        )
    return np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BadRecordError(name, f"not an integer: {text[:40]!r}") from None


def _num_boxes(row: Sequence[str], fields: Sequence[str]) -> int:
    """Check a TSV row's column count and image id (column 0); its num_boxes column as a count."""
    if len(row) != len(fields):
        raise BadRecordError(
            "columns", f"{len(row)} tab-separated columns, expected {len(fields)} ({', '.join(fields)})"
        )
    if not row[0].strip():
        raise BadRecordError(fields[0], "empty image id")
    n = _int(row[fields.index("num_boxes")], "num_boxes")
    if n < 0:
        raise BadRecordError("num_boxes", f"negative: {n}")
    return n


def parse_tsv_row(row: Sequence[str], feature_dim: int = FEATURE_DIM) -> RawImage:
    """One LXMERT TSV row; raises BadRecordError naming the field."""
    n = _num_boxes(row, TSV_FIELDS)
    obj_ids = _b64_array(row[3], np.int64, (n,), "objects_id")
    check_label_ids("objects_id", obj_ids)
    attr_ids = _b64_array(row[5], np.int64, (n,), "attrs_id")
    check_label_ids("attrs_id", attr_ids)
    return RawImage(
        image_id=row[0],
        img_h=_int(row[1], "img_h"),
        img_w=_int(row[2], "img_w"),
        obj_ids=obj_ids,
        obj_confs=_b64_array(row[4], np.float32, (n,), "objects_conf"),
        attr_ids=attr_ids,
        attr_confs=_b64_array(row[6], np.float32, (n,), "attrs_conf"),
        boxes=_b64_array(row[8], np.float32, (n, 4), "boxes"),
        features=_b64_array(row[9], np.float32, (n, feature_dim), "features"),
        names=dict(obj_ids="objects_id", obj_confs="objects_conf", attr_ids="attrs_id", attr_confs="attrs_conf"),
    )


def parse_butd_row(row: Sequence[str], feature_dim: int = FEATURE_DIM) -> RawImage:
    """One bottom-up-attention TSV row (image_id, image_w, image_h, num_boxes, boxes, features);
    raises BadRecordError naming the field. No labels or confidences: ids 0, confidences 0."""
    n = _num_boxes(row, BUTD_TSV_FIELDS)
    return RawImage(
        image_id=row[0],
        img_w=_int(row[1], "image_w"),
        img_h=_int(row[2], "image_h"),
        boxes=_b64_array(row[4], np.float32, (n, 4), "boxes"),
        features=_b64_array(row[5], np.float32, (n, feature_dim), "features"),
        obj_ids=np.zeros(n, np.int64),
        obj_confs=np.zeros(n, np.float32),
        attr_ids=np.zeros(n, np.int64),
        attr_confs=np.zeros(n, np.float32),
        names={"img_h/img_w": "image_h/image_w"},
    )


# A record source yields (location, image id if known before parsing, parse function).
Record = tuple[str, str | None, Callable[[], RawImage]]
ParseRow = Callable[[Sequence[str], int], RawImage]  # one TSV row and the feature width -> RawImage


_GZIP_MAGIC = b"\x1f\x8b"


def _open_text(binary: io.BufferedReader) -> io.TextIOBase:
    """A TSV as UTF-8 text, gunzipped on the fly if it starts with gzip's magic number (peeked, so a
    pipe such as <(unzip -p ...) loses nothing)."""
    if binary.peek(2)[:2] == _GZIP_MAGIC:
        return gzip.open(binary, "rt", encoding="utf-8", newline="")
    return io.TextIOWrapper(binary, encoding="utf-8", newline="")


def tsv_records(
    paths: Sequence[str | os.PathLike], feature_dim: int = FEATURE_DIM, parse_row: ParseRow = parse_tsv_row
) -> Iterator[Record]:
    """Records of TSV files (plain or gzipped), streamed line by line; LXMERT's layout unless
    `parse_row` reads another. A file without a line (a gzipped or piped empty one) is an error:
    its images would be missing from the store without a word."""
    csv.field_size_limit(sys.maxsize)  # one features column is ~300 KB of base64
    for path in paths:
        with open(path, "rb") as binary, _open_text(binary) as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            try:
                for row in reader:
                    image_id = row[0] if row else None
                    yield f"{path}, line {reader.line_num}", image_id, lambda row=row: parse_row(row, feature_dim)
            except UnicodeDecodeError as e:  # a binary file: one line naming it, not a traceback
                raise ConversionError(f"{path}: not a UTF-8 text TSV ({e})") from None
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                raise ConversionError(f"{path}: not a readable gzip file ({e})") from None
            if reader.line_num == 0:
                raise ConversionError(_hold_no_records([path]))


_NPZ_KEYS = {
    "img_h": ("img_h", "image_h"),
    "img_w": ("img_w", "image_w"),
    "num_boxes": ("num_boxes", "num_bbox"),
    "features": ("features", "x"),  # x, bbox, num_bbox, image_h, image_w: bottom-up-attention.pytorch's
    "boxes": ("boxes", "bbox"),
    "obj_ids": ("objects_id", "obj_ids"),
    "obj_confs": ("objects_conf", "obj_confs"),
    "attr_ids": ("attrs_id", "attr_ids"),
    "attr_confs": ("attrs_conf", "attr_confs"),
}


def _npz_number(name: str, value: np.ndarray) -> int:
    """A one-number entry (img_h, img_w, num_boxes) as an int; a fractional value is an error, not truncated."""
    value = np.asarray(value)
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise BadRecordError(name, f"expected one whole number, got an {value.dtype} array of shape {value.shape}")
    number = value.item()
    if not (np.isfinite(number) and number == int(number)):
        raise BadRecordError(name, f"expected one whole number, got {number}")
    return int(number)


def _npz_numbers(name: str, arr: np.ndarray) -> np.ndarray:
    """An array entry, which must hold numbers (not strings or booleans)."""
    if arr.dtype.kind not in "iuf":
        raise BadRecordError(name, f"expected numbers, got {arr.dtype} values")
    return arr


_PICKLED_INFO = "info"  # bottom-up-attention.pytorch: a pickled dict holding objects_id, ..., attrs_conf
_LABEL_NAMES = ("obj_ids", "obj_confs", "attr_ids", "attr_confs")
_LABEL_KEYS = [key for name in _LABEL_NAMES for key in _NPZ_KEYS[name]]


def _pickled_labels(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The label entries of an .npz file's pickled `info` dict, under the keys _NPZ_KEYS names."""
    try:
        with np.load(path, allow_pickle=True) as z:
            info = z[_PICKLED_INFO]
    except Exception as e:  # unpickling can fail any way the pickled classes do
        raise BadRecordError(_PICKLED_INFO, f"not readable ({type(e).__name__}: {e})") from None
    value = info.item() if info.dtype == object and info.size == 1 else None
    if not isinstance(value, dict):
        got = type(value).__name__ if value is not None else f"an {info.dtype} array of shape {info.shape}"
        raise BadRecordError(_PICKLED_INFO, f"expected a pickled dict, got {got}")
    return {key: np.asarray(value[key]) for key in _LABEL_KEYS if key in value}


def has_unread_pickled_labels(folder: str | os.PathLike) -> bool:
    """Whether the first .npz file of a folder keeps no labels of its own but a pickled `info` entry
    (bottom-up-attention.pytorch's layout), which only `allow_pickle` reads."""
    first = min(Path(folder).glob("*.npz"), default=None)
    try:
        with np.load(first, allow_pickle=False) as z:
            if _PICKLED_INFO not in z.files or set(_LABEL_KEYS).intersection(z.files):
                return False
            try:
                z[_PICKLED_INFO]
            except ValueError:  # an object array: only unpickling reads it
                return True
            return False
    except Exception:  # no file, or not an .npz: the conversion names the problem
        return False


def parse_npz(path: str | os.PathLike, allow_pickle: bool = False, boxes_normalized: bool = False) -> RawImage:
    """One per-image .npz file; raises BadRecordError naming the key. `allow_pickle` reads the labels
    bottom-up-attention.pytorch keeps in a pickled `info` dict (unpickling can run code from the file).
    `boxes_normalized`: the boxes are already divided by the image size (else they are in pixels)."""
    if not zipfile.is_zipfile(path):  # else numpy blames "pickled data", or returns a .npy's array
        raise BadRecordError("file", "not an .npz file (not a zip archive)")
    used = {key for keys in _NPZ_KEYS.values() for key in keys}  # other keys unread (MILVLG's "info": below)
    try:
        with np.load(path, allow_pickle=False) as z:
            files, data = z.files, {}
            for key in sorted(used.intersection(z.files)):
                try:
                    data[key] = z[key]
                except ValueError as e:  # e.g. an object array, which only unpickling would read
                    raise BadRecordError(key, f"not readable as an array of numbers ({e})") from None
    except BadRecordError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise BadRecordError("file", f"not a readable .npz ({e})") from None
    from_info: set[str] = set()
    if allow_pickle and _PICKLED_INFO in files:
        pickled = _pickled_labels(path)
        data = {**pickled, **data}  # labels stored as keys of their own win
        from_info = set(pickled) - set(files)
    names = {}  # the RawImage field -> the key it was read from, which errors name

    def get(name: str, required: bool = True) -> np.ndarray | None:
        for key in _NPZ_KEYS[name]:
            if key in data:
                names[name] = f"{_PICKLED_INFO}.{key}" if key in from_info else key
                return data[key]
        if required:
            raise BadRecordError(name, f"missing (looked for {' or '.join(_NPZ_KEYS[name])}; file has {sorted(files)})")
        return None

    features, boxes = get("features"), get("boxes")
    features, boxes = _npz_numbers(names["features"], features), _npz_numbers(names["boxes"], boxes)
    if features.ndim != 2:
        raise BadRecordError(names["features"], f"expected a 2-d (N, D) array, got shape {features.shape}")
    n = len(features)
    if boxes.shape != (n, 4):
        raise BadRecordError(names["boxes"], f"shape {boxes.shape}, expected ({n}, 4)")
    num_boxes = get("num_boxes", required=False)
    if num_boxes is not None and (count := _npz_number(names["num_boxes"], num_boxes)) != n:
        raise BadRecordError(names["num_boxes"], f"says {count} but {names['features']} has {n} rows")
    labels = {}
    for name in _LABEL_NAMES:
        dtype = np.int64 if name.endswith("_ids") else np.float32
        arr = get(name, required=False)
        if arr is None:
            labels[name] = np.zeros(n, dtype)
            continue
        arr = np.asarray(arr).reshape(-1)
        if name in ("obj_ids", "attr_ids"):
            check_label_ids(names[name], arr)  # before the cast, which would turn 1.5 into 1 and NaN into 0
        labels[name] = _npz_numbers(names[name], arr).astype(dtype)
    img_h, img_w = get("img_h"), get("img_w")
    img_h, img_w = _npz_number(names["img_h"], img_h), _npz_number(names["img_w"], img_w)
    names["img_h/img_w"] = f"{names['img_h']}/{names['img_w']}"
    return RawImage(
        image_id=Path(path).stem,
        img_h=img_h,
        img_w=img_w,
        boxes=boxes.astype(np.float32),
        features=features,
        **labels,
        boxes_normalized=boxes_normalized,
        source_may_normalize=True,
        names=names,
    )


def npz_records(
    folder: str | os.PathLike, allow_pickle: bool = False, boxes_normalized: bool = False
) -> Iterator[Record]:
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(Path(folder).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz files in {folder}")
    for p in files:
        yield str(p), p.stem, lambda p=p: parse_npz(p, allow_pickle, boxes_normalized)


_UNITER_NAMES = b"__keys__"  # UNITER's list of the image names: an entry that is not an image
_ZIP_MAGIC = b"PK\x03\x04"


def _msgpack_numpy(obj: dict) -> object:
    """msgpack object_hook: an array or number as msgpack-numpy writes it (UNITER's uncompressed
    values: {nd, type, kind, shape, data}, keys as bytes or str); other maps pass through."""

    def get(key: str) -> object:
        return obj.get(key.encode(), obj.get(key))

    if get("nd") is None:
        return obj
    values = np.frombuffer(get("data"), np.dtype(get("type")))
    return values.reshape(get("shape")) if get("nd") else values[0]


def _uniter_arrays(value: bytes) -> dict:
    """One UNITER img_db value: an .npz archive (`_compressed` databases) or a msgpack-numpy map."""
    if value[:4] == _ZIP_MAGIC:
        try:
            with np.load(io.BytesIO(value), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise BadRecordError("value", f"not a readable .npz ({e})") from None
    import msgpack

    try:
        data = msgpack.unpackb(value, raw=False, object_hook=_msgpack_numpy)
    except (ValueError, TypeError, KeyError) as e:  # msgpack's own errors are ValueErrors
        raise BadRecordError("value", f"neither an .npz nor msgpack-numpy data ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise BadRecordError("value", f"expected a map of arrays, got {type(data).__name__}")
    return data


def parse_uniter(name: str, value: bytes, image_id: str) -> RawImage:
    """One UNITER img_db record (its key `name`, e.g. coco_train2014_000000000009.npz): `features`
    (N, D), `norm_bb` (N, 6: x1, y1, x2, y2, w, h divided by the image size, which is not kept),
    optionally `conf` (N,) and `soft_labels` (N, 1 + classes; column 0 is the background)."""
    data = _uniter_arrays(value)

    def get(key: str, ndim: int, required: bool = True) -> np.ndarray | None:
        if key not in data:
            if required:
                raise BadRecordError(key, f"missing (record has {sorted(data)})")
            return None
        arr = np.asarray(data[key])
        if arr.ndim != ndim or arr.dtype.kind not in "iuf":
            raise BadRecordError(key, f"expected a {ndim}-d array of numbers, got {arr.dtype} of shape {arr.shape}")
        return arr

    features, norm_bb = get("features", 2), get("norm_bb", 2)
    n = len(features)
    if norm_bb.shape[0] != n or norm_bb.shape[1] < 4:
        raise BadRecordError("norm_bb", f"shape {norm_bb.shape}, expected ({n}, 6)")
    conf, soft_labels = get("conf", 1, required=False), get("soft_labels", 2, required=False)
    for key, arr in (("conf", conf), ("soft_labels", soft_labels)):
        if arr is not None and (len(arr) != n or not np.isfinite(arr).all()):
            raise BadRecordError(key, f"expected {n} rows of finite values, got shape {arr.shape}")
    if soft_labels is not None and soft_labels.shape[1] < 2:
        raise BadRecordError("soft_labels", f"shape {soft_labels.shape}: no class after the background column")
    if soft_labels is None:  # no labels: id 0 with confidence 0, as npz-dir; boxes still ranked by conf
        obj_ids, obj_confs = np.zeros(n, np.int64), np.zeros(n, np.float32)
    else:  # the detector's class of each box, as LXMERT's objects_id (0 ... classes - 1)
        classes = soft_labels[:, 1:].astype(np.float32)
        obj_ids = classes.argmax(1).astype(np.int64)
        obj_confs = (conf if conf is not None else classes.max(1)).astype(np.float32)
    return RawImage(
        image_id=image_id,
        img_h=0,
        img_w=0,
        boxes=norm_bb[:, :4].astype(np.float32),
        features=features,
        obj_ids=obj_ids,
        obj_confs=obj_confs,
        attr_ids=np.zeros(n, np.int64),
        attr_confs=np.zeros(n, np.float32),
        box_scores=None if conf is None else conf.astype(np.float32),
        boxes_normalized=True,
        names={"boxes": "norm_bb", "box_scores": "conf"},
    )


def _open_lmdb(folder: str | os.PathLike):
    try:
        import lmdb
        import msgpack  # noqa: F401  (the values' format: checked here, before any work)
    except ImportError:
        raise ConversionError("uniter-lmdb needs the lmdb and msgpack packages: pip install lmdb msgpack") from None
    if not (Path(folder) / "data.mdb").is_file():
        # Often the split folder (img_db/coco_train2014) instead of one of its databases: name them.
        inside = sorted(p.parent.name for p in Path(folder).glob("*/data.mdb"))
        hint = f"; the LMDB folders in it: {', '.join(inside)}" if inside else ""
        raise ConversionError(f"{folder}: not an LMDB folder (no data.mdb in it){hint}")
    try:
        return lmdb.open(str(folder), readonly=True, lock=False, readahead=False, max_readers=1)
    except lmdb.Error as e:
        raise ConversionError(f"{folder}: cannot open the LMDB ({e})") from None


def uniter_records(folder: str | os.PathLike) -> Iterator[Record]:
    """Records of a UNITER img_db LMDB, in key order; the image id is the key without `.npz`."""
    env = _open_lmdb(folder)
    try:
        with env.begin() as txn:
            for key, value in txn.cursor():
                if key == _UNITER_NAMES:
                    continue
                name = key.decode("utf-8", errors="replace")
                image_id = name.removesuffix(".npz")
                yield f"{folder}, key {name}", image_id, lambda n=name, v=value, i=image_id: parse_uniter(n, v, i)
    finally:
        env.close()


def convert(
    records: Iterable[Record],
    out: str | os.PathLike,
    num_objects: int = 100,
    feature_dim: int = FEATURE_DIM,
    pad: bool = False,
    skip_bad: bool = False,
    compression: str | None = None,
    progress: bool = True,
    total: int | None = None,
    image_ids: dict[str, str] | None = None,
    sources: Sequence[str | os.PathLike] | None = None,
) -> ConversionReport:
    """Write records into a store at `out` (atomically). Raises ConversionError on the first bad
    record unless skip_bad. `image_ids` renames every image (one missing from it is a bad record).
    `sources`, the inputs the records come from, are named when they hold no image to convert.
    Returns what was written and skipped."""
    report = ConversionReport()
    with FeatureStoreWriter(out, num_objects, feature_dim, padded=pad, compression=compression) as writer:
        bar = tqdm(
            records,
            total=total,
            unit="img",
            desc=f"-> {Path(out).name}",
            disable=not progress,
            mininterval=1.0,
            smoothing=0.1,
        )
        for location, image_id, parse in bar:
            try:
                raw = parse()
                image_id = raw.image_id
                if image_ids is not None:
                    if raw.image_id not in image_ids:
                        raise BadRecordError("image id", f"{raw.image_id!r} is not in the --image-ids map")
                    raw.image_id = image_ids[raw.image_id]
                if raw.image_id in writer:  # said here, where it is known whether --image-ids made the id
                    mapped = f" (--image-ids maps {image_id!r} to it)" if image_ids is not None else ""
                    raise BadRecordError("image id", f"{raw.image_id!r} is an earlier record's id too{mapped}")
                writer.add(raw.image_id, **_fit(raw, num_objects, feature_dim, pad))
            except BadRecordError as e:
                where = location + (f" (image {image_id})" if image_id else "")
                msg = f"{where}: {e}"
                if not skip_bad:
                    raise ConversionError(msg + " (pass --skip-bad to skip such records)") from None
                report.skipped += 1
                if len(report.skipped_examples) < 10:
                    report.skipped_examples.append(msg)
                continue
            report.written += 1
        bar.close()
        if report.written == 0:  # raised inside the writer's block: it deletes the empty store
            raise ConversionError(_nothing_converted(report, out, sources))
    return report


def _hold_no_records(paths: Sequence[str | os.PathLike]) -> str:
    return f"{', '.join(map(str, paths))} {'holds' if len(paths) == 1 else 'hold'} no records"


def _nothing_converted(report: ConversionReport, out: str | os.PathLike, sources: Sequence | None) -> str:
    """Why a conversion wrote no image, naming its inputs (an empty one is often a failed download)."""
    inputs = ", ".join(map(str, sources)) if sources else None
    if report.skipped == 0:
        return _hold_no_records(sources) if sources else f"no records to convert into {out}"
    return (
        f"no images converted into {out}: all {report.skipped} records{f' of {inputs}' if inputs else ''} were bad "
        f"and skipped (--skip-bad); the first: {report.skipped_examples[0]}"
    )


def check_output_path(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    overwrite: bool = False,
    several_inputs: bool = True,
) -> None:
    """Raise ConversionError, before any work, if the store cannot be written at `out`, would replace
    one of the inputs (a symlink to one included), or would replace an existing file unless
    `overwrite` (OutputExistsError): the finished store is renamed over `out`. `several_inputs`:
    whether the format converts several input files into one store (the TSVs), which the error suggests."""
    out = Path(out)
    if out.is_dir():
        raise ConversionError(f"output {out} is an existing folder, not a store file")
    existing_parent = nearest_existing(out.absolute().parent)
    if not existing_parent.is_dir():
        raise ConversionError(f"cannot create {out}: {existing_parent} is not a folder")
    if not os.path.lexists(out):
        return
    for path in inputs:
        if os.path.exists(path) and out.exists() and os.path.samefile(out, path):
            raise ConversionError(f"output {out} is the input {path}; refusing to overwrite it (choose another --out)")
    if not overwrite:  # e.g. a second TSV converted with the first one's --out: keep the first store
        if several_inputs:
            combine = "to convert several files into one store, name them all in one command"
        else:  # npz-dir and uniter-lmdb read one folder: stores are combined in data.json instead
            combine = 'to use several stores together, list them all in data.json\'s "stores"'
        raise OutputExistsError(
            f"output {out} already exists; refusing to replace it (pass --overwrite to replace it, or choose another "
            f"--out; {combine})"
        )


def convert_lxmert_tsv(
    inputs: Sequence[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False, **kwargs
) -> ConversionReport:
    """LXMERT TSV file(s) -> store; an existing `out` is replaced only if `overwrite`; kwargs as `convert`."""
    return _convert_tsv(inputs, out, parse_tsv_row, overwrite, **kwargs)


def convert_butd_tsv(
    inputs: Sequence[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False, **kwargs
) -> ConversionReport:
    """bottom-up-attention TSV file(s) -> store; `overwrite` and kwargs as `convert_lxmert_tsv`."""
    return _convert_tsv(inputs, out, parse_butd_row, overwrite, **kwargs)


def _convert_tsv(
    inputs: Sequence[str | os.PathLike], out: str | os.PathLike, parse_row: ParseRow, overwrite: bool, **kwargs
) -> ConversionReport:
    for path in inputs:  # all of them now, not after converting the first 17 GB
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such TSV file: {path}")
        if os.path.isdir(path):
            raise ConversionError(f"{path}: a folder, not a TSV file")
    empty = [path for path in dict.fromkeys(inputs) if os.path.isfile(path) and os.path.getsize(path) == 0]
    if empty:  # e.g. a failed download: its images would be missing from the store
        raise ConversionError(_hold_no_records(empty) + " (empty file)")
    check_output_path(inputs, out, overwrite)
    records = tsv_records(inputs, kwargs.get("feature_dim", FEATURE_DIM), parse_row)
    return convert(records, out, sources=inputs, **kwargs)


def convert_npz_dir(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    allow_pickle: bool = False,
    boxes_normalized: bool = False,
    **kwargs,
) -> ConversionReport:
    """A folder of per-image .npz files -> store; `allow_pickle` and `boxes_normalized` as `parse_npz`,
    `overwrite` and kwargs as `convert_lxmert_tsv`."""
    files = list(Path(folder).glob("*.npz"))
    check_output_path(files, out, overwrite, several_inputs=False)
    total = len(files)
    records = npz_records(folder, allow_pickle, boxes_normalized)
    return convert(records, out, total=total, sources=[folder], **kwargs)


def convert_uniter_lmdb(
    folder: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False, **kwargs
) -> ConversionReport:
    """A UNITER img_db LMDB folder (feat_th0.2_max100_min10, ..._compressed, all, ...) -> store;
    `overwrite` and kwargs as `convert_lxmert_tsv`."""
    env = _open_lmdb(folder)  # the folder is checked now, before the output path is touched
    with env.begin() as txn:
        total = env.stat()["entries"] - (txn.get(_UNITER_NAMES) is not None)
    env.close()
    check_output_path([Path(folder) / "data.mdb"], out, overwrite, several_inputs=False)
    return convert(uniter_records(folder), out, total=total, sources=[folder], **kwargs)


def read_image_id_map(path: str | os.PathLike) -> dict[str, str]:
    """--image-ids: a JSON object from the ids a converter reads to the ids the annotations use."""
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"--image-ids {path}: not a readable JSON file ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and v for v in mapping.values()):
        raise ConversionError(f"--image-ids {path}: expected a JSON object of non-empty strings (name -> image id)")
    return mapping


def positive_int(text: str) -> int:
    """argparse type for sizes: a bad value is an option error (exit 2) before any file is touched."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m semvlp.data.convert", description="Convert region features into a semvlp HDF5 store."
    )
    sub = parser.add_subparsers(dest="format", required=True)
    tsv = sub.add_parser("lxmert-tsv", help="LXMERT feature TSV file(s)")
    tsv.add_argument("inputs", nargs="+")
    butd = sub.add_parser("butd-tsv", help="bottom-up-attention feature TSV file(s) (6 columns, no labels)")
    butd.add_argument("inputs", nargs="+")
    npz = sub.add_parser("npz-dir", help="a folder of per-image .npz files")
    npz.add_argument("folder")
    npz.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read the labels bottom-up-attention.pytorch keeps in a pickled 'info' entry; unpickling can run "
        "code from the files, so only for files you trust",
    )
    npz.add_argument(
        "--boxes-normalized",
        action="store_true",
        help="the files' boxes are already divided by the image size (default: in pixels)",
    )
    uniter = sub.add_parser("uniter-lmdb", help="a UNITER img_db LMDB folder (e.g. feat_th0.2_max100_min10)")
    uniter.add_argument("folder")
    format_parsers = {"lxmert-tsv": tsv, "butd-tsv": butd, "npz-dir": npz, "uniter-lmdb": uniter}
    for p in format_parsers.values():
        p.add_argument(
            "--out", required=True, help="the store to write (.h5); an existing file is kept unless --overwrite"
        )
        p.add_argument(
            "--overwrite", action="store_true", help="replace an existing --out once the new store is complete"
        )
        p.add_argument("--num-objects", type=positive_int, default=100, help="K, objects per image (default 100)")
        p.add_argument("--feature-dim", type=positive_int, default=FEATURE_DIM)
        p.add_argument("--pad", action="store_true", help="pad images with fewer than K boxes")
        p.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
        p.add_argument(
            "--compression",
            choices=("none", "gzip", "lzf"),
            default="none",
            help="compress features (smaller, slower to read; default none)",
        )
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument(
            "--image-ids",
            help="a JSON object from the ids read (TSV id column, .npz file or UNITER key without .npz) to the ids "
            "the annotations use; every image must be in it",
        )
    args = parser.parse_args(argv)
    # The writer's chunks grow with K and D; one over HDF5's limit would fail (or write a store that
    # HDF5 before 2.0 cannot read), so say so now, as an option error, not after a traceback.
    problem = chunk_size_problem(args.num_objects, args.feature_dim, args.pad)
    if problem is not None:
        format_parsers[args.format].error(
            f"--num-objects {args.num_objects} with --feature-dim {args.feature_dim}: {problem}"
        )
    kwargs = dict(
        overwrite=args.overwrite,
        num_objects=args.num_objects,
        feature_dim=args.feature_dim,
        pad=args.pad,
        skip_bad=args.skip_bad,
        progress=not args.quiet,
        compression=None if args.compression == "none" else args.compression,
    )
    # With --overwrite a failed conversion keeps the store already at --out (the new one is renamed
    # over it only when complete): say so, not just that no store was written.
    if os.path.isfile(args.out):
        not_written = f"no store written; the existing {args.out} is kept"
    else:
        not_written = f"no store written at {args.out}"
    try:
        with sigterm_as_interrupt():  # SIGTERM deletes the hidden partial file, as Ctrl-C does
            if args.image_ids is not None:
                kwargs["image_ids"] = read_image_id_map(args.image_ids)
            if args.format == "lxmert-tsv":
                report = convert_lxmert_tsv(args.inputs, args.out, **kwargs)
            elif args.format == "butd-tsv":
                report = convert_butd_tsv(args.inputs, args.out, **kwargs)
            elif args.format == "npz-dir":
                if not args.allow_pickle and has_unread_pickled_labels(args.folder):
                    print(
                        f"note: the .npz files in {args.folder} keep their labels in a pickled 'info' entry, which is "
                        "not read: the store will hold none (--allow-pickle reads them)",
                        file=sys.stderr,
                    )
                report = convert_npz_dir(
                    args.folder,
                    args.out,
                    allow_pickle=args.allow_pickle,
                    boxes_normalized=args.boxes_normalized,
                    **kwargs,
                )
            else:
                report = convert_uniter_lmdb(args.folder, args.out, **kwargs)
    except OutputExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # an option error, as argparse's
    except (ConversionError, OSError) as e:  # OSError: a missing input, no permission, a full disk...
        print(f"error: {e}", file=sys.stderr)
        print(not_written, file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        status = report_interrupt(e)
        print(not_written, file=sys.stderr)
        return status
    print(f"wrote {report.written} images (K={args.num_objects}) to {args.out}")
    if report.skipped:
        print(f"skipped {report.skipped} bad records; the first {len(report.skipped_examples)}:")
        for msg in report.skipped_examples:
            print(f"  {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
