"""SemVLP: one shared Transformer encoder run in single-stream and two-stream modes."""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForVisualQuestionAnswering

from semvlp.config import SemVLPConfig
from semvlp.model import (
    SemVLPForNLVR2,
    SemVLPForPreTraining,
    SemVLPForQuestionAnswering,
    SemVLPForRetrieval,
    SemVLPModel,
)

# HuggingFace's Auto classes know the model type "semvlp" once this package is imported (their way
# for models outside transformers): AutoModel.from_pretrained(export) gives the encoder of any export,
# AutoModelForPreTraining a pre-training export, AutoModelForVisualQuestionAnswering a VQA/GQA one.
AutoConfig.register(SemVLPConfig.model_type, SemVLPConfig)
AutoModel.register(SemVLPConfig, SemVLPModel)
AutoModelForPreTraining.register(SemVLPConfig, SemVLPForPreTraining)
AutoModelForVisualQuestionAnswering.register(SemVLPConfig, SemVLPForQuestionAnswering)

__all__ = [
    "SemVLPConfig",
    "SemVLPModel",
    "SemVLPForPreTraining",
    "SemVLPForQuestionAnswering",
    "SemVLPForNLVR2",
    "SemVLPForRetrieval",
]
