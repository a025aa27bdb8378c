"""Everything that touches SAM 3 tensors. Knows nothing of sockets.

The prompt and result types load without torch (a capture process on a robot imports the wire
protocol, which uses them); the model side loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.encoder import ENCODER_NAMES, ENCODER_PRECISIONS, EXPORT_PRECISIONS, check_encoder_choice
from models.frames import check_frame
from models.lazy import lazy_attributes
from models.object_ids import ObjectIds
from models.prompts import MAX_OBJ_ID, MAX_POINTS, MAX_TEXT_CHARS, Prompt, PromptFailure
from models.results import FrameResult, ObjectResult

_LAZY = {
    "BUILTIN_MODELS": "models.model_names",
    "DEFAULT_MODEL": "models.model_names",
    "ModelLoadError": "models.model_names",
    "check_model_name": "models.model_names",
    "resolve_device": "models.devices",
    "Sam3Models": "models.loading",
    "load_models": "models.loading",
    "ImageEncoder": "models.encoder",
    "TorchImageEncoder": "models.encoder",
    "EncoderUnavailable": "models.encoder",
    "make_encoder": "models.encoder",
    "export_encoder": "models.encoder",
    "build_engine": "models.encoder",
    "tensorrt_problem": "models.encoder",
    "StreamingTracker": "models.streaming_tracker",
    "TrackerConfig": "models.streaming_tracker",
    "FrameOutputs": "models.predictor",
    "PredictorError": "models.predictor",
    "PromptCoordinatesWarning": "models.predictor",
    "Sam3VideoPredictor": "models.predictor",
    "UnknownSessionError": "models.predictor",
}

if TYPE_CHECKING:
    from models.devices import resolve_device
    from models.encoder import (
        EncoderUnavailable,
        ImageEncoder,
        TorchImageEncoder,
        build_engine,
        export_encoder,
        make_encoder,
        tensorrt_problem,
    )
    from models.loading import Sam3Models, load_models
    from models.model_names import BUILTIN_MODELS, DEFAULT_MODEL, ModelLoadError, check_model_name
    from models.predictor import (
        FrameOutputs,
        PredictorError,
        PromptCoordinatesWarning,
        Sam3VideoPredictor,
        UnknownSessionError,
    )
    from models.streaming_tracker import StreamingTracker, TrackerConfig


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "ENCODER_NAMES",
    "ENCODER_PRECISIONS",
    "EXPORT_PRECISIONS",
    "EncoderUnavailable",
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
    "PromptCoordinatesWarning",
    "PromptFailure",
    "Sam3Models",
    "Sam3VideoPredictor",
    "StreamingTracker",
    "TorchImageEncoder",
    "TrackerConfig",
    "UnknownSessionError",
    "build_engine",
    "check_encoder_choice",
    "check_model_name",
    "check_frame",
    "export_encoder",
    "load_models",
    "make_encoder",
    "resolve_device",
    "tensorrt_problem",
]
