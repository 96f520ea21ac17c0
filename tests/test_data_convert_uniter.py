"""uniter-lmdb: UNITER's img_db LMDB into the store. The databases are written here the way UNITER's
scripts/convert_imgdir.py writes them: float16 arrays, msgpack-numpy values (or .npz archives in
`_compressed` databases), keyed by .npz file name, plus a `__keys__` entry listing the names."""

import io
import json

import lmdb
import msgpack
import msgpack_numpy
import numpy as np
import pytest

from semvlp.data import convert as conv
from semvlp.data.convert import ConversionError, convert_uniter_lmdb
from semvlp.data.store import FeatureStore

D = 16  # --feature-dim; UNITER's features have 2048
CLASSES = 1600  # soft_labels: background + the Visual Genome classes


def uniter_image(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """One image as UNITER's bottom-up-attention extraction saves it (before the float16 cast)."""
    x1, y1 = rng.uniform(0, 0.5, n), rng.uniform(0, 0.5, n)
    x2, y2 = x1 + rng.uniform(0.01, 0.5, n), y1 + rng.uniform(0.01, 0.5, n)
    soft_labels = rng.dirichlet(np.ones(CLASSES + 1), n)
    return {
        "features": (rng.random((n, D)) * 10).astype(np.float32),
        "norm_bb": np.stack([x1, y1, x2, y2, x2 - x1, y2 - y1], 1).astype(np.float32),
        "conf": rng.permutation(np.linspace(0.2, 0.9, n)).astype(np.float32),
        "soft_labels": soft_labels.astype(np.float32),
    }


def uniter_value(image: dict[str, np.ndarray], compressed: bool) -> bytes:
    dump = {key: arr.astype(np.float16) if arr.dtype == np.float32 else arr for key, arr in image.items()}
    if compressed:
        with io.BytesIO() as writer:
            np.savez_compressed(writer, **dump)
            return writer.getvalue()
    return msgpack.dumps(dump, default=msgpack_numpy.encode, use_bin_type=True)


def write_img_db(folder, records: dict[str, bytes]):
    env = lmdb.open(str(folder), map_size=64 * 2**20)
    with env.begin(write=True) as txn:
        for name, value in records.items():
            txn.put(name.encode(), value)
        txn.put(b"__keys__", json.dumps(list(records)).encode())
    env.close()
    return folder


def as_stored(arr: np.ndarray) -> np.ndarray:
    """What the converter reads back from UNITER's float16 values."""
    return arr.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("compressed", [False, True], ids=["msgpack", "npz"])
def test_uniter_img_db_round_trip(tmp_path, compressed):
    rng = np.random.default_rng(0)
    images = {f"coco_train2014_{i:012d}.npz": uniter_image(rng, n) for i, n in enumerate([10, 14, 12])}
    db = write_img_db(tmp_path / "feat_th0.2_max100_min10", {k: uniter_value(v, compressed) for k, v in images.items()})
    report = convert_uniter_lmdb(db, tmp_path / "s.h5", num_objects=10, feature_dim=D, progress=False)
    assert (report.written, report.skipped) == (3, 0)  # the __keys__ entry is not an image
    store = FeatureStore(tmp_path / "s.h5")
    assert store.image_ids == [f"coco_train2014_{i:012d}" for i in range(3)]
    for name, image in images.items():
        keep = np.sort(np.argsort(-image["conf"])[:10])  # the 10 most confident, in their order
        got = store.read(name.removesuffix(".npz"))
        np.testing.assert_array_equal(got.features, image["features"][keep].astype(np.float16))
        np.testing.assert_array_equal(got.boxes, as_stored(image["norm_bb"][keep, :4]))
        np.testing.assert_array_equal(got.obj_ids, as_stored(image["soft_labels"][keep, 1:]).argmax(1))
        np.testing.assert_array_equal(got.obj_confs, as_stored(image["conf"][keep]))
        assert not got.attr_ids.any() and not got.attr_confs.any()  # UNITER keeps no attributes
        assert (got.img_h, got.img_w) == (0, 0)  # nor the image size: 0 x 0, boxes already normalized


def test_uniter_images_with_fewer_boxes_are_padded_and_unlabelled_ones_still_ranked(tmp_path):
    rng = np.random.default_rng(1)
    few, unlabelled = uniter_image(rng, 10), uniter_image(rng, 14)
    del unlabelled["soft_labels"]
    records = {"few.npz": uniter_value(few, False), "bare.npz": uniter_value(unlabelled, False)}
    db = write_img_db(tmp_path / "db", records)
    with pytest.raises(ConversionError, match=r"key bare.npz \(image bare\): field 'num_boxes': 14 boxes"):
        convert_uniter_lmdb(db, tmp_path / "s.h5", num_objects=20, feature_dim=D, progress=False)
    convert_uniter_lmdb(db, tmp_path / "s.h5", num_objects=12, feature_dim=D, pad=True, progress=False)
    store = FeatureStore(tmp_path / "s.h5")
    got = store.read("few")
    np.testing.assert_array_equal(got.valid_mask, np.arange(12) < 10)
    np.testing.assert_array_equal(got.features[10:], 0)
    got = store.read("bare")
    assert got.valid_mask.all() and not got.obj_ids.any() and not got.obj_confs.any()  # no labels: id 0, conf 0
    keep = np.sort(np.argsort(-unlabelled["conf"])[:12])  # the boxes are still chosen by conf
    np.testing.assert_array_equal(got.features, unlabelled["features"][keep].astype(np.float16))


def bad_records(rng: np.random.Generator) -> dict[str, tuple[bytes, str]]:
    """name -> (value, the field the error must name)."""
    no_boxes = uniter_image(rng, 10)
    del no_boxes["norm_bb"]
    outside = uniter_image(rng, 10)
    outside["norm_bb"][3, 2] = 1.2
    short_conf = uniter_image(rng, 10)
    short_conf["conf"] = short_conf["conf"][:9]
    return {
        "a_garbage.npz": (b"\x00not msgpack at all", "value"),
        "b_no_boxes.npz": (uniter_value(no_boxes, False), "norm_bb"),
        "c_outside.npz": (uniter_value(outside, True), "norm_bb"),
        "d_short_conf.npz": (uniter_value(short_conf, False), "conf"),
        "e_broken_zip.npz": (uniter_value(uniter_image(rng, 10), True)[:200], "value"),
    }


def test_every_bad_uniter_record_is_named_and_skip_bad_counts_them(tmp_path):
    rng = np.random.default_rng(2)
    good = uniter_value(uniter_image(rng, 10), False)
    for name, (value, field) in bad_records(rng).items():
        db = write_img_db(tmp_path / name, {"good.npz": good, name: value})
        with pytest.raises(ConversionError, match=rf"{db}, key {name} \(image .*\): field '{field}'"):
            convert_uniter_lmdb(db, tmp_path / "s.h5", num_objects=10, feature_dim=D, progress=False)
        assert not (tmp_path / "s.h5").exists()
    db = write_img_db(tmp_path / "all", {"good.npz": good, **{k: v for k, (v, _) in bad_records(rng).items()}})
    report = convert_uniter_lmdb(db, tmp_path / "s.h5", num_objects=10, feature_dim=D, skip_bad=True, progress=False)
    assert (report.written, report.skipped) == (1, 5)


def test_cli_maps_names_to_annotation_ids_and_names_what_is_wrong(tmp_path, capsys):
    rng = np.random.default_rng(3)
    db = write_img_db(tmp_path / "db", {f"coco_{i}.npz": uniter_value(uniter_image(rng, 10), False) for i in range(2)})
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"coco_0": "COCO_train2014_0", "coco_1": "COCO_train2014_1"}))
    args = ["uniter-lmdb", str(db), "--num-objects", "10", "--feature-dim", str(D), "--quiet"]
    assert conv.main([*args, "--out", str(tmp_path / "s.h5"), "--image-ids", str(ids)]) == 0
    assert FeatureStore(tmp_path / "s.h5").image_ids == ["COCO_train2014_0", "COCO_train2014_1"]

    ids.write_text(json.dumps({"coco_0": "COCO_train2014_0"}))
    assert conv.main([*args, "--out", str(tmp_path / "t.h5"), "--image-ids", str(ids)]) == 1
    err = capsys.readouterr().err
    assert "key coco_1.npz (image coco_1): field 'image id': 'coco_1' is not in the --image-ids map" in err
    assert "no store written" in err and not (tmp_path / "t.h5").exists()

    ids.write_text("[1, 2]")
    assert conv.main([*args, "--out", str(tmp_path / "t.h5"), "--image-ids", str(ids)]) == 1
    assert f"--image-ids {ids}: expected a JSON object" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert conv.main(["uniter-lmdb", str(tmp_path / "empty"), "--out", str(tmp_path / "t.h5")]) == 1
    assert f"{tmp_path / 'empty'}: not an LMDB folder (no data.mdb in it)" in capsys.readouterr().err
    assert not (tmp_path / "t.h5").exists()
    # the split folder instead of one of its databases: the error names the databases inside
    write_img_db(tmp_path / "empty" / "feat_th0.2_max100_min10", {"a.npz": uniter_value(uniter_image(rng, 10), False)})
    assert conv.main(["uniter-lmdb", str(tmp_path / "empty"), "--out", str(tmp_path / "t.h5")]) == 1
    assert "; the LMDB folders in it: feat_th0.2_max100_min10" in capsys.readouterr().err


def test_an_existing_out_is_kept_unless_overwrite(tmp_path, capsys):
    """As for the other formats (test_data_convert.py): an option error, nothing written."""
    db = write_img_db(tmp_path / "db", {"a.npz": uniter_value(uniter_image(np.random.default_rng(5), 10), False)})
    out = tmp_path / "s.h5"
    out.write_bytes(b"the first store")
    args = ["uniter-lmdb", str(db), "--out", str(out), "--num-objects", "10", "--feature-dim", str(D), "--quiet"]
    assert conv.main(args) == 2
    assert f"error: output {out} already exists; refusing to replace it (pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"the first store" and sorted(p.name for p in tmp_path.iterdir()) == ["db", "s.h5"]
    assert conv.main([*args, "--overwrite"]) == 0
    assert FeatureStore(out).image_ids == ["a"]
