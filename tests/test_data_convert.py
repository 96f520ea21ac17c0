"""Converters: LXMERT TSV and per-image .npz into the store; bad input is named; atomic output."""

import base64
import errno
import gc
import gzip
import os
import re
import resource
import signal
from collections.abc import Callable

import numpy as np
import pytest
from _lxmert_tsv import D, b64, raw_image, tsv_line, write_tsv

from semvlp.data import convert as conv
from semvlp.data.convert import ConversionError, convert_lxmert_tsv, convert_npz_dir
from semvlp.data.store import FeatureStore, FeatureStoreWriter, chunk_size_problem


def write_npz(path, img, **override):
    """One image as a per-image .npz with LXMERT's key names; `override` replaces or adds keys."""
    keys = ("img_h", "img_w", "num_boxes", "features", "boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf")
    np.savez(path, **{**{key: img[key] for key in keys}, **override})
    return path


def test_tsv_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = [raw_image(rng, f"COCO_{i}", n) for i, n in enumerate([5, 5, 8])]
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(img) for img in images])
    report = convert_lxmert_tsv([tsv], tmp_path / "s.h5", num_objects=5, feature_dim=D, progress=False)
    assert (report.written, report.skipped) == (3, 0)
    store = FeatureStore(tmp_path / "s.h5")
    assert store.image_ids == ["COCO_0", "COCO_1", "COCO_2"] and store.num_objects == 5
    for img in images:
        got = store.read(img["img_id"])
        # > K boxes: the K most confident, in their original order.
        keep = np.sort(np.argsort(-img["objects_conf"])[:5])
        scale = np.array([img["img_w"], img["img_h"]] * 2, np.float64)
        np.testing.assert_array_equal(got.boxes, (img["boxes"][keep] / scale).astype(np.float32))
        np.testing.assert_array_equal(got.obj_ids, img["objects_id"][keep])
        np.testing.assert_array_equal(got.obj_confs, img["objects_conf"][keep])
        np.testing.assert_array_equal(got.attr_ids, img["attrs_id"][keep])
        np.testing.assert_array_equal(got.attr_confs, img["attrs_conf"][keep])
        np.testing.assert_array_equal(got.features, img["features"][keep].astype(np.float16))  # fp16 rounding
        assert (got.img_h, got.img_w) == (img["img_h"], img["img_w"])
    assert sorted(store.read("COCO_2").obj_confs) == sorted(images[2]["objects_conf"])[-5:]


def test_too_few_boxes_needs_pad(tmp_path):
    rng = np.random.default_rng(1)
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(raw_image(rng, "a", 6)), tsv_line(raw_image(rng, "b", 3))])
    with pytest.raises(ConversionError, match=r"f.tsv, line 2 \(image b\): field 'num_boxes'.*--pad"):
        convert_lxmert_tsv([tsv], tmp_path / "s.h5", num_objects=4, feature_dim=D, progress=False)
    assert not (tmp_path / "s.h5").exists()
    convert_lxmert_tsv([tsv], tmp_path / "s.h5", num_objects=4, feature_dim=D, pad=True, progress=False)
    got = FeatureStore(tmp_path / "s.h5").read("b")
    assert got.valid_mask.tolist() == [True, True, True, False]
    assert not got.features[3].any() and got.obj_confs[3] == 0


def bad_lines(rng):
    """(line, expected message fragment) for every kind of bad record."""
    good = raw_image(rng, "bad", 4)
    nan_feats = good["features"].copy()
    nan_feats[1, 2] = np.nan
    far_boxes = good["boxes"].copy()
    far_boxes[2, 2] = good["img_w"] + 50
    low_boxes = good["boxes"].copy()
    low_boxes[1, 3] = good["img_h"] + 50  # below a landscape image, within its width
    return [
        (tsv_line(good).rsplit("\t", 1)[0], "field 'columns': 9 tab-separated columns"),
        (tsv_line(good, boxes="@@notbase64@@"), "field 'boxes': invalid base64"),
        (
            tsv_line(good, boxes=base64.b64encode(good["boxes"].tobytes()).decode()[:-3]),  # a cut line
            "field 'boxes': invalid base64: 85 characters, not a multiple of 4 (a truncated field?)",
        ),
        (tsv_line(good, objects_conf=good["objects_conf"][:3]), "field 'objects_conf': decodes to 3"),
        (tsv_line(good, features=good["features"][:, :-1]), "field 'features': decodes to"),
        (tsv_line(good, features=nan_feats), "field 'features': contains NaN"),
        (tsv_line(good, boxes=far_boxes), "field 'boxes': box 2"),
        (tsv_line(good, boxes=low_boxes), "field 'boxes': box 1"),
        (tsv_line(good, num_boxes="four"), "field 'num_boxes': not an integer"),
        (tsv_line(good, objects_id=np.array([3, 2**33 + 5, 1, 0])), "field 'objects_id': object 1 has id 8589934597"),
        (tsv_line(good, attrs_id=np.array([-1, 2, 1, 0])), "field 'attrs_id': object 0 has id -1"),
    ]


def test_every_bad_record_is_named(tmp_path):
    rng = np.random.default_rng(2)
    ok = tsv_line(raw_image(rng, "ok", 4))
    for k, (line, fragment) in enumerate(bad_lines(rng)):
        tsv = write_tsv(tmp_path / f"f{k}.tsv", [ok, line])
        with pytest.raises(ConversionError) as e:
            convert_lxmert_tsv([tsv], tmp_path / "s.h5", num_objects=4, feature_dim=D, progress=False)
        msg = str(e.value)
        assert f"f{k}.tsv, line 2" in msg and "(image bad)" in msg and fragment in msg, msg
        assert not (tmp_path / "s.h5").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tsv")) == []  # no temp files


def test_skip_bad_counts_and_reports(tmp_path):
    rng = np.random.default_rng(3)
    bad = bad_lines(rng)
    lines = (
        [tsv_line(raw_image(rng, "ok0", 4))]
        + [b for b, _ in bad]
        + [tsv_line(raw_image(rng, "ok1", 4)), tsv_line(raw_image(rng, "ok0", 4))]
    )
    tsv = write_tsv(tmp_path / "f.tsv", lines)
    report = convert_lxmert_tsv([tsv], tmp_path / "s.h5", num_objects=4, feature_dim=D, skip_bad=True, progress=False)
    assert report.written == 2 and report.skipped == len(bad) + 1  # + the duplicate id
    assert len(report.skipped_examples) == 10  # the first ten
    assert FeatureStore(tmp_path / "s.h5").image_ids == ["ok0", "ok1"]


def test_a_duplicate_id_says_where_it_came_from(tmp_path):
    rng = np.random.default_rng(4)
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(raw_image(rng, name, 4)) for name in ("a", "b", "a")])
    unmapped = "line 3 (image a): field 'image id': 'a' is an earlier record's id too (pass --skip-bad"
    with pytest.raises(ConversionError, match=re.escape(unmapped)):
        convert_lxmert_tsv([tsv], tmp_path / "s.h5", num_objects=4, feature_dim=D, progress=False)
    mapped = "field 'image id': 'x' is an earlier record's id too (--image-ids maps 'b' to it)"
    with pytest.raises(ConversionError, match=re.escape(mapped)):
        ids = {"a": "x", "b": "x"}
        convert_lxmert_tsv([tsv], tmp_path / "s.h5", num_objects=4, feature_dim=D, progress=False, image_ids=ids)
    assert not (tmp_path / "s.h5").exists()


def records_interrupted_by(interrupt: Callable[[], None], at_record: int = 3):
    """conv.tsv_records that calls `interrupt` in the middle of the file, before record `at_record`."""
    real = conv.tsv_records

    def records(paths, feature_dim, parse_row):
        for n, rec in enumerate(real(paths, feature_dim, parse_row)):
            if n == at_record:
                interrupt()
            yield rec

    return records


def ctrl_c() -> None:
    raise KeyboardInterrupt


def test_interrupted_conversion_leaves_no_store(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(raw_image(rng, f"i{i}", 4)) for i in range(5)])
    monkeypatch.setattr(conv, "tsv_records", records_interrupted_by(ctrl_c))
    with pytest.raises(KeyboardInterrupt):
        convert_lxmert_tsv([tsv], tmp_path / "s.h5", num_objects=4, feature_dim=D, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.tsv"]


def test_npz_dir(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "npz"
    folder.mkdir()
    a = raw_image(rng, "a", 6)
    np.savez(
        folder / "img_a.npz",
        img_h=a["img_h"],
        img_w=a["img_w"],
        num_boxes=6,
        features=a["features"],
        boxes=a["boxes"],
        objects_id=a["objects_id"],
        objects_conf=a["objects_conf"],
        attrs_id=a["attrs_id"],
        attrs_conf=a["attrs_conf"],
    )
    b = raw_image(rng, "b", 6)  # alias key names, no detector labels
    np.savez(folder / "img_b.npz", image_h=b["img_h"], image_w=b["img_w"], features=b["features"], bbox=b["boxes"])
    report = convert_npz_dir(folder, tmp_path / "s.h5", num_objects=6, feature_dim=D, progress=False)
    assert report.written == 2
    store = FeatureStore(tmp_path / "s.h5")
    got = store.read("img_a")
    np.testing.assert_array_equal(got.features, a["features"].astype(np.float16))
    np.testing.assert_array_equal(got.obj_ids, a["objects_id"])
    np.testing.assert_array_equal(got.attr_confs, a["attrs_conf"])
    np.testing.assert_array_equal(got.boxes[:, 2], (a["boxes"][:, 2] / a["img_w"]).astype(np.float32))
    got = store.read("img_b")
    assert not got.obj_confs.any() and not got.obj_ids.any()  # absent labels: id 0, confidence 0
    np.savez(folder / "img_c.npz", img_h=10, img_w=10, features=b["features"])
    with pytest.raises(ConversionError, match=r"img_c.npz \(image img_c\): field 'boxes': missing"):
        convert_npz_dir(folder, tmp_path / "t.h5", num_objects=6, feature_dim=D, progress=False)
    (folder / "img_d.npz").write_bytes(b"garbage")
    report = convert_npz_dir(folder, tmp_path / "t.h5", num_objects=6, feature_dim=D, skip_bad=True, progress=False)
    assert (report.written, report.skipped) == (2, 2)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: no such folder"):
        convert_npz_dir(tmp_path / "nope", tmp_path / "u.h5", num_objects=6, feature_dim=D, progress=False)


def test_normalized_boxes_where_pixels_are_expected_are_refused_unless_said(tmp_path, capsys):
    """Boxes already divided by the image size (some extractors write them so) were divided again,
    to at most 1/640: every object's position near 0, which neither the check nor the model can see."""
    img = raw_image(np.random.default_rng(7), "a", 4)
    normalized = (img["boxes"] / np.array([img["img_w"], img["img_h"]] * 2)).astype(np.float32)
    folder = tmp_path / "npz"
    folder.mkdir()
    write_npz(folder / "a.npz", img, boxes=normalized)
    args = ["npz-dir", str(folder), "--out", str(tmp_path / "s.h5"), "--num-objects", "4", "--feature-dim", str(D)]
    assert conv.main([*args, "--quiet"]) == 1
    assert (
        f"a.npz (image a): field 'boxes': every box lies within [0, 1] on the {img['img_w']}x{img['img_h']} image: "
        "normalized already? This format's boxes are in pixels (--boxes-normalized reads normalized ones)"
    ) in capsys.readouterr().err
    assert conv.main([*args, "--quiet", "--boxes-normalized"]) == 0
    got = FeatureStore(tmp_path / "s.h5").read("a")
    np.testing.assert_array_equal(got.boxes, normalized)
    assert (got.img_h, got.img_w) == (img["img_h"], img["img_w"])
    line = tsv_line({**img, "boxes": normalized})  # a TSV's boxes are in pixels: no option to say otherwise
    with pytest.raises(ConversionError, match=r"normalized already\? This format's boxes are in pixels \(pass"):
        convert_lxmert_tsv([write_tsv(tmp_path / "f.tsv", [line])], tmp_path / "t.h5", num_objects=4, feature_dim=D)


def test_cli_progress_and_errors(tmp_path, capsys):
    rng = np.random.default_rng(6)
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(raw_image(rng, f"i{i}", 4)) for i in range(3)])
    assert (
        conv.main(
            ["lxmert-tsv", str(tsv), "--out", str(tmp_path / "s.h5"), "--num-objects", "4", "--feature-dim", str(D)]
        )
        == 0
    )
    out = capsys.readouterr()
    assert "img/s" in out.err and "wrote 3 images" in out.out  # the progress bar reports images/s
    assert (
        conv.main(
            [
                "lxmert-tsv",
                str(tsv),
                "--out",
                str(tmp_path / "t.h5"),
                "--num-objects",
                "5",
                "--feature-dim",
                str(D),
                "--quiet",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "line 1 (image i0): field 'num_boxes'" in err and "no store written" in err
    assert not (tmp_path / "t.h5").exists()


def test_out_that_is_an_input_is_refused(tmp_path):
    rng = np.random.default_rng(7)
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(raw_image(rng, "a", 4))])
    before = tsv.read_bytes()
    (tmp_path / "link.h5").symlink_to(tsv)
    for out in (tsv, tmp_path / "link.h5", tmp_path / "." / "f.tsv"):
        with pytest.raises(ConversionError, match=f"{re.escape(str(out))} is the input {re.escape(str(tsv))}"):
            convert_lxmert_tsv([tsv], out, num_objects=4, feature_dim=D, progress=False)
    assert tsv.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["f.tsv", "link.h5"]
    folder = tmp_path / "npz"
    folder.mkdir()
    write_npz(folder / "a.npz", raw_image(rng, "a", 4))
    with pytest.raises(ConversionError, match="is the input"):
        convert_npz_dir(folder, folder / "a.npz", num_objects=4, feature_dim=D, progress=False)
    assert np.load(folder / "a.npz")["features"].shape == (4, D)
    convert_npz_dir(folder, folder / "store.h5", num_objects=4, feature_dim=D, progress=False)  # inside is fine
    assert FeatureStore(folder / "store.h5").image_ids == ["a"]


@pytest.mark.filterwarnings("error")  # no numpy cast warning either
def test_npz_label_ids_must_be_whole_int32(tmp_path):
    rng = np.random.default_rng(8)
    img = raw_image(rng, "a", 4)
    whole_floats = write_npz(tmp_path / "whole.npz", img, objects_id=img["objects_id"].astype(np.float32))
    assert conv.parse_npz(whole_floats).obj_ids.tolist() == img["objects_id"].tolist()
    for k, (key, ids, fragment) in enumerate(
        [
            ("objects_id", [0, 1.5, 2, 3], "field 'objects_id': object 1 has id 1.5"),  # the file's name
            ("objects_id", [0, 1, np.nan, 3], "field 'objects_id': object 2 has id nan"),
            ("objects_id", [0, 1, 2, -3], "field 'objects_id': object 3 has id -3"),
            ("attrs_id", [1e12, 1, 2, 3], "field 'attrs_id': object 0 has id 1000000000000.0"),
        ]
    ):
        folder = tmp_path / f"bad{k}"
        folder.mkdir()
        write_npz(folder / "x.npz", img, **{key: np.array(ids)})
        with pytest.raises(ConversionError, match="class ids must be whole numbers from 0 to 2147483647") as e:
            convert_npz_dir(folder, tmp_path / "s.h5", num_objects=4, feature_dim=D, progress=False)
        assert f"x.npz (image x): {fragment}" in str(e.value)
        assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("option, value", [("--num-objects", "0"), ("--num-objects", "-1"), ("--feature-dim", "-5")])
def test_cli_rejects_bad_sizes_before_any_work(tmp_path, capsys, option, value):
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(raw_image(np.random.default_rng(9), "a", 4))])
    args = ["lxmert-tsv", str(tsv), "--out", str(tmp_path / "s.h5"), "--num-objects", "4", "--feature-dim", str(D)]
    with pytest.raises(SystemExit) as e:
        conv.main([*args, option, value])
    assert e.value.code == 2  # argparse's exit status for a bad option
    assert f"argument {option}: must be a positive integer, got {value}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.tsv"]  # no hidden .partial file


def test_sigterm_deletes_the_partial_store(tmp_path, monkeypatch, capsys, sigterm_received):
    rng = np.random.default_rng(10)
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(raw_image(rng, f"i{i}", 4)) for i in range(5)])
    sigterm = lambda: os.kill(os.getpid(), signal.SIGTERM)  # e.g. a batch scheduler ending the job
    monkeypatch.setattr(conv, "tsv_records", records_interrupted_by(sigterm))
    code = conv.main(
        ["lxmert-tsv", str(tsv), "--out", str(tmp_path / "s.h5"), "--num-objects", "4", "--feature-dim", str(D)]
    )
    assert code == 128 + signal.SIGTERM and sigterm_received == []
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.tsv"]


def test_bad_paths_are_named_before_any_work(tmp_path, capsys):
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(raw_image(np.random.default_rng(11), "a", 4))])
    folder = tmp_path / "folder"
    folder.mkdir()
    for inputs, out, message in [
        ([tsv, folder], tmp_path / "s.h5", f"{folder}: a folder, not a TSV file"),
        ([tsv], folder, f"output {folder} is an existing folder"),
        ([tsv], tmp_path / "f.tsv" / "s.h5", f"cannot create {tmp_path}/f.tsv/s.h5: {tsv} is not a folder"),
    ]:
        with pytest.raises(ConversionError) as e:
            convert_lxmert_tsv(inputs, out, num_objects=4, feature_dim=D, progress=False)
        assert message in str(e.value)
    with pytest.raises(FileNotFoundError, match=f"no such TSV file: {tmp_path}/missing.tsv"):
        convert_lxmert_tsv([tsv, tmp_path / "missing.tsv"], tmp_path / "s.h5", num_objects=4, feature_dim=D)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.tsv", "folder"] and not any(folder.iterdir())
    assert conv.main(["lxmert-tsv", str(tsv), "--out", str(folder), "--num-objects", "4", "--feature-dim", str(D)]) == 1
    assert capsys.readouterr().err == f"error: output {folder} is an existing folder, not a store file\n" + (
        f"no store written at {folder}\n"
    )


def test_gzipped_tsv_is_read_and_a_binary_one_named(tmp_path):
    rng = np.random.default_rng(12)
    lines = [tsv_line(raw_image(rng, f"i{i}", 4)) for i in range(3)]
    with gzip.open(tmp_path / "f.tsv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    convert_lxmert_tsv([tmp_path / "f.tsv.gz"], tmp_path / "s.h5", num_objects=4, feature_dim=D, progress=False)
    assert FeatureStore(tmp_path / "s.h5").image_ids == ["i0", "i1", "i2"]
    (tmp_path / "b.tsv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xd8" * 100)
    (tmp_path / "t.tsv.gz").write_bytes(gzip.compress(b"\n".join(line.encode() for line in lines))[:-20])
    for name, message in [("b.tsv", "not a UTF-8 text TSV"), ("t.tsv.gz", "not a readable gzip file")]:
        with pytest.raises(ConversionError, match=f"{tmp_path / name}: {message}"):
            convert_lxmert_tsv([tmp_path / name], tmp_path / "t.h5", num_objects=4, feature_dim=D, progress=False)
    assert not (tmp_path / "t.h5").exists()


def test_npz_values_of_the_wrong_kind_are_named(tmp_path):
    img = raw_image(np.random.default_rng(13), "a", 4)
    for k, (override, fragment) in enumerate(
        [
            ({"num_boxes": np.array([4, 4])}, "field 'num_boxes': expected one whole number, got an int64 array"),
            ({"img_h": 480.5}, "field 'img_h': expected one whole number, got 480.5"),
            ({"img_h": 0, "img_w": 0}, "field 'img_h/img_w': image size must be positive, got 0x0"),  # not UNITER's
            ({"boxes": np.array([{"x": 1}], dtype=object)}, "field 'boxes': not readable as an array of numbers"),
            ({"features": img["features"].astype(str)}, "field 'features': expected numbers, got <U"),
            ({"objects_conf": np.array(["high"] * 4)}, "field 'objects_conf': expected numbers, got <U4"),
            ({"objects_conf": np.full(4, np.inf)}, "field 'objects_conf': contains NaN or infinite values"),
            ({"objects_conf": np.ones(3)}, "field 'objects_conf': shape (3,), expected (4,)"),
        ]
    ):
        folder = tmp_path / f"bad{k}"
        folder.mkdir()
        write_npz(folder / "x.npz", img, **override)
        with pytest.raises(ConversionError) as e:
            convert_npz_dir(folder, tmp_path / "s.h5", num_objects=4, feature_dim=D, progress=False)
        assert f"x.npz (image x): {fragment}" in str(e.value)
    assert not (tmp_path / "s.h5").exists()


def write_milvlg_npz(path, img, info):
    """One image as bottom-up-attention.pytorch (MILVLG) writes it: x, bbox, num_bbox, image_h, image_w,
    and its labels in `info`, a dict numpy pickles."""
    np.savez(path, x=img["features"], bbox=img["boxes"], num_bbox=len(img["boxes"]), image_h=img["img_h"],
             image_w=img["img_w"], info=np.array(info, dtype=object))  # fmt: skip
    return path


def test_npz_labels_in_a_pickled_info_dict_are_read_with_allow_pickle_only(tmp_path, capsys):
    img = raw_image(np.random.default_rng(15), "a", 6)
    labels = ("objects_id", "objects_conf", "attrs_id", "attrs_conf")
    folder = tmp_path / "npz"
    folder.mkdir()
    write_milvlg_npz(folder / "a.npz", img, {"image_id": "a", **{key: img[key] for key in labels}})
    args = ["npz-dir", str(folder), "--num-objects", "4", "--feature-dim", str(D), "--quiet"]

    assert conv.main([*args, "--out", str(tmp_path / "unread.h5")]) == 0  # not unpickled: no labels, and a note
    assert "keep their labels in a pickled 'info' entry, which is not read" in capsys.readouterr().err
    stored = FeatureStore(tmp_path / "unread.h5").read("a")
    np.testing.assert_array_equal(stored.features, img["features"][:4].astype(np.float16))  # no ranking: first K
    assert not stored.obj_ids.any() and not stored.obj_confs.any() and not stored.attr_ids.any()

    assert conv.main([*args, "--out", str(tmp_path / "read.h5"), "--allow-pickle"]) == 0
    assert "note" not in capsys.readouterr().err
    stored = FeatureStore(tmp_path / "read.h5").read("a")
    keep = np.sort(np.argsort(-img["objects_conf"])[:4])  # the K most confident, as from LXMERT's TSV
    np.testing.assert_array_equal(stored.features, img["features"][keep].astype(np.float16))
    for name, key in zip(("obj_ids", "obj_confs", "attr_ids", "attr_confs"), labels, strict=True):
        np.testing.assert_array_equal(getattr(stored, name), img[key][keep])

    plain = tmp_path / "plain"  # an `info` of numbers is no pickle: no note
    plain.mkdir()
    np.savez(plain / "a.npz", x=img["features"], bbox=img["boxes"], image_h=img["img_h"], image_w=img["img_w"],
             info=np.array([1, 2]))  # fmt: skip
    assert conv.main(["npz-dir", str(plain), *args[2:], "--out", str(tmp_path / "plain.h5")]) == 0
    assert "note" not in capsys.readouterr().err


def test_a_bad_pickled_info_is_named(tmp_path):
    img = raw_image(np.random.default_rng(16), "a", 4)
    for info, fragment in [
        ("not a dict", "field 'info': expected a pickled dict, got str"),
        (["a", "list"], "field 'info': expected a pickled dict, got an object array of shape (2,)"),
        ({"objects_id": ["cat"] * 4}, "field 'info.objects_id': class ids must be numbers, got <U3 values"),
        ({"objects_conf": np.ones(3, np.float32)}, "field 'info.objects_conf': shape (3,), expected (4,)"),
    ]:
        folder = tmp_path / "npz"
        folder.mkdir(exist_ok=True)
        write_milvlg_npz(folder / "a.npz", img, info)
        with pytest.raises(ConversionError) as e:
            convert_npz_dir(folder, tmp_path / "s.h5", allow_pickle=True, num_objects=4, feature_dim=D, progress=False)
        assert f"a.npz (image a): {fragment}" in str(e.value)
        assert not (tmp_path / "s.h5").exists()


def test_npz_errors_name_the_key_the_file_uses(tmp_path, capsys):
    """A bad objects_id was named 'obj_ids' (the converter's own name): the user's file has no such key.
    Each key is named as the file spells it, aliases (bottom-up-attention.pytorch's x, bbox, ...) too."""
    img = raw_image(np.random.default_rng(19), "a", 4)
    nan_x = img["features"].copy()
    nan_x[0, 0] = np.nan
    folders = {name: tmp_path / name for name in ("objects_id", "x", "image_h", "bbox", "obj_ids")}
    for folder in folders.values():
        folder.mkdir()
    write_npz(folders["objects_id"] / "x.npz", img, objects_id=np.array([0, 1, 2.5, 3]))
    write_milvlg_npz(folders["x"] / "x.npz", {**img, "features": nan_x}, {})
    write_milvlg_npz(folders["image_h"] / "x.npz", {**img, "img_h": 0}, {})
    write_milvlg_npz(folders["bbox"] / "x.npz", {**img, "boxes": img["boxes"][:3]}, {})
    np.savez(folders["obj_ids"] / "x.npz", img_h=480, img_w=640, features=img["features"], boxes=img["boxes"],
             obj_ids=np.array([-1, 0, 1, 2]))  # fmt: skip
    out = tmp_path / "s.h5"
    for name, fragment in [
        ("objects_id", "field 'objects_id': object 2 has id 2.5"),
        ("x", "field 'x': contains NaN or infinite values"),
        ("image_h", "field 'image_h/image_w': image size must be positive, got 0x640"),
        ("bbox", "field 'bbox': shape (3, 4), expected (4, 4)"),
        ("obj_ids", "field 'obj_ids': object 0 has id -1"),
    ]:
        args = ["npz-dir", str(folders[name]), "--out", str(out), "--num-objects", "4", "--feature-dim", str(D)]
        assert conv.main([*args, "--quiet"]) == 1
        err = capsys.readouterr().err
        assert f"error: {folders[name] / 'x.npz'} (image x): {fragment}" in err, err
        assert err.endswith(f"no store written at {out}\n") and not out.exists()
    folder = tmp_path / "num_bbox"  # num_bbox is compared with x, as the file names them
    folder.mkdir()
    np.savez(folder / "x.npz", x=img["features"], bbox=img["boxes"], num_bbox=5, image_h=480, image_w=640)
    with pytest.raises(ConversionError, match=r"x.npz \(image x\): field 'num_bbox': says 5 but x has 4 rows"):
        convert_npz_dir(folder, out, num_objects=4, feature_dim=D, progress=False)


def test_empty_tsv_id_and_non_zip_npz_are_named(tmp_path):
    rng = np.random.default_rng(14)
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(raw_image(rng, "ok", 4)), tsv_line(raw_image(rng, "", 4))])
    with pytest.raises(ConversionError, match=r"f.tsv, line 2: field 'img_id': empty image id"):
        convert_lxmert_tsv([tsv], tmp_path / "s.h5", num_objects=4, feature_dim=D, progress=False)
    folder = tmp_path / "npz"
    folder.mkdir()
    (folder / "x.npz").write_bytes(b"garbage")
    with pytest.raises(ConversionError) as e:
        convert_npz_dir(folder, tmp_path / "s.h5", num_objects=4, feature_dim=D, progress=False)
    assert "x.npz (image x): field 'file': not an .npz file (not a zip archive)" in str(e.value)
    assert not (tmp_path / "s.h5").exists()


def test_cli_refuses_sizes_whose_chunks_reach_4_gib_before_any_work(tmp_path, capsys):
    """One image's features are one HDF5 chunk (1, K, D) of float16 and 64 images' boxes another (64, K, 4)
    of float32: at 4 GiB HDF5 before 2.0 can neither write (h5py's traceback) nor read such a chunk."""
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(raw_image(np.random.default_rng(15), "a", 4))])
    out = tmp_path / "new" / "s.h5"
    for k, d, dataset, room in [
        (1048576, 2048, "'features' dataset's HDF5 chunk (1, 1048576, 2048)", "at most 1,048,575 objects fit"),
        (4194304, 1, "'boxes' dataset's HDF5 chunk (64, 4194304, 4)", "at most 4,194,303 objects fit"),
    ]:
        with pytest.raises(SystemExit) as e:
            conv.main(["lxmert-tsv", str(tsv), "--out", str(out), "--num-objects", str(k), "--feature-dim", str(d)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"error: --num-objects {k} with --feature-dim {d}: the {dataset}" in err
        assert "HDF5 chunks must stay under 4 GiB" in err and room in err
        assert chunk_size_problem(k - 1, d) is None  # the largest K that fits, by the writer's own chunks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.tsv"]
    with pytest.raises(ValueError, match="num_objects=1048576, feature_dim=2048: the 'features' dataset's"):
        FeatureStoreWriter(out, num_objects=1048576, feature_dim=2048)  # library callers too, before any file


@pytest.mark.parametrize("failure", ["bad record", "Ctrl-C"])
def test_a_failed_conversion_removes_the_folders_it_created(tmp_path, monkeypatch, capsys, failure):
    """--out under folders that did not exist: a conversion that fails or is interrupted removes the
    folders it made for the store, and only those."""
    rng = np.random.default_rng(16)
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(raw_image(rng, f"i{i}", 4)) for i in range(5)])
    (tmp_path / "existing").mkdir()
    out = tmp_path / "existing" / "new" / "sub" / "s.h5"
    args = ["lxmert-tsv", str(tsv), "--out", str(out), "--num-objects", "4", "--feature-dim", str(D), "--quiet"]
    if failure == "bad record":
        args[args.index("--num-objects") + 1] = "5"  # the records hold 4 boxes
        expected_code = 1
    else:
        monkeypatch.setattr(conv, "tsv_records", records_interrupted_by(ctrl_c))
        expected_code = 128 + signal.SIGINT
    assert conv.main(args) == expected_code
    assert f"no store written at {out}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "f.tsv"]
    assert not any((tmp_path / "existing").iterdir())
    monkeypatch.undo()
    convert_lxmert_tsv([tsv], out, num_objects=4, feature_dim=D, progress=False)  # a success keeps them
    assert FeatureStore(out).image_ids == [f"i{i}" for i in range(5)]


def butd_line(img) -> str:
    """One row as bottom-up-attention's generate_tsv.py writes it: width before height, no labels."""
    cols = [img["img_id"], img["img_w"], img["img_h"], img["num_boxes"], b64(img["boxes"]), b64(img["features"])]
    return "\t".join(str(c) for c in cols)


def test_butd_tsv_round_trip_renamed_by_image_ids(tmp_path, capsys):
    rng = np.random.default_rng(11)
    images = [raw_image(rng, str(coco_id), n, w=640, h=480) for coco_id, n in ((9, 6), (25, 8))]
    tsv = write_tsv(tmp_path / "trainval_36.tsv", [butd_line(img) for img in images])
    ids = tmp_path / "ids.json"
    ids.write_text('{"9": "COCO_train2014_000000000009", "25": "COCO_train2014_000000000025"}')
    args = ["butd-tsv", str(tsv), "--num-objects", "6", "--feature-dim", str(D), "--quiet", "--image-ids", str(ids)]
    assert conv.main([*args, "--out", str(tmp_path / "s.h5")]) == 0
    store = FeatureStore(tmp_path / "s.h5")
    assert store.image_ids == ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
    for img, image_id in zip(images, store.image_ids, strict=True):
        got = store.read(image_id)
        # no confidences to rank by: the first K boxes; width first in the file, x divided by it
        np.testing.assert_array_equal(got.features, img["features"][:6].astype(np.float16))
        np.testing.assert_array_equal(got.boxes[:, 2], (img["boxes"][:6, 2] / 640).astype(np.float32))
        np.testing.assert_array_equal(got.boxes[:, 3], (img["boxes"][:6, 3] / 480).astype(np.float32))
        assert (got.img_w, got.img_h) == (640, 480)
        assert not (got.obj_ids.any() or got.obj_confs.any() or got.attr_ids.any() or got.attr_confs.any())

    ids.write_text('{"9": "COCO_train2014_000000000009"}')
    assert conv.main([*args, "--out", str(tmp_path / "t.h5")]) == 1
    err = capsys.readouterr().err
    assert "trainval_36.tsv, line 2 (image 25): field 'image id': '25' is not in the --image-ids map" in err
    assert not (tmp_path / "t.h5").exists()

    lxmert = write_tsv(tmp_path / "lxmert.tsv", [tsv_line(images[0])])  # the wrong TSV layout is named
    assert conv.main(["butd-tsv", str(lxmert), "--out", str(tmp_path / "t.h5"), "--feature-dim", str(D)]) == 1
    err = capsys.readouterr().err
    assert "line 1 (image 9): field 'columns': 10 tab-separated columns, expected 6 (image_id, image_w" in err


@pytest.mark.parametrize("fmt", ["lxmert-tsv", "butd-tsv", "npz-dir"])
def test_an_existing_out_is_kept_unless_overwrite(tmp_path, capsys, fmt):
    """Converting val2014 with train2014's --out replaced the first store without a word: it is an
    option error now (exit status 2, nothing written), and --overwrite replaces the store. The hint
    suggests naming several inputs only where the subcommand takes several (npz-dir takes one folder);
    a failed --overwrite says the existing store is kept, not just that none was written."""
    images = [raw_image(np.random.default_rng(17), str(i), 4) for i in range(3)]
    if fmt == "npz-dir":
        source = tmp_path / "npz"
        source.mkdir()
        for img in images:
            write_npz(source / f"{img['img_id']}.npz", img)
    else:
        source = write_tsv(tmp_path / "f.tsv", [(butd_line if fmt == "butd-tsv" else tsv_line)(img) for img in images])
    out = tmp_path / "coco.h5"
    out.write_bytes(b"the first store")
    args = [fmt, str(source), "--out", str(out), "--num-objects", "4", "--feature-dim", str(D), "--quiet"]
    assert conv.main(args) == 2
    if fmt == "npz-dir":
        combine = 'to use several stores together, list them all in data.json\'s "stores"'
    else:
        combine = "to convert several files into one store, name them all in one command"
    assert capsys.readouterr().err == (
        f"error: output {out} already exists; refusing to replace it (pass --overwrite to replace it, or choose "
        f"another --out; {combine})\n"
    )
    assert out.read_bytes() == b"the first store"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["coco.h5", source.name])  # no .partial file
    too_many = [*args, "--overwrite"]
    too_many[too_many.index("--num-objects") + 1] = "5"  # the images have 4 boxes: the conversion fails
    assert conv.main(too_many) == 1
    err = capsys.readouterr().err
    assert "field 'num_boxes': 4 boxes, fewer than --num-objects 5" in err
    assert err.endswith(f"\nno store written; the existing {out} is kept\n")
    assert out.read_bytes() == b"the first store"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["coco.h5", source.name])
    assert conv.main([*args, "--overwrite"]) == 0
    assert FeatureStore(out).image_ids == ["0", "1", "2"]


def write_empty_lmdb(folder):
    """A UNITER img_db with no image: only the `__keys__` entry (an empty list)."""
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(folder), map_size=2**20)
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", b"[]")
    env.close()
    return folder


def test_an_input_without_records_is_named(tmp_path, capsys):
    """An empty input was reported as "no images converted into X.h5 (0 bad records skipped)",
    naming only the store; among several inputs its images went missing without a word. Nothing is
    left behind either way."""
    rng = np.random.default_rng(20)
    good = write_tsv(tmp_path / "good.tsv", [tsv_line(raw_image(rng, f"i{i}", 4)) for i in range(2)])
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    gz_empty = tmp_path / "empty.tsv.gz"
    gz_empty.write_bytes(gzip.compress(b""))  # a gzipped TSV that holds no line: known only once read
    db = write_empty_lmdb(tmp_path / "db")
    (tmp_path / "npz").mkdir()
    out = tmp_path / "new" / "s.h5"
    options = ["--out", str(out), "--num-objects", "4", "--feature-dim", str(D), "--quiet"]
    for inputs, message in [
        (["lxmert-tsv", str(empty)], f"{empty} holds no records (empty file)"),
        (["butd-tsv", str(empty)], f"{empty} holds no records (empty file)"),
        (["lxmert-tsv", str(good), str(empty), str(empty)], f"{empty} holds no records (empty file)"),
        (["lxmert-tsv", str(good), str(gz_empty)], f"{gz_empty} holds no records"),
        (["uniter-lmdb", str(db)], f"{db} holds no records"),
        (["npz-dir", str(tmp_path / "npz")], f"no .npz files in {tmp_path / 'npz'}"),
    ]:
        assert conv.main([*inputs, *options]) == 1, inputs
        assert capsys.readouterr().err == f"error: {message}\nno store written at {out}\n"
        assert not (tmp_path / "new").exists()
    # Records, but every one bad and skipped: the inputs are named and the first error quoted.
    bad = write_tsv(tmp_path / "bad.tsv", [tsv_line(raw_image(rng, "b", 3))])
    assert conv.main(["lxmert-tsv", str(bad), *options, "--skip-bad"]) == 1
    assert capsys.readouterr().err == (
        f"error: no images converted into {out}: all 1 records of {bad} were bad and skipped (--skip-bad); the "
        f"first: {bad}, line 1 (image b): field 'num_boxes': 3 boxes, fewer than --num-objects 4 (use --pad to pad "
        f"and record a validity mask)\nno store written at {out}\n"
    )
    assert not (tmp_path / "new").exists()


def test_a_uniter_out_that_exists_is_kept_with_a_hint_that_fits(tmp_path, capsys):
    """uniter-lmdb reads one database: its hint suggested naming several in one command, which argparse
    refuses ("unrecognized arguments")."""
    db = write_empty_lmdb(tmp_path / "db")
    out = tmp_path / "coco.h5"
    out.write_bytes(b"the first store")
    args = ["uniter-lmdb", str(db), "--out", str(out), "--num-objects", "4", "--feature-dim", str(D), "--quiet"]
    assert conv.main(args) == 2
    assert capsys.readouterr().err == (
        f"error: output {out} already exists; refusing to replace it (pass --overwrite to replace it, or choose "
        'another --out; to use several stores together, list them all in data.json\'s "stores")\n'
    )
    assert conv.main([*args, "--overwrite"]) == 1  # an empty database: nothing replaces the store
    assert capsys.readouterr().err == f"error: {db} holds no records\nno store written; the existing {out} is kept\n"
    assert out.read_bytes() == b"the first store" and sorted(p.name for p in tmp_path.iterdir()) == ["coco.h5", "db"]


def test_a_gzipped_tsv_that_ends_mid_line_names_the_cut_field(tmp_path, capsys):
    """A complete gzip stream whose text stops inside a features column was reported as "decodes to
    10.5 float32 values": the byte count is what tells the column was cut."""
    img = raw_image(np.random.default_rng(21), "a", 4)
    cut = base64.b64encode(img["features"].tobytes()[:42]).decode()  # valid base64 of 42 bytes: 10.5 floats
    tsv = tmp_path / "f.tsv.gz"
    tsv.write_bytes(gzip.compress((tsv_line(img).rsplit("\t", 1)[0] + "\t" + cut).encode()))  # no final newline
    out = tmp_path / "s.h5"
    args = ["lxmert-tsv", str(tsv), "--out", str(out), "--num-objects", "4", "--feature-dim", str(D), "--quiet"]
    assert conv.main(args) == 1
    err = capsys.readouterr().err
    assert (
        f"error: {tsv}, line 1 (image a): field 'features': decodes to 42 bytes, not a whole number of 4-byte float32 "
        f"values (a truncated field?); expected {4 * D * 4} bytes, {4 * D} values of shape (4, {D})"
    ) in err
    assert not out.exists()


def test_a_failed_write_is_one_error_naming_the_store(tmp_path, capsys):
    """A write that fails partway (a full disk) is reported as one error naming the store, and leaves
    no file. HDF5 used to fail again while the partial file was closed (a second traceback, "Can't
    decrement id ref count") and then crash the process at exit (segfault). The file size limit
    stands in for the full disk: write(2) fails the same way, with EFBIG instead of ENOSPC."""
    rng = np.random.default_rng(18)
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_line(raw_image(rng, f"i{i}", 4)) for i in range(50)])  # a 70 KB store
    out = tmp_path / "s.h5"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default would end pytest
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, limits[1]))
    try:
        code = conv.main(
            ["lxmert-tsv", str(tsv), "--out", str(out), "--num-objects", "4", "--feature-dim", str(D), "--quiet"]
        )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    gc.collect()  # where the crash came from: h5py freeing the ids HDF5 had half freed
    assert code == 1
    assert capsys.readouterr().err == (
        f"error: [Errno {errno.EFBIG}] {os.strerror(errno.EFBIG)}: '{out}'\nno store written at {out}\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.tsv"]
