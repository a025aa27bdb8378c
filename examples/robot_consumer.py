"""A robot's view of the tracker: subscribe to its results and act on the newest one.

The tracker publishes, on its results endpoint (ZeroMQ PUB), one ``result`` message per tracked frame
(objects with id, score, pixel box, label and a COCO-RLE mask), ``event`` messages and a ``status``
heartbeat every 0.5 s, each under a topic (``streamer.topics``). This consumer subscribes to the
heartbeats and to the results *without* the frame (and, with ``--stream``, of that camera only), so
the tracker never sends it pixels: a 1080p30 camera's frames would be ~187 MB/s it has no use for. It
keeps only the newest result of each camera after each poll (the ZeroMQ guide's latest-value pattern), so
it never acts on a stale frame. Subscribe with ``frames=True`` to get each result with its frame instead.

    sam3-stream run --model facebook/sam3 --source 0 --prompt person      # prints the results endpoint
    python examples/robot_consumer.py --results-endpoint ipc:///tmp/sam3-stream-XXXX/results
    python examples/robot_consumer.py --results-endpoint tcp://gpu-server:5556 --stream cam0

Prompts go the other way, to the tracker's control endpoint, with ``streamer.transport.PromptClient``.

With trackers on a cluster (``sam3-stream cluster``), name the stream and follow the cluster's map instead
of a tracker: the robot subscribes to every tracker and keeps receiving its stream across moves (a tracker
killed, the cluster rebalanced), after a short gap.

    python examples/robot_consumer.py --map-url http://127.0.0.1:8470/map --stream cam0

A tracker on another host runs with CURVE keys: give this robot a key folder made by
``sam3-stream keys DIR --client robot1`` (copy ``DIR/exported/robot1`` here) and pass ``--keys`` (or set
``SAM3_STREAM_KEYS``). The socket heals: a peer that breaks the connection (garbage, an oversized message)
gets a fresh socket, so a tracker restarted later is heard again.
"""

from __future__ import annotations

import argparse
import logging
import time

from streamer import security
from streamer.cluster.route import MapSubscriber
from streamer.healing import CHECK_INTERVAL_S, HealingSocket
from streamer.protocol import ProtocolError, decode_result, peek_kind
from streamer.topics import parse_topic
from streamer.transport import drain, results_subscriber

OFFLINE_AFTER_S = 1.5  # no heartbeat for this long: the tracker is gone


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the objects the tracker finds, newest frame only.")
    parser.add_argument("--results-endpoint", default="tcp://127.0.0.1:5556", help="the tracker's results PUB")
    parser.add_argument(
        "--map-url", default=None, help="follow a cluster's map (GET /map of 'sam3-stream cluster') instead"
    )
    parser.add_argument("--stream", default=None, help="only this camera's results (default: every camera's)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many results (default: run forever)")
    security.add_arguments(parser, binds=False)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        keys = security.key_folder_from_args(args, ["tcp://" if args.map_url else args.results_endpoint])
        curve = security.CurveClient(keys) if keys else None
    except ValueError as exc:  # names the missing or unsafe key file
        parser.error(str(exc))

    streams = [args.stream] if args.stream else None  # None: every camera's results
    if args.stream and "\0" in args.stream:
        parser.error("--stream: must not contain NUL characters")
    if args.map_url:  # every tracker of the cluster: the stream is heard wherever it is placed
        sock: HealingSocket | MapSubscriber = MapSubscriber(args.map_url, streams=streams, security=curve)
    else:
        sock = HealingSocket(
            lambda watch: results_subscriber(
                args.results_endpoint, frames=False, streams=streams, security=curve, on_created=watch
            ),
            f"results {args.results_endpoint}",
        )
    printed, last_heard = 0, time.monotonic()
    try:
        while not args.count or printed < args.count:
            newest: dict[str, list] = {}  # per camera, the newest result of this poll
            sock.check()
            for parts in drain(sock.socket, timeout_ms=int(CHECK_INTERVAL_S * 1000)):
                try:
                    kind = peek_kind(parts)
                    _prefix, stream = parse_topic(bytes(parts[0]))
                except (ProtocolError, ValueError, IndexError):
                    continue
                last_heard = time.monotonic()  # results and heartbeats both say the tracker is alive
                if kind == "result" and stream is not None:
                    newest[stream] = parts
            if time.monotonic() - last_heard > OFFLINE_AFTER_S:
                print(f"tracker offline: nothing from {args.map_url or args.results_endpoint} for {OFFLINE_AFTER_S} s")
                last_heard = time.monotonic()
            for parts in newest.values():
                try:
                    result, _ = decode_result(parts)  # masks decoded to boolean H x W arrays; no frame came
                except ProtocolError as exc:  # a malformed result is skipped, named, never fatal
                    print(f"dropped a malformed result: {exc}")
                    continue
                latency_ms = (time.time() - result.t_capture) * 1000.0
                objects = ", ".join(
                    f"#{o.obj_id} {o.label or ''} {list(o.bbox)} {o.score:.2f} "
                    f"({int(o.mask.sum()) if o.mask is not None else 0} px)"
                    for o in result.objects
                )
                print(
                    f"{result.stream} seq {result.seq}: {len(result.objects)} objects, {latency_ms:.0f} ms after "
                    f"capture: {objects or '-'}",
                    flush=True,
                )
                printed += 1
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


if __name__ == "__main__":
    main()
