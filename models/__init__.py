"""Everything that touches SAM 3 tensors. Knows nothing of sockets."""

from models.prompts import Prompt
from models.results import FrameResult, ObjectResult

__all__ = ["FrameResult", "ObjectResult", "Prompt"]
