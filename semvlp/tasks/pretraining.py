"""Pre-training: the four tasks of SemVLPForPreTraining, one stream mode per step.

Before `qa_from_step` the training loss leaves out the image-QA term (it is still computed and
logged): LXMERT pre-trained with image QA only in its last 10 of 20 epochs. On the toy world, QA
from the first step holds image-text matching at chance for over 1,000 steps (both read the pooled
vector; docs/data_format.md section 6).

Evaluation runs the held-out batches in every mode the schedule trains, and reports each
loss and the accuracy of masked LM, ITM, QA and object labels, per mode.

With `packed_text`, training and evaluation give the model the batch's text without padding (a
PackedText and the packed mlm_labels; see semvlp/data/pretrain_dataset.py) instead of the padded
input_ids, attention_mask, token_type_ids and mlm_labels. The losses and metrics are the same.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from semvlp import dist
from semvlp.config import SemVLPConfig
from semvlp.flops import training_step_flops
from semvlp.model import LOSS_NAMES, PackedText
from semvlp.schedule import mode_for_step
from semvlp.train import to_device

MODEL_INPUTS = (
    "input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos", "visual_attention_mask",
    "mlm_labels", "obj_mask", "obj_labels", "obj_confs", "attr_labels", "attr_confs", "itm_labels", "qa_labels",
)  # fmt: skip


PADDED_TEXT = ("attention_mask", "token_type_ids")  # what PackedText replaces besides input_ids


def model_inputs(batch: dict, packed_text: bool = False) -> dict:
    """The model's arguments from a batch: padded text, or packed text (PackedText + packed mlm_labels)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if packed_text:
        for k in PADDED_TEXT:
            inputs.pop(k, None)
        inputs.update(input_ids=PackedText.from_batch(batch), mlm_labels=batch["packed_mlm_labels"])
    return inputs


class PretrainTask:
    def __init__(
        self,
        config: SemVLPConfig,
        train_loader,
        eval_loader,
        stream_schedule: str,
        seed: int,
        eval_batches: int,
        packed_text: bool = False,
        qa_from_step: int = 0,
    ):
        self.config = config
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.stream_schedule = stream_schedule
        self.seed = seed
        self.eval_batches = eval_batches
        self.packed_text = packed_text
        self.qa_from_step = qa_from_step
        self.eval_modes = ("single", "two") if stream_schedule == "alternate" else (stream_schedule,)

    def mode(self, step: int) -> str:
        return mode_for_step(self.stream_schedule, step, self.seed)

    def forward(self, engine, batch: dict, mode: str):
        """The model on a device batch, its text padded or packed (`packed_text`)."""
        return engine(**model_inputs(batch, self.packed_text), mode=mode)

    def loss(self, engine, batch: dict, mode: str, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.forward(engine, batch, mode)
        if step < self.qa_from_step:
            return sum(value for name, value in out.losses.items() if name != "qa"), out.losses
        return out.loss, out.losses

    def batch_samples(self, batch: dict) -> int:
        return batch["input_ids"].shape[0]

    def batch_flops(self, batch: dict, mode: str) -> float:
        """Model FLOPs of the step, counted from the batch while it is still on the host."""
        return training_step_flops(
            self.config,
            batch["attention_mask"].sum(dim=1).tolist(),
            mode,
            num_masked_tokens=int((batch["mlm_labels"] != -100).sum()),
            num_masked_objects=int((batch["obj_mask"] & batch["itm_labels"].bool()[:, None]).sum()),  # matched pairs
            num_objects=batch["visual_feats"].shape[1],
        )

    def evaluate(self, engine) -> dict[str, float]:
        metrics = {}
        for mode in self.eval_modes:
            sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=engine.device))
            for i, batch in enumerate(self.eval_loader):
                if self.eval_batches and i == self.eval_batches:
                    break
                batch = to_device(batch, engine.device)
                out = self.forward(engine, batch, mode)
                for name in LOSS_NAMES:
                    sums[f"loss_{name}"] += out.losses[name].float()
                sums["batches"] += 1
                _count(sums, "mlm", out.mlm_logits, out.mlm_targets)
                _count(sums, "itm", out.itm_logits, batch["itm_labels"])
                qa_rows = (batch["qa_labels"] != -100) & batch["itm_labels"].bool()
                _count(sums, "qa", out.qa_logits[qa_rows], batch["qa_labels"][qa_rows])
                _count(sums, "obj_label", out.obj_label_logits, out.obj_label_targets)
            names = sorted(sums)
            totals = dist.all_reduce_sum(torch.stack([sums[n] for n in names])).tolist()
            total = dict(zip(names, totals, strict=True))
            for name in LOSS_NAMES:
                metrics[f"{mode}/loss_{name}"] = total[f"loss_{name}"] / max(total["batches"], 1)
            for task in ("mlm", "itm", "qa", "obj_label"):
                if total.get(f"{task}_total", 0) > 0:
                    metrics[f"{mode}/{task}_acc"] = total[f"{task}_correct"] / total[f"{task}_total"]
        return metrics


def _count(sums: dict, name: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
    sums[f"{name}_correct"] += (logits.argmax(-1) == targets).sum()
    sums[f"{name}_total"] += targets.numel()
