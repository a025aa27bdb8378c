"""The gateway following a cluster's map: the stream it shows stays on screen when it moves to another
tracker (a tracker died, the cluster was rebalanced). See :mod:`streamer.cluster.route`."""

from __future__ import annotations

import asyncio
import logging

from streamer.cluster.route import fetch_map
from streamer.gateway.feed import ResultFeed
from streamer.healing import CauseLog
from streamer.transport import AsyncPromptClient

__all__ = ["MAP_REFRESH_S", "follow_map"]

log = logging.getLogger(__name__)

MAP_REFRESH_S = 0.5


async def follow_map(
    map_url: str, stream: str | None, feed: ResultFeed, client: AsyncPromptClient, refresh_s: float = MAP_REFRESH_S
) -> None:
    """Every ``refresh_s``, read the map and point ``feed`` (results) and ``client`` (prompts) at the tracker
    holding ``stream``. Runs until cancelled; a map that cannot be read keeps the last route."""
    errors = CauseLog(f"map {map_url}")
    known: str | None = None  # the tracker followed; None until the first route
    while True:
        try:
            route = (await asyncio.to_thread(fetch_map, map_url, refresh_s * 4)).route(stream or "")
        except (OSError, ValueError) as exc:
            errors.count("map not read; following the last route", detail=str(exc))
            route = None
        errors.flush()
        if route is not None and (route.tracker != known or route.results_endpoint != feed.endpoint):
            # A prompt sent after this goes to the new holder: each request opens its socket on client.endpoint.
            client.endpoint = route.control_endpoint
            feed.retarget(route.results_endpoint, route.tracker if known is not None else None)
            known = route.tracker
        await asyncio.sleep(refresh_s)
