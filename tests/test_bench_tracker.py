"""The tracker benchmark runs end to end and reports the object curve (a few frames, tiny model)."""

from __future__ import annotations

import importlib.util
import json

from helpers import REPO

SCRIPT = REPO / "scripts" / "bench_tracker.py"


def test_bench_tracker_reports_a_curve_of_batched_unbatched_and_baseline(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_tracker", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--frames", "3", "--objects", "1", "8", "--width", "96", "--height", "72"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert report["curve"]["objects"] == [1, 8]
    for kind in ("batched", "unbatched", "baseline"):
        assert len(report["curve"][f"{kind}_p50_ms"]) == 2
        assert report["curve"][f"{kind}_p50_8_over_1"] > 0
    assert [run["objects"] for run in report["runs"]] == [1, 8]
    assert "batched_vs_baseline" in report["runs"][1]
