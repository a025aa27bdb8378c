"""Everything that touches SAM 3 tensors. Knows nothing of sockets.

The prompt and result types load without torch (a capture process on a robot imports the wire
protocol, which uses them); the model side loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from models.frames import check_frame
from models.object_ids import ObjectIds
from models.prompts import MAX_OBJ_ID, MAX_POINTS, MAX_TEXT_CHARS, Prompt, PromptFailure
from models.results import FrameResult, ObjectResult

_LAZY = {
    "DEFAULT_MODEL": "models.loading",
    "ModelLoadError": "models.loading",
    "Sam3Models": "models.loading",
    "load_models": "models.loading",
    "ImageEncoder": "models.encoder",
    "TorchImageEncoder": "models.encoder",
    "StreamingTracker": "models.streaming_tracker",
    "TrackerConfig": "models.streaming_tracker",
    "FrameOutputs": "models.predictor",
    "PredictorError": "models.predictor",
    "Sam3VideoPredictor": "models.predictor",
    "UnknownSessionError": "models.predictor",
}

if TYPE_CHECKING:
    from models.encoder import ImageEncoder, TorchImageEncoder
    from models.loading import DEFAULT_MODEL, ModelLoadError, Sam3Models, load_models
    from models.predictor import FrameOutputs, PredictorError, Sam3VideoPredictor, UnknownSessionError
    from models.streaming_tracker import StreamingTracker, TrackerConfig


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "MAX_OBJ_ID",
    "MAX_POINTS",
    "MAX_TEXT_CHARS",
    "FrameOutputs",
    "FrameResult",
    "ImageEncoder",
    "ModelLoadError",
    "ObjectIds",
    "ObjectResult",
    "PredictorError",
    "Prompt",
    "PromptFailure",
    "Sam3Models",
    "Sam3VideoPredictor",
    "StreamingTracker",
    "TorchImageEncoder",
    "TrackerConfig",
    "UnknownSessionError",
    "check_frame",
    "load_models",
]
