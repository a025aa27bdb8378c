"""One log format for every ``sam3-stream`` process, and the libraries' own noise kept out of it.

Quiet unless ``--log-level DEBUG``: no download or shard-loading progress bars (huggingface_hub and
transformers), no line per HTTP request of the hub client, no OpenCV warnings from probing a camera that
is not there (the capture already says so in its own words), and hub warnings printed once, in our
format: huggingface_hub adds its own stderr handler *and* propagates to the root logger, so each of its
warnings used to appear twice. The settings go into the environment too, so child processes started
after this inherit them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

__all__ = ["LOG_FORMAT", "setup_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # read by huggingface_hub (and through it transformers) at import
    "OPENCV_LOG_LEVEL": "ERROR",  # read by OpenCV when it loads
}


def setup_logging(level: str) -> None:
    """Log at ``level`` (a ``logging`` level name) to stderr in :data:`LOG_FORMAT`; quiet the libraries
    unless ``level`` is ``DEBUG``. A variable the user set in the environment is left as it is."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    if level == "DEBUG":
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if "cv2" in sys.modules:  # imported already (the capture's sources): the variable came too late
        cv2 = sys.modules["cv2"]
        with contextlib.suppress(AttributeError):
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    with contextlib.suppress(ImportError):  # a capture-only install may lack it
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hub_logging

        disable_progress_bars()
        hub_root = hub_logging.get_logger()
        for handler in list(hub_root.handlers):  # its own handler: every warning was printed twice
            hub_root.removeHandler(handler)
        hub_root.propagate = True
    for name in ("httpx", "httpx2", "httpcore"):  # the hub client's HTTP stack logs every request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
