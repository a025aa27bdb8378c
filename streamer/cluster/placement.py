"""Where streams go: placement, rebalancing and draining over measured loads (pure functions).

A tracker has one tracking thread, so its frame budget is one second of work per second. A stream's
*cost* is the share of that budget it needs: the measured seconds per tracked frame (its prompts and
objects included) times its camera's frame rate (so an overloaded tracker, which skips frames, still
shows what its streams need); a stream not measured yet counts at the mean measured cost (a new camera
is assumed to be like the others). A tracker's *spare* budget is its capacity less its streams' costs.
Counting streams instead would put a 30 fps camera with ten objects on a par with an idle 1 fps one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["DEFAULT_STREAM_COST", "Move", "TrackerLoad", "drain_moves", "estimate_cost", "place", "rebalance"]

DEFAULT_STREAM_COST = 0.05  # share of a frame budget assumed for a stream when nothing was measured yet


@dataclass
class TrackerLoad:
    """One tracker as placement sees it: its streams' costs (``None``: not measured yet) and its capacity."""

    name: str
    streams: dict[str, float | None] = field(default_factory=dict)
    capacity: float = 1.0

    def load(self, unmeasured: float) -> float:
        """Seconds of work per second, counting unmeasured streams at ``unmeasured``."""
        return sum(unmeasured if cost is None else cost for cost in self.streams.values())

    def spare(self, unmeasured: float) -> float:
        """Frame budget left (negative: overloaded, frames are being skipped)."""
        return self.capacity - self.load(unmeasured)


@dataclass(frozen=True)
class Move:
    """Take ``stream`` from ``source`` (``None``: nobody holds it) to ``target``."""

    stream: str
    source: str | None
    target: str


def estimate_cost(trackers: Sequence[TrackerLoad]) -> float:
    """The cost assumed for an unmeasured stream: the mean measured cost, else :data:`DEFAULT_STREAM_COST`."""
    measured = [cost for t in trackers for cost in t.streams.values() if cost is not None]
    return sum(measured) / len(measured) if measured else DEFAULT_STREAM_COST


def place(trackers: Sequence[TrackerLoad], unmeasured: float | None = None) -> str:
    """The tracker with the most spare budget (ties: fewer streams, then name). ``ValueError`` if none."""
    if not trackers:
        raise ValueError("trackers: none is available to place a stream on")
    cost = estimate_cost(trackers) if unmeasured is None else unmeasured
    return min(trackers, key=lambda t: (-t.spare(cost), len(t.streams), t.name)).name


def drain_moves(trackers: Sequence[TrackerLoad], leaving: str) -> list[Move]:
    """Moves taking every stream off ``leaving`` (costliest first) to the others, each to the most spare."""
    cost = estimate_cost(trackers)
    others = [TrackerLoad(t.name, dict(t.streams), t.capacity) for t in trackers if t.name != leaving]
    source = next((t for t in trackers if t.name == leaving), None)
    if source is None or not source.streams:
        return []
    moves = []
    for stream, stream_cost in sorted(source.streams.items(), key=lambda item: -(item[1] or cost)):
        target = place(others, cost)
        next(t for t in others if t.name == target).streams[stream] = stream_cost
        moves.append(Move(stream, leaving, target))
    return moves


def rebalance(trackers: Sequence[TrackerLoad], max_moves: int = 64, margin: float = 0.0) -> list[Move]:
    """Moves that even out the loads, fewest first: take a stream from the busiest tracker to the least busy
    while that narrows the gap between them (a stream costing ``c`` moves only when the gap exceeds
    ``c + margin``, so a balanced cluster stays put and streams that need not move are left alone; a margin
    keeps measurement noise from moving streams back and forth)."""
    cost = estimate_cost(trackers)
    loads = [TrackerLoad(t.name, dict(t.streams), t.capacity) for t in trackers]
    moves: list[Move] = []
    while len(loads) > 1 and len(moves) < max_moves:
        busiest = max(loads, key=lambda t: (t.load(cost) / t.capacity, t.name))
        idlest = min(loads, key=lambda t: (t.load(cost) / t.capacity, t.name))
        gap = busiest.load(cost) - idlest.load(cost)
        movable = _cheapest_over(busiest.streams, cost, gap - margin)
        if busiest is idlest or movable is None:
            break
        idlest.streams[movable] = busiest.streams.pop(movable)
        moves.append(Move(movable, busiest.name, idlest.name))
    return _collapse(moves)


def _cheapest_over(streams: Mapping[str, float | None], unmeasured: float, gap: float) -> str | None:
    """The stream whose move narrows ``gap`` most (cost nearest half the gap), among those costing under it."""
    fitting = [(abs((unmeasured if c is None else c) - gap / 2), s) for s, c in streams.items()]
    fitting = [(d, s) for d, s in fitting if (unmeasured if streams[s] is None else streams[s]) < gap - 1e-9]
    return min(fitting)[1] if fitting else None


def _collapse(moves: list[Move]) -> list[Move]:
    """One move per stream, from where it is to where it ends (a stream moved twice in the plan moves once)."""
    first: dict[str, Move] = {}
    for move in moves:
        start = first.get(move.stream)
        first[move.stream] = Move(move.stream, start.source if start else move.source, move.target)
    return [m for m in first.values() if m.source != m.target]
