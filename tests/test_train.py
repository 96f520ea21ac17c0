"""The training loop's optimizer steps (semvlp/train.py), on a real DeepSpeed engine in this process."""

from __future__ import annotations

import json
from pathlib import Path

import deepspeed
import pytest
import torch

from semvlp.config import config_from_preset
from semvlp.model import SemVLPModel
from semvlp.train import CROSS_ATTENTION_GROUP, cross_attention_held, optimizer_group_count, optimizer_groups

CPU_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "cpu.json"


def step(engine, mode: str) -> None:
    """One optimizer step of two micro-batches (gradient accumulation) in `mode`."""
    for micro in range(2):
        g = torch.Generator().manual_seed(10 * engine.global_steps + micro)
        out = engine(
            input_ids=torch.randint(50, (2, 6), generator=g),
            visual_feats=torch.randn(2, 100, 2048, generator=g),
            visual_pos=torch.rand(2, 100, 4, generator=g),
            mode=mode,
        )
        engine.backward(out.pooled.square().mean())
        engine.step()


def cross_attention_state(engine) -> list[dict]:
    """The optimizer's state (moments, step count) of the cross-attention group's flat partitions."""
    optimizer = engine.optimizer.optimizer
    held = engine.optimizer.param_groups[CROSS_ATTENTION_GROUP]["params"]
    return [{k: v.clone() for k, v in optimizer.state[p].items()} for p in held if p in optimizer.state]


def same_state(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "precision, zero_stage, scheduled", [("fp32", 1, True), ("fp32", 2, True), ("bf16", 1, True), ("fp32", 1, False)]
)
def test_single_stream_steps_leave_the_cross_attention_and_its_optimizer_state_unchanged(
    one_process_group, precision, zero_stage, scheduled
):
    """Only two-stream steps run the cross-attention sub-layers. DeepSpeed's ZeRO optimizer steps flat
    partitions, so a single-stream step handed them zero gradients and Adam still moved them, by its
    momentum from the last two-stream step and by weight decay, and decayed its moments of them:
    held, they and their moments and step count stay as they are (a first step held leaves a first
    step's state: step 0, zero moments), as a torch optimizer leaves a parameter without a gradient,
    and the other parameters train as before."""
    config = json.loads(CPU_CONFIG.read_text())
    config.update(train_batch_size=4, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    config["scheduler"]["params"].update(warmup_num_steps=2, total_num_steps=20)
    if not scheduled:  # a constant lr: no scheduler sets the held group's lr again after a step
        del config["scheduler"]
    del config["tensorboard"]
    config["zero_optimization"]["stage"] = zero_stage
    if precision == "bf16":  # DeepSpeed's BF16_Optimizer: another wrapper of the torch optimizer
        config["bf16"] = {"enabled": True}
    assert config["optimizer"]["params"]["weight_decay"] > 0  # the decay alone would move them
    torch.manual_seed(0)
    model = SemVLPModel(config_from_preset("tiny", vocab_size=50, num_hidden_layers=2, cross_attention_start_layer=1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model), config=config)
    groups = engine.optimizer.param_groups
    cross = {name: p for name, p in engine.module.named_parameters() if ".cross_attention." in name}
    assert cross and len(groups) == 2
    snapshot = lambda params: {name: p.detach().clone() for name, p in params}
    changed = lambda before, params: {name for name, p in params if not torch.equal(p, before[name])}

    learning_rates = []
    for mode in ("single", "two", "two", "two", "single", "single", "two"):
        learning_rates.append(groups[0]["lr"])  # what this step applies (warm-up's first one is 0)
        cross_before, all_before = snapshot(cross.items()), snapshot(engine.module.named_parameters())
        state_before = cross_attention_state(engine)
        with cross_attention_held(engine, mode):
            step(engine, mode)
        assert groups[CROSS_ATTENTION_GROUP]["lr"] == groups[0]["lr"]  # set back for the next step
        state = cross_attention_state(engine)
        if mode == "single":
            assert not changed(cross_before, cross.items()), mode
            if state_before:
                assert same_state(state, state_before), mode
            else:  # the first step: Adam made its state in it
                assert state and all(not value.any() for values in state for value in values.values())
        else:
            assert not same_state(state, state_before), mode
        if mode == "single" and learning_rates[-1] > 0:
            assert changed(all_before, engine.module.named_parameters()) - set(cross), mode  # the rest trained
        elif learning_rates[-1] > 0:  # (bf16: LayerNorm weights of 1.0 move by less than a bf16 step at first)
            moved = changed(cross_before, cross.items())
            assert moved == set(cross) if precision == "fp32" else moved, mode
    assert learning_rates[3] > 0  # a two-stream step that moved them came before the single-stream ones
    assert [int(s["step"]) for s in cross_attention_state(engine)] == [4]  # the two-stream steps only

    cross_before, state_before = snapshot(cross.items()), cross_attention_state(engine)
    step(engine, "single")  # what a single-stream step did without holding them
    assert changed(cross_before, cross.items()) == set(cross)
    assert not same_state(cross_attention_state(engine), state_before)


def test_a_model_without_cross_attention_has_one_group():
    for start, groups in ((1, 2), (2, 1)):  # L_s < L: the cross-attention's group; L_s = L: none
        config = config_from_preset("tiny", vocab_size=50, num_hidden_layers=2, cross_attention_start_layer=start)
        model = SemVLPModel(config)
        assert len(optimizer_groups(model)) == optimizer_group_count(config) == groups
        assert sum(len(group["params"]) for group in optimizer_groups(model)) == len(list(model.parameters()))


def test_bf16_configs_are_refused_below_sm80_though_torch_would_emulate_bf16(monkeypatch, tmp_path):
    """torch.cuda.is_bf16_supported() says yes on a V100 or T4 (bf16 emulated, slowly) and asks GPU 0
    from every rank: the check reads this rank's GPU's compute capability instead."""
    from semvlp.run_config import ConfigError, RunConfig
    from semvlp.train import resolve_ds_config

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (7, 0))
    monkeypatch.setenv("LOCAL_RANK", "3")
    a100 = Path(__file__).resolve().parents[1] / "ds_configs" / "a100.json"
    run = RunConfig(deepspeed_config=str(a100), max_steps=1000)
    with pytest.raises(ConfigError, match="a100.json: bf16 needs sm_80"):
        resolve_ds_config(run, 4, tmp_path)
    assert asked == [3]
