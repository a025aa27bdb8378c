"""A robot's view of the tracker: subscribe to its results and act on the newest one.

The tracker publishes, on its results endpoint (ZeroMQ PUB), one ``result`` message per tracked frame
(objects with id, score, pixel box, label and a COCO-RLE mask, plus the frame itself) and a
``status`` heartbeat every 0.5 s. A consumer connects a SUB socket, and after each poll keeps only
the newest result of each stream (the ZeroMQ guide's latest-value pattern), so it never acts on a stale frame.

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
from streamer.protocol import ProtocolError, decode_result, peek_json_field, peek_kind
from streamer.transport import drain, results_subscriber

OFFLINE_AFTER_S = 1.5  # no heartbeat for this long: the tracker is gone


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the objects the tracker finds, newest frame only.")
    parser.add_argument("--results-endpoint", default="tcp://127.0.0.1:5556", help="the tracker's results PUB")
    parser.add_argument(
        "--map-url", default=None, help="follow a cluster's map (GET /map of 'sam3-stream cluster') instead"
    )
    parser.add_argument("--stream", default=None, help="only this camera's results (default: all)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many results (default: run forever)")
    security.add_arguments(parser, binds=False)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        keys = security.key_folder_from_args(args, ["tcp://" if args.map_url else args.results_endpoint])
        curve = security.CurveClient(keys) if keys else None
    except ValueError as exc:  # names the missing or unsafe key file
        parser.error(str(exc))

    if args.map_url:
        sock: HealingSocket | MapSubscriber = MapSubscriber(args.map_url, security=curve)
    else:
        sock = HealingSocket(
            lambda: results_subscriber(args.results_endpoint, security=curve), f"results {args.results_endpoint}"
        )
    printed, last_heard = 0, time.monotonic()
    try:
        while not args.count or printed < args.count:
            newest: dict[str, list] = {}  # per stream, the newest result of this poll
            sock.check()
            for parts in drain(sock.socket, timeout_ms=int(CHECK_INTERVAL_S * 1000)):
                try:
                    kind = peek_kind(parts)
                    stream = peek_json_field(bytes(parts[0]).decode("utf-8", "replace"), "stream")
                except (ProtocolError, IndexError):
                    continue
                last_heard = time.monotonic()  # results and heartbeats both say the tracker is alive
                if kind == "result" and isinstance(stream, str) and args.stream in (None, stream):
                    newest[stream] = parts
            if time.monotonic() - last_heard > OFFLINE_AFTER_S:
                print(f"tracker offline: nothing from {args.map_url or args.results_endpoint} for {OFFLINE_AFTER_S} s")
                last_heard = time.monotonic()
            for parts in newest.values():
                try:
                    result, _frame = decode_result(parts)  # masks decoded to boolean H x W arrays
                except ProtocolError:
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
