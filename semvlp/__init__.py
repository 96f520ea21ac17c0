"""SemVLP: one shared Transformer encoder run in single-stream and two-stream modes."""

from semvlp.config import SemVLPConfig
from semvlp.model import (
    SemVLPForNLVR2,
    SemVLPForPreTraining,
    SemVLPForQuestionAnswering,
    SemVLPForRetrieval,
    SemVLPModel,
)

__all__ = [
    "SemVLPConfig",
    "SemVLPModel",
    "SemVLPForPreTraining",
    "SemVLPForQuestionAnswering",
    "SemVLPForNLVR2",
    "SemVLPForRetrieval",
]
