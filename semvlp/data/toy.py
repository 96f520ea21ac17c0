"""The toy world: a small generated dataset in exactly the real formats, so everything runs anywhere.

    python -m semvlp.data.toy --out data/toy [--seed 0]

writes, deterministically from the seed, in well under a minute on 2 cores (~50 MB):

    features.h5               one store (K=100, D=2048) with the train, valid and test images
    vocab.txt                 WordPiece vocab covering every word used
    objects_vocab.txt         the detector's label names, one per line (python -m semvlp.attention_map)
    pretrain_train.json       LXMERT pre-training layout (sentf/labelf), sources mscoco, vqa, gqa
    pretrain_valid.json
    all_ans.json              the pre-training answer table (LXMERT layout)
    vqa_{train,valid,test}.json + vqa_ans2label.json / vqa_label2ans.json   (test: no labels)
    gqa_{train,valid,testdev}.json + gqa_ans2label.json / gqa_label2ans.json
    nlvr2_{train,valid,test}.json
    dataset_flickr30k.json    Karpathy-split layout: train / val / test
    data.json                 the DataConfig naming all of the above
    toy_world.json            generator version, seed, sizes, and each file's size and SHA-256
                              (a stale, incomplete or changed world is regenerated, not reused)

The world. Every image shows one of 8 scenes (wall, floor, sky, grass, road, water, sand, table),
and 2-5 salient objects of 2-3 of the scene's 4 classes (32 classes in all), each object in one of
8 colors; the first class appears 1-3 times. A salient object is reported by 4 detections with
jittered boxes, each feature a sparse class prototype plus a sparse color prototype plus noise
(norm ~30) with a high confidence; every other of the K=100 slots is clutter: the scene's
low-norm (~2) background prototype with a low confidence. Every sentence says where it is ("on
the sand"). Captions are coarse ("a clock , two lamps and a horse on the sand .") or fine ("on
the sand , the yellow clock is left of the blue horse ."); questions ask what color, how many, is
there, is the X <color>, is X left of Y. By construction the text never gives away its answer or
whether it matches: the answers to each kind of question are balanced whatever the words (an
absent object asked about comes from the same scene as the present ones), and a sentence of
another image almost always names a place, an object or a color absent from this one (a test
checks < 8%). So image-text matching and QA can only beat chance by looking at the features.

Learnability: a probe that feeds the mean of the projected object features and the mean of the
word embeddings to an MLP reaches ~0.9 held-out ITM accuracy after 250 steps of batch 32 (see
docs/data_format.md, section 6, for the measurements).

Size trade-off: features are gzip-compressed (the clutter is highly repetitive), which costs
~0.3 ms per image read; real stores stay uncompressed for speed.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from semvlp.data.config import DataConfig, NLVR2Data, PretrainData, QAData, RetrievalData
from semvlp.data.store import FeatureStoreWriter
from semvlp.interrupt import report_interrupt, sigterm_as_interrupt

TOY_VERSION = 3  # 3: the manifest lists every file with its size and SHA-256

OBJECTS = (
    "car",
    "dog",
    "cat",
    "cup",
    "ball",
    "chair",
    "tree",
    "bird",
    "hat",
    "book",
    "boat",
    "bike",
    "lamp",
    "shoe",
    "clock",
    "horse",
    "cow",
    "kite",
    "bench",
    "vase",
    "bowl",
    "bear",
    "duck",
    "frog",
    "pen",
    "bag",
    "bed",
    "sofa",
    "plant",
    "truck",
    "train",
    "apple",
)
COLORS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
BACKGROUNDS = ("wall", "floor", "sky", "grass", "road", "water", "sand", "table")
PLACES = (
    "by the wall",
    "on the floor",
    "under the sky",
    "on the grass",
    "on the road",
    "on the water",
    "on the sand",
    "on the table",
)  # where a sentence situates its scene
CLUTTER_ATTRS = ("plain", "dark", "bright", "dull")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
ANSWERS = COLORS + ("yes", "no", "1", "2", "3")
NUM_OBJECT_LABELS = len(OBJECTS) + len(BACKGROUNDS)
NUM_ATTRIBUTE_LABELS = len(COLORS) + len(CLUTTER_ATTRS)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class ToySpec:
    """Sizes of the world. The defaults are the bundled world; tests use smaller ones."""

    train_images: int = 2000
    valid_images: int = 200
    test_images: int = 200
    num_objects: int = 100
    feature_dim: int = 2048
    captions_per_image: int = 5
    vqa_per_image: int = 4
    gqa_per_image: int = 2
    nlvr2_train: int = 3000
    nlvr2_eval: int = 300  # valid and test each
    flickr_train_images: int = 1000
    detections_per_object: int = 4  # a detector reports each salient object several times
    classes_per_scene: int | None = 4  # None: any class in any scene
    num_classes: int = len(OBJECTS)  # the first n of OBJECTS appear (the label space stays the same)
    num_colors: int = len(COLORS)  # the first n of COLORS appear

    @classmethod
    def small(cls) -> ToySpec:
        """A world of 180 images for tests: generated in about a second."""
        return cls(
            train_images=120, valid_images=30, test_images=30, nlvr2_train=60, nlvr2_eval=20, flickr_train_images=60
        )


@dataclass
class _Obj:
    cls: int
    color: int
    box: tuple[float, float, float, float]  # normalized x1, y1, x2, y2

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass
class _Image:
    image_id: str
    background: int
    objects: list[_Obj]  # salient objects only

    def count(self, cls: int) -> int:
        return sum(o.cls == cls for o in self.objects)

    def classes(self) -> set[int]:
        return {o.cls for o in self.objects}

    def has(self, cls: int, color: int | None = None) -> bool:
        return any(o.cls == cls and (color is None or o.color == color) for o in self.objects)

    def singles(self) -> list[_Obj]:
        """Objects whose class appears once (so "the car" is unambiguous)."""
        return [o for o in self.objects if self.count(o.cls) == 1]


def _plural(cls: int) -> str:
    return OBJECTS[cls] + "s"


def _phrase(cls: int, n: int) -> str:
    return f"a {OBJECTS[cls]}" if n == 1 else f"{NUMBER_WORDS[n]} {_plural(cls)}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]


# ----------------------------------------------------------------------------- images


def _scene_classes(scene: int, spec: ToySpec) -> list[int]:
    """The classes that appear in a scene (a background): 4 consecutive ones. With 32 classes and 8
    scenes each class belongs to one scene; with 16, to two."""
    if spec.classes_per_scene is None:
        return list(range(spec.num_classes))
    stride = spec.num_classes // len(BACKGROUNDS)
    return sorted({(stride * scene + j) % spec.num_classes for j in range(spec.classes_per_scene)})


def _sample_image(rng: np.random.Generator, image_id: str, spec: ToySpec) -> _Image:
    scene = int(rng.integers(len(BACKGROUNDS)))
    n_classes = int(rng.integers(2, 4))  # 2-3 distinct classes, from the scene's classes
    classes = rng.choice(_scene_classes(scene, spec), n_classes, replace=False)
    # The first class appears 1-3 times (uniform: "how many" answers are balanced), others once.
    counts = [int(rng.integers(1, 4))] + [1] * (n_classes - 1)
    objects = []
    for cls, n in zip(classes.tolist(), counts, strict=True):
        for _ in range(n):
            w, h = rng.uniform(0.15, 0.35, 2)
            x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            objects.append(_Obj(cls, int(rng.integers(spec.num_colors)), (x1, y1, x1 + w, y1 + h)))
    return _Image(image_id, scene, objects)


def _prototypes(rng: np.random.Generator, n: int, dim: int, support: int, lo: float, hi: float) -> np.ndarray:
    protos = np.zeros((n, dim), np.float32)
    for p in protos:
        p[rng.choice(dim, support, replace=False)] = rng.uniform(lo, hi, support)
    return protos


class _FeatureMaker:
    """Detector outputs for an image: salient objects are class + color prototypes + noise."""

    def __init__(self, rng: np.random.Generator, spec: ToySpec):
        d = spec.feature_dim
        self.k, self.d, self.dets = spec.num_objects, d, spec.detections_per_object
        if 5 * self.dets > self.k:  # up to 5 salient objects per image
            raise ValueError(f"{self.dets} detections x 5 objects do not fit in K={self.k}")
        self.cls = _prototypes(rng, len(OBJECTS), d, 96, 1.5, 3.0)
        self.color = _prototypes(rng, len(COLORS), d, 96, 1.5, 3.0)
        self.background = _prototypes(rng, len(BACKGROUNDS), d, 48, 0.2, 0.5)

    def make(self, rng: np.random.Generator, img: _Image, img_w: int, img_h: int) -> dict:
        k, n = self.k, len(img.objects)
        feats = np.zeros((k, self.d), np.float32)
        boxes = np.zeros((k, 4))
        obj_ids = np.full(k, len(OBJECTS) + img.background, np.int64)
        obj_confs = np.zeros(k, np.float32)
        attr_ids = len(COLORS) + rng.integers(0, len(CLUTTER_ATTRS), k)
        attr_confs = np.zeros(k, np.float32)
        slots = rng.permutation(k)
        # Clutter in every slot the objects leave: the scene's background prototype at one of three
        # scales (which also compresses well), small boxes, low confidence.
        n_bg = k - n * self.dets
        bg = slots[:n_bg]
        scale = np.array([0.5, 0.75, 1.0], np.float32)[rng.integers(0, 3, len(bg))]
        feats[bg] = self.background[img.background][None, :] * scale[:, None]
        obj_confs[bg] = rng.uniform(0.05, 0.4, len(bg))
        attr_confs[bg] = rng.uniform(0.05, 0.3, len(bg))
        wh = rng.uniform(0.02, 0.15, (len(bg), 2))
        xy = rng.uniform(0, 1, (len(bg), 2)) * (1 - wh)
        boxes[bg] = np.concatenate([xy, xy + wh], axis=1)
        # Each salient object is detected several times with jittered boxes (as real detectors
        # do), at random positions among the K slots.
        m = self.dets
        for obj_slots, o in zip(slots[n_bg : n_bg + n * m].reshape(n, m).tolist(), img.objects, strict=True):
            proto = self.cls[o.cls] + self.color[o.color]
            x1, y1, x2, y2 = o.box
            for slot in obj_slots:
                noise = rng.normal(0.0, 0.3, self.d).astype(np.float32) * (proto > 0)
                feats[slot] = np.maximum(proto + noise, 0.0)
                obj_ids[slot], attr_ids[slot] = o.cls, o.color
                obj_confs[slot] = rng.uniform(0.7, 0.99)
                attr_confs[slot] = rng.uniform(0.6, 0.95)
                jitter = rng.uniform(-0.05, 0.05, 4) * np.array([x2 - x1, y2 - y1] * 2)
                boxes[slot] = np.clip(np.array(o.box) + jitter, 0.0, 1.0)
        px = np.round(boxes * np.array([img_w, img_h, img_w, img_h])) / np.array([img_w, img_h, img_w, img_h])
        return dict(
            features=feats.astype(np.float16),
            boxes=np.clip(px, 0, 1).astype(np.float32),
            img_h=img_h,
            img_w=img_w,
            obj_ids=obj_ids,
            obj_confs=obj_confs,
            attr_ids=attr_ids.astype(np.int64),
            attr_confs=attr_confs,
        )


# ----------------------------------------------------------------------------- text


def _captions(rng: np.random.Generator, img: _Image, n: int) -> list[str]:
    """n captions: the first coarse (the whole scene, no colors), the rest fine (details)."""
    out = []
    classes = list(dict.fromkeys(o.cls for o in img.objects))
    rng.shuffle(classes)
    scene = _join([_phrase(c, img.count(c)) for c in classes])
    place = PLACES[img.background]
    out.append(f"{scene} {place} .")
    while len(out) < n:
        kind = rng.integers(3)
        a, b = (img.objects[i] for i in rng.choice(len(img.objects), 2, replace=False))
        if kind == 0:
            out.append(f"a {COLORS[a.color]} {OBJECTS[a.cls]} {place} .")
        elif kind == 1:
            out.append(f"a {COLORS[a.color]} {OBJECTS[a.cls]} next to a {COLORS[b.color]} {OBJECTS[b.cls]} {place} .")
        else:
            left, right = (a, b) if a.cx <= b.cx else (b, a)
            out.append(
                f"{place} , the {COLORS[left.color]} {OBJECTS[left.cls]} is left of the "
                f"{COLORS[right.color]} {OBJECTS[right.cls]} ."
            )
    return out


def _question(rng: np.random.Generator, img: _Image, kind: str, spec: ToySpec) -> tuple[str, str, str]:
    """(question, answer, VQA answer_type). Every answer is balanced given the question's words."""
    singles = img.singles()
    if kind == "color":
        o = singles[rng.integers(len(singles))]
        return f"what color is the {OBJECTS[o.cls]} ?", COLORS[o.color], "other"
    if kind == "count":
        cls = img.objects[0].cls  # the class with a uniform 1-3 count
        return f"how many {_plural(cls)} are there ?", str(img.count(cls)), "number"
    if kind == "there":
        anchor = singles[rng.integers(len(singles))]
        others = sorted(img.classes() - {anchor.cls})
        # The absent class comes from the same scene, as present ones do: the pair of words then
        # says nothing about the answer.
        absent = sorted(set(_scene_classes(img.background, spec)) - img.classes())
        yes = bool(rng.random() < 0.5)
        cls = others[rng.integers(len(others))] if yes else absent[rng.integers(len(absent))]
        q = f"is there a {OBJECTS[cls]} next to the {COLORS[anchor.color]} {OBJECTS[anchor.cls]} ?"
        return q, "yes" if yes else "no", "yes/no"
    if kind == "is_color":
        o = singles[rng.integers(len(singles))]
        yes = bool(rng.random() < 0.5)
        color = o.color if yes else int((o.color + rng.integers(1, spec.num_colors)) % spec.num_colors)
        return f"is the {OBJECTS[o.cls]} {COLORS[color]} ?", "yes" if yes else "no", "yes/no"
    if kind == "left":
        a, b = (singles[i] for i in rng.choice(len(singles), 2, replace=False))
        return (f"is the {OBJECTS[a.cls]} left of the {OBJECTS[b.cls]} ?", "yes" if a.cx < b.cx else "no", "yes/no")
    raise ValueError(kind)


def _questions(
    rng: np.random.Generator, img: _Image, n: int, kinds: tuple[str, ...], spec: ToySpec
) -> list[tuple[str, str, str]]:
    out = []
    usable = [k for k in kinds if k != "left" or len(img.singles()) >= 2]
    for _ in range(n):
        q, a, t = _question(rng, img, usable[rng.integers(len(usable))], spec)
        out.append((f"{PLACES[img.background]} , {q}", a, t))  # the place, as in the captions
    return out


_VQA_KINDS = ("color", "count", "there", "is_color")
_GQA_KINDS = ("color", "is_color", "left", "there")


def _nlvr2(rng: np.random.Generator, images: list[_Image], n: int, split: str, spec: ToySpec) -> list[dict]:
    """Statements about an ordered pair of images, half true and half false."""
    out = []
    while len(out) < n:
        i0, i1 = rng.choice(len(images), 2, replace=False)
        left, right = images[i0], images[i1]
        want = bool(rng.random() < 0.5)
        kind = rng.integers(4)
        cls = int(rng.integers(spec.num_classes))
        color = int(rng.integers(spec.num_colors))
        if want and kind in (0, 3):  # pick a true (class, color) from the relevant image
            src = left if kind == 0 or rng.random() < 0.5 else right
            o = src.objects[rng.integers(len(src.objects))]
            cls, color = o.cls, o.color
        if kind == 0:
            sent = f"there is a {COLORS[color]} {OBJECTS[cls]} in the left image ."
            truth = left.has(cls, color)
        elif kind == 1:
            cls = right.objects[rng.integers(len(right.objects))].cls
            number = right.count(cls) if want else int(rng.integers(1, 4))
            sent = f"the right image contains exactly {NUMBER_WORDS[number]} {_plural(cls)} ."
            truth = right.count(cls) == number
        elif kind == 2:
            shared = sorted(left.classes() & right.classes())
            if want and shared:
                cls = shared[rng.integers(len(shared))]
            sent = f"both images contain a {OBJECTS[cls]} ."
            truth = left.has(cls) and right.has(cls)
        else:
            sent = f"at least one image has a {COLORS[color]} {OBJECTS[cls]} ."
            truth = left.has(cls, color) or right.has(cls, color)
        if truth != want:
            continue  # rejection keeps the labels balanced within every statement type
        k = len(out)
        out.append(
            {
                "identifier": f"{split}-{k}-0-0",
                "img0": left.image_id,
                "img1": right.image_id,
                "sent": sent,
                "label": int(truth),
                "uid": f"nlvr2_{split}_{k}",
            }
        )
    return out


# ----------------------------------------------------------------------------- files


class NotAToyWorldError(FileExistsError, ValueError):
    """The folder asked for holds something else, which is never overwritten. A ValueError too, so
    that the launchers' run_main reports it as an option error (one line, exit status 2)."""


def _write_json(path: Path, data: object) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, separators=(",", ":")))  # dumps uses the C encoder, dump does not


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def generate_toy_world(
    out: str | os.PathLike, seed: int = 0, spec: ToySpec | None = None, progress: bool = False
) -> Path:
    """Write the toy world into folder `out` (created; existing files are overwritten).

    Returns the path of its data.json. Prefer ensure_toy_world, which is atomic and reuses an
    existing world.
    """
    spec = spec or ToySpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seq = np.random.SeedSequence(seed)
    scene_rng, feat_rng, text_rng, task_rng = (np.random.default_rng(s) for s in seq.spawn(4))
    t0 = time.time()

    n_train, n_valid, n_test = spec.train_images, spec.valid_images, spec.test_images
    images = [_sample_image(scene_rng, f"toy_{i:06d}", spec) for i in range(n_train + n_valid + n_test)]
    splits = {
        "train": images[:n_train],
        "valid": images[n_train : n_train + n_valid],
        "test": images[n_train + n_valid :],
    }

    maker = _FeatureMaker(feat_rng, spec)
    sizes = [(640, 480), (480, 640), (500, 375), (640, 427), (427, 640)]
    with FeatureStoreWriter(
        out / "features.h5", spec.num_objects, spec.feature_dim, compression="gzip", compression_level=4
    ) as w:
        for n, img in enumerate(images):
            img_w, img_h = sizes[feat_rng.integers(len(sizes))]
            w.add(img.image_id, **maker.make(feat_rng, img, img_w, img_h))
            if progress and (n + 1) % 500 == 0:
                print(f"  {n + 1}/{len(images)} images ({time.time() - t0:.1f}s)", flush=True)

    # Pre-training records (LXMERT layout) and the VQA / GQA questions they contain.
    words: set[str] = set()
    pretrain: dict[str, list] = {"train": [], "valid": []}
    vqa: dict[str, list] = {"train": [], "valid": [], "test": []}
    gqa: dict[str, list] = {"train": [], "valid": [], "test": []}
    for split, imgs in splits.items():
        for img in imgs:
            caps = _captions(text_rng, img, spec.captions_per_image)
            vq = _questions(text_rng, img, spec.vqa_per_image, _VQA_KINDS, spec)
            gq = _questions(text_rng, img, spec.gqa_per_image, _GQA_KINDS, spec)
            for s in caps + [q for q, _, _ in vq + gq]:
                words.update(s.split())
            row = int(img.image_id.split("_")[1])
            if split != "test":
                pretrain[split].append(
                    {
                        "img_id": img.image_id,
                        "sentf": {"mscoco": caps, "vqa": [q for q, _, _ in vq], "gqa": [q for q, _, _ in gq]},
                        "labelf": {"vqa": [{a: 1.0} for _, a, _ in vq], "gqa": [{a: 1.0} for _, a, _ in gq]},
                    }
                )
            for j, (q, a, atype) in enumerate(vq):
                label = {a: 1.0}
                if a in COLORS and text_rng.random() < 0.2:  # a minority of annotators disagree
                    label[COLORS[(COLORS.index(a) + 1) % spec.num_colors]] = 0.3
                rec = {
                    "answer_type": atype,
                    "img_id": img.image_id,
                    "question_id": row * 10 + j,
                    "question_type": " ".join(q.split()[:3]),
                    "sent": q,
                }
                if split != "test":
                    rec["label"] = label
                vqa[split].append(rec)
            for j, (q, a, _) in enumerate(gq):
                gqa[split].append(
                    {"img_id": img.image_id, "question_id": f"{row * 10 + j:08d}", "sent": q, "label": {a: 1.0}}
                )

    nlvr2 = {
        "train": _nlvr2(task_rng, splits["train"], spec.nlvr2_train, "train", spec),
        "valid": _nlvr2(task_rng, splits["valid"], spec.nlvr2_eval, "dev", spec),
        "test": _nlvr2(task_rng, splits["test"], spec.nlvr2_eval, "test1", spec),
    }
    for recs in nlvr2.values():
        for r in recs:
            words.update(r["sent"].split())

    flickr = []
    karpathy = [
        ("train", splits["train"][: spec.flickr_train_images]),
        ("val", splits["valid"]),
        ("test", splits["test"]),
    ]
    for split, imgs in karpathy:
        for img in imgs:
            caps = _captions(task_rng, img, 5)
            words.update(w for c in caps for w in c.split())
            flickr.append(
                {
                    "filename": f"{img.image_id}.jpg",
                    "imgid": len(flickr),
                    "split": split,
                    "sentences": [{"raw": c, "tokens": c.split()[:-1]} for c in caps],
                }
            )

    for split, recs in pretrain.items():
        _write_json(out / f"pretrain_{split}.json", recs)
    all_ans = [{"ans": a, "ans_count": 0, "dsets": ["vqa", "gqa"]} for a in ANSWERS]
    _write_json(out / "all_ans.json", all_ans)
    for name, recs, test_name in (("vqa", vqa, "test"), ("gqa", gqa, "testdev")):
        for split, file_split in (("train", "train"), ("valid", "valid"), ("test", test_name)):
            _write_json(out / f"{name}_{file_split}.json", recs[split])
        _write_json(out / f"{name}_ans2label.json", {a: i for i, a in enumerate(ANSWERS)})
        _write_json(out / f"{name}_label2ans.json", list(ANSWERS))
    for split, recs in nlvr2.items():
        _write_json(out / f"nlvr2_{split}.json", recs)
    _write_json(out / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": flickr})

    words.update(ANSWERS)
    words.update(".,?!'-")
    words.update(str(i) for i in range(10))
    with open(out / "vocab.txt", "w") as f:
        f.write("\n".join(SPECIAL_TOKENS + tuple(sorted(words))) + "\n")
    with open(out / "objects_vocab.txt", "w") as f:  # label id -> name, Visual Genome's layout
        f.write("\n".join(OBJECTS + BACKGROUNDS) + "\n")

    base = out.resolve()
    config = DataConfig(
        stores=(str(base / "features.h5"),),
        vocab=str(base / "vocab.txt"),
        max_text_len=20,
        num_object_labels=NUM_OBJECT_LABELS,
        num_attribute_labels=NUM_ATTRIBUTE_LABELS,
        pretrain=PretrainData(
            train=(str(base / "pretrain_train.json"),),
            valid=(str(base / "pretrain_valid.json"),),
            sources=("mscoco", "vqa", "gqa"),
            answer_table=str(base / "all_ans.json"),
        ),
        vqa=QAData(
            train=(str(base / "vqa_train.json"),),
            valid=(str(base / "vqa_valid.json"),),
            test=(str(base / "vqa_test.json"),),
            ans2label=str(base / "vqa_ans2label.json"),
            label2ans=str(base / "vqa_label2ans.json"),
        ),
        gqa=QAData(
            train=(str(base / "gqa_train.json"),),
            valid=(str(base / "gqa_valid.json"),),
            test=(str(base / "gqa_testdev.json"),),
            ans2label=str(base / "gqa_ans2label.json"),
            label2ans=str(base / "gqa_label2ans.json"),
        ),
        nlvr2=NLVR2Data(
            train=(str(base / "nlvr2_train.json"),),
            valid=(str(base / "nlvr2_valid.json"),),
            test=(str(base / "nlvr2_test.json"),),
        ),
        flickr30k=RetrievalData(annotations=str(base / "dataset_flickr30k.json")),
    )
    config.save(out / "data.json")
    # Written last: a world without its manifest is incomplete. It lists every file in the folder,
    # which ensure_toy_world makes fresh, so exactly the files written above.
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(out.iterdir())
        if p.is_file() and p.name != "toy_world.json"
    }
    _write_json(out / "toy_world.json", {"version": TOY_VERSION, "seed": seed, "spec": asdict(spec), "files": files})
    return out / "data.json"


def _reuse_problem(folder: Path, seed: int, spec: ToySpec) -> str | None:
    """Why the world in `folder` cannot be reused, or None if it can. Every file the manifest lists
    must have its recorded size and SHA-256: hashing the 47 MB default world takes ~50 ms, little next
    to regenerating it (~10 s), and unlike sizes alone it catches a file changed in place."""
    try:
        with open(folder / "toy_world.json") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return "no toy_world.json"
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return "toy_world.json is unreadable"
    if not isinstance(manifest, dict) or manifest.get("version") != TOY_VERSION:
        return "made by another version of the generator"
    if manifest.get("seed") != seed:
        return f"seed {manifest.get('seed')}, not {seed}"
    if manifest.get("spec") != asdict(spec):
        return "other sizes"
    files = manifest.get("files")
    if not isinstance(files, dict) or "data.json" not in files:
        return "toy_world.json lists no files"
    for name, recorded in files.items():
        if not isinstance(recorded, dict) or Path(name).name != name:
            return "toy_world.json is malformed"
        path = folder / name
        try:
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != recorded.get("size") or _sha256(path) != recorded.get("sha256"):
                return f"{name} has changed"
        except OSError as e:
            return f"{name} is unreadable ({e.strerror})"
    return None


def _refuse_foreign(folder: Path) -> None:
    """Raise NotAToyWorldError if `folder` holds something other than a toy world, which a
    regeneration would replace."""
    if folder.exists() and not folder.is_dir():
        raise NotAToyWorldError(f"{folder} is a file, not a toy world folder; choose another folder")
    if folder.is_dir() and not (folder / "toy_world.json").exists() and any(folder.iterdir()):
        raise NotAToyWorldError(f"{folder} exists and is not a toy world; choose another folder")


def ensure_toy_world(
    folder: str | os.PathLike, seed: int = 0, spec: ToySpec | None = None, regenerate: bool = False
) -> Path:
    """The data.json of the toy world in `folder`, generating it first if absent or stale (or always,
    with `regenerate`; the world in place stays until its replacement is complete).

    Safe to call from several processes at once (e.g. every rank): one generates under a lock,
    into a temporary folder renamed into place when complete; the others wait and reuse it.
    A world that is stale, incomplete or changed is regenerated (with a note on stderr).
    A folder that exists but holds something other than a toy world is an error (NotAToyWorldError).

    The lock file, `.NAME.lock` beside the folder, stays: deleting a flock'd file lets a waiter that
    has already opened it lock the deleted file while a newcomer locks a new one at the same path,
    and both would generate at once.
    """
    spec = spec or ToySpec()
    folder = Path(folder)
    if seed < 0:
        raise ValueError(f"the toy world's seed must be >= 0, got {seed}")
    if not regenerate and _reuse_problem(folder, seed, spec) is None:
        return folder / "data.json"
    _refuse_foreign(folder)  # before the lock: a refused call leaves nothing behind
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Again: another process may have generated it.
        problem = "regeneration asked for" if regenerate else _reuse_problem(folder, seed, spec)
        if problem is None:
            return folder / "data.json"
        _refuse_foreign(folder)
        if not regenerate and (folder / "toy_world.json").exists():
            print(f"note: the toy world in {folder} cannot be reused ({problem}); regenerating it", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        try:
            generate_toy_world(tmp, seed, spec)
            # data.json holds paths relative to its folder, so the renamed world stays valid.
            if folder.exists():
                stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
                os.replace(folder, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder / "data.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m semvlp.data.toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the world into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if an up-to-date world exists")
    parser.add_argument("--small", action="store_true", help="180 images instead of 2,400 (tests, quick looks)")
    args = parser.parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; expected a folder to write the world into")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        with sigterm_as_interrupt():  # SIGTERM deletes the half-made world, as Ctrl-C does
            path = ensure_toy_world(out, args.seed, ToySpec.small() if args.small else None, regenerate=args.force)
    except KeyboardInterrupt as e:
        sys.exit(report_interrupt(e))
    except NotAToyWorldError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)  # an option error (--out), as argparse's
    except OSError as e:  # no permission, a full disk...
        print(f"error: cannot write the toy world in --out {out}: {e}", file=sys.stderr)
        sys.exit(1)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"toy world in {out} ({size:.1f} MB, {time.time() - t0:.1f}s); data configuration: {path}")


if __name__ == "__main__":
    main()
