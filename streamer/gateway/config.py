"""The gateway's settings, in one place for the CLI, the app factory and the tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamer.compositor import CompositeStyle
from streamer.config import GATEWAY_HTTP_HOST, GATEWAY_HTTP_PORT, Endpoints
from streamer.keys import KeyFolder

DEFAULT_RESULTS_ENDPOINT = Endpoints.tcp_defaults().results
DEFAULT_CONTROL_ENDPOINT = Endpoints.tcp_defaults().control


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens, which tracker it follows, and how it draws.

    - ``stream_id``: the capture stream to show and to prompt; ``None`` follows the first stream
      results arrive for (fine with one camera; name it when the tracker serves several).
    - ``ice_hosts``: addresses offered as ICE host candidates (see ``streamer.gateway.ice``);
      ``"auto"`` adds aioice's own interface addresses (for viewers on other machines).
    - ``ice_servers``: STUN/TURN URLs; none by default, since a STUN look-up only delays
      gathering on a box without internet.
    - ``max_viewers``: more are refused (HTTP 503). Frames are encoded once for all viewers, so a viewer
      costs its packets' sending and encryption, not an encode. A viewer holds its slot from its offer
      on, so one whose peer connection has not connected within ``connect_timeout_s`` (or fails, or
      closes) is closed and its slot freed.
    - ``max_body_bytes``: the largest HTTP request body taken (an offer is a few kB).
    - ``token``: when set, the page, ``/offer`` and ``/metrics`` need it (see ``streamer.gateway.access``).
    - ``insecure``: serve an address other machines can reach without a token (refused otherwise).
    - ``allowed_hosts``: host names the page may be reached by, besides ``http_host``, localhost and
      loopback addresses; any other ``Host`` header is refused (DNS rebinding).
    - ``prompt_timeout_s`` / ``prompt_tries``: the lazy pirate client's wait per try and tries.
    - ``no_signal_after_s`` / ``offline_after_s``: silence that turns the feed state from live to
      no_signal (heartbeats but no results) and to tracker_offline (no heartbeats either).
    - ``video_bitrate``: bits per second of the shared video encode; ``None``: by frame size (about 1.4 Mb/s
      at 720p, 3.1 Mb/s at 1080p).
    - ``map_url``: a cluster's map (``sam3-stream cluster``'s ``/map``): the stream's results and control
      endpoints follow it as the stream moves between trackers (``stream_id`` required).
    - ``frames_endpoint``: the captures' frames PUB; with it the page offers the smooth view (camera rate,
      newest masks marked as held: ``streamer.gateway.camera``); ``None``: the exact view only.
    - ``keys``: CURVE keys for tcp:// results and control endpoints (``streamer.security``); ``None``: plain.
    """

    results_endpoint: str = DEFAULT_RESULTS_ENDPOINT
    control_endpoint: str = DEFAULT_CONTROL_ENDPOINT
    stream_id: str | None = None
    http_host: str = GATEWAY_HTTP_HOST
    http_port: int = GATEWAY_HTTP_PORT
    ice_hosts: tuple[str, ...] = ("127.0.0.1",)
    ice_servers: tuple[str, ...] = ()
    max_viewers: int = 8
    connect_timeout_s: float = 5.0
    max_body_bytes: int = 64 * 1024
    token: str | None = field(default=None, repr=False)  # never in logs
    insecure: bool = False
    allowed_hosts: tuple[str, ...] = ()
    prompt_timeout_s: float = 1.5
    prompt_tries: int = 2
    no_signal_after_s: float = 1.0
    offline_after_s: float = 1.5
    banner_fps: float = 10.0
    style: CompositeStyle = field(default_factory=CompositeStyle)
    video_bitrate: int | None = None
    frames_endpoint: str | None = None
    keys: KeyFolder | None = None
    map_url: str | None = None
