"""Everything that touches SAM 3 tensors. Knows nothing of sockets."""

from models.encoder import ImageEncoder, TorchImageEncoder
from models.loading import DEFAULT_MODEL, ModelLoadError, Sam3Models, load_models
from models.prompts import Prompt
from models.results import FrameResult, ObjectResult
from models.streaming_tracker import StreamingTracker, TrackerConfig

__all__ = [
    "DEFAULT_MODEL",
    "FrameResult",
    "ImageEncoder",
    "ModelLoadError",
    "ObjectResult",
    "Prompt",
    "Sam3Models",
    "StreamingTracker",
    "TorchImageEncoder",
    "TrackerConfig",
    "load_models",
]
