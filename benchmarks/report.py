"""Tables from throughput results (benchmarks/throughput.py JSON): per-run detail and a summary.

    python benchmarks/report.py                            # summary of benchmarks/results/*.json
    python benchmarks/report.py OUT/*.json --detail        # plus every file's per-run tables
    python benchmarks/report.py --readme README.md         # also rewrite README's results block
    python benchmarks/report.py --pretrain OUT/pretrain_metrics.jsonl   # gpu_check's runs of the main job

The summary pools the files of one (device, git commit, preset): a GPU check writes one file per
group of backends. For each precision, micro-batch and mode it shows our fastest run (any backend,
compiled or not), its MFU, and ours/peer samples/s against the peer that does the same job
(VisualBERT for single-stream, LXMERT for two-stream) at the same batch and precision. With
--readme the block between `<!-- results:start -->` and `<!-- results:end -->` is replaced; the
rest of the file is left alone, and a file without both markers is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
PEER_FOR_MODE = {"single": "visualbert", "two": "lxmert"}
OURS_SECTIONS = ("main", "compiled", "max_batch")
# Issue 7's targets, checked where they apply (H100, bf16, base preset, micro-batch 64).
TARGET_MFU, TARGET_PEER_RATIO, TARGET_MODE_GAP = 0.50, 2.0, 0.10

FORMULA = (
    "Step = forward + backward + gradient clipping (norm 1.0) + AdamW of `SemVLPForPreTraining` on a fixed "
    "synthetic batch already on the device (K = 100 objects, 20-token text with its attention mask), plain "
    "PyTorch; bf16/fp16 cast the model and keep fp32 master weights as DeepSpeed does. Model FLOPs per "
    "step = sum over matmuls of 6 x rows x n_in x n_out (visual projection 4x: its input needs no gradient) "
    "+ 12 x d x s_q x s_k per attention layer and sequence, real tokens only; for one "
    "stream this is the usual 6N + 12·L·d·s per token. Single-stream: s = 1 + K + m. "
    "Two-stream, per stream: text s = m, image s = 1 + K, cross-attention s_q = 1 + K, s_k = m. "
    "MFU = model FLOP/s / dense peak (semvlp/peaks.py; empty for unknown devices). "
    "ours/peer = samples/s against HF `VisualBertForPreTraining` (single) and `LxmertForPreTraining` "
    "(two, 9/5/5 layers), randomly initialized at the same size, same batch and precision."
)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------- one file, every run


def format_tables(doc: dict) -> str:
    """Every run of one throughput JSON, then peer ratios, the padding study and the max-batch search."""
    git = doc["git"]
    lines = [
        f"device: {doc['device']['name']} ({doc['device']['type']})  torch {doc['versions']['torch']}  "
        f"commit {git['commit'][:10]}{'+dirty' if git.get('dirty') else ''}  {doc['date']}",
        "peak: " + ", ".join(f"{p}: {v['tflops'] or '-'} ({v['source']})" for p, v in doc["peak"].items()),
        "backends: " + ", ".join(f"{k}: {v}" for k, v in doc["backends"].items()),
        "",
        "| section | model | mode | backend | prec | compile | batch | text | ms/step | spread % | fwd+bwd ms "
        "| optim ms | samples/s | tokens/s | TFLOP/s | MFU % | peak GiB | kernel busy % | GPU util % | SM MHz "
        "| status |",
        "|" + "---|" * 21,
    ]
    for r in doc["runs"]:
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"[:100]
        nvml = r.get("nvml") or {}
        backend = r["backend"] + (" checkpointed" if r.get("gradient_checkpointing") else "")
        cells = [r["section"], r["model"], r["mode"], backend, r["precision"]]
        compiled = (r.get("compile_mode") or "yes") if r["compile"] else "no"
        cells += [compiled, str(r["batch_size"]), str(r.get("text", ""))]
        cells += [_fmt(r.get(k), f) for k, f in (("ms_per_step", ".2f"), ("spread_pct", ".1f"))]
        cells += [_fmt(r.get(k), f) for k, f in (("fwd_bwd_ms", ".2f"), ("optimizer_ms", ".2f"))]
        cells += [_fmt(r.get(k), f) for k, f in (("samples_per_s", ".1f"), ("tokens_per_s", ".0f"), ("tflops", ".2f"))]
        cells += [_fmt(r["mfu"] * 100 if r.get("mfu") else None, ".1f"), _fmt(r.get("peak_mem_gib"), ".2f")]
        cells.append(_fmt(r.get("gpu_busy_pct"), ".0f"))
        cells += [_fmt(nvml.get("gpu_util_pct"), ".0f"), _fmt(nvml.get("sm_clock_mhz"), ".0f"), status]
        lines.append(_row(cells))
    if any(r["model"] != "semvlp" for r in doc["runs"]):
        lines.append("Peers' TFLOP/s count executed FLOPs (torch.utils.flop_counter), not model FLOPs: no MFU.")
    if doc.get("ratios"):
        lines += ["", "| peer | mode | ours (backend) | ours samples/s | peer samples/s | ours/peer | eager/peer |"]
        lines.append("|" + "---|" * 7)
        for q in doc["ratios"]:
            backend = q["ours_backend"] + (" compiled" if q["ours_compile"] else "")
            cells = [q["peer"], q["mode"], backend, f"{q['ours_samples_per_s']:.1f}", f"{q['peer_samples_per_s']:.1f}"]
            eager = "-" if q["ratio_eager"] is None else f"{q['ratio_eager']:.2f}x"
            lines.append(_row(cells + [f"{q['ratio']:.2f}x", eager]))
    padding = [r for r in doc["runs"] if r["section"] == "padding" and (r["status"] == "ok" or r.get("same_as"))]
    if padding:
        lines += ["", "| padding: mode | text layout | padded to | mean length | samples/s | vs pad20 |"]
        lines.append("|" + "---|" * 6)
        ref = {r["mode"]: r["samples_per_s"] for r in padding if r["text"] == "pad20" and r["status"] == "ok"}
        for r in padding:
            if r.get("same_as"):  # not run: its batch is another layout's
                lines.append(_row([r["mode"], r["text"], "-", "-", f"= {r['same_as']} (the same batch)", "-"]))
                continue
            rel = r["samples_per_s"] / ref[r["mode"]] if r["mode"] in ref else None
            pad_to = "-" if r["text_pad_to"] is None else str(r["text_pad_to"])  # None: packed, no padding
            cells = [r["mode"], r["text"], pad_to, f"{r['text_mean_len']:.1f}"]
            lines.append(_row(cells + [f"{r['samples_per_s']:.1f}", _fmt(rel, ".3f") + "x"]))
        lines.append(_row(["any", "packed", "-", "-", "-", doc["packed_attention"]]))
    if doc.get("max_batch"):
        mb = doc["max_batch"]
        tried = ", ".join(
            f"{t['batch_size']}: {'fits' if t['fits'] else t.get('reason', '')[:60]}" for t in mb["tried"]
        )
        lines += ["", f"largest micro-batch ({mb['backend']}, {mb['precision']}): {mb['largest']}  [{tried}]"]
        if mb.get("stopped") or mb.get("error"):
            lines.append(f"  stopped: {mb.get('stopped') or mb.get('error')}")
    return "\n".join(lines)


# ---------------------------------------------------------------- summary across files


def load(paths: list[Path]) -> list[dict]:
    """The throughput results among `paths`; other JSON (kernel benchmarks share the folder) is ignored."""
    docs = []
    for path in paths:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        if isinstance(doc, dict) and str(doc.get("schema", "")).startswith("semvlp-throughput/"):
            doc["_path"] = str(path)
            docs.append(doc)
    return docs


def groups(docs: list[dict]) -> list[dict]:
    """Pool the files of one (device, commit, preset): their runs are one measurement campaign."""
    pooled: dict[tuple, dict] = {}
    for doc in sorted(docs, key=lambda d: d["date"]):
        key = (doc["device"]["name"], doc["git"]["commit"], doc["settings"]["preset"])
        group = pooled.setdefault(key, {"device": doc["device"], "git": doc["git"], "peak": {}, "runs": []})
        group["preset"], group["date"] = doc["settings"]["preset"], doc["date"]
        group["peak"].update(doc["peak"])
        group["runs"] += [r for r in doc["runs"] if r["status"] == "ok"]
    return list(pooled.values())


def summary_rows(group: dict) -> list[dict]:
    """Our fastest run per (precision, batch, text layout, mode) and its ratio to the matching peer
    (same precision, batch and text: shorter text is less work)."""
    runs = group["runs"]
    ours_all = [r for r in runs if r["model"] == "semvlp" and r["section"] in OURS_SECTIONS]
    same = lambda r: (r["precision"], r["batch_size"], r.get("text", "full"))
    keys = sorted(
        {(*same(r), r["mode"]) for r in ours_all},
        key=lambda k: (k[0], k[1], k[2] != "full", k[2], ("single", "two", "alternate").index(k[3])),
    )
    rows = []
    for precision, batch, text, mode in keys:
        ours = [r for r in ours_all if (*same(r), r["mode"]) == (precision, batch, text, mode)]
        best = max(ours, key=lambda r: r["samples_per_s"])
        peer_name = PEER_FOR_MODE.get(mode)
        peers = [r for r in runs if r["model"] == peer_name and same(r) == (precision, batch, text)]
        peer = max(peers, key=lambda r: r["samples_per_s"]) if peers else None
        rows.append(
            {
                "precision": precision,
                "batch_size": batch,
                "text": text,
                "mode": mode,
                "best": best,
                "peer": peer_name if peer else None,
                "ratio": best["samples_per_s"] / peer["samples_per_s"] if peer else None,
            }
        )
    return rows


def format_summary(docs: list[dict]) -> str:
    lines = [
        "| device | date | commit | preset | precision | batch | mode | ours (backend) | ms/step | samples/s "
        "| MFU % | peak GiB | ours/peer |",
        "|" + "---|" * 13,
    ]
    checks = []
    for group in groups(docs):
        rows = summary_rows(group)
        for row in rows:
            best = row["best"]
            backend = best["backend"] + (" compiled" if best["compile"] else "")
            backend += " checkpointed" if best.get("gradient_checkpointing") else ""
            ratio = f"{row['ratio']:.2f}x {row['peer']}" if row["ratio"] else "-"
            cells = [group["device"]["name"], group["date"][:10], group["git"]["commit"][:8], group["preset"]]
            batch = str(row["batch_size"]) + ("" if row["text"] == "full" else f" ({row['text']} text)")
            cells += [row["precision"], batch, row["mode"], backend]
            cells += [f"{best['ms_per_step']:.2f}", f"{best['samples_per_s']:.1f}"]
            mfu = best["mfu"] * 100 if best.get("mfu") else None
            cells += [_fmt(mfu, ".1f"), _fmt(best.get("peak_mem_gib"), ".1f")]
            lines.append(_row(cells + [ratio]))
        checks += target_checks(group, rows)
    if checks:
        lines += ["", "Targets (issue 7; H100, bf16, base, micro-batch 64):"] + [f"- {c}" for c in checks]
    return "\n".join(lines)


def target_checks(group: dict, rows: list[dict]) -> list[str]:
    if "H100" not in group["device"]["name"].upper() or group["preset"] != "base":
        return []
    at = {r["mode"]: r for r in rows if (r["precision"], r["batch_size"], r["text"]) == ("bf16", 64, "full")}
    if "single" not in at or not at["single"]["best"].get("mfu"):
        return []
    single = at["single"]["best"]["mfu"]
    verdict = "met" if single >= TARGET_MFU else "NOT met"
    out = [f"single-stream MFU {single:.1%} (target >= {TARGET_MFU:.0%}): {verdict}"]
    if at["single"]["ratio"]:
        ratio = at["single"]["ratio"]
        verdict = "met" if ratio >= TARGET_PEER_RATIO else "NOT met"
        out.append(f"single-stream vs VisualBERT {ratio:.2f}x samples/s (target >= {TARGET_PEER_RATIO:g}x): {verdict}")
    for mode in ("two", "alternate"):
        if mode in at and at[mode]["best"].get("mfu"):
            mfu = at[mode]["best"]["mfu"]
            verdict = "met" if mfu >= single * (1 - TARGET_MODE_GAP) else "NOT met"
            out.append(f"{mode} MFU {mfu:.1%} vs single {single:.1%} (target within {TARGET_MODE_GAP:.0%}): {verdict}")
    return out


# ---------------------------------------------------------------- the main job (gpu_check's pretrain stage)


def format_pretrain(records: list[dict]) -> str:
    """One row per launch/pretrain.py run of gpu_check.sh (pretrain_metrics.jsonl: each run's
    metrics.jsonl lines, prefixed with its kernel_backend, compile and overflow_check (DeepSpeed's
    bf16 overflow check, which the shipped configs turn off), after a `run` line naming device,
    versions and commit): its last log window and its profiled steps (--profile_steps)."""
    runs: dict[tuple, dict] = {}
    for r in records:
        run = runs.setdefault((r.get("kernel_backend"), r.get("compile"), r.get("overflow_check", False)), {})
        run[r.get("kind")] = r  # the last of each kind
    lines = [
        "| device | commit | kernel backend | compile | bf16 overflow check | step | samples/s | ms/step | MFU % "
        "| data wait ms | profiled steps | profiled ms/step | GPU busy % | kernels/step |",
        "|" + "---|" * 14,
    ]
    for (backend, compiled, checked), run in runs.items():
        about, train, profile = run.get("run", {}), run.get("train", {}), run.get("profile", {})
        cells = [about.get("device", "-"), about.get("git_commit", "-")[:8], str(backend), "yes" if compiled else "no"]
        cells.append("yes" if checked else "no")
        cells += [str(train.get("step", "-")), _fmt(train.get("samples_per_s"), ".1f")]
        cells += [_fmt(train["step_time_s"] * 1e3 if "step_time_s" in train else None, ".1f")]
        cells += [_fmt(train["mfu"] * 100 if "mfu" in train else None, ".1f")]
        cells += [_fmt(train["data_wait_s"] * 1e3 if "data_wait_s" in train else None, ".2f")]
        steps = f"{profile['first_step']}-{profile['step']}" if "first_step" in profile else profile.get("error", "-")
        cells += [steps, _fmt(profile.get("wall_ms_per_step"), ".1f"), _fmt(profile.get("gpu_busy_pct"), ".0f")]
        cells.append(_fmt(profile.get("kernels_per_step"), ".0f"))
        lines.append(_row(cells))
    return "\n".join(lines)


def readme_block(docs: list[dict]) -> str:
    body = format_summary(docs) if docs else "No results yet."
    regen = "Regenerated from `benchmarks/results/*.json` by `python benchmarks/report.py --readme README.md`."
    return f"{START}\n{regen}\n\n{FORMULA}\n\n{body}\n{END}"


def rewrite_readme(path: Path, block: str) -> None:
    text = path.read_text()
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise SystemExit(f"{path}: needs {START} ... {END} markers around the results block")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(head + block + tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", type=Path, help="JSON files or folders (default: benchmarks/results)")
    p.add_argument("--detail", action="store_true", help="also print every file's per-run tables")
    p.add_argument("--readme", type=Path, help="rewrite the marked results block of this file")
    p.add_argument("--pretrain", type=Path, help="only the table of gpu_check.sh's pretrain_metrics.jsonl")
    args = p.parse_args(argv)
    if args.pretrain:
        print(format_pretrain([json.loads(line) for line in args.pretrain.read_text().splitlines() if line.strip()]))
        return 0
    paths = []
    for path in args.paths or [RESULTS]:
        paths += sorted(path.glob("*.json")) if path.is_dir() else [path]
    docs = load(paths)
    if args.detail:
        for doc in docs:
            print(f"== {doc['_path']}\n{format_tables(doc)}\n")
    if not docs:
        print(f"no throughput results among {len(paths)} JSON file(s) in {[str(p) for p in args.paths or [RESULTS]]}")
    else:
        print(format_summary(docs))
    if args.readme:
        rewrite_readme(args.readme, readme_block(docs))
        print(f"rewrote the results block of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
