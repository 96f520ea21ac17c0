"""Flickr30K image-text retrieval fine-tuning under DeepSpeed (paper 4.2) on the ITM score, with
sampled or hard negatives, lr 5e-5. UNITER's recipe is `--loss rank` with hard negatives (its
Flickr30K run: the 31 hardest of 399, captions up to 60 tokens, which data.json's max_text_len sets).

    # from a pre-trained export, 4 GPUs, hard negatives (the 7 hardest of 63 per direction):
    deepspeed launch/finetune_retrieval.py --deepspeed_config ds_configs/v100.json \
        --data /data/semvlp/data.json --init_from runs/pretrain/export --negatives 63 --hard_negatives 7
    # CPU, 2 processes, tiny model, the toy world, evaluating on 50 images of each split:
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 launch/finetune_retrieval.py --deepspeed_config ds_configs/cpu.json \
        --preset tiny --init_from runs/pretrain/export --eval_images 50

Writes OUTPUT_DIR/predictions/retrieval_<split>.json (top-10 images per caption, top-10 captions
per image), results.json (R@1/5/10 both directions and their mean) and export/ (the best dev
checkpoint). Every option: `python launch/finetune_retrieval.py --help`.
"""

from __future__ import annotations

from dataclasses import dataclass

from semvlp import runner
from semvlp.tasks.finetune import run_finetuning
from semvlp.tasks.retrieval import RetrievalConfig, RetrievalTask


@dataclass(frozen=True)
class FlickrConfig(RetrievalConfig):
    """Flickr30K retrieval fine-tuning (R@1/5/10, both directions)."""

    lr: float = 5e-5
    batch_size: int = 32
    epochs: float = 4.0


def main(argv: list[str] | None = None) -> None:
    run_finetuning(FlickrConfig.from_args(argv), RetrievalTask)


if __name__ == "__main__":
    runner.run_main(main)
