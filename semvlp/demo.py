"""Forward/backward smoke of the tiny model in both modes (until the pre-training launcher lands)."""

from __future__ import annotations

import torch

from semvlp.config import config_from_preset
from semvlp.model import SemVLPForPreTraining


def main() -> None:
    torch.manual_seed(0)
    config = config_from_preset("tiny", vocab_size=1000, num_qa_labels=50)
    model = SemVLPForPreTraining(config)
    batch_size, text_len, num_objects = 4, 12, config.num_objects
    batch = dict(
        input_ids=torch.randint(1000, (batch_size, text_len)),
        visual_feats=torch.randn(batch_size, num_objects, config.visual_feat_dim).half(),
        visual_pos=torch.rand(batch_size, num_objects, 4),
        mlm_labels=torch.randint(1000, (batch_size, text_len)),
        obj_mask=torch.rand(batch_size, num_objects) < 0.15,
        obj_labels=torch.randint(config.num_object_labels, (batch_size, num_objects)),
        obj_confs=torch.rand(batch_size, num_objects),
        attr_labels=torch.randint(config.num_attribute_labels, (batch_size, num_objects)),
        attr_confs=torch.rand(batch_size, num_objects),
        itm_labels=torch.ones(batch_size, dtype=torch.long),
        qa_labels=torch.randint(50, (batch_size,)),
    )
    for mode in ("single", "two"):
        out = model(**batch, mode=mode)
        out.loss.backward()
        print(mode, {name: round(loss.item(), 3) for name, loss in out.losses.items()})


if __name__ == "__main__":
    main()
