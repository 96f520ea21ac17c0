"""Input-pipeline throughput: pre-training samples/s from a K=100 store, for 0, 1 and 2 workers.

    python benchmarks/dataloader.py                            # workers 0 1 2, batch 256, 1,000 images
    python benchmarks/dataloader.py --workers 0 2 4 --images 2000 --seconds 20 --batch-size 128

What one sample is: everything `build_pretrain_loader` does per example, end to end, as the
trainer receives it: read the image (K=100 x 2048 fp16 features, boxes, detector labels) from an
HDF5 store straight into the batch tensor, draw the ITM negative, mask 15% of tokens (80/10/10) and
objects, pick the QA target, pad the text to the batch's longest and build the packed form. Text
is tokenized once when the dataset is built (timed separately: `dataset_build_s`), as in training.

Data: the toy world's annotations (generated if absent, ~20 s) with an UNCOMPRESSED K=100 store
holding its first --images images, written once into --cache. (The toy world's own store is gzip-
compressed to stay small, which costs ~0.3 ms per image; real stores, written by the converters,
are not compressed.) Sentences of the other images are dropped with skip_missing=True.

Timing: the store file is read once first, so it is page-cached (the target case). For each worker
count the loader runs --warmup batches untimed (worker start-up), then batches for at least
--seconds; samples/s = samples / elapsed. With workers, twice: as the training loops run it
(`reuse_buffers`: each worker writes batch after batch into the same few shared-memory buffers)
and as `build_pretrain_loader` does by default (fresh shared memory per batch).
`read_images_per_s` is the bare store read rate (FeatureStore.read_into of every field, one
process), the ceiling of the pipeline.

Memory: with 2 workers, each worker's private memory (Private_Dirty of /proc/PID/smaps_rollup less
RssShmem, i.e. less the batches in flight) is measured for the corpus repeated --memory-scale / 4
and --memory-scale times. Per-sentence data lives in numpy arrays built before the fork, shared
copy-on-write, so the figure should not grow with the number of sentences.

Output: benchmarks/results/dataloader-<machine>-<date>.json (machine, versions, git commit, every
figure), and a table. The target in issue 3 is >= 5,000 samples/s per loader process from a
page-cached store on a 2-core machine. Workers hand batches over in shared memory, whose pages
cost more to fault in than private memory (~50 ms vs ~13 ms per 100 MB batch on the project's CPU
machine): fresh per batch, that made one worker ~5x slower than the in-process loader, hence
`reuse_buffers`. Numbers on a shared machine depend on its load: the JSON records the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from semvlp.data import build_pretrain_dataset, load_pretrain_answer_table, load_tokenizer  # noqa: E402
from semvlp.data.annotations import PretrainCorpus, load_pretrain_annotations  # noqa: E402
from semvlp.data.config import DataConfig  # noqa: E402
from semvlp.data.loader import ResumableLoader  # noqa: E402
from semvlp.data.pretrain_dataset import PretrainDataset  # noqa: E402
from semvlp.data.store import FeatureStore, FeatureStoreWriter, open_stores  # noqa: E402
from semvlp.data.toy import ensure_toy_world  # noqa: E402


def machine() -> dict:
    cpu = platform.processor() or "cpu"
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
    except (OSError, AttributeError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "gpu": gpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def git() -> dict:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()

    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def build_store(toy_config: DataConfig, path: Path, n: int) -> None:
    """An uncompressed copy of the first n toy images (reused when it already matches)."""
    if path.exists():
        try:
            if len(FeatureStore(path)) == n:
                return
        except Exception:  # noqa: BLE001 - anything unreadable is rebuilt
            pass
    src = FeatureStore(toy_config.stores[0])
    if n > len(src):
        raise SystemExit(f"--images {n}: the toy world has only {len(src)} images")
    with FeatureStoreWriter(path, src.num_objects, src.feature_dim) as w:
        for row in range(n):
            img = src.read(row)
            w.add(
                img.image_id,
                img.features,
                img.boxes,
                img.img_h,
                img.img_w,
                img.obj_ids,
                img.obj_confs,
                img.attr_ids,
                img.attr_confs,
            )


def warm_page_cache(path: Path) -> float:
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - t


def read_rate(path: Path, seconds: float = 3.0) -> float:
    store = FeatureStore(path)
    k, d = store.num_objects, store.feature_dim
    out = {
        "features": np.empty((1, k, d), np.float16),
        "boxes": np.empty((1, k, 4), np.float32),
        "obj_ids": np.empty((1, k), np.int64),
        "obj_confs": np.empty((1, k), np.float32),
        "attr_ids": np.empty((1, k), np.int64),
        "attr_confs": np.empty((1, k), np.float32),
    }
    order = np.random.default_rng(0).permutation(len(store))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        store.read_into(int(order[n % len(order)]), out, 0)
        n += 1
    return n / (time.perf_counter() - t0)


def worker_private_mb(loader: ResumableLoader) -> list[float]:
    """Per worker: private dirty memory minus resident shared memory (the batches in flight,
    which count as private until the main process maps them), in MB."""
    it = loader._loader._iterator  # persistent workers keep their iterator here
    out = []
    for w in getattr(it, "_workers", []):
        try:
            smaps = Path(f"/proc/{w.pid}/smaps_rollup").read_text()
            status = Path(f"/proc/{w.pid}/status").read_text()
            private = int(re.search(r"Private_Dirty:\s*(\d+) kB", smaps).group(1))
            shmem = int(re.search(r"RssShmem:\s*(\d+) kB", status).group(1))
            out.append(round(max(private - shmem, 0) / 1024, 1))
        except (OSError, AttributeError):
            pass
    return out


def tiled_dataset(config: DataConfig, scale: int) -> PretrainDataset:
    """The corpus repeated `scale` times: a bigger dataset over the same images."""
    table = load_pretrain_answer_table(config)
    c = load_pretrain_annotations(config.pretrain.train, config.pretrain.sources, table)
    n, m = len(c), len(c.qa_answers)
    counts = np.tile(np.diff(c.qa_offsets), scale)
    offsets = np.zeros(n * scale + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    big = PretrainCorpus(
        sources=c.sources,
        image_ids=c.image_ids,
        sent_image=np.tile(c.sent_image, scale),
        sent_source=np.tile(c.sent_source, scale),
        sent_index=np.tile(c.sent_index, scale),
        texts=c.texts * scale,
        qa_offsets=offsets,
        qa_answers=np.tile(c.qa_answers, scale),
        qa_scores=np.tile(c.qa_scores, scale),
    )
    assert len(big.qa_answers) == m * scale
    return PretrainDataset(big, open_stores(config.stores), load_tokenizer(config.vocab), table, skip_missing=True)


def run_loader(dataset, batch_size: int, workers: int, warmup: int, seconds: float, reuse_buffers: bool) -> dict:
    loader = ResumableLoader(dataset, batch_size, seed=0, num_workers=workers, reuse_buffers=reuse_buffers)
    batches = samples = 0
    times = []
    t0 = None
    last = time.perf_counter()
    while True:
        for batch in loader:
            now = time.perf_counter()
            if batches == warmup:
                t0 = now
            elif t0 is not None:
                times.append(now - last)
                samples += batch["input_ids"].shape[0]
            last = now
            batches += 1
            if t0 is not None and now - t0 >= seconds and samples:
                elapsed = now - t0
                mem = worker_private_mb(loader)
                return {
                    "workers": workers,
                    "reuse_buffers": reuse_buffers and workers > 0,
                    "batch_size": batch_size,
                    "timed_batches": len(times),
                    "samples_per_s": round(samples / elapsed, 1),
                    "ms_per_batch_p50": round(1e3 * float(np.median(times)), 2),
                    "worker_private_dirty_mb": mem,
                }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=1000, help="images in the benchmark store (400 KB each)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per worker count")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per worker count")
    parser.add_argument("--cache", default=str(REPO / "runs" / "bench_data"), help="toy world + store folder")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--no-memory", action="store_true", help="skip the worker-memory scaling check")
    parser.add_argument("--memory-scale", type=int, default=32, help="corpus copies in the memory check")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    cache = Path(args.cache)
    load_before = os.getloadavg()
    toy = DataConfig.load(ensure_toy_world(cache / "toy"))
    store_path = cache / f"bench_k100_{args.images}.h5"
    build_store(toy, store_path, args.images)
    config = DataConfig.from_dict({**toy.to_dict(), "stores": [str(store_path)]})
    with h5py.File(store_path) as f:
        assert f["features"].compression is None
    warm_s = warm_page_cache(store_path)
    t = time.perf_counter()
    dataset = build_pretrain_dataset(config, skip_missing=True)
    build_s = time.perf_counter() - t
    print(
        f"store {store_path} ({store_path.stat().st_size / 2**20:.0f} MB, page cache warmed in {warm_s:.1f}s); "
        f"{len(dataset)} sentences; dataset built in {build_s:.1f}s",
        flush=True,
    )

    reads = read_rate(store_path)
    print(f"bare store reads: {reads:,.0f} images/s (one process)", flush=True)
    runs = []
    for w in args.workers:
        for reuse in (True, False) if w else (False,):
            r = run_loader(dataset, args.batch_size, w, args.warmup, args.seconds, reuse)
            runs.append(r)
            buffers = ("reused buffers" if reuse else "fresh buffers") if w else "in process"
            print(
                f"  workers={w} ({buffers}): {r['samples_per_s']:>9,.0f} samples/s  p50 "
                f"{r['ms_per_batch_p50']:.1f} ms/batch  worker private MB {r['worker_private_dirty_mb']}",
                flush=True,
            )

    memory = None
    if not args.no_memory:
        memory = {}
        for scale in (args.memory_scale // 4, args.memory_scale):
            ds = tiled_dataset(config, scale)
            r = run_loader(ds, args.batch_size, 2, args.warmup, min(args.seconds, 3.0), reuse_buffers=True)
            memory[f"x{scale}"] = {"sentences": len(ds), "worker_private_dirty_mb": r["worker_private_dirty_mb"]}
            del ds
        print(f"worker memory vs corpus size: {memory}", flush=True)

    when = datetime.now(timezone.utc)
    doc = {
        "benchmark": "dataloader",
        "date": when.isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "h5py": h5py.__version__,
            "numpy": np.__version__,
        },
        "settings": {
            "images": args.images,
            "num_objects": 100,
            "feature_dim": 2048,
            "sentences": len(dataset),
            "batch_size": args.batch_size,
            "seconds": args.seconds,
            "warmup_batches": args.warmup,
            "store_compression": None,
            "page_cached": True,
            "pin_memory": torch.cuda.is_available(),
        },
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "dataset_build_s": round(build_s, 2),
        "read_images_per_s": round(reads, 1),
        "runs": runs,
        "memory_scaling": memory,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", (doc["machine"]["gpu"] or doc["machine"]["cpu"]).lower()).strip("-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dataloader-{slug}-x{doc['machine']['affinity']}-b{args.batch_size}-{when:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
