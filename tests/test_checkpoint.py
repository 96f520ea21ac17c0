"""The newest-checkpoint pointer survives a crash in the middle of writing a checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import deepspeed
import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from semvlp import checkpoint, runner
from semvlp.config import config_from_preset
from semvlp.model import SemVLPModel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine_factory():
    # init_distributed fills RANK, WORLD_SIZE, MASTER_PORT...; restore the environment afterwards so
    # that later tests' launcher subprocesses do not inherit this process group's rendezvous port.
    saved_env = dict(os.environ)
    runner.init_distributed()  # one gloo process
    config = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    config.update(train_batch_size=2, train_micro_batch_size_per_gpu=2)
    config["scheduler"]["params"].update(warmup_num_steps=1, total_num_steps=10)
    del config["tensorboard"]

    def make(seed: int):
        torch.manual_seed(seed)
        model = SemVLPModel(
            config_from_preset("tiny", vocab_size=50, num_hidden_layers=2, cross_attention_start_layer=1)
        )
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        return engine

    yield make
    torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved_env)


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


def test_pointer_survives_a_crash_mid_save(tmp_path, engine_factory, monkeypatch):
    engine = engine_factory(seed=0)
    train_step(engine)
    checkpoint.save(engine, tmp_path, 1, {"step": 1}, keep_last=2)
    good = {k: v.clone() for k, v in engine.module.state_dict().items()}
    train_step(engine)

    written = []

    def crash_after_first_file(self, state_dict, path):
        if written:
            raise OSError("disk full (simulated)")
        written.append(path)
        torch.save(state_dict, path)

    monkeypatch.setattr(TorchCheckpointEngine, "save", crash_after_first_file)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(engine, tmp_path, 2, {"step": 2}, keep_last=2)
    monkeypatch.undo()

    assert written and Path(written[0]).parent.name == "step00000002"  # the crash left a partial checkpoint
    assert not (tmp_path / "step00000002" / checkpoint.COMPLETE).exists()
    assert checkpoint.latest_tag(tmp_path) == "step00000001"

    fresh = engine_factory(seed=1)
    client_state = checkpoint.load_latest(fresh, tmp_path)
    assert client_state["step"] == 1
    for name, tensor in fresh.module.state_dict().items():
        assert torch.equal(tensor, good[name]), name


def test_old_checkpoints_are_pruned_only_after_a_newer_one_is_complete(tmp_path, engine_factory):
    engine = engine_factory(seed=0)
    for step in (1, 2, 3):
        train_step(engine)
        checkpoint.save(engine, tmp_path, step, {"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000002", "step00000003"]
    assert checkpoint.latest_tag(tmp_path) == "step00000003"
