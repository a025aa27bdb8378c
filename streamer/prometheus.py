"""Prometheus text exposition: ``# HELP``/``# TYPE`` lines and samples, label values escaped."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["PrometheusText"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class PrometheusText:
    """Collects metrics named ``{prefix}_{name}``; :meth:`text` is the response body."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        """One metric: ``kind`` ``counter`` or ``gauge``; each sample is (labels, value)."""
        full = f"{self.prefix}_{name}"
        self.lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
        for labels, value in samples:
            shown = ",".join(f'{key}="{_escape(str(v))}"' for key, v in labels.items())
            self.lines.append(f"{full}{{{shown}}} {value:g}" if shown else f"{full} {value:g}")

    def text(self) -> str:
        """The exposition, newline-terminated."""
        return "\n".join(self.lines) + "\n"
