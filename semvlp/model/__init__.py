from semvlp.model.bert_init import init_from_bert
from semvlp.model.finetuning import SemVLPForNLVR2, SemVLPForQuestionAnswering, SemVLPForRetrieval
from semvlp.model.modeling import (
    PackedText,
    SemVLPModel,
    SemVLPOutput,
    StreamStates,
    enable_activation_checkpointing,
)
from semvlp.model.pretraining import LOSS_NAMES, PreTrainingOutput, SemVLPForPreTraining

__all__ = [
    "LOSS_NAMES",
    "PackedText",
    "PreTrainingOutput",
    "SemVLPForNLVR2",
    "SemVLPForPreTraining",
    "SemVLPForQuestionAnswering",
    "SemVLPForRetrieval",
    "SemVLPModel",
    "SemVLPOutput",
    "StreamStates",
    "enable_activation_checkpointing",
    "init_from_bert",
]
