"""The HDF5 region-feature store: exactly K detector objects per image, read one image per call.

One file per image source (COCO, VG, ...). The layout (format version 1) is documented in
docs/data_format.md; in short, for N images and K objects:

    features    float16 [N, K, D]   chunked one image per chunk (D = 2048 for bottom-up features)
    boxes       float32 [N, K, 4]   (x1, y1, x2, y2) divided by image width/height, in [0, 1]
    img_h img_w int32   [N]      0 x 0 when the source records no image size (UNITER: boxes come normalized)
    obj_ids     int32   [N, K]      detector class ids (stored int32, read as int64)
    obj_confs   float32 [N, K]
    attr_ids    int32   [N, K]
    attr_confs  float32 [N, K]
    image_ids   utf-8 strings [N]
    valid_mask  bool    [N, K]      only in stores built with padding (`--pad`)
    attrs: format_version, num_objects, feature_dim, padded

Why it is built this way (DESIGN.md section 4): a fixed K means visual batches never need
padding; fp16 halves the bytes; one chunk per image makes a random read touch one chunk; and
h5py reads one image per `ds[i]` call at thousands of images per second, while fancy-indexing
a list of rows is ~40x slower, so readers never do that. h5py file handles must not cross a
fork, so `FeatureStore` opens its file lazily, once per process.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 1
FEATURE_DIM = 2048
# Small per-object fields are chunked by this many images: reads of one row stay cheap
# (~5 us with h5py) without one HDF5 chunk per image for a 1.6 KB record.
_SMALL_CHUNK_ROWS = 64
# Per-object fields: name -> (on-disk dtype, in-memory dtype).
_OBJECT_FIELDS = {
    "obj_ids": (np.int32, np.int64),
    "obj_confs": (np.float32, np.float32),
    "attr_ids": (np.int32, np.int64),
    "attr_confs": (np.float32, np.float32),
}
# HDF5 before 2.0 can neither create a chunk of 4 GiB or more nor read one that HDF5 2.0 wrote
# (its newer layout message is refused), so no chunk of a store may reach that size.
MAX_CHUNK_BYTES = 2**32 - 1


@dataclass(frozen=True)
class _DatasetLayout:
    """How the writer creates one dataset: its shape per image, on-disk dtype and chunk shape."""

    row_shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]

    @property
    def chunk_bytes(self) -> int:
        return math.prod(self.chunks) * self.dtype.itemsize


def _store_layout(num_objects: int, feature_dim: int, padded: bool) -> dict[str, _DatasetLayout]:
    """Every dataset of a store with K objects of dimension D, in the order the writer creates them."""
    k, d, c = num_objects, feature_dim, _SMALL_CHUNK_ROWS
    layout = {
        "features": _DatasetLayout((k, d), np.dtype(np.float16), (1, k, d)),  # one image per chunk
        "boxes": _DatasetLayout((k, 4), np.dtype(np.float32), (c, k, 4)),
        "img_h": _DatasetLayout((), np.dtype(np.int32), (1024,)),
        "img_w": _DatasetLayout((), np.dtype(np.int32), (1024,)),
    }
    for name, (disk_dtype, _) in _OBJECT_FIELDS.items():
        layout[name] = _DatasetLayout((k,), np.dtype(disk_dtype), (c, k))
    layout["image_ids"] = _DatasetLayout((), h5py.string_dtype("utf-8"), (1024,))
    if padded:
        layout["valid_mask"] = _DatasetLayout((k,), np.dtype(np.bool_), (c, k))
    return layout


def chunk_size_problem(num_objects: int, feature_dim: int, padded: bool = False) -> str | None:
    """Why no store with K objects of dimension D can be written, or None when it can: the writer's
    largest HDF5 chunk would exceed MAX_CHUNK_BYTES. The text says how many objects would fit."""
    layout = _store_layout(num_objects, feature_dim, padded)
    name, dataset = max(layout.items(), key=lambda item: item[1].chunk_bytes)
    if dataset.chunk_bytes <= MAX_CHUNK_BYTES:
        return None
    # A chunk holds either all K objects of its rows or none (row_shape ()), so its size is K times
    # its size at K = 1.
    per_object = max(d.chunk_bytes for d in _store_layout(1, feature_dim, padded).values() if d.row_shape)
    fits = MAX_CHUNK_BYTES // per_object
    room = f"at most {fits:,} objects fit" if fits else "not even one object fits"
    return (
        f"the {name!r} dataset's HDF5 chunk {dataset.chunks} of {dataset.dtype} would take "
        f"{dataset.chunk_bytes:,} bytes, and HDF5 chunks must stay under 4 GiB (HDF5 before 2.0 can neither "
        f"write nor read a larger one); {room} with {feature_dim}-dimensional features"
    )


class StoreFormatError(ValueError):
    """A file is not a feature store this code can read."""


@dataclass
class ImageFeatures:
    """The detector output for one image, exactly K objects (see the module docstring)."""

    image_id: str
    features: np.ndarray  # [K, D] float16
    boxes: np.ndarray  # [K, 4] float32, normalized (x1, y1, x2, y2)
    img_h: int
    img_w: int
    obj_ids: np.ndarray  # [K] int64
    obj_confs: np.ndarray  # [K] float32
    attr_ids: np.ndarray  # [K] int64
    attr_confs: np.ndarray  # [K] float32
    valid_mask: np.ndarray | None  # [K] bool, only for stores built with padding


class ImageValueError(ValueError):
    """An image that a batch reads holds values the converters refuse (a store made by other means)."""


class BadRecordError(ValueError):
    """One input record is malformed; `field` names the offending column or key."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r}: {message}")
        self.field = field


_MAX_LABEL_ID = int(np.iinfo(np.int32).max)  # ids are stored as int32


def check_label_ids(field: str, ids: np.ndarray) -> None:
    """Raise BadRecordError unless every id is a whole number from 0 to 2**31 - 1.

    Ids are stored as int32 and used as class indices: a fractional, NaN, negative or larger id
    would be rounded, wrapped or crash the loss far from its source. There is no "no label" id:
    a source without labels stores id 0 with confidence 0.
    """
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iuf":
        raise BadRecordError(field, f"class ids must be numbers, got {ids.dtype} values")
    bad = (ids < 0) | (ids > _MAX_LABEL_ID)
    if ids.dtype.kind == "f":
        bad |= ~np.isfinite(ids) | (np.floor(ids) != ids)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise BadRecordError(
            field, f"object {i} has id {ids.flat[i].item()}; class ids must be whole numbers from 0 to {_MAX_LABEL_ID}"
        )


def check_image(
    features: np.ndarray,
    boxes: np.ndarray,
    img_h: int,
    img_w: int,
    obj_ids: np.ndarray,
    obj_confs: np.ndarray,
    attr_ids: np.ndarray,
    attr_confs: np.ndarray,
    num_objects: int,
    feature_dim: int,
    valid_mask: np.ndarray | None = None,
) -> None:
    """Raise BadRecordError naming the first field that does not fit the store's layout."""
    k = num_objects
    if features.shape != (k, feature_dim):
        raise BadRecordError("features", f"shape {features.shape}, expected {(k, feature_dim)}")
    if boxes.shape != (k, 4):
        raise BadRecordError("boxes", f"shape {boxes.shape}, expected {(k, 4)}")
    for name, arr in (
        ("obj_ids", obj_ids),
        ("obj_confs", obj_confs),
        ("attr_ids", attr_ids),
        ("attr_confs", attr_confs),
    ):
        if arr.shape != (k,):
            raise BadRecordError(name, f"shape {arr.shape}, expected {(k,)}")
    check_label_ids("obj_ids", obj_ids)
    check_label_ids("attr_ids", attr_ids)
    if valid_mask is not None and valid_mask.shape != (k,):
        raise BadRecordError("valid_mask", f"shape {valid_mask.shape}, expected {(k,)}")
    if not (img_h > 0 and img_w > 0 or img_h == img_w == 0):
        raise BadRecordError("img_h/img_w", f"image size must be positive (or 0x0: not recorded), got {img_h}x{img_w}")
    for name, arr in (("features", features), ("boxes", boxes), ("obj_confs", obj_confs), ("attr_confs", attr_confs)):
        if not np.isfinite(arr).all():
            raise BadRecordError(name, "contains NaN or infinite values")
    if boxes.size and (boxes.min() < 0.0 or boxes.max() > 1.0):
        raise BadRecordError(
            "boxes", f"normalized coordinates outside [0, 1]: min {boxes.min():.4f}, max {boxes.max():.4f}"
        )
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise BadRecordError("boxes", "a box has x2 < x1 or y2 < y1")


class _PartialFile(io.FileIO):
    """The writer's temporary file, which HDF5 writes through (h5py's fileobj driver).

    Why not let HDF5 open the path: after a failed write (a full disk), HDF5 fails to close the file
    and then crashes the process at exit (a segfault; h5py 3.16, HDF5 2.0). Here a failed write is
    kept in `error`, naming the store, and it and every later write are dropped, so HDF5 never sees a
    failure; the writer raises `error` after each image and before renaming the file into place. A
    discarded file drops its writes too, so closing it writes nothing.
    """

    def __init__(self, fd: int, store: Path):
        super().__init__(fd, "r+")
        self.store = store
        self.error: OSError | None = None
        self.discarding = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = len(view) if self.discarding or self.error is not None else 0
        while done < len(view):  # h5py ignores a short write (a nearly full disk): finish it
            try:
                done += super().write(view[done:])
            except OSError as e:
                self.error = OSError(e.errno, e.strerror, str(self.store))
                break
        return len(view)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = super().readinto(view)
        view[n:] = bytes(len(view) - n)  # past the end of the file: zeros, as HDF5's own driver reads
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        if not self.discarding and self.error is None:
            try:
                return super().truncate(size)
            except OSError as e:
                self.error = OSError(e.errno, e.strerror, str(self.store))
        return self.tell() if size is None else size

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


class FeatureStoreWriter:
    """Writes a store to a temporary file and renames it into place only when complete.

    Use as a context manager; an exception (or Ctrl-C) inside the block deletes the partial
    file and the folders created for `path`, so an interrupted conversion never leaves a
    plausible-looking broken store, nor empty folders:

        with FeatureStoreWriter("coco.h5", num_objects=36) as w:
            w.add("COCO_1", features, boxes, img_h, img_w, obj_ids, obj_confs, attr_ids, attr_confs)

    Args:
        path: final file path.
        num_objects: K, objects per image.
        feature_dim: D, feature size.
        padded: the store records a per-object validity mask (`add` then takes `valid_mask`).
        compression: None (default: fastest reads), "gzip" or "lzf", for the features only.
        compression_level: gzip level.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        num_objects: int = 100,
        feature_dim: int = FEATURE_DIM,
        padded: bool = False,
        compression: str | None = None,
        compression_level: int = 4,
    ):
        if compression not in (None, "gzip", "lzf"):
            raise ValueError(f"compression must be None, 'gzip' or 'lzf', got {compression!r}")
        for name, value in (("num_objects", num_objects), ("feature_dim", feature_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        problem = chunk_size_problem(num_objects, feature_dim, padded)
        if problem is not None:
            raise ValueError(f"num_objects={num_objects}, feature_dim={feature_dim}: {problem}")
        self.path = Path(path)
        self.num_objects = num_objects
        self.feature_dim = feature_dim
        self.padded = padded
        self._compression = compression
        self._compression_level = compression_level if compression == "gzip" else None
        self._file: h5py.File | None = None
        self._raw: _PartialFile | None = None  # what HDF5 writes the file through
        self._tmp_path: Path | None = None
        self._created_folders: list[Path] = []  # for `path`, removed again if the write fails
        self._ids: set[str] = set()
        self._n = 0
        self._capacity = 0

    def __enter__(self) -> FeatureStoreWriter:
        try:
            _make_folders(self.path.parent, self._created_folders)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
            self._tmp_path = Path(tmp)
            self._raw = _PartialFile(fd, self.path)
            self._create_datasets()
            self._raw.raise_error()
        except BaseException:  # __exit__ does not run when __enter__ fails: clean up here
            self._discard()
            raise
        return self

    def _create_datasets(self) -> None:
        assert self._tmp_path is not None
        f = h5py.File(self._raw, "w")
        self._file = f
        k, d = self.num_objects, self.feature_dim
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["num_objects"] = k
        f.attrs["feature_dim"] = d
        f.attrs["padded"] = self.padded
        f.attrs["box_format"] = "x1y1x2y2 normalized by image width/height"
        for name, dataset in _store_layout(k, d, self.padded).items():
            compression = {}  # only the features are ever compressed
            if name == "features":
                compression = dict(compression=self._compression, compression_opts=self._compression_level)
            shape, maxshape = (0, *dataset.row_shape), (None, *dataset.row_shape)
            f.create_dataset(name, shape, dataset.dtype, maxshape=maxshape, chunks=dataset.chunks, **compression)
        self._ds = {name: f[name] for name in f}
        self._pending: dict[str, list] = {name: [] for name in self._ds if name != "features"}

    def __len__(self) -> int:
        return self._n

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._ids

    def add(
        self,
        image_id: str,
        features: np.ndarray,
        boxes: np.ndarray,
        img_h: int,
        img_w: int,
        obj_ids: np.ndarray,
        obj_confs: np.ndarray,
        attr_ids: np.ndarray,
        attr_confs: np.ndarray,
        valid_mask: np.ndarray | None = None,
    ) -> None:
        """Append one image. Boxes are already normalized. Raises BadRecordError on bad input."""
        if self._file is None:
            raise RuntimeError("FeatureStoreWriter.add outside its `with` block")
        if image_id in self._ids:
            raise BadRecordError("img_id", f"duplicate image id {image_id!r}")
        if self.padded != (valid_mask is not None):
            raise ValueError("valid_mask must be given exactly when the store is padded")
        check_image(
            features,
            boxes,
            img_h,
            img_w,
            obj_ids,
            obj_confs,
            attr_ids,
            attr_confs,
            self.num_objects,
            self.feature_dim,
            valid_mask,
        )
        if features.dtype != np.float16 and np.abs(features).max(initial=0.0) > np.finfo(np.float16).max:
            raise BadRecordError("features", "values overflow float16")
        i = self._n
        if i == self._capacity:
            self._capacity = max(1024, 2 * self._capacity)
            for ds in self._ds.values():
                ds.resize(self._capacity, axis=0)
        self._ds["features"][i] = features.astype(np.float16, copy=False)
        record = {
            "boxes": boxes,
            "img_h": img_h,
            "img_w": img_w,
            "obj_ids": obj_ids,
            "obj_confs": obj_confs,
            "attr_ids": attr_ids,
            "attr_confs": attr_confs,
            "image_ids": image_id,
        }
        if valid_mask is not None:
            record["valid_mask"] = valid_mask
        for name, value in record.items():
            self._pending[name].append(value)
        self._ids.add(image_id)
        self._n += 1
        if len(self._pending["image_ids"]) == _SMALL_CHUNK_ROWS:
            self._flush()
        self._raw.raise_error()  # a full disk stops the conversion now, not at the end

    def _flush(self) -> None:
        """Write the buffered small fields: one h5py call per field per 64 images, not per image."""
        n = len(self._pending["image_ids"])
        if n:
            start = self._n - n
            for name, values in self._pending.items():
                ds = self._ds[name]
                ds[start : self._n] = np.asarray(values, dtype=object if name == "image_ids" else ds.dtype)
                values.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None and self._tmp_path is not None
        if exc_type is not None:
            self._discard()
            return
        try:
            self._flush()
            for ds in self._file.values():
                ds.resize(self._n, axis=0)
            self._file.attrs["num_images"] = self._n
            self._file.close()
            self._file = None
            self._raw.close()
            self._raw.raise_error()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp_path, 0o666 & ~umask)  # mkstemp made it private
            os.replace(self._tmp_path, self.path)
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        """Delete what this writer made: the partial file, then the folders it created for `path`.
        Never raises from closing the file, so the error that stopped the write is the one reported."""
        try:
            if self._file is not None:
                self._raw.discarding = True  # nothing more to write, so nothing left to fail on
                with contextlib.suppress(Exception):  # already failing: report the first error
                    self._file.close()
        finally:
            self._file = None
            if self._raw is not None:
                self._raw.close()
            if self._tmp_path is not None:
                self._tmp_path.unlink(missing_ok=True)
            _remove_folders(self._created_folders)


def _make_folders(folder: Path, created: list[Path]) -> None:
    """Create `folder` and its missing parents, appending each one made here to `created`, outermost
    first: a failed write removes exactly those, never a folder that existed or appeared meanwhile."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # made by someone else meanwhile: not ours to remove
            continue
        created.append(path)


def _remove_folders(created: list[Path]) -> None:
    """Remove the folders `_make_folders` created, innermost first, while they are empty."""
    while created:
        try:
            created[-1].rmdir()
        except OSError:  # something else was put there: keep it, and the folders above it
            return
        created.pop()


class _RowIndex:
    """File offsets of the rows of one uncompressed chunked dataset, so a row is one pread.

    h5py spends 5-25 us of Python per `ds[i]` call, and a whole-chunk read allocates a new
    bytes object; a pread straight into the batch array does neither. Built once per process
    from HDF5's chunk index (H5Dchunk_iter, ~1 us per chunk). `ok` is False, and the caller
    falls back to h5py, when the layout does not allow it (filters, partial chunks, a chunk
    never written, a non-native byte order).
    """

    def __init__(self, ds: h5py.Dataset):
        self.ok = False
        if (
            ds.chunks is None
            or ds.chunks[1:] != ds.shape[1:]
            or ds.dtype.kind not in "biuf"
            or not ds.dtype.isnative
            or ds.id.get_create_plist().get_nfilters() != 0
            or ds.shape[0] == 0
        ):
            return
        self.dtype = ds.dtype
        self.rows_per_chunk = ds.chunks[0]
        self.row_nbytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
        offsets = np.full(-(-ds.shape[0] // self.rows_per_chunk), -1, np.int64)

        def visit(info) -> None:
            offsets[info.chunk_offset[0] // self.rows_per_chunk] = info.byte_offset

        try:
            ds.id.chunk_iter(visit)
        except (AttributeError, RuntimeError):  # HDF5 < 1.12.3 has no chunk_iter
            return
        self.offsets = offsets
        self.ok = bool((offsets >= 0).all())

    def read(self, fd: int, row: int, dst: np.ndarray) -> None:
        """Row `row` into `dst` (its shape: one row), casting from the on-disk dtype if needed."""
        offset = int(self.offsets[row // self.rows_per_chunk]) + (row % self.rows_per_chunk) * self.row_nbytes
        if dst.dtype == self.dtype and dst.flags.c_contiguous:
            n = os.preadv(fd, [memoryview(dst).cast("B")], offset)
        else:
            buf = os.pread(fd, self.row_nbytes, offset)
            n = len(buf)
            dst[...] = np.frombuffer(buf, self.dtype).reshape(dst.shape)
        if n != self.row_nbytes:
            raise OSError(f"short read: {n} of {self.row_nbytes} bytes at offset {offset}")


class FeatureStore:
    """Read-only access to one store file; safe to pass to DataLoader workers.

    The HDF5 file is opened on first read in each process (an h5py handle must not cross a
    fork). `read` returns an ImageFeatures copy; `read_into` writes one image straight into
    preallocated batch arrays, which is what the batch builders use.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"feature store not found: {self.path}")
        try:
            with h5py.File(self.path, "r") as f:
                version = f.attrs.get("format_version")
                if version is None:
                    raise StoreFormatError(f"{self.path}: not a semvlp feature store (no format_version)")
                if int(version) != FORMAT_VERSION:
                    raise StoreFormatError(
                        f"{self.path}: store format version {int(version)}, this code reads version {FORMAT_VERSION}"
                    )
                self._check_complete(f)
                self.num_objects = int(f.attrs["num_objects"])
                self.feature_dim = int(f.attrs["feature_dim"])
                self.padded = bool(f.attrs["padded"])
                self.image_ids: list[str] = self._read_image_ids(f["image_ids"])
        except OSError as e:
            raise StoreFormatError(f"{self.path}: cannot open as HDF5 ({e})") from e
        self._rows = {image_id: row for row, image_id in enumerate(self.image_ids)}
        if len(self._rows) != len(self.image_ids):  # else a lookup would read the other image's row
            first: dict[str, int] = {}
            for row, image_id in enumerate(self.image_ids):
                if image_id in first:
                    rows = f"rows {first[image_id]} and {row}"
                    raise StoreFormatError(f"{self.path}: image id {image_id!r} is in {rows}; ids must be unique")
                first[image_id] = row
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._fd = -1
        self._label_id_ranges: dict[str, tuple[tuple[int, str], tuple[int, str]]] = {}

    def _check_complete(self, f: h5py.File) -> None:
        """StoreFormatError naming what a damaged or hand-made store lacks, rather than a KeyError (or
        a short read) at the first batch that needs it."""
        missing = [name for name in ("num_objects", "feature_dim", "padded") if name not in f.attrs]
        if missing:
            raise StoreFormatError(f"{self.path}: not a complete feature store (no attribute {', '.join(missing)})")
        n = len(f["image_ids"]) if isinstance(f.get("image_ids"), h5py.Dataset) else None
        k, d = int(f.attrs["num_objects"]), int(f.attrs["feature_dim"])
        expected = {
            "image_ids": (n,),
            "features": (n, k, d),
            "boxes": (n, k, 4),
            "img_h": (n,),
            "img_w": (n,),
            **{name: (n, k) for name in _OBJECT_FIELDS},
        }
        if f.attrs["padded"]:
            expected["valid_mask"] = (n, k)
        missing = [name for name in expected if not isinstance(f.get(name), h5py.Dataset)]
        if missing:
            raise StoreFormatError(f"{self.path}: not a complete feature store (no dataset {', '.join(missing)})")
        wrong = [
            f"{name} has shape {f[name].shape}, expected {shape}"
            for name, shape in expected.items()
            if f[name].shape != shape
        ]
        if wrong:
            raise StoreFormatError(f"{self.path}: not a complete feature store ({'; '.join(wrong)})")

    def _read_image_ids(self, ds: h5py.Dataset) -> list[str]:
        """The image ids, which the annotations look up as strings: a store written by hand with
        numbers (np.arange) is refused here, not with an AttributeError at the first lookup."""
        if h5py.check_string_dtype(ds.dtype) is None:
            raise StoreFormatError(f"{self.path}: image_ids must be strings, got {ds.dtype} values")
        try:
            return [s.decode("utf-8") for s in ds[:]]
        except UnicodeDecodeError as e:
            raise StoreFormatError(f"{self.path}: image_ids must be UTF-8 strings ({e})") from None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._rows

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, images={len(self)}, K={self.num_objects})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_file", "_pid", "_ds", "_index"):
            state.pop(key, None)
        state["_file"], state["_pid"], state["_fd"] = None, None, -1
        return state

    def row(self, image_id: str) -> int:
        """Row of an image id; KeyError naming the store if absent."""
        try:
            return self._rows[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in {self.path}") from None

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            # A handle inherited through fork is left alone (closing it could disturb the parent's).
            # rdcc_nbytes=0: reads are random, so HDF5's chunk cache only adds a copy.
            self._file = h5py.File(self.path, "r", rdcc_nbytes=0)
            self._pid = os.getpid()
            self._ds = {name: self._file[name] for name in self._file}
            self._fd = os.open(self.path, os.O_RDONLY)
            self._index = {}
            for name in ("features", "boxes", "obj_ids", "obj_confs", "attr_ids", "attr_confs", "valid_mask"):
                if name in self._ds:
                    index = _RowIndex(self._ds[name])
                    if index.ok:
                        self._index[name] = index
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
            os.close(self._fd)
        self._file = None

    def __del__(self) -> None:
        try:
            if self._file is not None and self._pid == os.getpid():
                os.close(self._fd)
        except (AttributeError, OSError):
            pass

    def read(self, key: str | int) -> ImageFeatures:
        """One image by id or row."""
        row = self.row(key) if isinstance(key, str) else int(key)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {self.path} with {len(self)} images")
        k = self.num_objects
        out = {
            "features": np.empty((1, k, self.feature_dim), np.float16),
            "boxes": np.empty((1, k, 4), np.float32),
            "obj_ids": np.empty((1, k), np.int64),
            "obj_confs": np.empty((1, k), np.float32),
            "attr_ids": np.empty((1, k), np.int64),
            "attr_confs": np.empty((1, k), np.float32),
        }
        if self.padded:
            out["valid_mask"] = np.empty((1, k), np.bool_)
        self.read_into(row, out, 0)
        self._h5()
        return ImageFeatures(
            image_id=self.image_ids[row],
            features=out["features"][0],
            boxes=out["boxes"][0],
            img_h=int(self._ds["img_h"][row]),
            img_w=int(self._ds["img_w"][row]),
            obj_ids=out["obj_ids"][0],
            obj_confs=out["obj_confs"][0],
            attr_ids=out["attr_ids"][0],
            attr_confs=out["attr_confs"][0],
            valid_mask=out["valid_mask"][0] if self.padded else None,
        )

    def read_into(self, row: int, out: dict[str, np.ndarray], j: int) -> None:
        """Copy image `row` into `out[name][j]` for every array in `out`.

        Recognized names: features, boxes, obj_ids, obj_confs, attr_ids, attr_confs, valid_mask
        (filled with True for stores built without padding). Names are optional, so a caller
        that needs only features and boxes pays only for those reads.
        """
        self._h5()
        ds, index = self._ds, self._index
        for name, dst in out.items():
            if name == "valid_mask" and not self.padded:
                dst[j] = True
            elif name in index:
                index[name].read(self._fd, row, dst[j])
            else:  # compressed (e.g. the toy world's features): h5py decodes
                dst[j] = ds[name][row]

    def label_id_range(self, name: str, rows_per_read: int = 8192) -> tuple[tuple[int, str], tuple[int, str]]:
        """The smallest and the largest id of the label dataset `name` (obj_ids or attr_ids), each with
        an image that holds it: ((lowest, image id), (highest, image id)). Reads the dataset in slices,
        once per store (a start asks twice: the label counts, then the notes on unlabeled stores)."""
        if name in self._label_id_ranges:
            return self._label_id_ranges[name]
        ds = self._h5()[name]
        lowest, highest = (np.iinfo(np.int64).max, ""), (np.iinfo(np.int64).min, "")
        for start in range(0, len(self), rows_per_read):
            ids = ds[start : start + rows_per_read]
            per_image_min, per_image_max = ids.min(1), ids.max(1)
            low, high = int(per_image_min.argmin()), int(per_image_max.argmax())
            if per_image_min[low] < lowest[0]:
                lowest = (int(per_image_min[low]), self.image_ids[start + low])
            if per_image_max[high] > highest[0]:
                highest = (int(per_image_max[high]), self.image_ids[start + high])
        self._label_id_ranges[name] = lowest, highest
        return lowest, highest

    def value_problems(self, rows_per_read: int = 1024) -> list[str]:
        """What the writer's checks (check_image) refuse, in a store written by other means: non-finite
        features or confidences, boxes outside [0, 1] or with x2 < x1 or y2 < y1. Each problem once,
        naming the first image and how many have it. Reads every dataset in slices: the whole store once
        (9 s for 1.6 GB from a cold page cache on a 2-core CPU machine, disk-bound)."""
        f = self._h5()
        found: dict[str, list[int]] = {}  # problem -> [first row, images]
        for start in range(0, len(self), rows_per_read):
            rows = slice(start, min(start + rows_per_read, len(self)))
            with np.errstate(over="ignore"):  # a float32 store's values beyond float16's range: inf, as read
                features = f["features"][rows].astype(np.float16, copy=False)
            arrays = {"features": features, **{name: f[name][rows] for name in ("boxes", "obj_confs", "attr_confs")}}
            for problem, bad in image_value_problems(arrays).items():
                bad = np.flatnonzero(bad)
                if len(bad):
                    found.setdefault(problem, [start + int(bad[0]), 0])[1] += len(bad)
        return [
            f"{self.path}: {problem}, image {self.image_ids[first]!r} (row {first})"
            + (f" and {count - 1} more" if count > 1 else "")
            for problem, (first, count) in found.items()
        ]


def image_value_problems(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image (the first axis), what check_image refuses in the values of `arrays` (features as
    the loader reads them, float16; boxes; and obj_confs and attr_confs where given): {problem: bool
    [images]}. The problems are worded as `value_problems` and the loader's error name them."""
    boxes, finite_features = arrays["boxes"], np.isfinite(arrays["features"]).all(axis=(1, 2))
    x1, y1, x2, y2 = np.moveaxis(boxes, -1, 0)
    problems = {
        "features are not finite in float16 (NaN, inf or beyond 65504)": ~finite_features,
        "boxes are not normalized to [0, 1]": ~((boxes >= 0) & (boxes <= 1)).all(axis=(1, 2)),  # NaN too
        "a box has x2 < x1 or y2 < y1": ((x2 < x1) | (y2 < y1)).any(axis=1),
    }
    for name in ("obj_confs", "attr_confs"):
        if name in arrays:
            problems[f"{name} hold non-finite values"] = ~np.isfinite(arrays[name]).all(axis=1)
    return problems


class FeatureStoreSet:
    """Several stores seen as one: global rows, lookup by image id, the same K everywhere.

    An image id may be in one store only: two stores that both hold "9" (COCO's and Visual Genome's
    numeric ids) would give some questions the other image's features, silently.
    """

    def __init__(self, stores: Sequence[FeatureStore | str | os.PathLike]):
        if not stores:
            raise ValueError("FeatureStoreSet needs at least one store")
        self.stores = [s if isinstance(s, FeatureStore) else FeatureStore(s) for s in stores]
        ks = {s.num_objects for s in self.stores}
        ds = {s.feature_dim for s in self.stores}
        if len(ks) != 1 or len(ds) != 1:
            detail = ", ".join(f"{s.path} (K={s.num_objects}, D={s.feature_dim})" for s in self.stores)
            raise StoreFormatError(f"stores disagree on objects per image or feature size: {detail}")
        self.num_objects = ks.pop()
        self.feature_dim = ds.pop()
        self.padded = any(s.padded for s in self.stores)
        for i, earlier in enumerate(self.stores):
            for later in self.stores[i + 1 :]:
                shared = [image_id for image_id in later.image_ids if image_id in earlier]
                if shared:
                    raise StoreFormatError(
                        f"image id {shared[0]!r} is in both {earlier.path} and {later.path}"
                        + (f" (and {len(shared) - 1} more ids)" if len(shared) > 1 else "")
                        + ": an id must name one image across the stores. Convert one of them again with "
                        "--image-ids, a map to ids of its own (e.g. COCO's '9' -> 'COCO_train2014_000000000009')"
                    )
        self._offsets = np.cumsum([0] + [len(s) for s in self.stores])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __contains__(self, image_id: object) -> bool:
        return any(image_id in s for s in self.stores)

    @property
    def image_ids(self) -> list[str]:
        return [i for s in self.stores for i in s.image_ids]

    def row(self, image_id: str) -> int:
        for offset, s in zip(self._offsets, self.stores, strict=False):
            if image_id in s:
                return int(offset) + s.row(image_id)
        raise KeyError(f"image {image_id!r} is in none of the stores {', '.join(str(s.path) for s in self.stores)}")

    def rows(self, image_ids: Iterable[str]) -> np.ndarray:
        """Global rows of many ids, -1 where an id is missing."""
        return np.array([self.row(i) if i in self else -1 for i in image_ids], dtype=np.int64)

    def _locate(self, row: int) -> tuple[FeatureStore, int]:
        s = int(np.searchsorted(self._offsets, row, side="right")) - 1
        if not 0 <= s < len(self.stores):
            raise IndexError(f"row {row} out of range for {len(self)} images")
        return self.stores[s], row - int(self._offsets[s])

    def read(self, key: str | int) -> ImageFeatures:
        row = self.row(key) if isinstance(key, str) else int(key)
        store, local = self._locate(row)
        feats = store.read(local)
        if self.padded and feats.valid_mask is None:
            feats.valid_mask = np.ones(self.num_objects, np.bool_)
        return feats

    def read_into(self, row: int, out: dict[str, np.ndarray], j: int) -> None:
        store, local = self._locate(int(row))
        store.read_into(local, out, j)

    def describe(self, row: int) -> str:
        """Where global row `row` is: its store, image id and row there."""
        store, local = self._locate(int(row))
        return f"{store.path}, image {store.image_ids[local]!r} (row {local})"


def open_stores(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> FeatureStoreSet:
    """A FeatureStoreSet from one path or a list of paths."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return FeatureStoreSet(list(paths))
