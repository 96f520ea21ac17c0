"""launch/pretrain.py end to end: real DeepSpeed engines in 2 CPU processes (gloo) on the toy world."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from _launch import CPU_CONFIG, REPO, one_process_ds_config, pretrain_command, records, run_pretrain

from semvlp import runner
from semvlp.config import config_from_preset
from semvlp.model import SemVLPModel
from semvlp.schedule import mode_for_step


def steps_done(log: Path) -> int:
    """The last step count of rank 0's progress bar in a launcher's `log`, 0 before the first."""
    counts = re.findall(r"(\d+)/\d+ \[", log.read_text(errors="replace"))
    return int(counts[-1]) if counts else 0


def fp32_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"))


def optimizer_state(run_dir: Path) -> list[dict]:
    tag = (run_dir / "checkpoints" / "latest").read_text()
    shards = sorted((run_dir / "checkpoints" / tag).glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # ZeRO-1: one optimizer shard per rank
    return [torch.load(s, map_location="cpu", weights_only=False)["optimizer_state_dict"] for s in shards]


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):  # e.g. DeepSpeed's loss scaler object
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


def eager_args(toy_data: Path) -> list[str]:
    """4 steps of the tiny preset in one process, the QA loss from step 2, logging every step: `eager_run`'s."""
    return ["--data", str(toy_data), "--max_steps", "4", "--qa_from_step", "2", "--log_every", "1",
            "--eval_every", "0", "--eval_batches", "1", "--num_workers", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory, toy_data) -> Path:
    """The padded, eager run that --packed_text and --compile must reproduce and --qa_from_step shapes."""
    run_dir = tmp_path_factory.mktemp("eager") / "run"
    result = run_pretrain([*eager_args(toy_data), "--output_dir", str(run_dir)], processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.ranks
def test_alternating_pretraining_runs_on_two_ranks(tmp_path, toy_data):
    """Alternating pre-training on 2 ranks, each step 2 accumulated micro-batches of 8:

    - a step is an optimizer step for the schedule, the checkpoints and the profiler (--profile_steps),
      whose window holds every micro-batch of its steps, on every rank;
    - DeepSpeed's shared-memory all-reduce (its inference path's, JIT-compiled) is neither built nor
      mapped: no /dev/shm buffer appears (runner.init_distributed);
    - stderr that is not a terminal (a batch job's log file) gets the progress bar every 30 s, not
      at every step.
    """
    shm_buffers = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    run_dir = tmp_path / "run"
    # DeepSpeed's other monitors get the same records as TensorBoard; csv_monitor stands for them here.
    config = json.loads(CPU_CONFIG.read_text())
    config["csv_monitor"] = {"enabled": True, "output_path": "auto", "job_name": "semvlp"}
    config.update(train_batch_size=32, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2)
    (tmp_path / "csv.json").write_text(json.dumps(config))
    result = run_pretrain(
        ["--data", str(toy_data), "--output_dir", str(run_dir), "--max_steps", "24", "--log_every", "4",
         "--eval_every", "0", "--eval_batches", "2", "--num_workers", "1", "--deepspeed_config",
         str(tmp_path / "csv.json"), "--profile_warmup", "1", "--profile_steps", "2"]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("/24 [") <= 3, result.stderr[-3000:]  # the first draw, the last, its close
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == [4, 8, 12, 16, 20, 24]
    assert all(r["world_size"] == 2 for r in train)  # and the ranks' modes agreed: the loop checks it
    modes = [m for r in train for m in r["modes"]]
    assert len(modes) == 24 and {"single", "two"} == set(modes)
    losses = [r["loss"] for r in train]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    for name in ("mlm", "obj_feat", "obj_label", "attr_label", "itm", "qa"):
        assert all(name in r for r in train)
    assert train[-1]["samples_per_s"] > 0 and train[-1]["tflops_per_s"] > 0
    assert all(0 < r["data_wait_s"] < r["step_time_s"] for r in train)  # the loader's worker prepares ahead
    assert all("mfu" not in r for r in train)  # no listed peak for a CPU
    evaluation = records(run_dir, "eval")[-1]
    for mode in ("single", "two"):
        for metric in ("itm_acc", "mlm_acc", "qa_acc", "obj_label_acc", "loss_itm"):
            assert f"{mode}/{metric}" in evaluation
    assert (run_dir / "export" / "model.safetensors").is_file() and (run_dir / "export" / "vocab.txt").is_file()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    losses_csv = (run_dir / "csv_monitor" / "semvlp" / "train_loss.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in losses_csv[1:]] == ["4", "8", "12", "16", "20", "24"]
    assert (run_dir / "csv_monitor" / "semvlp" / "eval_two_itm_acc.csv").is_file()
    assert "held-out metrics after 24 steps" in result.stdout
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) == shm_buffers
    assert "deepspeed_shm_comm_op" not in result.stdout + result.stderr  # DeepSpeed prints its builds and loads

    states = torch.load(run_dir / "checkpoints" / "step00000024" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["global_steps"] == 24  # optimizer steps
    assert states["loader"]["position"] == 48  # micro-batches consumed: 24 steps x 2
    [profile] = records(run_dir, "profile")
    assert (profile["first_step"], profile["step"], profile["steps"]) == (2, 3, 2)
    assert profile["wall_ms_per_step"] > 0  # per step: the arithmetic is checked in tests/test_profiling.py
    # Every micro-batch of the 2 steps ran inside the window: 4 forward passes, each looking up every embedding once.
    with gzip.open(run_dir / "profile" / "rank0_steps2-3.pt.trace.json.gz") as f:
        lookups = sum(event.get("name") == "aten::embedding" for event in json.load(f)["traceEvents"])
    tables = sum(isinstance(m, torch.nn.Embedding) for m in SemVLPModel(config_from_preset("tiny")).modules())
    assert lookups == 2 * 2 * tables, (lookups, tables)
    assert "profile of steps 2-3:" in result.stdout
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == [
        "rank0_steps2-3.pt.trace.json.gz", "rank1_steps2-3.pt.trace.json.gz", "summary_steps2-3.txt"
    ]  # fmt: skip


def test_the_alternate_schedule_draws_each_mode_with_probability_one_half_step_by_step():
    """Paper 3.3.2: each mini-batch is single- or two-stream with probability 1/2, drawn independently."""
    modes = [mode_for_step("alternate", step, 42) for step in range(20_000)]
    assert abs(modes.count("single") / len(modes) - 0.5) < 0.015  # 3 standard deviations: 0.011
    repeats = sum(a == b for a, b in zip(modes, modes[1:], strict=False)) / (len(modes) - 1)
    assert abs(repeats - 0.5) < 0.015  # neither strict alternation nor long runs
    assert modes[:100] != [mode_for_step("alternate", step, 43) for step in range(100)]  # the seed draws anew
    assert [mode_for_step(schedule, 7, 42) for schedule in ("single", "two")] == ["single", "two"]


def test_evaluation_averages_each_loss_over_batches_and_each_accuracy_over_its_own_rows():
    """PretrainTask.evaluate with a stand-in engine, counted by hand over two batches: QA accuracy over
    the labelled matched pairs only, ITM over every pair, masked LM and object labels over the rows the
    model returns; every loss the mean of its batch values."""
    from types import SimpleNamespace

    from semvlp.model import LOSS_NAMES
    from semvlp.tasks.pretraining import PretrainTask

    def scores(predicted: list[int], classes: int = 8) -> torch.Tensor:  # logits whose argmax is `predicted`
        return torch.nn.functional.one_hot(torch.tensor(predicted), classes).float()

    batches = [
        {"input_ids": torch.zeros(3, 4, dtype=torch.long), "itm_labels": torch.tensor([1, 0, 1]),
         "qa_labels": torch.tensor([2, -100, -100])},  # QA: row 0 only (row 1 mismatched, row 2 unlabelled)
        {"input_ids": torch.zeros(3, 4, dtype=torch.long), "itm_labels": torch.tensor([1, 1, 0]),
         "qa_labels": torch.tensor([1, 3, 7])},  # QA: rows 0 and 1
    ]  # fmt: skip
    outputs = [
        SimpleNamespace(  # QA 1/1, ITM 2/3, masked LM 1/2, object labels 2/3
            losses={name: torch.tensor(1.0 + i) for i, name in enumerate(LOSS_NAMES)},
            qa_logits=scores([2, 5, 6]), itm_logits=scores([1, 1, 1], 2),
            mlm_logits=scores([4, 5]), mlm_targets=torch.tensor([4, 6]),
            obj_label_logits=scores([1, 1, 1]), obj_label_targets=torch.tensor([1, 0, 1]),
        ),
        SimpleNamespace(  # QA 1/2, ITM 2/3, masked LM 1/1, object labels 1/2
            losses={name: torch.tensor(3.0 + 3 * i) for i, name in enumerate(LOSS_NAMES)},
            qa_logits=scores([1, 0, 7]), itm_logits=scores([1, 0, 0], 2),
            mlm_logits=scores([3]), mlm_targets=torch.tensor([3]),
            obj_label_logits=scores([2, 2]), obj_label_targets=torch.tensor([2, 5]),
        ),
    ]  # fmt: skip
    calls = iter(outputs)

    class Engine:  # gives the outputs above, batch after batch
        device = torch.device("cpu")

        def __call__(self, mode, **inputs):
            return next(calls)

    task = PretrainTask(None, None, batches, stream_schedule="single", seed=0, eval_batches=0)
    metrics = task.evaluate(Engine())
    expected = {f"single/loss_{name}": 2.0 + 2 * i for i, name in enumerate(LOSS_NAMES)}  # (1 + i + 3 + 3i) / 2
    expected.update({"single/qa_acc": 2 / 3, "single/itm_acc": 4 / 6, "single/mlm_acc": 2 / 3,
                     "single/obj_label_acc": 3 / 5})  # fmt: skip
    assert metrics == pytest.approx(expected)


def test_log_record_gives_mfu_against_the_peak_of_every_process():
    """The `mfu` a GPU run logs (none on CPU, above): model TFLOP/s over the listed dense peak of all
    processes; and `data_wait_s` per step."""
    from types import SimpleNamespace

    from semvlp.peaks import peak_tflops
    from semvlp.train import Window, _log_record

    engine = SimpleNamespace(get_lr=lambda: [1e-4], get_global_grad_norm=lambda: None)
    # two optimizer steps of two micro-batches each (gradient accumulation)
    window = Window(terms={"loss": torch.tensor(4.0)}, modes=["single", "two"], micro_batches=4, samples=128)
    window.flops, window.data_wait, window.start = 2 * 5.0e12, 0.004, time.perf_counter() - 0.02
    peak, _ = peak_tflops("NVIDIA H100 80GB HBM3", "bf16")
    record = _log_record(window, 2, engine, "bf16", 0, peak)
    assert record["loss"] == pytest.approx(1.0)  # summed over 4 micro-batches: their mean
    assert record["mfu"] == pytest.approx(record["tflops_per_s"] / 989.0)  # one process: world size 1
    assert record["data_wait_s"] == pytest.approx(0.002)
    assert "mfu" not in _log_record(window, 2, engine, "fp32", 0, None)


def test_the_log_window_sums_copies_of_the_steps_losses():
    """Under CUDA graphs (--compile_mode reduce-overhead) the next replay overwrites a step's outputs in
    place: the window's sums must not be those tensors themselves."""
    from semvlp.train import Window

    window, loss = Window(), torch.tensor(2.0)
    window.add({"loss": loss}, samples=8, flops=1.0)
    loss.fill_(5.0)  # the next replay writes its loss where this one was
    window.add({"loss": loss}, samples=8, flops=1.0)
    assert window.terms["loss"].item() == 7.0 and window.micro_batches == 2


def test_step_flops_count_the_masked_objects_the_model_runs():
    """The object heads run on masked objects of matched pairs only (a mismatched pair's objects are
    masked too, so as not to give its label away): counting every masked object inflated MFU."""
    from semvlp.flops import training_step_flops
    from semvlp.tasks.pretraining import PretrainTask

    config = config_from_preset("tiny", vocab_size=50)
    task = PretrainTask(config, None, None, "alternate", 0, 1, False, 0)
    obj_mask = torch.zeros(4, 100, dtype=torch.bool)
    obj_mask[:, :10] = True  # 10 per pair; pairs 1 and 3 mismatched
    mlm_labels = torch.full((4, 8), -100)
    mlm_labels[[0, 2], 1] = 7
    batch = dict(attention_mask=torch.ones(4, 8, dtype=torch.long), mlm_labels=mlm_labels, obj_mask=obj_mask,
                 itm_labels=torch.tensor([1, 0, 1, 0]), visual_feats=torch.zeros(4, 100, 8))  # fmt: skip
    expected = training_step_flops(config, [8] * 4, "two", num_masked_tokens=2, num_masked_objects=20, num_objects=100)
    assert task.batch_flops(batch, "two") == expected
    assert expected < training_step_flops(config, [8] * 4, "two", 2, num_masked_objects=40, num_objects=100)


def test_qa_loss_joins_the_training_loss_at_qa_from_step(eager_run):
    train = records(eager_run, "train")  # --qa_from_step 2
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for record in train:  # "loss" is what was backpropagated; "qa" is logged at every step
        others = sum(record[name] for name in ("mlm", "obj_feat", "obj_label", "attr_label", "itm"))
        expected = others if record["step"] <= 2 else others + record["qa"]
        assert record["qa"] > 0.1 and record["loss"] == pytest.approx(expected, rel=1e-5), record
    assert json.loads((eager_run / "hparams.json").read_text())["qa_from_step"] == 2


@pytest.mark.ranks
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, toy_data):
    # With dropout on (the tiny preset has none), so resuming must restore the model's RNG streams too.
    dropout = tmp_path / "dropout.json"
    config_from_preset("tiny", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).to_json_file(dropout)
    common = ["--data", str(toy_data), "--model_config", str(dropout), "--max_steps", "8", "--eval_every", "0",
              "--eval_batches", "1", "--log_every", "2", "--num_workers", "1"]  # fmt: skip
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    assert run_pretrain([*common, "--output_dir", str(straight)]).returncode == 0
    first = run_pretrain([*common, "--output_dir", str(pieces), "--exit_after_steps", "5"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped at step 5 of 8" in first.stdout
    # A resume continues the saved run: options that would change its schedule (DeepSpeed would take
    # them without a word) are refused, the run's record left as it was.
    record = (pieces / "hparams.json").read_bytes()
    changed = run_pretrain([*common, "--output_dir", str(pieces), "--resume", "--max_steps", "9", "--seed", "7"])
    assert changed.returncode == 2
    assert "was trained with --max_steps 8 (this run: 9); --seed 42 (this run: 7); the ds_config's scheduler" in (
        changed.stderr
    )
    assert (pieces / "hparams.json").read_bytes() == record
    second = run_pretrain([*common, "--output_dir", str(pieces), "--resume"])
    assert second.returncode == 0, second.stderr[-3000:]

    assert records(pieces, "resume")[0]["step"] == 5
    straight_losses = [r["loss"] for r in records(straight, "train")]
    pieces_losses = [r["loss"] for r in records(pieces, "train")]
    # Logged windows: straight 1-2, 3-4, 5-6, 7-8; pieces 1-2, 3-4, 5, 6, 7-8.
    assert [pieces_losses[i] for i in (0, 1, 4)] == [straight_losses[i] for i in (0, 1, 3)]
    assert_same(fp32_state(pieces), fp32_state(straight), "params")
    assert_same(optimizer_state(pieces), optimizer_state(straight), "optimizer")

    # Resuming the finished run takes no step and leaves its checkpoint as it is (a rewrite in place,
    # killed halfway, would damage the checkpoint `latest` names), then evaluates and exports again.
    files = sorted((pieces / "checkpoints").rglob("*"))
    written = [f.stat().st_mtime_ns for f in files]
    third = run_pretrain([*common, "--output_dir", str(pieces), "--resume"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert "held-out metrics after 8 steps" in third.stdout
    assert sorted((pieces / "checkpoints").rglob("*")) == files
    assert [f.stat().st_mtime_ns for f in files] == written


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # an exited orphan may stay unreaped in a container
    except psutil.NoSuchProcess:
        return False


def rank_process(launcher: psutil.Process, rank: str) -> psutil.Process:
    """The launcher's rank `rank`: the descendant with that RANK whose parent has another (its loader
    workers inherit RANK from it)."""
    for process in launcher.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # e.g. a short-lived helper process that has exited
            if process.environ().get("RANK") == rank and process.parent().environ().get("RANK") != rank:
                return process
    raise AssertionError(f"no rank {rank} among the launcher's processes")


@pytest.mark.ranks
def test_sigterm_to_one_rank_checkpoints_both_at_one_step_within_two_and_stops(tmp_path, toy_data):
    """A scheduler's time limit (SLURM: SIGTERM to every task, SIGKILL after KillWait) or a spot
    instance's notice: the ranks agree on a step at most two after the signal, with no log step near
    (--log_every 1000), checkpoint it and stop, to continue with --resume. Only rank 1 is signalled,
    so rank 0 learns of it from the ranks' exchange. DataLoader workers ignore the signal, so the
    steps up to the checkpoint still get their batches. The evaluation due at that step (here every
    step is due one) is not lost: the checkpoint comes first, the evaluation first thing after --resume."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    cmd, env = pretrain_command(
        ["--data", str(toy_data), "--output_dir", str(run_dir), "--max_steps", "500", "--log_every", "1000",
         "--eval_every", "1", "--eval_batches", "1", "--num_workers", "1"]
    )  # fmt: skip
    env["TQDM_MININTERVAL"] = "0.1"  # the progress bar counts the steps: redrawn as on a terminal
    with open(log, "w") as out:  # its own process group: the launcher, both ranks and their workers
        launcher = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while steps_done(log) < 3:  # rank 0's progress bar
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        rank_process(psutil.Process(launcher.pid), "1").send_signal(signal.SIGTERM)
        at_least = steps_done(log)
        assert launcher.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)

    (stop,) = records(run_dir, "stop")
    step = stop["step"]
    assert stop["signals"] == ["SIGTERM"]
    # Signalled in step `at_least` + 1 or later, rank 1 told the others by the end of the next one.
    # (The progress bar lags the ranks by at most a step at these step times, ~0.2 s.)
    assert at_least < step <= at_least + 3, (at_least, step)
    assert [r["step"] for r in records(run_dir, "train")] == [step]  # the window up to the stop is logged
    assert [r["step"] for r in records(run_dir, "eval")] == list(range(1, step))  # not yet that of `step`
    assert f"stopped at step {step} of 500; continue with --resume" in log.read_text()
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert tag == f"step{step:08d}" and (run_dir / "checkpoints" / tag / "COMPLETE").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints" / tag).glob("rng_rank*.pt")) == [
        "rng_rank0.pt",
        "rng_rank1.pt",
    ]
    assert not (run_dir / "export").exists()

    # One process continues it (a smaller allocation after the preemption), with the global batch kept
    # (16 x 2 accumulated). ZeRO-1 split the optimizer state in two shards: DeepSpeed's universal
    # format joins them, and the state carries on: Adam's step count goes on from `step` (the
    # cross-attention's group counts the two-stream steps only: train.cross_attention_held), and its
    # second moments are those saved times beta2 plus the new squared gradients (>= beta2 x saved;
    # a fresh state would hold only (1 - beta2) x those gradients).
    saved = adam_state(run_dir)
    assert any(".cross_attention." in name for name in saved)  # both optimizer groups are compared
    files = sorted(p.name for p in (run_dir / "checkpoints" / tag).iterdir())
    config = json.loads(CPU_CONFIG.read_text()) | {"gradient_accumulation_steps": 2}
    (tmp_path / "one.json").write_text(json.dumps(config))
    alone = run_pretrain(
        ["--data", str(toy_data), "--output_dir", str(run_dir), "--resume", "--max_steps", "500",
         "--exit_after_steps", "1", "--eval_every", "0", "--eval_batches", "1", "--num_workers", "0"],
        processes=1, ds_config=tmp_path / "one.json",
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "was saved by 2 processes and this run has 1: converting it to DeepSpeed's universal" in alone.stdout
    assert "kernel backend 'auto' -> eager on cpu (torch.float32)\n" in alone.stderr  # what --kernel_backend chose
    assert records(run_dir, "resume")[0]["step"] == step and records(run_dir, "train")[-1]["step"] == step + 1
    assert [r["step"] for r in records(run_dir, "eval")] == list(range(1, step + 1))  # `step`'s, after the resume
    resumed = adam_state(run_dir)
    beta2 = config["optimizer"]["params"]["betas"][1]
    assert resumed.keys() == saved.keys()
    seed = json.loads((run_dir / "hparams.json").read_text())["seed"]
    two_stream = [mode_for_step("alternate", s, seed) == "two" for s in range(step + 1)]
    for name, state in resumed.items():
        steps_taken = two_stream if ".cross_attention." in name else [True] * (step + 1)
        assert (saved[name]["step"], state["step"]) == (sum(steps_taken[:step]), sum(steps_taken)), name
        assert torch.all(state["exp_avg_sq"] >= beta2 * saved[name]["exp_avg_sq"] * (1 - 1e-6)), name
    assert sorted(p.name for p in (run_dir / "checkpoints" / tag).iterdir()) == files  # the conversion is gone


def adam_state(run_dir: Path) -> dict[str, dict]:
    """Adam's state per parameter in the newest checkpoint, joined from its ZeRO shards (any number)."""
    tag = (run_dir / "checkpoints" / "latest").read_text()
    paths = sorted((run_dir / "checkpoints" / tag).glob("*optim_states.pt"), key=lambda p: int(p.name.split("_")[3]))
    shards = [torch.load(p, map_location="cpu", weights_only=False)["optimizer_state_dict"] for p in paths]
    joined = {}
    for shard in shards:  # rank order: each holds a contiguous part of each group's flattened parameters
        for group, mapping in enumerate(shard["param_slice_mappings"]):  # the cross-attention's group too
            flat = shard["base_optimizer_state"]["state"][group]
            for name, fragment in mapping.items():
                part = joined.setdefault(name, {"step": int(flat["step"]), "exp_avg_sq": []})
                part["exp_avg_sq"].append(flat["exp_avg_sq"].narrow(0, fragment.start, fragment.numel))
    return {name: {**part, "exp_avg_sq": torch.cat(part["exp_avg_sq"])} for name, part in joined.items()}


def test_an_os_error_is_one_line_naming_its_file(capsys):
    from semvlp.runner import run_main

    def main(argv: list[str] | None) -> None:
        raise PermissionError(13, "Permission denied", "/data/runs/pretrain")

    with pytest.raises(SystemExit) as exited:
        run_main(main, [])
    assert exited.value.code == 1
    assert capsys.readouterr().err == "error (rank 0): [Errno 13] Permission denied: '/data/runs/pretrain'\n"


def test_out_of_gpu_memory_names_the_options_that_lower_it(capsys):
    from semvlp.runner import run_main

    def main(argv: list[str] | None) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nOf the allocated ...")

    with pytest.raises(SystemExit) as exited:
        run_main(main, [])
    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        "error (rank 0): out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB.). Lower the ds_config's "
        "train_micro_batch_size_per_gpu (with gradient_accumulation_steps raised to keep the global batch) or add "
        "--gradient_checkpointing; when fine-tuning runs out while evaluating, lower --eval_batch_size. The "
        "checkpoints written so far are complete: continue with --resume.\n"
    )


def test_stop_signal_takes_sigterm_and_sigusr1_and_restores_the_handlers():
    """SIGUSR1 (SLURM's --signal=USR1@120 notice) stops the run as SIGTERM does, instead of killing it."""
    from semvlp.train import StopSignal

    before = {signum: signal.getsignal(signum) for signum in StopSignal.SIGNALS}
    with StopSignal() as stop:
        assert stop.received is None and stop.agreed() == []
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGUSR1"  # the first one received
        assert stop.agreed() == []  # a step's call starts the exchange of what it has received ...
        assert stop.agreed() == ["SIGUSR1"]  # ... and the next step's call returns it
    assert {signum: signal.getsignal(signum) for signum in StopSignal.SIGNALS} == before


def test_packed_text_trains_and_resumes_to_the_losses_of_padded_text(tmp_path, toy_data, eager_run):
    """--packed_text (PackedText + packed mlm_labels, training and evaluation) logs the padded run's losses.

    The tiny preset has no dropout, which would draw other masks for packed and padded text. The
    packed run stops after step 1 and resumes, so its later steps also check that a resumed packed
    run continues unchanged.
    """
    from semvlp.data import build_pretrain_loader
    from semvlp.model import PackedText
    from semvlp.tasks.pretraining import model_inputs

    batch = next(iter(build_pretrain_loader(toy_data, batch_size=4)))
    inputs = model_inputs(batch, packed_text=True)  # what PretrainTask(packed_text=True) gives the model
    assert isinstance(inputs["input_ids"], PackedText) and inputs["mlm_labels"] is batch["packed_mlm_labels"]
    assert "attention_mask" not in inputs and "token_type_ids" not in inputs

    tiny = config_from_preset("tiny")
    assert tiny.hidden_dropout_prob == tiny.attention_probs_dropout_prob == 0.0
    padded, packed = eager_run, tmp_path / "packed"
    for extra in (["--exit_after_steps", "1"], ["--resume"]):
        result = run_pretrain([*eager_args(toy_data), "--output_dir", str(packed), "--packed_text", *extra], 1)
        assert result.returncode == 0, result.stderr[-3000:]

    assert json.loads((packed / "hparams.json").read_text())["packed_text"] is True
    assert records(packed, "resume")[0]["step"] == 1
    padded_train, packed_train = records(padded, "train"), records(packed, "train")
    assert [r["step"] for r in packed_train] == [r["step"] for r in padded_train] == [1, 2, 3, 4]
    assert {m for r in padded_train for m in r["modes"]} == {"single", "two"}  # seed 42: single, then two
    for expected, got in zip(padded_train, packed_train, strict=True):
        assert got["modes"] == expected["modes"]
        for name in ("loss", "mlm", "obj_feat", "obj_label", "attr_label", "itm", "qa", "grad_norm"):
            assert got[name] == pytest.approx(expected[name], abs=1e-5), (expected["step"], name)
    expected, got = records(padded, "eval")[-1], records(packed, "eval")[-1]
    assert expected.keys() == got.keys() and "single/loss_mlm" in got and "two/mlm_acc" in got
    for name, value in expected.items():
        if name not in ("kind", "step"):
            assert got[name] == pytest.approx(value, abs=1e-5), name


def assert_stops_before_any_work(tmp_path, toy_data, capsys, load_launcher, args: list[str], message: str) -> None:
    """launch/pretrain.py in-process (what the launcher does: run_main(main)) stops with exit status 2,
    `message` on stderr, and no run folder."""
    from semvlp.runner import run_main

    # a ds_config valid for this one process, so that only the option at fault can stop the run
    argv = ["--deepspeed_config", str(one_process_ds_config()), "--preset", "tiny", "--data", str(toy_data),
            "--output_dir", str(tmp_path / "run"), *args]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        run_main(load_launcher("pretrain.py").main, argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "huge"], "--preset 'huge' is unknown"),
        (["--data", "/nonexistent/data.json"], "--data /nonexistent/data.json: no such file"),
        (["--data", str(REPO / "ds_configs")],
         f"{REPO / 'ds_configs'} is a folder; the data configuration (--data) must be a data.json file"),
        (["--stream_schedule", "sometimes"], "--stream_schedule 'sometimes'"),
        (["--max_steps", "0"], "--max_steps must be >= 1"),
        (["--max_steps", "10", "--qa_from_step", "10"], "--qa_from_step 10 must be in 0..max_steps-1=9"),
        (["--eval_only"], "--eval_only needs --init_from, a pre-training export"),
        (["--init_from", str(REPO / "setup.py")], f"--init_from {REPO / 'setup.py'} is a file; expected a model"),
        (["--compile", "--compile_mode", "fast"], "--compile_mode 'fast': expected one of ('default', "),
        (["--compile_mode", "reduce-overhead"], "--compile_mode reduce-overhead needs --compile"),
        (["--compile", "--compile_backend", "tvm"], "--compile_backend 'tvm': expected one of ('inductor', "),
        (["--compile", "--compile_backend", "eager", "--compile_mode", "max-autotune"],
         "--compile_mode max-autotune is inductor's; --compile_backend is eager"),
        (["--max_steps", "10", "--profile_steps", "3", "--profile_warmup", "10"],
         "--profile_warmup 10 leaves no step to profile in the 10 steps this run does"),
    ],
)  # fmt: skip
def test_option_errors_name_the_option_before_any_work(tmp_path, toy_data, capsys, load_launcher, args, message):
    assert_stops_before_any_work(tmp_path, toy_data, capsys, load_launcher, args, message)


@pytest.mark.parametrize("source, layers", [("preset", 4), ("model_config", 6), ("export", 3), ("bert", 2)])
def test_model_configuration_errors_name_the_option(tmp_path, toy_data, capsys, load_launcher, source, layers):
    """L_s is checked against the layer count of the model the options name (--preset, --model_config,
    --init_from a SemVLP export or a BERT folder) before the run folder is written."""

    model = []
    if source == "model_config":
        config_from_preset("tiny", num_hidden_layers=layers).to_json_file(tmp_path / "model.json")
        model = ["--model_config", str(tmp_path / "model.json")]
    elif source == "export":
        config_from_preset("tiny", num_hidden_layers=layers).save_pretrained(tmp_path / "export")
        model = ["--init_from", str(tmp_path / "export")]
    elif source == "bert":
        (tmp_path / "bert").mkdir()
        bert = {"model_type": "bert", "hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": layers}
        (tmp_path / "bert" / "config.json").write_text(json.dumps(bert))
        model = ["--init_from", str(tmp_path / "bert")]
    message = f"--cross_attention_start_layer: cross_attention_start_layer=9 must be in 0..num_hidden_layers={layers}"
    args = ["--cross_attention_start_layer", "9", *model]
    assert_stops_before_any_work(tmp_path, toy_data, capsys, load_launcher, args, message)


@pytest.mark.parametrize(
    "fault",
    ["output_dir", "resume", "no weights", "truncated", "run folder", "ds_config", "ds_config key", "ZeRO"]
    + ["optimizer lr", "total_num_steps", "warmup_num_steps", "gradient_clipping"],
)
def test_run_folder_init_and_ds_config_errors_stop_before_any_work(tmp_path, toy_data, capsys, load_launcher, fault):
    """An --output_dir that cannot be written, --resume with nothing to resume, an --init_from whose
    weights are missing or damaged or that is a run folder, a ds_config that is not an object, holds a
    key DeepSpeed does not know (it would ignore it) or asks for no ZeRO: named before any work. So is
    a schedule that differs from what the ds_config seems to say (an optimizer lr the scheduler
    ignores, a total_num_steps that overrides --max_steps, a warmup the run never ends), and a
    gradient_clipping that would fail the first step."""
    export = tmp_path / "export"
    config_from_preset("tiny").save_pretrained(export)
    (tmp_path / "file").write_text("")
    if fault == "output_dir":
        args, message = ["--output_dir", str(tmp_path / "file" / "run")], f"{tmp_path / 'file'} is a file, not a folder"
    elif fault == "resume":
        args, message = ["--resume"], f"--resume: no complete checkpoint in {tmp_path / 'run' / 'checkpoints'}"
    elif fault == "no weights":
        args, message = ["--init_from", str(export)], f"--init_from {export}: no weights (model.safetensors or "
    elif fault == "truncated":
        SemVLPModel(config_from_preset("tiny")).save_pretrained(export)
        os.truncate(export / "model.safetensors", 1000)
        args = ["--init_from", str(export)]
        message = f"--init_from {export / 'model.safetensors'}: not a readable safetensors file (truncated or damaged"
    elif fault == "run folder":  # --init_from a run folder instead of its export
        args, message = ["--init_from", str(tmp_path)], f"(a run folder? its model is {export})"
    elif fault == "ds_config":
        (tmp_path / "ds.json").write_text("[]")
        args, message = ["--deepspeed_config", str(tmp_path / "ds.json")], "ds.json: expected a JSON object, found a"
    else:
        ds_config = json.loads(one_process_ds_config().read_text())
        if fault == "ds_config key":  # DeepSpeed would train at the optimizer's constant lr
            ds_config["schedular"] = ds_config.pop("scheduler")
            message = "does not know the key(s) 'schedular' (did you mean 'scheduler'?); they would be ignored"
        elif fault == "ZeRO":  # its checkpoints would not export
            del ds_config["zero_optimization"]
            message = "zero_optimization stage 0: without ZeRO a checkpoint holds no optimizer shards"
        elif fault == "optimizer lr":  # the natural edit: it trained at warmup_max_lr all the same
            ds_config["optimizer"]["params"]["lr"] = 1e-5
            message = "optimizer lr 1e-05 and scheduler warmup_max_lr 0.001 differ; the scheduler sets the lr from"
        elif fault == "total_num_steps":
            ds_config["scheduler"]["params"]["total_num_steps"] = 100000
            message = 'scheduler total_num_steps 100000 is not --max_steps 1000; set it to "auto"'
        elif fault == "warmup_num_steps":
            ds_config["scheduler"]["params"]["warmup_num_steps"] = 1000
            message = "scheduler warmup_num_steps 1000 is not below --max_steps 1000: the lr would never reach its peak"
        else:  # a string: DeepSpeed took it, and the first step failed with a TypeError
            ds_config["gradient_clipping"] = "1.0"
            message = "gradient_clipping must be a number >= 0 (0: no clipping), got '1.0'"
        (tmp_path / "ds.json").write_text(json.dumps(ds_config))
        args = ["--deepspeed_config", str(tmp_path / "ds.json")]
    assert_stops_before_any_work(tmp_path, toy_data, capsys, load_launcher, args, message)


@pytest.mark.parametrize("fault", ["data.json", "annotations", "text length"])
def test_data_errors_stop_before_the_run_folder(tmp_path, toy_data, capsys, load_launcher, fault):
    """The data are read before the run folder is written: a data.json that does not parse, a
    pre-training record without its sentences, or a text length the model has no positions for, is
    named and leaves nothing behind."""
    from semvlp.data.config import DataConfig

    data = tmp_path / "data.json"
    if fault == "data.json":
        data.write_text('{"stores": ["features.h5"],\n')
        message = f"{data}: invalid JSON at line 2"
    elif fault == "text length":  # the tiny preset has 64 positions
        DataConfig.from_dict({**DataConfig.load(toy_data).to_dict(), "max_text_len": 65}).save(data)
        message = "the data's max_text_len=65 (data.json) exceeds the model's max_position_embeddings=64"
    else:
        raw = DataConfig.load(toy_data).to_dict()
        records = json.loads(Path(raw["pretrain"]["train"][0]).read_text())
        del records[7]["sentf"]
        (tmp_path / "train.json").write_text(json.dumps(records))
        raw["pretrain"]["train"] = [str(tmp_path / "train.json")]
        DataConfig.from_dict(raw).save(data)
        message = f"{tmp_path / 'train.json'}: record 7 has no field 'sentf'"
    assert_stops_before_any_work(tmp_path, toy_data, capsys, load_launcher, ["--data", str(data)], message)


@pytest.mark.ranks
def test_loader_workers_that_would_overfill_dev_shm_stop_before_the_run_folder(tmp_path, toy_data, small_dev_shm):
    """In a container's 64 MB /dev/shm (Docker's default), 2 ranks with the default 2 workers each would
    hold 3 training and up to 3 evaluation batches per worker there: the run stops before its run folder
    and says so, instead of failing in its first steps with torch's "unable to allocate shared memory"."""
    from semvlp.data.loader import shared_memory_bound
    from semvlp.data.pretrain_dataset import build_pretrain_dataset

    cmd, env = pretrain_command(["--data", str(toy_data), "--output_dir", str(tmp_path / "run")])
    result = subprocess.run(small_dev_shm(cmd, "64m"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    per_rank = sum(shared_memory_bound(build_pretrain_dataset(toy_data, split=s), 16, 2) for s in ("train", "valid"))
    assert (
        f"--num_workers 2: the loader workers of 2 rank(s) on this machine hold up to {2 * per_rank / 2**20:,.0f} MB "
        "of batches in /dev/shm, which has 64 MB free. Use fewer workers"
    ) in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "launcher_env, ranks",
    [
        ({}, 1),  # python launch/pretrain.py
        ({"LOCAL_SIZE": "2"}, 2),  # deepspeed
        ({"LOCAL_WORLD_SIZE": "4"}, 4),  # torchrun
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 8),  # deepspeed --launcher openmpi, mpirun
        ({"MPI_LOCALNRANKS": "3"}, 3),  # MPICH or Intel MPI mpiexec
        ({"SLURM_STEP_TASKS_PER_NODE": "8(x2),4"}, 8),  # deepspeed --launcher slurm, srun
        ({"SLURM_STEP_TASKS_PER_NODE": "2", "LOCAL_SIZE": "4"}, 4),  # deepspeed inside a SLURM job
    ],
)
def test_the_shared_memory_check_counts_the_ranks_every_launcher_starts_on_a_machine(monkeypatch, launcher_env, ranks):
    for name in (*runner.LOCAL_WORLD_SIZE_VARIABLES, "SLURM_STEP_TASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in launcher_env.items():
        monkeypatch.setenv(name, value)
    assert runner.local_world_size_from_env() == ranks


class StandInMPIWorld:
    """mpi4py's COMM_WORLD as rank 1 of 2 on one host sees it, whose rank 0 has the address 10.0.0.7."""

    def Get_rank(self) -> int:
        return 1

    def Get_size(self) -> int:
        return 2

    def bcast(self, value, root: int):
        return "10.0.0.7"

    def allgather(self, value) -> list:
        return ["node1", "node1"]


def test_ranks_an_mpi_or_slurm_launcher_leaves_unnamed_are_discovered_before_the_options_are_checked(monkeypatch):
    """DeepSpeed's openmpi, mvapich and slurm runners start the ranks with mpirun or srun and no RANK:
    they find their places through mpi4py, before the batch arithmetic reads WORLD_SIZE (the defaults
    of one process would make every rank a rank 0 on GPU 0). A batch script's own SLURM variables, or
    a launcher that names the ranks, change nothing; without mpi4py the error says what to install."""
    import sys
    import types

    import deepspeed.comm.comm

    from semvlp.run_config import ConfigError

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID")
    # A private environment: the discovery writes os.environ itself, which later tests' launches inherit.
    left_out = (*runner.LAUNCHER_WORLD_SIZE_VARIABLES, *names)
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in left_out})
    monkeypatch.setattr(deepspeed.comm.comm, "cdb", None)  # no process group yet, as in a fresh rank
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # not installed: `import mpi4py` fails
    monkeypatch.setenv("SLURM_NTASKS", "4")  # an sbatch script's environment: `python launch/...` is one process
    monkeypatch.setenv("SLURM_PROCID", "0")
    runner.discover_launcher_ranks()
    assert "RANK" not in os.environ and runner.world_size_from_env() == 1

    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # mpirun's 2 ranks
    with pytest.raises(ConfigError, match=r"\(OMPI_COMM_WORLD_SIZE=2\) that does not set RANK.*pip install mpi4py"):
        runner.discover_launcher_ranks()
    mpi = types.SimpleNamespace(COMM_WORLD=StandInMPIWorld(), Get_processor_name=lambda: "node1")
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))
    seen = []  # what a launcher's main finds: run_main discovers the ranks first
    runner.run_main(lambda argv: seen.append({name: os.environ.get(name) for name in names[:5]}), [])
    assert seen == [
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}
    ]
    assert runner.world_size_from_env() == 2

    monkeypatch.setenv("RANK", "0")  # deepspeed's own launcher (pdsh, local) names the ranks itself
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    runner.discover_launcher_ranks()


def test_init_from_a_model_of_another_vocabulary_is_named(tmp_path, toy_data, capsys, load_launcher):
    """Its word embeddings could not be loaded: the data's vocab must be the one it was trained with."""
    SemVLPModel(config_from_preset("tiny", vocab_size=50)).save_pretrained(tmp_path / "export")
    message = f"--init_from {tmp_path / 'export'} has vocab_size=50, but the data's vocab holds "
    assert_stops_before_any_work(tmp_path, toy_data, capsys, load_launcher, ["--init_from", str(tmp_path / "export")],
                                 message)  # fmt: skip


def test_init_from_a_model_of_another_feature_size_is_named(tmp_path, toy_data, capsys, load_launcher):
    """Its visual projection takes other features than the stores hold (another detector): an error,
    not a silently new projection."""
    from semvlp.data.config import DataConfig
    from semvlp.data.tokenizer import load_tokenizer

    vocab_size = len(load_tokenizer(DataConfig.load(toy_data).vocab))
    model = SemVLPModel(config_from_preset("tiny", vocab_size=vocab_size, visual_feat_dim=1024))
    model.save_pretrained(tmp_path / "export")
    message = (f"--init_from {tmp_path / 'export'} has visual_feat_dim=1024, but the data's feature stores hold "
               "2048-dimensional features")  # fmt: skip
    assert_stops_before_any_work(tmp_path, toy_data, capsys, load_launcher, ["--init_from", str(tmp_path / "export")],
                                 message)  # fmt: skip


def test_init_from_a_training_checkpoint_names_the_export_command(tmp_path, toy_data, capsys, load_launcher):
    step = tmp_path / "checkpoints" / "step00000100"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("100\n")
    message = f"export it first with `python -m semvlp.export {step} --out DIR` and pass --init_from DIR"
    assert_stops_before_any_work(tmp_path, toy_data, capsys, load_launcher, ["--init_from", str(step)], message)


def test_batch_size_arithmetic_is_checked_before_any_work(tmp_path, toy_data, capsys, load_launcher, monkeypatch):
    """With the world size DeepSpeed's launcher gives 2 ranks (WORLD_SIZE), a global batch that is not
    micro-batch x accumulation x ranks stops the run before the data is read."""
    config = json.loads(CPU_CONFIG.read_text())
    config["train_batch_size"] = 48  # 16 x 1 x 2 ranks = 32
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(config))
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = "train_batch_size=48 != train_micro_batch_size_per_gpu=16 x gradient_accumulation_steps=1 x world size 2"
    assert_stops_before_any_work(tmp_path, toy_data, capsys, load_launcher, ["--deepspeed_config", str(bad)], message)
    config["train_batch_size"] = 16  # right for one rank, half of what 2 ranks take
    bad.write_text(json.dumps(config))
    message = "train_batch_size=16 != train_micro_batch_size_per_gpu=16 x gradient_accumulation_steps=1 x world size 2"
    assert_stops_before_any_work(tmp_path, toy_data, capsys, load_launcher, ["--deepspeed_config", str(bad)], message)


@pytest.mark.slow
def test_compiled_and_activation_checkpointed_model_trains_as_the_eager_one(tmp_path, toy_data, eager_run):
    """--compile (DeepSpeed's engine.compile) with --gradient_checkpointing (each block recomputed in
    the backward, inside the compiled graphs): the same losses step by step and the same evaluation
    as eager, in both stream modes and through the masked rows' graph breaks; checkpoints and export
    keep the module's parameter names. The run exits although the compiled model's caches keep its
    loaders (and their workers) alive to exit. Backend aot_eager: dynamo's capture and AOTAutograd's
    joint graph as with inductor, without inductor's C++ code generation, which costs this 2-core CI
    about 80 s more and says nothing of the Triton code a GPU gets (with inductor the same run gave
    the eager losses to 1e-5 by hand)."""
    eager, compiled = eager_run, tmp_path / "compiled"
    compile_args = ["--compile", "--compile_backend", "aot_eager", "--gradient_checkpointing"]
    result = run_pretrain([*eager_args(toy_data), "--output_dir", str(compiled), *compile_args], processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((compiled / "hparams.json").read_text())["gradient_checkpointing"] is True
    steps = [records(run, "train") for run in (eager, compiled)]
    assert {m for r in steps[1] for m in r["modes"]} == {"single", "two"}
    for a, b in zip(*steps, strict=True):
        assert a["modes"] == b["modes"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    final = [records(run, "eval")[-1] for run in (eager, compiled)]
    for name in ("single/loss_mlm", "single/loss_itm", "two/loss_mlm", "two/loss_itm", "two/loss_obj_feat"):
        assert final[1][name] == pytest.approx(final[0][name], rel=1e-4), name
    exported = [SemVLPModel.from_pretrained(run / "export").state_dict() for run in (eager, compiled)]
    assert exported[1].keys() == exported[0].keys()
    for name, tensor in exported[0].items():
        torch.testing.assert_close(exported[1][name], tensor, rtol=1e-3, atol=1e-5)


def test_non_finite_loss_stops_naming_the_step_and_term(tmp_path, toy_data):
    from semvlp.data.config import DataConfig
    from semvlp.data.pretrain_dataset import pretraining_model_fields
    from semvlp.model import SemVLPForPreTraining

    config = config_from_preset("tiny", **pretraining_model_fields(DataConfig.load(toy_data)))
    model = SemVLPForPreTraining(config)
    with torch.no_grad():
        model.itm_head.weight.fill_(float("inf"))  # only the ITM logits become non-finite
    model.save_pretrained(tmp_path / "broken")
    result = run_pretrain(
        ["--data", str(toy_data), "--output_dir", str(tmp_path / "run"), "--init_from", str(tmp_path / "broken"),
         "--max_steps", "4", "--num_workers", "0"],
        processes=1,
    )  # fmt: skip
    assert result.returncode == 1
    assert "non-finite loss at step 1 (term(s): itm" in result.stderr
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_eval_only_refuses_an_export_without_the_pretraining_heads(tmp_path, toy_data):
    encoder = tmp_path / "encoder"
    SemVLPModel(config_from_preset("tiny", vocab_size=134)).save_pretrained(encoder)
    result = run_pretrain(
        ["--data", str(toy_data), "--init_from", str(encoder), "--eval_only", "--output_dir", str(tmp_path / "run")],
        processes=1,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"--eval_only: {encoder} lacks (or has other shapes for) " in result.stderr
    assert "is it an export of this task?" in result.stderr
    assert not (tmp_path / "run").exists()
