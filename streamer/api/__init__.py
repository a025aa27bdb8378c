"""``sam3-stream api``: SAM 3 on files over HTTP, with the request fields of the hosted SAM 3 services.

Modules, one job each: ``config`` (settings), ``app`` (application, lifecycle, CLI), ``routes``
(handlers), ``jobspec`` (each route's fields -> a job), ``body`` (reading bounded bodies),
``inputs`` (URL / data URI / base64 / upload -> a checked file), ``fetch`` (downloads that refuse
private addresses), ``media`` (format sniffing, sizes, video probing), ``store`` (SQLite jobs and
their folders), ``worker`` (runs queued jobs), ``runner`` (one job through ``streamer.segment``, the
code ``sam3-stream segment-video`` runs too: predictor, drawing, H.264 mp4 or PNG/JPEG, RLE JSON), ``events``
(server-sent events and synchronous waits), ``views`` (response bodies), ``auth`` (API keys, signed
result URLs), ``openapi`` (the OpenAPI document), ``errors`` (the error shape).
"""

from streamer.api.app import add_arguments, config_from_args, create_app, run_from_args, serve
from streamer.api.config import ApiConfig

__all__ = ["ApiConfig", "add_arguments", "config_from_args", "create_app", "run_from_args", "serve"]
