"""The gateway: composited WebRTC video of the tracker's results, prompts in over a data channel.

aiohttp serves the operator page, signaling (``POST /offer``), ``/health`` and ``/metrics``;
aiortc carries the video and the ``prompts`` data channel. Modules, one concept each:
``config`` (settings), ``feed`` (results subscription and live/no-signal/offline state),
``webrtc`` (peer connections, the composited track), ``prompts`` (data channel -> control socket),
``ice`` (which addresses ICE offers), ``access`` (Host/Origin checks, token, login), ``memory`` (giving
memory back after viewers leave), ``app`` (routes, lifecycle, CLI).
"""

from streamer.gateway.access import TOKEN_ENV, check_exposure
from streamer.gateway.app import (
    add_access_arguments,
    add_arguments,
    config_from_args,
    create_app,
    run_from_args,
    run_gateway,
    token_from_args,
)
from streamer.gateway.config import GatewayConfig

__all__ = [
    "TOKEN_ENV",
    "GatewayConfig",
    "add_access_arguments",
    "add_arguments",
    "check_exposure",
    "config_from_args",
    "create_app",
    "run_from_args",
    "run_gateway",
    "token_from_args",
]
