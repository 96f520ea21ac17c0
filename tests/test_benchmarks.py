"""The throughput benchmark on CPU: the CLI end to end (tiny preset, 2 steps per mode), the JSON it
writes, report.py on that JSON, the model-FLOPs formula against torch's FLOP counter, the
DeepSpeed-style mixed-precision step, and the peak table."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semvlp.peaks import peak_tflops

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"semvlp_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


throughput = _load("throughput")
report = _load("report")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores, more threads only add contention to these small models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "result.json"
    # Without the interpreter the triton backend is unavailable on CPU: the run must record why.
    # (tests/conftest.py sets TRITON_INTERPRET in this process.)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(BENCH / "throughput.py"), "--preset", "tiny", "--batch-size", "2"]
    cmd += ["--modes", "single,two,alternate", "--backends", "sdpa,triton", "--precision", "fp32"]
    cmd += ["--warmup", "0", "--steps", "2", "--repeats", "1", "--peers", "--padding-study"]
    cmd += ["--padding-modes", "single", "--find-max-batch", "--max-batch-cap", "4", "--device", "cpu"]
    cmd += ["--padding-backend", "triton"]  # unavailable here: the study falls back to the fastest backend
    cmd += ["--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout, out


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_json_has_run_metadata(cli_run):
    doc, stdout, _ = cli_run
    assert doc["schema"] == throughput.SCHEMA
    assert doc["device"]["type"] == "cpu"
    assert {"torch", "triton", "transformers", "deepspeed"} <= set(doc["versions"])
    assert doc["versions"]["torch"] == torch.__version__
    assert len(doc["git"]["commit"]) == 40 or doc["git"]["commit"] == "unknown"
    assert doc["date"][:4].isdigit()
    assert doc["backends"]["sdpa/fp32"] == "available"
    assert doc["backends"]["triton/fp32"] != "available"  # the reason select_ops gave
    assert doc["peak"]["fp32"]["tflops"] is None  # CPU: no peak, so no MFU
    # The padding study ran the packed layout on sdpa (the only backend here): attention via padding.
    assert doc["packed_attention"].startswith("measured: 'packed' padding-study rows on sdpa ran padded attention")
    assert "--padding-backend triton is unavailable: the study runs on sdpa" in stdout


def test_every_run_has_finite_positive_figures(cli_run):
    doc, _, _ = cli_run
    assert doc["runs"], "no runs recorded"
    for run in doc["runs"]:
        assert run["status"] == "ok", run
        for key in ("ms_per_step", "samples_per_s", "tokens_per_s", "tflops", "flops_per_step", "fwd_bwd_ms"):
            assert _positive(run[key]), (key, run)
        assert run["ms_min"] <= run["ms_per_step"] <= run["ms_max"]
        assert math.isfinite(run["loss"])
        assert run["mfu"] is None
        assert run["samples_per_s"] == pytest.approx(run["batch_size"] / (run["ms_per_step"] / 1e3))
        assert run["compile_mode"] is None and not run["compile"]
        assert "gpu_busy_pct" not in run and "device_time_error" not in run  # device time: CUDA only


def test_main_grid_peers_padding_and_max_batch(cli_run):
    doc, _, _ = cli_run
    runs = doc["runs"]
    main = {(r["backend"], r["mode"]) for r in runs if r["section"] == "main"}
    assert main == {("sdpa", "single"), ("sdpa", "two"), ("sdpa", "alternate")}
    assert {r["model"] for r in runs if r["section"] == "peer"} == {"visualbert", "lxmert"}
    assert {(q["peer"], q["mode"]) for q in doc["ratios"]} == {("visualbert", "single"), ("lxmert", "two")}
    assert all(_positive(q["ratio"]) for q in doc["ratios"])
    padding = {r["text"]: r for r in runs if r["section"] == "padding"}
    assert set(padding) == set(throughput.LAYOUTS)
    assert padding["full"]["text_pad_to"] == padding["pad20"]["text_pad_to"] == 20
    assert padding["bucket-longest"]["text_pad_to"] <= 12
    # Padding is not credited: the same lengths padded further cost the same model FLOPs.
    assert padding["pad20"]["flops_per_step"] == padding["longest"]["flops_per_step"]
    assert padding["pad20"]["flops_per_step"] < padding["full"]["flops_per_step"]
    assert padding["packed"]["text_pad_to"] is None  # no padding at all
    assert padding["packed"]["flops_per_step"] == padding["longest"]["flops_per_step"]
    assert doc["max_batch"]["largest"] == 4
    assert [t["batch_size"] for t in doc["max_batch"]["tried"]] == [2, 4]
    assert {r["mode"] for r in runs if r["section"] == "max_batch" and r["batch_size"] == 4} == set(throughput.MODES)


def test_table_is_printed_last(cli_run):
    _, stdout, _ = cli_run
    lines = stdout.strip().splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("| section | model | mode |")]
    assert len(header) == 1
    assert not any(line.startswith("[throughput]") for line in lines[header[0] :])  # nothing after the tables
    assert any(line.startswith("largest micro-batch") for line in lines[-2:])


def test_report_summary_and_readme_block(cli_run, tmp_path, capsys):
    doc, _, path = cli_run
    assert report.main([str(path)]) == 0
    summary = capsys.readouterr().out
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "tiny" in line]
    assert {row.split(" | ")[6] for row in rows} == {"single", "two", "alternate"}
    assert any("x visualbert" in row for row in rows) and any("x lxmert" in row for row in rows)

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{report.START}\nstale\n{report.END}\nafter\n")
    assert report.main([str(path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith("after\n")
    assert "stale" not in text and "6N + 12·L·d·s" in text and "| device | date | commit |" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        report.main([str(path), "--readme", str(readme)])


def test_summary_keeps_text_layouts_apart_and_pairs_peers_on_the_same_text():
    """Shorter text is less work: a pad20 run is neither "our fastest" full-text run nor compared with
    a full-text peer, and the H100 target verdicts read the full-text rows only."""

    def run(model: str, text: str, samples_per_s: float, mode: str = "single") -> dict:
        section = "main" if model == "semvlp" else "peer"
        return {"model": model, "section": section, "mode": mode, "precision": "bf16", "batch_size": 64,
                "text": text, "samples_per_s": samples_per_s, "ms_per_step": 64e3 / samples_per_s,
                "backend": "sdpa", "compile": False, "status": "ok", "mfu": 0.5 if text == "full" else 0.9}  # fmt: skip

    runs = [run("semvlp", "full", 100.0), run("semvlp", "pad20", 300.0), run("visualbert", "full", 50.0)]
    runs.append(run("visualbert", "pad20", 200.0))
    group = {"runs": runs, "device": {"name": "NVIDIA H100 80GB HBM3"}, "preset": "base"}
    rows = report.summary_rows(group)
    assert [(r["text"], r["best"]["samples_per_s"], r["ratio"]) for r in rows] == [
        ("full", 100.0, 2.0),
        ("pad20", 300.0, 1.5),
    ]
    assert report.target_checks(group, rows)[:2] == [
        "single-stream MFU 50.0% (target >= 50%): met",
        "single-stream vs VisualBERT 2.00x samples/s (target >= 2x): met",
    ]
    group.update(git={"commit": "0" * 40}, date="2026-12-07", peak={})
    summary = report.format_summary([{**group, "settings": {"preset": "base"}}])
    assert "| bf16 | 64 (pad20 text) | single | sdpa |" in summary


def test_report_tables_gpu_checks_runs_of_the_main_job(tmp_path, capsys):
    """gpu_check.sh's pretrain_metrics.jsonl: a row per (kernel backend, compile, DeepSpeed's bf16
    overflow check) from its last log window and its profile record; a failed profile shows its error."""
    run = {"kind": "run", "device": "NVIDIA H100 80GB HBM3", "git_commit": "0123456789abcdef"}
    train = {"kind": "train", "step": 30, "samples_per_s": 2000.0, "step_time_s": 0.032, "mfu": 0.412,
             "data_wait_s": 0.0004}  # fmt: skip
    lines = [
        {**run, "kernel_backend": "auto", "compile": False},
        {"kind": "train", "step": 10, "kernel_backend": "auto", "compile": False, "samples_per_s": 1.0},
        {**train, "kernel_backend": "auto", "compile": False},
        {"kind": "profile", "step": 13, "first_step": 11, "steps": 3, "wall_ms_per_step": 33.0,
         "gpu_busy_pct": 61.4, "kernels_per_step": 2110.0, "kernel_backend": "auto", "compile": False},
        {**run, "kernel_backend": "auto", "compile": True},
        {**train, "kernel_backend": "auto", "compile": True},
        {"kind": "profile", "step": 11, "error": "RuntimeError: CUPTI", "kernel_backend": "auto", "compile": True},
        {**run, "kernel_backend": "auto", "compile": False, "overflow_check": True},
        {**train, "kernel_backend": "auto", "compile": False, "overflow_check": True, "samples_per_s": 1500.0},
    ]  # fmt: skip
    path = tmp_path / "pretrain_metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert report.main(["--pretrain", str(path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| NVIDIA")]
    assert rows == [
        "| NVIDIA H100 80GB HBM3 | 01234567 | auto | no | no | 30 | 2000.0 | 32.0 | 41.2 | 0.40 "
        "| 11-13 | 33.0 | 61 | 2110 |",
        "| NVIDIA H100 80GB HBM3 | 01234567 | auto | yes | no | 30 | 2000.0 | 32.0 | 41.2 | 0.40 "
        "| RuntimeError: CUPTI | - | - | - |",
        "| NVIDIA H100 80GB HBM3 | 01234567 | auto | no | yes | 30 | 1500.0 | 32.0 | 41.2 | 0.40 | - | - | - | - |",
    ]


def test_table_shows_compile_mode_and_kernel_busy_share(cli_run):
    doc, _, _ = cli_run
    run = {**doc["runs"][0], "compile": True, "compile_mode": "reduce-overhead", "gpu_busy_pct": 41.6}
    table = report.format_tables({**doc, "runs": [run], "ratios": [], "max_batch": None})
    header, _, row = table.splitlines()[4:7]
    cells = dict(zip(header.split(" | "), row.split(" | "), strict=True))
    assert cells["compile"] == "reduce-overhead" and cells["kernel busy %"] == "42"


def test_compile_mode_reaches_torch_compile(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.setdefault("mode", mode) or model)
    args = ["--device", "cpu", "--compile", "on", "--compile-mode", "reduce-overhead", "--out", str(tmp_path)]
    runner = throughput.Runner(throughput.parse_args(args), torch.device("cpu"))
    runner.build_ours("eager", "fp32", compile_=True)
    assert seen == {"mode": "reduce-overhead"}
    assert throughput.parse_args(["--device", "cpu"]).compile_mode == "default"


def test_gradient_checkpointing_reaches_our_model_and_the_json(tmp_path):
    args = ["--device", "cpu", "--preset", "tiny", "--gradient-checkpointing", "--out", str(tmp_path)]
    runner = throughput.Runner(throughput.parse_args(args), torch.device("cpu"))
    _, model = runner.build_ours("eager", "fp32", compile_=False)
    assert model.semvlp.encoder.gradient_checkpointing
    (run,) = runner.run_ours("main", "eager", "fp32", False, ["two"], ["full"], 2, timing=(0, 1, 1))
    assert run["status"] == "ok" and run["gradient_checkpointing"] is True
    assert runner.doc["settings"]["gradient_checkpointing"] is True
    assert "| main | semvlp | two | eager checkpointed | fp32 |" in report.format_tables(runner.doc)


def test_the_max_batch_search_saves_each_size_it_tries(monkeypatch, tmp_path):
    """gpu_check.sh kills a stage at its time limit: the search's JSON holds every size tried so far."""
    args = ["--device", "cpu", "--preset", "tiny", "--batch-size", "1", "--max-batch-cap", "4", "--out",
            str(tmp_path / "r.json")]  # fmt: skip
    runner = throughput.Runner(throughput.parse_args(args), torch.device("cpu"))
    saved = []
    monkeypatch.setattr(runner, "save", lambda: saved.append(len(runner.doc["max_batch"]["tried"])))
    assert runner.find_max_batch("eager", "fp32") == 4
    assert saved[:3] == [1, 2, 3]  # after sizes 1, 2 and 4, before the next doubling passes the cap


def test_compiled_runs_record_their_graph_breaks(monkeypatch, tmp_path):
    """A compiled run counts the graph breaks of its own compilation, as dynamo's explain() counts
    them for the same forward. Dynamo only (backend="eager"): inductor would add minutes."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compile_(model, backend="eager"))
    args = ["--device", "cpu", "--preset", "tiny", "--compile", "on", "--out", str(tmp_path)]
    runner = throughput.Runner(throughput.parse_args(args), torch.device("cpu"))
    torch._dynamo.reset()
    (run,) = runner.run_ours("main", "eager", "fp32", True, ["single"], ["full"], 2, timing=(1, 1, 1))
    assert run["status"] == "ok" and run["graph_breaks"] == sum(run["graph_break_reasons"].values())

    _, call = runner.build_ours("eager", "fp32", compile_=False)
    batch = throughput.make_batch(runner.cfg, [20, 20], 20, torch.device("cpu"))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(call)(**batch.inputs, mode="single")
    assert run["graph_breaks"] == len(explained.break_reasons) > 0  # the masked-row gathers of the losses


def test_kernel_speedups_by_wall_clock_and_device_time():
    fused_ops = _load("fused_ops")
    rows = [
        {"op": "bias_gelu", "case": "c", "mode": "full", "provider": "triton", "p50_ms": 0.4, "device_ms": 0.1,
         "GBps": 500.0, "device_GBps": 2000.0},
        {"op": "bias_gelu", "case": "c", "mode": "full", "provider": "eager", "p50_ms": 0.2, "device_ms": 0.2},
        {"op": "bias_gelu", "case": "c", "mode": "check", "provider": "sdpa", "error": "no kernel"},
    ]  # fmt: skip
    by_timing = {s["timing"]: s for s in fused_ops.speedups(rows, copy_GBps=2500.0)}
    assert by_timing["p50_ms"]["speedup_vs_eager"] == pytest.approx(0.5)
    assert by_timing["device_ms"]["speedup_vs_eager"] == pytest.approx(2.0)
    assert by_timing["device_ms"]["best_other"] == "eager" and by_timing["device_ms"]["triton_ms"] == 0.1
    assert (by_timing["p50_ms"]["pct_of_copy"], by_timing["device_ms"]["pct_of_copy"]) == (20.0, 80.0)
    # CPU rows have no device_ms: only the wall-clock comparison; no copy bandwidth measured: no percentage
    cpu = [{k: v for k, v in r.items() if k != "device_ms"} for r in rows]
    assert [(s["timing"], s["pct_of_copy"]) for s in fused_ops.speedups(cpu)] == [("p50_ms", None)]
    # The model-path cases (GEMM included): triton vs eager like the others, but no bytes: no percentage
    gemm = [{**r, "op": "linear_gelu", "GBps": None, "device_GBps": None, "TFLOPs": 100.0} for r in rows]
    by_timing = {s["timing"]: s for s in fused_ops.speedups(gemm, copy_GBps=2500.0)}
    assert by_timing["device_ms"]["speedup_vs_eager"] == pytest.approx(2.0)
    assert by_timing["device_ms"]["pct_of_copy"] is None and by_timing["p50_ms"]["pct_of_copy"] is None


def test_kernel_peak_memory_is_one_untimed_calls_peak_with_its_inputs(monkeypatch):
    """peak_memory_mb against a stand-in for torch.cuda's allocator counters: what was live before
    the call (the check's outputs) and what the timer allocated before it (do_bench's 256 MiB
    L2-flush buffer) do not count; the call's own peak and its inputs do; stale grads are cleared first."""
    fused_ops = _load("fused_ops")
    mib = 2**20
    mem = {"now": 300 * mib, "peak": 300 * mib}  # 300 MiB live before the call

    def allocate(nbytes: int) -> None:
        mem["now"] += nbytes
        mem["peak"] = max(mem["peak"], mem["now"])

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: mem.update(peak=mem["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: mem["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    x = torch.zeros(mib // 4, requires_grad=True)  # 1 MiB of fp32
    x.grad = torch.ones_like(x)  # left by an earlier call
    seen_grads = []

    def call() -> None:
        seen_grads.append(x.grad)
        allocate(3 * mib)  # the call's activations and output, freed on return
        allocate(-3 * mib)

    allocate(256 * mib)  # the timer's flush buffer, before the measured call
    allocate(-256 * mib)
    assert fused_ops.peak_memory_mb(call, [x, x[:2]], torch.device("cuda")) == pytest.approx(4.0)
    assert seen_grads == [None] and x.grad is None
    assert fused_ops.peak_memory_mb(call, [x], torch.device("cpu")) is None and len(seen_grads) == 1


def test_kernel_host_time_calls_start_from_cleared_grads(monkeypatch):
    """Each host-timed forward + backward starts with no grads, as a training step does: from the
    second call on, the backward would otherwise launch an accumulation per input as well."""
    fused_ops = _load("fused_ops")
    x = torch.randn(8, requires_grad=True)
    grads_before_each_call = []

    def square(x):
        grads_before_each_call.append(x.grad)
        return x * x

    def setup():
        return [x], {"eager": square}, None, None, None, None

    monkeypatch.setattr(fused_ops, "host_time", lambda fn, device: [fn() for _ in range(3)] and 0.1)
    timer = lambda closure, grad_to_none: (1.0, 1.0, 1.0)
    results = []
    fused_ops.measure_case("op", "case", setup, timer, torch.device("cpu"), ["full"], results, with_check=False)
    assert "error" not in results[0] and results[0]["host_ms"] == 0.1
    assert grads_before_each_call[1:] == [None, None, None]  # after the check call: the three host-timed ones


def test_device_time_is_cuda_only():
    device_time = _load("device_time")
    assert device_time.device_ms(lambda: torch.ones(3).sum(), torch.device("cpu")) is None


def test_model_flops_formula_matches_the_flop_counter():
    """Our analytic model FLOPs equal the matmul FLOPs torch counts when no text is padded."""
    from semvlp.config import config_from_preset
    from semvlp.flops import training_step_flops
    from semvlp.model import SemVLPForPreTraining

    cfg = config_from_preset("tiny", kernel_backend="eager")
    torch.manual_seed(0)
    model = SemVLPForPreTraining(cfg).train()
    cpu = torch.device("cpu")
    full = throughput.make_batch(cfg, [20, 20], 20, cpu)
    padded = throughput.make_batch(cfg, [9, 14], 20, cpu)
    for mode in ("single", "two"):
        counted = throughput.counted_step_flops(lambda b=full, m=mode: model(**b.inputs, mode=m).loss)
        assert throughput.semvlp_step_flops(cfg, full, mode) == pytest.approx(counted, rel=1e-9), mode
        # With padding the counter sees the padded work; the model FLOPs count real tokens only.
        counted = throughput.counted_step_flops(lambda b=padded, m=mode: model(**b.inputs, mode=m).loss)
        assert throughput.semvlp_step_flops(cfg, padded, mode) < counted
        # A batch of texts of several lengths costs what its examples cost alone (attention is per sequence).
        for length in (9, 14):
            alone = throughput.make_batch(cfg, [length], length, cpu)
            counted = throughput.counted_step_flops(lambda b=alone, m=mode: model(**b.inputs, mode=m).loss)
            assert throughput.semvlp_step_flops(cfg, alone, mode) == pytest.approx(counted, rel=1e-9), (mode, length)
        apart = training_step_flops(cfg, [9], mode, 1, 2) + training_step_flops(cfg, [14], mode, 2, 3)
        assert training_step_flops(cfg, [9, 14], mode, 3, 5) == pytest.approx(apart, rel=1e-12), mode
    alternate = throughput.semvlp_step_flops(cfg, full, "alternate")
    assert alternate == pytest.approx(
        (throughput.semvlp_step_flops(cfg, full, "single") + throughput.semvlp_step_flops(cfg, full, "two")) / 2
    )


def _tiny_model_and_batch(text_lengths=(20, 20)):
    from semvlp.config import config_from_preset
    from semvlp.model import SemVLPForPreTraining

    cfg = config_from_preset("tiny", kernel_backend="eager")
    torch.manual_seed(0)
    model = SemVLPForPreTraining(cfg).train()
    return model, throughput.make_batch(cfg, list(text_lengths), max(text_lengths), torch.device("cpu"))


def test_cast_step_keeps_fp32_masters_and_steps_unused_params_with_zero_grads(monkeypatch):
    """--amp cast: bf16 model, fp32 master weights. A single-stream step leaves cross-attention without
    gradients; DeepSpeed's ZeRO optimizer still steps its flat partition whole, so AdamW steps them
    here with zero gradients: the weight decay alone moves them."""
    model, batch = _tiny_model_and_batch()
    cpu = torch.device("cpu")
    train = throughput.TrainStep(model, "bf16", "cast", cpu, lr=1e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, _ = train(lambda: model(**batch.inputs, mode="single").loss, throughput.Clock(cpu))
    assert math.isfinite(loss.item())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in train.masters)
    for param, master in zip(train.params, train.masters, strict=True):
        assert torch.equal(param.detach(), master.to(torch.bfloat16))
    named = dict(model.named_parameters())
    masters = {n: train.masters[i] for i, n in enumerate(n for n, p in model.named_parameters() if p.requires_grad)}
    cross = [n for n in named if ".cross_attention." in n]
    assert cross
    for name in cross:
        master = masters[name]
        assert torch.equal(master.grad, torch.zeros_like(master)) and master in train.optimizer.state
        assert torch.allclose(master, before[name].float() * (1 - 1e-4 * 0.01), rtol=0, atol=1e-9)
    assert not torch.equal(
        named["semvlp.encoder.layers.0.ffn.up.weight"], before["semvlp.encoder.layers.0.ffn.up.weight"]
    )
    # fp32: the same rule without masters (the model's own parameters step)
    model, batch = _tiny_model_and_batch()
    train = throughput.TrainStep(model, "fp32", "cast", cpu)
    train(lambda: model(**batch.inputs, mode="single").loss, throughput.Clock(cpu))
    stepped = {id(p) for p in train.optimizer.state}
    assert all(id(p) in stepped for n, p in model.named_parameters() if ".cross_attention." in n)
    zeros, made = dict(train.zero_grads), []
    zeros_like = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: made.append(1) or zeros_like(*a, **k))
    train(lambda: model(**batch.inputs, mode="single").loss, throughput.Clock(cpu))
    assert zeros and all(train.zero_grads[i] is z and z.count_nonzero() == 0 for i, z in zeros.items())
    assert len(zeros) > 4 > len(made)  # made once, not a tensor per unused parameter per step (the model's own: 1)


def test_step_clips_the_gradients_to_the_ds_configs_norm():
    """Every ds_config clips the global gradient norm at 1.0, a pass over every gradient each step:
    the benchmark's step does it too (after unscaling, for fp16), and --grad-clip 0 turns it off."""
    for name in ("cpu", "v100", "a100", "h100"):
        config = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
        assert config["gradient_clipping"] == throughput.GRAD_CLIP == throughput.parse_args([]).grad_clip, name
    cpu = torch.device("cpu")

    def master_grad_norm(precision: str, grad_clip: float) -> float:
        model, batch = _tiny_model_and_batch()
        train = throughput.TrainStep(model, precision, "cast", cpu, grad_clip=grad_clip)
        if train.scaler:  # a scale that does not overflow fp16 here, and that clipping before unscaling would show
            train.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        train(lambda: model(**batch.inputs, mode="two").loss, throughput.Clock(cpu))
        return torch.linalg.vector_norm(torch.stack([m.grad.float().norm() for m in train.masters])).item()

    unclipped = master_grad_norm("bf16", 0.0)
    assert unclipped > 1.0  # so that clipping at 1.0 does something
    assert master_grad_norm("bf16", 1.0) == pytest.approx(1.0, rel=1e-4)
    assert master_grad_norm("bf16", 1e-3) == pytest.approx(1e-3, rel=1e-4)
    assert master_grad_norm("fp16", 1e-3) == pytest.approx(1e-3, rel=1e-3)  # unscaled first


def test_every_batch_has_the_attention_mask_the_collate_gives():
    """The trainer's collate always passes attention_mask, all ones when nothing is padded; without
    one SDPA would pick a flash kernel training never runs."""
    _, full = _tiny_model_and_batch((20, 20))
    assert torch.equal(full.inputs["attention_mask"], torch.ones(2, 20, dtype=torch.long))
    _, padded = _tiny_model_and_batch((9, 14))
    assert padded.inputs["attention_mask"].sum(1).tolist() == [9, 14]


def test_padding_study_skips_a_layout_whose_batch_is_an_earlier_ones(tmp_path):
    """At micro-batch 64 the longest of 64 captions of 8..20 tokens is 20: "longest" is pad20's batch."""
    args = ["--device", "cpu", "--preset", "tiny", "--out", str(tmp_path / "r.json")]
    runner = throughput.Runner(throughput.parse_args(args), torch.device("cpu"))
    assert throughput.text_lengths("longest", 64, 20, seed=0) == throughput.text_lengths("pad20", 64, 20, seed=0)
    runs = runner.run_ours("padding", "eager", "fp32", False, ["two"], ["pad20", "longest", "packed"], 64, (0, 1, 1))
    assert [(r["text"], r["status"], r.get("same_as")) for r in runs] == [
        ("pad20", "ok", None),
        ("longest", "skipped", "pad20"),
        ("packed", "ok", None),  # the same lengths, not the same batch
    ]
    table = report.format_tables(runner.doc)
    assert "| two | longest | - | - | = pad20 (the same batch) | - |" in table


def test_peers_get_no_mfu_and_the_json_has_no_nan(tmp_path):
    """A peer's FLOPs are counted (executed), not model FLOPs: its MFU would not compare with ours.
    Non-finite figures are written as null: bare NaN is not JSON."""
    out = tmp_path / "r.json"
    args = ["--device", "cpu", "--preset", "tiny", "--batch-size", "2", "--out", str(out)]
    runner = throughput.Runner(throughput.parse_args(args), torch.device("cpu"))
    runner.doc["peak"]["fp32"] = {"tflops": 1.0, "source": "a stand-in peak"}  # CPU has none
    (ours,) = runner.run_ours("main", "eager", "fp32", False, ["single"], ["full"], 2, timing=(0, 1, 1))
    peer = runner.run_peer("visualbert", "fp32", 2)
    assert ours["mfu"] == pytest.approx(ours["tflops"]) and peer["mfu"] is None and peer["tflops"] > 0
    assert "executed FLOPs" in peer["flops_source"]
    assert "Peers' TFLOP/s count executed FLOPs" in report.format_tables(runner.doc)
    runner.doc["runs"].append({**ours, "loss": float("nan"), "ms_repeats": [float("inf")]})
    runner.save()
    saved = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert saved["runs"][-1]["loss"] is None and saved["runs"][-1]["ms_repeats"] == [None]


@pytest.mark.parametrize(
    "name, precision, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("Tesla V100-SXM2-32GB", "fp16", 125.0),
        ("Tesla V100-SXM2-32GB", "bf16", None),  # no bf16 tensor cores on Volta
        ("NVIDIA H100 80GB HBM3", "fp32", None),
        ("NVIDIA GeForce RTX 4090", "bf16", None),  # not listed: MFU stays empty
        ("NVIDIA RTX A1000", "bf16", None),  # "A100" only as a whole word
        ("NVIDIA H200 NVL", "bf16", None),  # a lower-power part: not the SXM figure
        ("NVIDIA GH200 480GB", "bf16", None),
        ("Tesla V100S-PCIE-32GB", "fp16", 130.0),
        ("Tesla V100-PCIE-16GB", "fp16", 112.0),
        ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", "bf16", None),  # a slice: not the whole device's SMs
    ],
)
def test_peak_table(name, precision, expected):
    value, source = peak_tflops(name, precision)
    assert value == expected, source
    assert source


def test_kernel_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/fused_ops.py on CPU (reference providers, tiny shapes): every op timed, no errors, profiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(BENCH / "fused_ops.py"), "--quick", "--profile", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = tmp_path.glob("kernels_*_float32_*.json")
    assert f"wrote {path} (20 rows, 0 errors)" in result.stdout
    run = json.loads(path.read_text())
    assert run["meta"]["dtype"] == "float32" and run["meta"]["torch"] == torch.__version__
    assert len(run["meta"]["git_commit"]) == 40
    rows = run["results"]
    assert not [r for r in rows if "error" in r]
    timed = {(r["op"], r["mode"]) for r in rows}
    ops = ("attention", "varlen_attention", "bias_gelu", "residual_layer_norm", "linear_cross_entropy")
    ops += ("linear_gelu", "linear_residual_layer_norm")  # the model's fusion sites, GEMM included
    assert timed == {(op, mode) for op in ops for mode in ("forward", "full")}
    assert all(_positive(r["p50_ms"]) and _positive(r["host_ms"]) and r["p20_ms"] <= r["p80_ms"] for r in rows)
    # GEMM ops: TFLOP/s, no GB/s; the memory-bound ops: GB/s. (CPU: no peak_mb, a CUDA counter.)
    by_op = {op: [r for r in rows if r["op"] == op] for op in ops}
    assert all(_positive(r["TFLOPs"]) and "GBps" not in r for r in by_op["linear_gelu"] + by_op["linear_cross_entropy"])
    assert all(_positive(r["GBps"]) and "TFLOPs" not in r for r in by_op["bias_gelu"])
    assert {r["case"] for r in by_op["linear_gelu"]} == {"242x64->256"}
    assert {r["case"] for r in by_op["linear_residual_layer_norm"]} == {"242x256->64_drop0.1"}
    assert not [r for r in rows if "peak_mb" in r]
    # Checked against the fp32 reference unless dropout makes the outputs random.
    assert all((r["max_abs_diff_vs_fp32_reference"] is None) == ("_drop0.1" in r["case"]) for r in rows)
    # --profile: a profiler table per case, for its first provider (eager here, triton on a GPU)
    profile = path.with_name(path.stem + "_profile.txt").read_text()
    assert profile.count("== ") == len({(r["op"], r["case"]) for r in rows}) and "failed" not in profile
    assert "== bias_gelu 242x256 eager forward+backward" in profile and "Self CPU time total" in profile


def test_kernel_benchmark_records_the_autotuners_choices_and_the_compiled_kernels():
    """fused_ops's record of what Triton chose, read from Triton's caches, checked without a GPU:
    kernel_resources's offline driver compiles for sm_90 and times every config as 1 ms."""
    probe = """
import json, sys, torch
sys.path.insert(0, "benchmarks")
import fused_ops, kernel_resources
from triton.runtime import driver
driver.set_active(kernel_resources.OfflineDriver(90))
providers = {"attention": ["triton"], "varlen_attention": [], "fused": []}
cases = fused_ops.model_cases(torch.device("cpu"), torch.bfloat16, 2, fused_ops.BASE_SHAPES, providers)
inputs, table, *_ = next(setup for op, case, setup in cases if case == "single_121_masked")()
out = table["triton"](*inputs)
out.backward(torch.randn_like(out))
reported = set()
first, again = fused_ops.autotune_choices(reported), fused_ops.autotune_choices(reported)
print(json.dumps({"choices": first, "again": again, "compiled": fused_ops.compiled_kernels()}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEMVLP_TRITON_AUTOTUNE")}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["again"] == []  # each decision is reported once
    choices = {c["kernel"]: c for c in seen["choices"]}
    assert sorted(choices) == ["_attention_backward_kernel", "_attention_forward_kernel"]
    backward = choices["_attention_backward_kernel"]
    key = backward["key"]
    assert key.pop("dtypes")[:4] == ["torch.bfloat16"] * 3 + ["torch.uint8"]  # q, k, v, the key mask
    assert key == {"TQ": 121, "TK": 121, "HEAD_DIM": 64, "HAS_MASK": True, "HAS_DROPOUT": False}
    # 121 keys: the 4 fused configs and the 8 split ones (32- and 64-key blocks) are all timed.
    assert len(backward["timings_ms"]) == 12 and backward["chosen"] in backward["timings_ms"]
    assert all(t == [1.0, 1.0, 1.0] for t in backward["timings_ms"].values())
    compiled = [c for c in seen["compiled"] if c["kernel"] == "_attention_backward_kernel"]
    assert len(compiled) == 12  # one per config
    assert {c["constexprs"]["BLOCK_M"] for c in compiled} == {16, 32}
    assert {c["constexprs"]["KEY_BLOCK"] for c in compiled} == {32, 64, 128}
    assert all(c["registers"] > 0 and c["spill_bytes"] is not None and c["shared_bytes"] > 0 for c in compiled)


def test_gpu_check_runs_only_the_selected_stages_and_prints_the_stage_table(tmp_path):
    """gpu_check.sh's skeleton without its long stages (GPU_CHECK_STAGES names none of them): the
    install, info and summary stages run, every other stage is reported as not selected, and the
    stage table comes last. The CPU smoke run of every stage (GPU_CHECK_CPU=1) takes ~40 s."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_CPU="1", GPU_CHECK_STAGES="none")
    result = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), "-", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = result.stdout[result.stdout.index("| stage | result |") :].splitlines()
    rows = dict(line.strip("| ").split(" | ") for line in table[2:] if line.startswith("| "))
    assert rows.pop("install").startswith("ok") and rows.pop("info").startswith("ok")
    assert rows.pop("summary").startswith("ok")
    assert rows == {
        "kernel-tests": "skipped (not in GPU_CHECK_STAGES)",
        "kernel-bench": "skipped (not in GPU_CHECK_STAGES)",
        "throughput": "skipped (not in GPU_CHECK_STAGES)",
        "throughput-compile": "skipped (cpu mode)",
        "throughput-fp16": "skipped (not in GPU_CHECK_STAGES)",
        "model-kernels": "skipped (cpu mode or no tests/test_model_kernels.py)",
        "pretrain": "skipped (not in GPU_CHECK_STAGES)",
    }
    assert table[-1].startswith("gpu_check: done") and (tmp_path / "out" / "gpu_check.log").is_file()


def test_step_ops_counts_the_operators_of_deepspeeds_bf16_overflow_check(tmp_path):
    """benchmarks/step_ops.py on the CPU: a DeepSpeed step of the shipped h100.json (overflow check
    off) against the same config with DeepSpeed's default, which adds ~13 operators per tensor.
    With torch's Adam, as ds_configs/cpu.json: DeepSpeed's FusedAdam would be JIT-built for the CPU
    first (~40 s of C++), and the check's operators are what this counts."""
    default = json.loads((REPO / "ds_configs" / "h100.json").read_text())
    default["bf16"]["check_grad_overflow"] = True
    (tmp_path / "checked.json").write_text(json.dumps(default))
    torch_adam = json.dumps({"optimizer": {"params": {"torch_adam": True}}})
    cmd = [sys.executable, str(BENCH / "step_ops.py"), "ds_configs/h100.json", str(tmp_path / "checked.json"),
           "--override", torch_adam, "--preset", "tiny", "--warmup", "1", "--steps", "1",
           "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp_path / "out").glob("step_ops-*-tiny-*.json")
    result = json.loads(path.read_text())
    assert result["device"]["type"] == "cpu" and result["git"]["commit"] and result["versions"]["deepspeed"]
    shipped, checked = result["runs"]
    assert shipped["optimizer"] == checked["optimizer"] == "DeepSpeedZeroOptimizer"
    tensors = shipped["parameter_tensors"]
    assert checked["operators_per_step"] - shipped["operators_per_step"] >= 10 * tensors
    assert shipped["by_phase"]["forward/model"] == checked["by_phase"]["forward/model"] > 0
    assert done.stdout.splitlines()[-1].startswith(str(tmp_path / "checked.json"))
