"""VQA v2 fine-tuning under DeepSpeed (paper 4.2; LXMERT's settings: lr 5e-5, batch 32, 4 epochs).

    # from a pre-trained export, single-stream (paper Table 5), 4 GPUs:
    deepspeed launch/finetune_vqa.py --deepspeed_config ds_configs/v100.json \
        --data /data/semvlp/data.json --init_from runs/pretrain/export --mode single
    # CPU, 2 processes, tiny model, the toy world:
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/finetune_vqa.py --deepspeed_config ds_configs/cpu.json \
        --preset tiny --init_from runs/pretrain/export
    # predictions only, from a fine-tuned export (e.g. for the test-server split):
    deepspeed launch/finetune_vqa.py --deepspeed_config ds_configs/v100.json --data ... \
        --init_from runs/vqa/export --predict_only --predict_splits test

Writes OUTPUT_DIR/predictions/vqa_<split>.json ([{"question_id", "answer"}]), results.json and
export/ (the best dev checkpoint). Every option: `python launch/finetune_vqa.py --help`.
"""

from __future__ import annotations

from dataclasses import dataclass

from semvlp import runner
from semvlp.tasks.finetune import run_finetuning
from semvlp.tasks.qa import VQA, QAConfig, QATask


@dataclass(frozen=True)
class VQAConfig(QAConfig):
    """VQA v2 fine-tuning (soft score)."""

    output_dir: str = "runs/vqa"
    lr: float = 5e-5
    batch_size: int = 32
    epochs: float = 4.0


def main(argv: list[str] | None = None) -> None:
    run_finetuning(VQAConfig.from_args(argv), lambda run, *data: QATask(run, VQA, *data))


if __name__ == "__main__":
    runner.run_main(main)
