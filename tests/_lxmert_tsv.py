"""LXMERT feature TSV lines of made-up images, for the converter tests and the LXMERT-folder test."""

import base64

import numpy as np

D = 16  # --feature-dim; real files have 2048


def b64(arr) -> str:
    if isinstance(arr, str):  # already a column's text (used to inject bad base64)
        return arr
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()


def raw_image(rng, image_id, n, w=640, h=480):
    x1 = rng.uniform(0, w / 2, n)
    y1 = rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1)
    return dict(
        img_id=image_id,
        img_h=h,
        img_w=w,
        objects_id=rng.integers(0, 1600, n).astype(np.int64),
        objects_conf=rng.permutation(np.linspace(0.1, 0.9, n)).astype(np.float32),
        attrs_id=rng.integers(0, 400, n).astype(np.int64),
        attrs_conf=rng.random(n).astype(np.float32),
        num_boxes=n,
        boxes=boxes.astype(np.float32),
        features=(rng.random((n, D)) * 10).astype(np.float32),
    )


def tsv_line(img, **override) -> str:
    img = {**img, **override}
    cols = [
        img["img_id"],
        str(img["img_h"]),
        str(img["img_w"]),
        b64(img["objects_id"]),
        b64(img["objects_conf"]),
        b64(img["attrs_id"]),
        b64(img["attrs_conf"]),
        str(img["num_boxes"]),
        b64(img["boxes"]),
        b64(img["features"]),
    ]
    return "\t".join(str(c) for c in cols)


def write_tsv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path
