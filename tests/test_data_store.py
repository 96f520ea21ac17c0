"""The HDF5 feature store: write/read round trip, padding, atomic writes, fork safety, bad input."""

import multiprocessing as mp
import pickle
import re

import h5py
import numpy as np
import pytest

from semvlp.data.batching import visual_batch
from semvlp.data.store import (
    FORMAT_VERSION,
    BadRecordError,
    FeatureStore,
    FeatureStoreSet,
    FeatureStoreWriter,
    StoreFormatError,
)

K, D = 7, 24  # small odd sizes; the store does not care about 100 x 2048


def make_image(rng, k=K, d=D):
    x1y1 = rng.uniform(0, 0.5, (k, 2)).astype(np.float32)
    return dict(
        features=rng.normal(size=(k, d)).astype(np.float16),
        boxes=np.concatenate([x1y1, x1y1 + rng.uniform(0, 0.5, (k, 2)).astype(np.float32)], 1),
        img_h=int(rng.integers(100, 900)),
        img_w=int(rng.integers(100, 900)),
        obj_ids=rng.integers(0, 1600, k),
        obj_confs=rng.random(k).astype(np.float32),
        attr_ids=rng.integers(0, 400, k),
        attr_confs=rng.random(k).astype(np.float32),
    )


def write_store(path, n=5, seed=0, padded=False, compression=None, prefix="img"):
    rng = np.random.default_rng(seed)
    images = {}
    with FeatureStoreWriter(path, K, D, padded=padded, compression=compression) as w:
        for i in range(n):
            img = make_image(rng)
            if padded:
                img["valid_mask"] = np.arange(K) < (i % K) + 1
            images[f"{prefix}{i}"] = img
            w.add(f"{prefix}{i}", **img)
    return images


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_round_trip(tmp_path, compression):
    path = tmp_path / "s.h5"
    images = write_store(path, n=70, compression=compression)  # > 64: crosses a write buffer flush
    store = FeatureStore(path)
    assert len(store) == 70 and store.num_objects == K and store.feature_dim == D and not store.padded
    assert store.image_ids == list(images)
    assert "img3" in store and "nope" not in store
    for row, (image_id, img) in enumerate(images.items()):
        for key in (image_id, row):
            got = store.read(key)
            assert got.image_id == image_id and got.valid_mask is None
            assert got.features.dtype == np.float16 and got.boxes.dtype == np.float32
            assert got.obj_ids.dtype == np.int64 and got.attr_ids.dtype == np.int64
            np.testing.assert_array_equal(got.features, img["features"])
            np.testing.assert_array_equal(got.boxes, img["boxes"])
            np.testing.assert_array_equal(got.obj_ids, img["obj_ids"])
            np.testing.assert_array_equal(got.obj_confs, img["obj_confs"])
            np.testing.assert_array_equal(got.attr_ids, img["attr_ids"])
            np.testing.assert_array_equal(got.attr_confs, img["attr_confs"])
            assert (got.img_h, got.img_w) == (img["img_h"], img["img_w"])
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == FORMAT_VERSION and f.attrs["num_objects"] == K
        assert f["features"].chunks == (1, K, D)  # one image per chunk
        assert "valid_mask" not in f
    with pytest.raises(KeyError, match="nope"):
        store.read("nope")


def test_padded_store_and_store_set(tmp_path):
    a = write_store(tmp_path / "a.h5", n=3)
    b = write_store(tmp_path / "b.h5", n=4, padded=True, prefix="b")
    s = FeatureStoreSet([tmp_path / "a.h5", tmp_path / "b.h5"])
    assert len(s) == 7 and s.padded and s.num_objects == K
    assert s.row("img2") == 2 and s.row("b0") == 3
    assert s.rows(["b3", "zzz", "img0"]).tolist() == [6, -1, 0]
    np.testing.assert_array_equal(s.read("b2").valid_mask, b["b2"]["valid_mask"])
    np.testing.assert_array_equal(s.read("b2").features, b["b2"]["features"])
    assert s.read("img1").valid_mask.all()  # unpadded stores read as all-valid in a padded set
    batch = visual_batch(s, np.array([s.row("img1"), s.row("b2")]))  # as the loader reads them
    assert batch["visual_attention_mask"][0].all()
    np.testing.assert_array_equal(batch["visual_attention_mask"][1].numpy(), b["b2"]["valid_mask"])
    np.testing.assert_array_equal(s.read(1).features, a["img1"]["features"])
    with FeatureStoreWriter(tmp_path / "c.h5", K + 1, D) as w:
        w.add("c", **make_image(np.random.default_rng(0), k=K + 1))
    with pytest.raises(StoreFormatError, match="disagree"):
        FeatureStoreSet([tmp_path / "a.h5", tmp_path / "c.h5"])


def test_an_image_id_in_two_stores_is_refused(tmp_path):
    """COCO's and Visual Genome's numeric ids overlap: with "9" in two stores, some questions would
    read the other image's features."""
    write_store(tmp_path / "coco.h5", n=3, prefix="")  # ids "0", "1", "2"
    write_store(tmp_path / "vg.h5", n=5, seed=1, prefix="")
    with pytest.raises(StoreFormatError) as refused:
        FeatureStoreSet([tmp_path / "coco.h5", tmp_path / "vg.h5"])
    assert str(refused.value).startswith(
        f"image id '0' is in both {tmp_path / 'coco.h5'} and {tmp_path / 'vg.h5'} (and 2 more ids): an id must name "
        "one image across the stores. Convert one of them again with --image-ids"
    )


def test_interrupted_write_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(KeyboardInterrupt), FeatureStoreWriter(tmp_path / "s.h5", K, D) as w:
        w.add("a", **make_image(rng))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_sizes_and_cleans_up_a_failed_start(tmp_path):
    with pytest.raises(ValueError, match="num_objects must be a positive integer, got 0"):
        FeatureStoreWriter(tmp_path / "s.h5", 0, D)
    with pytest.raises(ValueError, match="feature_dim must be a positive integer, got -5"):
        FeatureStoreWriter(tmp_path / "s.h5", K, -5)
    bad_level = FeatureStoreWriter(tmp_path / "s.h5", K, D, compression="gzip", compression_level=42)
    with pytest.raises(ValueError, match="GZIP"), bad_level:
        pass  # h5py refuses the gzip level inside __enter__, after the partial file exists
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_images(tmp_path):
    rng = np.random.default_rng(0)
    with FeatureStoreWriter(tmp_path / "s.h5", K, D) as w:
        w.add("a", **make_image(rng))
        with pytest.raises(BadRecordError, match="duplicate"):
            w.add("a", **make_image(rng))
        bad = make_image(rng)
        bad["boxes"][0, 2] = 1.5
        with pytest.raises(BadRecordError, match="'boxes'"):
            w.add("b", **bad)
        bad = make_image(rng)
        bad["obj_confs"][3] = np.nan
        with pytest.raises(BadRecordError, match="'obj_confs'.*NaN"):
            w.add("c", **bad)
        bad = make_image(rng)
        bad["obj_ids"][2] = 2**31  # int32 would wrap it to -2**31
        with pytest.raises(BadRecordError, match="'obj_ids': object 2 has id 2147483648"):
            w.add("e", **bad)
        bad = make_image(rng)
        bad["attr_ids"][0] = -1
        with pytest.raises(BadRecordError, match="'attr_ids': object 0 has id -1"):
            w.add("f", **bad)
        bad = make_image(rng, k=K - 1)
        with pytest.raises(BadRecordError, match="'features'.*shape"):
            w.add("d", **bad)
        with pytest.raises(BadRecordError, match=r"'img_h/img_w'.*got 0x640"):  # 0 x 0 alone means "not recorded"
            w.add("g", **{**make_image(rng), "img_h": 0, "img_w": 640})
        w.add("no_size", **{**make_image(rng), "img_h": 0, "img_w": 0})
    assert FeatureStore(tmp_path / "s.h5").image_ids == ["a", "no_size"]


def test_version_and_not_a_store(tmp_path):
    write_store(tmp_path / "s.h5", n=1)
    with h5py.File(tmp_path / "s.h5", "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(StoreFormatError, match="version 99"):
        FeatureStore(tmp_path / "s.h5")
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreFormatError, match="cannot open"):
        FeatureStore(tmp_path / "x.h5")
    with pytest.raises(FileNotFoundError):
        FeatureStore(tmp_path / "missing.h5")


def test_incomplete_store_names_what_it_lacks(tmp_path):
    for k, (damage, message) in enumerate(
        [
            (lambda f: f.__delitem__("obj_ids"), "no dataset obj_ids"),
            (lambda f: f.__delitem__("image_ids"), "no dataset image_ids"),
            (lambda f: f.attrs.__delitem__("num_objects"), "no attribute num_objects"),
            (lambda f: f["boxes"].resize(2, axis=0), "boxes has shape (2, 7, 4), expected (3, 7, 4)"),
        ]
    ):
        path = tmp_path / f"s{k}.h5"
        write_store(path, n=3)
        with h5py.File(path, "a") as f:
            damage(f)
        with pytest.raises(StoreFormatError, match=f"{path}: not a complete feature store .*{re.escape(message)}"):
            FeatureStore(path)


def test_image_ids_must_be_strings(tmp_path):
    """Numeric ids (a store written by hand with np.arange) failed in data.check, the launchers and
    predict with "AttributeError: 'numpy.int64' object has no attribute 'decode'"."""
    path = tmp_path / "s.h5"
    write_store(path, n=3)
    with h5py.File(path, "a") as f:
        del f["image_ids"]
        f["image_ids"] = np.arange(3)
    with pytest.raises(
        StoreFormatError, match=f"^{re.escape(str(path))}: image_ids must be strings, got int64 values$"
    ):
        FeatureStore(path)


def test_an_image_id_twice_in_one_store_is_refused(tmp_path):
    """A store written by hand with an id in two rows opened, and the id read the later row's image."""
    path = tmp_path / "s.h5"
    write_store(path, n=4)
    with h5py.File(path, "a") as f:
        f["image_ids"][3] = b"img1"
    with pytest.raises(StoreFormatError, match=f"^{re.escape(str(path))}: image id 'img1' is in rows 1 and 3; ids"):
        FeatureStore(path)


def test_float32_features_are_checked_as_the_loader_reads_them(tmp_path):
    """A store made by other means with float32 features: the loader reads them as float16, where
    a value beyond 65504 is inf; the check tested the finite float32 values and said nothing."""
    path = tmp_path / "s.h5"
    write_store(path, n=3)
    with h5py.File(path, "a") as f:
        features = f["features"][:].astype(np.float32)
        features[2, 1, 0] = 1e5
        del f["features"]
        f["features"] = features
    store = FeatureStore(path)
    with np.errstate(over="ignore"):
        assert np.isinf(store.read(2).features[1, 0])
    problem = "features are not finite in float16 (NaN, inf or beyond 65504)"
    assert store.value_problems() == [f"{path}: {problem}, image 'img2' (row 2)"]


def _child_read(store, q):
    q.put(store.read("img2").features.tolist())


def test_handle_reopened_after_fork(tmp_path):
    images = write_store(tmp_path / "s.h5", n=3)
    store = FeatureStore(tmp_path / "s.h5")
    store.read("img0")  # the parent now holds an open handle
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_read, args=(store, q))
    p.start()
    got = np.array(q.get(timeout=30), np.float16)
    p.join(timeout=30)
    assert p.exitcode == 0
    np.testing.assert_array_equal(got, images["img2"]["features"])
    assert store._file is not None and store.read("img1").image_id == "img1"  # parent unaffected


def test_pickle_after_reading(tmp_path):
    """A store that has read (open handle, file descriptor) still pickles, as spawn-started workers need."""
    images = write_store(tmp_path / "s.h5", n=3)
    store = FeatureStore(tmp_path / "s.h5")
    store.read(0)
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.read("img1").boxes, images["img1"]["boxes"])
    np.testing.assert_array_equal(store.read("img1").features, images["img1"]["features"])
