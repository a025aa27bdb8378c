"""Trackers on Ray (``sam3-stream cluster``): streams placed on trackers with spare frame budget, moved
when a tracker dies, rebalanced when one is added, drained when one is removed.

Ray is the control plane only; frames, results and prompts stay on ZeroMQ as elsewhere:

- :mod:`streamer.cluster.placement`: where streams go (pure functions over measured loads).
- :mod:`streamer.cluster.tracker_actor`: one tracker service per actor, serving the streams assigned to it.
- :mod:`streamer.cluster.registry`: the registry actor (stream -> tracker map, failure detection, moves).
- :mod:`streamer.cluster.cluster`: starting or joining Ray and making the actors (what the command and tests use).
- :mod:`streamer.cluster.command`: the ``cluster`` command, its HTTP control API, ``/health``, ``/metrics``, ``/map``.
- :mod:`streamer.cluster.route`: following the map from outside Ray (robots, gateways).

``registry`` and ``cluster`` import ``ray`` (the optional extra ``ray``); ``tracker_actor`` only to find its
node's address, ``command`` only when it runs; ``placement`` and ``route`` never.
"""
