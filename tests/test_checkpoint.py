"""Checkpoints: the newest-checkpoint pointer survives a crash in the middle of writing one, and
every complete checkpoint exports on its own (semvlp.export)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import deepspeed
import numpy as np
import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from transformers import AutoModel, AutoTokenizer

from semvlp import checkpoint, export, runner
from semvlp.config import config_from_preset
from semvlp.data.tokenizer import load_tokenizer
from semvlp.model import SemVLPModel
from semvlp.run_config import ConfigError, RunConfig
from semvlp.train import optimizer_groups

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "ds_configs" / "cpu.json"
GPU_PRECISION = {"bf16": json.loads((REPO / "ds_configs" / "h100.json").read_text())["bf16"]}  # a100.json's too


@pytest.fixture
def vocab(tmp_path) -> Path:
    """A WordPiece vocab of 50 tokens: the special ones, a few words, a continuation piece."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = ["a", "blue", "cup", "by", "the", "wall", "##s", "cafe", ",", "."]
    tokens = [*special, *words, *(f"token{i}" for i in range(50 - len(special) - len(words)))]
    path = tmp_path / "vocab.txt"
    path.write_text("".join(f"{token}\n" for token in tokens))
    return path


@pytest.fixture(scope="module")
def engine_factory(one_process_group):
    config = json.loads(CPU_CONFIG.read_text())
    config.update(train_batch_size=2, train_micro_batch_size_per_gpu=2)
    config["scheduler"]["params"].update(warmup_num_steps=1, total_num_steps=10)
    del config["tensorboard"]

    def make(seed: int, bf16: bool = False):
        torch.manual_seed(seed)
        model = SemVLPModel(
            config_from_preset("tiny", vocab_size=50, num_hidden_layers=2, cross_attention_start_layer=1)
        )
        precision = GPU_PRECISION if bf16 else {}
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=optimizer_groups(model), config={**config, **precision}
        )
        return engine

    return make


def train_step(engine) -> None:
    g = torch.Generator().manual_seed(engine.global_steps)
    out = engine(
        input_ids=torch.randint(50, (2, 6), generator=g),
        visual_feats=torch.randn(2, 100, 2048, generator=g),
        visual_pos=torch.rand(2, 100, 4, generator=g),
        mode="two",
    )
    engine.backward(out.pooled.square().mean())
    engine.step()


def test_pointer_survives_a_crash_mid_save(tmp_path, engine_factory, monkeypatch, vocab):
    engine = engine_factory(seed=0)
    train_step(engine)
    checkpoint.save(engine, tmp_path, 1, {"step": 1}, keep_last=2, vocab=vocab)
    good = {k: v.clone() for k, v in engine.module.state_dict().items()}
    train_step(engine)

    written = []

    def crash_after_first_file(self, state_dict, path):
        if written:
            raise OSError("disk full (simulated)")
        written.append(path)
        torch.save(state_dict, path)

    monkeypatch.setattr(TorchCheckpointEngine, "save", crash_after_first_file)
    with pytest.raises(checkpoint.CheckpointError) as failed:
        checkpoint.save(engine, tmp_path, 2, {"step": 2}, keep_last=2, vocab=vocab)
    monkeypatch.undo()
    assert str(failed.value) == (
        f"saving checkpoint {tmp_path / 'step00000002'} failed on rank 0 (is the disk full?): disk full (simulated). "
        f"The last complete checkpoint is untouched: {tmp_path / 'latest'} still names step00000001"
    )

    assert written and Path(written[0]).parent.name == "step00000002"  # the crash came after a file ...
    assert not (tmp_path / "step00000002").exists()  # ... and took the partial checkpoint with it
    assert checkpoint.latest_tag(tmp_path) == "step00000001"

    fresh = engine_factory(seed=1)
    client_state = checkpoint.load_latest(fresh, tmp_path)
    assert client_state["step"] == 1
    for name, tensor in fresh.module.state_dict().items():
        assert torch.equal(tensor, good[name]), name


def test_resume_names_a_damaged_or_different_checkpoint_before_deepspeed_loads_it(tmp_path, engine_factory, vocab):
    engine = engine_factory(seed=0)
    train_step(engine)
    step = checkpoint.save(engine, tmp_path / "run", 1, {"step": 1}, keep_last=2, vocab=vocab)
    cases = tmp_path / "cases"

    def damaged(name: str, damage) -> Path:
        shutil.copytree(tmp_path / "run", cases / name)
        damage(cases / name / step.name)
        return cases / name

    other_model = damaged("other_model", lambda folder: (folder / "config.json").write_text(
        json.dumps({**json.loads((folder / "config.json").read_text()), "cross_attention_start_layer": 2})
    ))  # fmt: skip
    shard = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    truncated = damaged("truncated", lambda folder: os.truncate(folder / shard, 1000))
    no_step = damaged("no_step", lambda folder: (folder.parent / "latest").write_text("step00000007"))
    expected = {
        other_model: f"--resume: {other_model / step.name} holds a model with cross_attention_start_layer=2 "
        "(this run: 1). Resume with the options it was saved with",
        truncated: f"{truncated / step.name / shard}: not a readable torch file (truncated or damaged",
        no_step: f"{no_step / 'latest'} names 'step00000007', which has no COMPLETE marker: the checkpoint folder is "
        f"damaged. Its complete checkpoints: step00000001; write the name of one into {no_step / 'latest'}",
    }
    for directory, message in expected.items():
        with pytest.raises(ValueError) as error:
            checkpoint.load_latest(engine_factory(seed=1), directory)
        assert message in str(error.value), directory


def test_a_checkpoint_of_another_optimizer_grouping_is_refused_and_k_may_differ(tmp_path, engine_factory, vocab):
    """A checkpoint saved before the cross-attention sub-layers had an optimizer group of their own:
    on as many processes DeepSpeed failed on its shards' layout (blaming parameter alignment), and
    through the universal format (another number of processes) it loaded the first group only, leaving
    the cross-attention's master weights at their initialization. It is named instead. K (num_objects,
    recorded from the data) shapes no weight: a checkpoint saved with another K resumes."""
    torch.manual_seed(0)
    model = SemVLPModel(config_from_preset("tiny", vocab_size=50, num_hidden_layers=2, cross_attention_start_layer=1))
    config = json.loads(CPU_CONFIG.read_text())
    config.update(train_batch_size=2, train_micro_batch_size_per_gpu=2)
    config["scheduler"]["params"].update(warmup_num_steps=1, total_num_steps=10)
    del config["tensorboard"]
    one_group, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    train_step(one_group)
    step = checkpoint.save(one_group, tmp_path / "old", 1, {"step": 1}, keep_last=2, vocab=vocab)
    with pytest.raises(ValueError) as refused:
        checkpoint.load_latest(engine_factory(seed=1), tmp_path / "old")
    assert str(refused.value).startswith(
        f"--resume: {step} was saved with 1 optimizer parameter group(s) and this version of semvlp trains 2 "
    )

    engine = engine_factory(seed=0)
    train_step(engine)
    step = checkpoint.save(engine, tmp_path / "new", 1, {"step": 1}, keep_last=2, vocab=vocab)
    saved = json.loads((step / "config.json").read_text())
    (step / "config.json").write_text(json.dumps({**saved, "num_objects": 36}))
    assert checkpoint.load_latest(engine_factory(seed=1), tmp_path / "new")["step"] == 1


def test_resume_with_another_global_batch_is_refused_before_anything_is_written(tmp_path, engine_factory, vocab):
    """A resumed step must hold as many examples as the checkpoint's: the schedule counts steps, and
    the data position maps onto another sharding only then. Another train_batch_size is named before
    the run folder is written; the same one split otherwise (micro-batch x accumulation) resumes."""
    engine = engine_factory(seed=0)  # train_batch_size 2
    train_step(engine)
    run_dir = tmp_path / "run"
    step = checkpoint.save(engine, run_dir / "checkpoints", 1, {"step": 1}, keep_last=2, vocab=vocab)
    files = sorted(run_dir.rglob("*"))

    def resume(**batch: int) -> RunConfig:
        path = tmp_path / f"ds_{'_'.join(map(str, batch.values()))}.json"
        path.write_text(json.dumps(json.loads(CPU_CONFIG.read_text()) | batch))
        return RunConfig(deepspeed_config=str(path), output_dir=str(run_dir), preset="tiny", resume=True)

    with pytest.raises(ConfigError) as refused:
        runner.check_options(resume(train_batch_size=4, train_micro_batch_size_per_gpu=4))
    assert str(refused.value) == (
        f"--resume: {step} was trained with a global batch (train_batch_size) of 2, this run has 4 "
        f"(--deepspeed_config {tmp_path / 'ds_4_4.json'}). Resume with 2, or export the checkpoint "
        f"(python -m semvlp.export {step} --out DIR) and start a new run with --init_from DIR"
    )
    with pytest.raises(ConfigError, match=r"this run has 8 \(--batch_size\)"):  # a fine-tuning launcher's
        runner.check_options(resume(train_batch_size=2, train_micro_batch_size_per_gpu=2), train_batch_size=8)
    assert sorted(run_dir.rglob("*")) == files
    split = runner.check_options(
        resume(train_batch_size=2, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2)
    )
    assert (split["train_batch_size"], "checkpoint" in split) == (2, False)  # the same world size: no conversion


def test_resume_of_another_model_is_refused_before_the_run_folder_is_touched(tmp_path, engine_factory, vocab):
    """--resume with options that build another model is named before anything is written: the run's
    record (hparams.json, ds_config.json, ...) still describes its checkpoints."""
    engine = engine_factory(seed=0)
    train_step(engine)
    run_dir = tmp_path / "run"
    step = checkpoint.save(engine, run_dir / "checkpoints", 1, {"step": 1}, keep_last=2, vocab=vocab)
    (run_dir / "hparams.json").write_text('{"preset": "tiny"}\n')
    files = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    ds_config = tmp_path / "ds.json"
    batch = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2}  # the checkpoint's
    ds_config.write_text(json.dumps(json.loads(CPU_CONFIG.read_text()) | batch))
    # The checkpoint's schedule too: 10 steps, warmup 1 (engine_factory).
    run = RunConfig(deepspeed_config=str(ds_config), output_dir=str(run_dir), preset="tiny", max_steps=10, resume=True)
    other = config_from_preset("tiny", vocab_size=50, num_hidden_layers=2, cross_attention_start_layer=2)

    with pytest.raises(ConfigError) as refused:
        runner.start(run, other)
    assert str(refused.value).startswith(
        f"--resume: {step} holds a model with cross_attention_start_layer=1 (this run: 2). Resume with the options"
    )
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == files
    assert runner.start(run, engine.module.config)[0] == run_dir  # the model it holds resumes


def test_a_resume_on_a_training_split_of_another_size_is_refused(tmp_path, engine_factory, vocab):
    """Another --data was refused by the loader only once the run's record had been rewritten; now
    with the options (runner.start), before anything is written."""
    engine = engine_factory(seed=0)
    step = checkpoint.save(engine, tmp_path, 1, {"step": 1, "loader": {"num_examples": 100}}, 2, vocab)
    ds_config = engine.config  # the one the checkpoint was trained with
    checkpoint.check_same_schedule(step, {}, ds_config, train_examples=100)
    with pytest.raises(ValueError, match=r"trained with a training split of 100 examples \(this run's --data: 90\)"):
        checkpoint.check_same_schedule(step, {}, ds_config, train_examples=90)


def test_a_new_run_in_the_folder_of_one_that_left_no_checkpoint_is_refused(tmp_path):
    """A run killed before its first checkpoint cannot be resumed; one started afresh in its folder
    appended to its metrics.jsonl, and its best/ outranked the new run's (whose own best was pruned)."""
    run_dir = tmp_path / "run"
    (run_dir / "best" / "step00000030").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 10}\n')
    run = RunConfig(deepspeed_config=str(CPU_CONFIG), output_dir=str(run_dir), preset="tiny")
    message = "holds metrics.jsonl and best of a run that left no checkpoint to resume: delete them or choose another"
    with pytest.raises(ConfigError, match=message):
        runner.check_options(run)


def test_a_ds_config_deepspeed_rejects_at_the_engine_leaves_no_folder_behind(tmp_path, engine_factory):
    """An optimizer parameter DeepSpeed's optimizer lacks fails only as the engine is built, after its
    TensorBoard monitor made its folder: a new run's folder is removed, an existing one keeps what it held."""
    engine_factory(seed=0)  # the process group
    ds_config = json.loads(CPU_CONFIG.read_text()) | {"train_batch_size": 16}
    ds_config["optimizer"]["params"]["weight_decy"] = 0.01
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    run_dir = tmp_path / "run"
    run = RunConfig(deepspeed_config=str(tmp_path / "ds.json"), output_dir=str(run_dir), preset="tiny")
    resolved = runner.check_options(run)
    assert resolved["tensorboard"]["output_path"] == str(run_dir / "tensorboard")
    model = SemVLPModel(config_from_preset("tiny", vocab_size=50, num_hidden_layers=2))

    message = f"--deepspeed_config {tmp_path / 'ds.json'}: DeepSpeed rejects it: TypeError: .*'weight_decy'"
    with pytest.raises(ConfigError, match=message):
        runner.build_engine(model, resolved, run)
    assert not run_dir.exists()
    run_dir.mkdir()
    (run_dir / "hparams.json").write_text("{}\n")
    with pytest.raises(ConfigError, match=message):
        runner.build_engine(model, resolved, run)
    assert [path.name for path in run_dir.iterdir()] == ["hparams.json"]


def test_old_checkpoints_are_pruned_only_after_a_newer_one_is_complete(tmp_path, engine_factory, vocab):
    engine = engine_factory(seed=0)
    for step in (1, 2, 3):
        train_step(engine)
        checkpoint.save(engine, tmp_path / "ckpt", step, {"step": step}, keep_last=2, vocab=vocab)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step*")) == ["step00000002", "step00000003"]
    assert checkpoint.latest_tag(tmp_path / "ckpt") == "step00000003"


def test_a_run_rolled_back_to_an_older_checkpoint_keeps_the_one_it_saves(tmp_path, engine_factory, vocab):
    """Pruning kept the highest-numbered checkpoints, so a run resumed from an older one (its pointer
    rolled back, as the damaged-pointer message suggests, or a stale best/) deleted the checkpoint it
    had just saved, which `latest` then named. Later ones are the abandoned run's and stay."""
    engine = engine_factory(seed=0)
    ckpt = tmp_path / "ckpt"
    for step in (10, 30):
        train_step(engine)
        checkpoint.save(engine, ckpt, step, {"step": step}, keep_last=2, vocab=vocab)
    (ckpt / checkpoint.POINTER).write_text("step00000010")
    train_step(engine)
    checkpoint.save(engine, ckpt, 20, {"step": 20}, keep_last=1, vocab=vocab)
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000020", "step00000030"]
    assert checkpoint.load_latest(engine, ckpt)["step"] == 20


def test_a_save_into_the_folder_of_a_killed_save_holds_only_its_own_files(tmp_path, engine_factory, vocab):
    """A save killed before COMPLETE leaves its files. Resumed on another number of processes, the run
    saved the same step into that folder: the other ranks' optimizer shards and RNG states stayed,
    and the checkpoint `latest` named could be neither resumed nor exported."""
    engine = engine_factory(seed=0)
    ckpt = tmp_path / "ckpt"
    train_step(engine)
    checkpoint.save(engine, ckpt, 1, {"step": 1}, keep_last=2, vocab=vocab)
    killed = ckpt / "step00000002"
    killed.mkdir()
    for name in ("rng_rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):  # a second rank's
        (killed / name).write_bytes(b"half a file")
    train_step(engine)
    checkpoint.save(engine, ckpt, 2, {"step": 2}, keep_last=2, vocab=vocab)
    assert checkpoint.saved_world_size(killed) == 1 and not list(killed.glob("*rank_1*"))
    assert export.main([str(ckpt), "--out", str(tmp_path / "export")]) == 0
    assert_weights(tmp_path / "export", weights(engine.module))


def test_each_checkpoint_loads_the_way_its_own_world_size_asks(tmp_path, engine_factory, vocab):
    """A fine-tuning run resumed on another number of processes built its engine to load universal
    checkpoints; its best/, saved by the new number, then failed to load at the end of the run (or
    the other way round), with no export and no predictions. The way is chosen per checkpoint."""
    engine = engine_factory(seed=0)
    engine._config.load_universal_checkpoint = True  # what the engine of such a run was built with
    train_step(engine)
    checkpoint.save(engine, tmp_path / "best", 1, {"step": 1}, keep_last=1, vocab=vocab)
    assert checkpoint.load_latest(engine, tmp_path / "best")["step"] == 1
    assert engine.load_universal_checkpoint() is True  # the engine's setting is left as it was


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_weights(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    exported = SemVLPModel.from_pretrained(folder)
    assert exported.config.architectures == ["SemVLPModel"]
    got = exported.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_a_save_stopped_before_its_complete_marker_leaves_latest_on_the_previous_one(
    tmp_path, engine_factory, vocab, monkeypatch
):
    """The marker first, then the pointer: a save killed between the shards and the marker leaves
    `latest` on the last complete checkpoint, which a resume takes (the other order names a damaged one)."""
    engine = engine_factory(seed=0)
    ckpt = tmp_path / "checkpoints"
    checkpoint.save(engine, ckpt, 1, {"step": 1}, keep_last=2, vocab=vocab)
    write = checkpoint._write_atomically

    def killed_at_the_marker(path, contents):
        if path.name == checkpoint.COMPLETE:
            raise KeyboardInterrupt  # as a kill there would stop it
        write(path, contents)

    monkeypatch.setattr(checkpoint, "_write_atomically", killed_at_the_marker)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(engine, ckpt, 2, {"step": 2}, keep_last=2, vocab=vocab)
    assert (ckpt / checkpoint.tag_for_step(2)).is_dir()  # its shards were written
    assert checkpoint.latest_tag(ckpt) == checkpoint.tag_for_step(1)


def test_an_export_refuses_a_checkpoint_whose_weights_do_not_fit_its_config(tmp_path, engine_factory, vocab):
    """config.json describing a model with more tensors than the shards hold (a block more): exported,
    those would keep their random initialization without a word."""
    engine = engine_factory(seed=0)
    folder = checkpoint.save(engine, tmp_path / "checkpoints", 1, {"step": 1}, keep_last=1, vocab=vocab)
    config = json.loads((folder / checkpoint.CONFIG).read_text())
    (folder / checkpoint.CONFIG).write_text(
        json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1})
    )
    with pytest.raises(
        ValueError, match=r"its weights do not fit SemVLPModel .* \(missing \['encoder.layers.\d+.*unexpected \[\]"
    ):
        export.export_checkpoint(folder, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_every_complete_checkpoint_exports_its_own_weights(tmp_path, engine_factory, vocab):
    """An intermediate checkpoint exports to the weights of its step (fp32 training here: exactly),
    from the command line, without the engine; a folder of checkpoints exports its newest."""
    engine = engine_factory(seed=0)
    for _ in range(2):  # with this warmup, DeepSpeed's first two steps are at learning rate 0
        train_step(engine)
    ckpt = tmp_path / "checkpoints"
    saved = {}
    for step in (1, 2):
        train_step(engine)
        checkpoint.save(engine, ckpt, step, {"step": step}, keep_last=2, vocab=vocab)
        saved[step] = weights(engine.module)
    assert not all(torch.equal(saved[1][k], saved[2][k]) for k in saved[1])

    result = subprocess.run(
        [sys.executable, "-m", "semvlp.export", str(ckpt / "step00000001"), "--out", str(tmp_path / "step1")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported {ckpt / 'step00000001'} to {tmp_path / 'step1'}" in result.stdout
    assert "Writing model shards" not in result.stderr  # transformers' progress bar, over one file
    assert_weights(tmp_path / "step1", saved[1])
    assert (tmp_path / "step1" / "vocab.txt").read_text() == vocab.read_text()
    assert sorted(p.name for p in tmp_path.glob(".step1*")) == []  # the staging folder is gone
    # Next to the model, what HuggingFace users load with it: the tokenizer that training used.
    tokenizer, text = AutoTokenizer.from_pretrained(tmp_path / "step1"), "A blue CUP by the walls, café ."
    assert tokenizer.tokenize(text) == ["a", "blue", "cup", "by", "the", "wall", "##s", ",", "cafe", "."]
    assert tokenizer(text)["input_ids"] == load_tokenizer(vocab)(text)["input_ids"]

    assert export.main([str(ckpt), "--out", str(tmp_path / "newest")]) == 0
    assert_weights(tmp_path / "newest", saved[2])

    # An existing export is replaced only when asked, and then whole.
    assert export.main([str(ckpt / "step00000002"), "--out", str(tmp_path / "step1")]) == 2
    assert_weights(tmp_path / "step1", saved[1])
    assert export.main([str(ckpt / "step00000002"), "--out", str(tmp_path / "step1"), "--overwrite"]) == 0
    assert_weights(tmp_path / "step1", saved[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "newest", "step1", "vocab.txt"]


def test_an_interrupted_export_keeps_the_export_it_would_replace(
    tmp_path, engine_factory, vocab, monkeypatch, capsys, sigterm_received
):
    engine = engine_factory(seed=0)
    ckpt, out = tmp_path / "checkpoints", tmp_path / "model"
    checkpoint.save(engine, ckpt, 1, {"step": 1}, keep_last=2, vocab=vocab)
    assert export.main([str(ckpt), "--out", str(out)]) == 0
    exported = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    # SIGTERM (a batch scheduler) while the new copy is written...
    monkeypatch.setattr(export, "tokenizer_config", lambda **_: os.kill(os.getpid(), signal.SIGTERM))
    assert export.main([str(ckpt), "--out", str(out), "--overwrite"]) == 128 + signal.SIGTERM
    assert sigterm_received == []
    assert capsys.readouterr().err.endswith(f"\nerror: terminated (SIGTERM)\nnothing written at {out}\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == exported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "model", "vocab.txt"]
    monkeypatch.undo()

    # ...or Ctrl-C after the old export was moved aside, before the new one took its place.
    replace = os.replace

    def interrupted(source, target):
        if Path(source).name.startswith(f".{out.name}.tmp"):
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted)
    assert export.main([str(ckpt), "--out", str(out), "--overwrite"]) == 128 + signal.SIGINT
    assert {p.name: p.read_bytes() for p in out.iterdir()} == exported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "model", "vocab.txt"]


def test_from_pretrained_of_a_checkpoint_says_to_export_it(tmp_path, engine_factory, vocab):
    """A checkpoint folder holds config.json, so HF's from_pretrained took it for a model and then
    said only that it had no model.safetensors."""
    engine = engine_factory(seed=0)
    step = checkpoint.save(engine, tmp_path / "checkpoints", 1, {"step": 1}, keep_last=2, vocab=vocab)
    message = f"{step} is a training checkpoint (DeepSpeed shards), not a model folder: export it first"
    # AutoModel reads the step folder's config.json first; a folder of checkpoints has none.
    for load, folder in [(SemVLPModel.from_pretrained, step), (SemVLPModel.from_pretrained, step.parent),
                         (AutoModel.from_pretrained, step)]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message.replace(str(step), str(folder)))):
            load(folder)


def test_export_errors_name_the_checkpoint_and_write_nothing(tmp_path, engine_factory, vocab, capsys):
    engine = engine_factory(seed=0)
    train_step(engine)
    run_dir = tmp_path / "run"
    step = checkpoint.save(engine, run_dir / "checkpoints", 1, {"step": 1}, keep_last=2, vocab=vocab)
    unfinished = run_dir / "checkpoints" / "step00000002"
    unfinished.mkdir()
    (unfinished / "mp_rank_00_model_states.pt").write_bytes(b"")
    no_config, bad_config, bad_shard = (tmp_path / name / "step00000001" for name in ("nc", "bc", "bs"))
    for copy in (no_config, bad_config, bad_shard):
        shutil.copytree(step, copy)
    (no_config / "config.json").unlink()
    (bad_config / "config.json").write_text('{"model_type": ')
    os.truncate(bad_shard / "mp_rank_00_model_states.pt", 100)
    cases = [
        (unfinished, f"{unfinished}: incomplete checkpoint (no COMPLETE marker): its save did not finish"),
        (run_dir, f"{run_dir}: not a checkpoint (a step folder with COMPLETE, or a folder with latest); "
                  "it holds the checkpoint folder(s) checkpoints"),
        (no_config, f"{no_config}: no config.json, so the model it holds is unknown"),
        (bad_config, f"{bad_config / 'config.json'}: not a readable model config"),
        (bad_shard, f"{bad_shard / 'mp_rank_00_model_states.pt'}: not a readable torch file (truncated or damaged"),
        (tmp_path / "missing", f"{tmp_path / 'missing'}: no such checkpoint folder"),
    ]  # fmt: skip
    for path, message in cases:
        out = tmp_path / "export"
        assert export.main([str(path), "--out", str(out)]) == 2, path
        err = capsys.readouterr().err
        assert message in err, err
        assert f"nothing written at {out}" in err
        assert not out.exists()
        assert not list(tmp_path.glob(".export*"))

    # --overwrite replaces an export, never the checkpoint it comes from or a folder of other files.
    ckpt = run_dir / "checkpoints"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    cases = [
        (ckpt, run_dir, f"--out {run_dir} would replace or hold the checkpoint {step}: choose a folder outside it"),
        (step, step / "export", f"--out {step / 'export'} would replace or hold the checkpoint {step}"),
        (step, tmp_path / "notes", f"--out {tmp_path / 'notes'} holds files but no SemVLP model"),
        (step, tmp_path / "notes" / "todo.txt", f"--out {tmp_path / 'notes' / 'todo.txt'} is a file; name a folder"),
        (step, tmp_path / "notes" / "todo.txt" / "x", f"{tmp_path / 'notes' / 'todo.txt'} is a file, not a folder"),
    ]
    for path, out, message in cases:
        assert export.main([str(path), "--out", str(out), "--overwrite"]) == 2, out
        assert message in capsys.readouterr().err
    assert checkpoint.find_complete(ckpt) == step and (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert not (step / "export").exists()


def test_the_gpu_configs_train_bf16_without_the_per_tensor_overflow_check(engine_factory):
    """a100.json / h100.json: ZeRO-1 in bf16 without DeepSpeed's overflow check, whose ~13 small ops
    per tensor and step are 3,000 of the ~4,900 a base-size step dispatches (benchmarks/step_ops.py).
    A non-finite gradient is then applied; check_finite_weights keeps it out of the checkpoints."""
    assert GPU_PRECISION == {"bf16": {"enabled": True, "check_grad_overflow": False}}
    engine = engine_factory(seed=0, bf16=True)
    assert type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer" and not engine.optimizer.check_grad_overflow
    assert json.loads((REPO / "ds_configs" / "a100.json").read_text()) == json.loads(
        (REPO / "ds_configs" / "h100.json").read_text()
    )


def test_non_finite_weights_stop_the_run_instead_of_a_checkpoint(engine_factory):
    from semvlp.train import NonFiniteLossError, check_finite_weights

    engine = engine_factory(seed=0, bf16=True)
    train_step(engine)
    check_finite_weights(engine, 1)
    weight = engine.module.encoder.layers[1].ffn.down.weight
    for value in (float("nan"), float("inf")):
        with torch.no_grad():
            weight[3, 5] = value
        with pytest.raises(NonFiniteLossError, match="non-finite weights after step 1 .* not checkpointing them"):
            check_finite_weights(engine, 1)


def test_the_rng_state_a_checkpoint_keeps_restores_every_generator():
    """Python's, numpy's and torch's (dropout, on CPU; CUDA's where there is one): a resumed run draws
    what the uninterrupted one would have."""
    state = checkpoint.rng_state()
    drawn = random.random(), np.random.rand(), torch.rand(3)
    checkpoint.set_rng_state(state)
    again = random.random(), np.random.rand(), torch.rand(3)
    assert drawn[:2] == again[:2] and torch.equal(drawn[2], again[2])


def test_a_bf16_run_resumes_to_the_weights_and_optimizer_state_of_an_uninterrupted_one(tmp_path, engine_factory, vocab):
    straight = engine_factory(seed=0, bf16=True)
    for _ in range(3):
        train_step(straight)
    checkpoint.save(straight, tmp_path, 3, {"step": 3}, keep_last=2, vocab=vocab)
    train_step(straight)

    resumed = engine_factory(seed=1, bf16=True)
    assert checkpoint.load_latest(resumed, tmp_path)["step"] == 3
    train_step(resumed)
    for name, tensor in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], tensor), name
    expected, got = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    for a, b in zip(expected["single_partition_of_fp32_groups"], got["single_partition_of_fp32_groups"], strict=True):
        assert torch.equal(a, b)  # the fp32 master weights
    for key, state in expected["base_optimizer_state"]["state"].items():
        for name, value in state.items():
            assert torch.equal(got["base_optimizer_state"]["state"][key][name], value), (key, name)


def test_a_bf16_checkpoint_exports_its_fp32_master_weights(tmp_path, engine_factory, vocab):
    """Under bf16 (the A100/H100 configs) the module holds bf16 copies; the export holds the fp32
    weights the optimizer updates, which round to exactly those copies."""
    engine = engine_factory(seed=0, bf16=True)
    for _ in range(4):
        train_step(engine)
    step = checkpoint.save(engine, tmp_path / "checkpoints", 4, {"step": 4}, keep_last=2, vocab=vocab)
    assert list(step.glob("bf16_zero_pp_rank_0_*optim_states.pt"))
    export.export_checkpoint(step, tmp_path / "export")
    exported = SemVLPModel.from_pretrained(tmp_path / "export").state_dict()
    module = engine.module.state_dict()
    assert module["embeddings.word_embeddings.weight"].dtype == torch.bfloat16
    for name, tensor in module.items():
        assert exported[name].dtype == torch.float32, name
        assert torch.equal(exported[name].to(torch.bfloat16), tensor), name
    assert any(not torch.equal(exported[name], tensor.float()) for name, tensor in module.items())
