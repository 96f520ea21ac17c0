"""GQA (balanced) fine-tuning under DeepSpeed (paper 4.2; LXMERT's settings: lr 1e-5, batch 32, 4 epochs).

    # from a pre-trained export, single-stream (paper Table 5), 4 GPUs:
    deepspeed launch/finetune_gqa.py --deepspeed_config ds_configs/v100.json \
        --data /data/semvlp/data.json --init_from runs/pretrain/export --mode single
    # CPU, 2 processes, tiny model, the toy world:
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/finetune_gqa.py --deepspeed_config ds_configs/cpu.json \
        --preset tiny --init_from runs/pretrain/export
    # predictions only, from a fine-tuned export (e.g. for the test-server split):
    deepspeed launch/finetune_gqa.py --deepspeed_config ds_configs/v100.json --data ... \
        --init_from runs/gqa/export --predict_only --predict_splits test

Writes OUTPUT_DIR/predictions/gqa_<split>.json ([{"questionId", "prediction"}]), results.json and
export/ (the best dev checkpoint). Every option: `python launch/finetune_gqa.py --help`.
"""

from __future__ import annotations

from dataclasses import dataclass

from semvlp import runner
from semvlp.tasks.finetune import run_finetuning
from semvlp.tasks.qa import GQA, QAConfig, QATask


@dataclass(frozen=True)
class GQAConfig(QAConfig):
    """GQA fine-tuning (exact match)."""

    output_dir: str = "runs/gqa"
    lr: float = 1e-5
    batch_size: int = 32
    epochs: float = 4.0


def main(argv: list[str] | None = None) -> None:
    run_finetuning(GQAConfig.from_args(argv), lambda run, *data: QATask(run, GQA, *data))


if __name__ == "__main__":
    runner.run_main(main)
