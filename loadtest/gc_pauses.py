"""`walletd` with every garbage collection timed: where the POST latency tail came from.

    python -m loadtest.gc_pauses OUT.json serve --port 18401 --data-dir /tmp/d ...

Runs walletd's own CLI in this process with a ``gc.callbacks`` hook that records, per
collection, its generation, wall and CPU milliseconds and how many objects it freed, and
rewrites OUT.json every 2 s (the last PAUSES_MAX collections, the collector's thresholds,
the object count per generation, the frozen count). Drive load at it (wrk, loadtest.bench
--url) and read the file: `summarize(path)` prints one line per generation.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "summarize"]

PAUSES_MAX = 20_000
DUMP_INTERVAL_S = 2.0


class _Recorder:
    def __init__(self) -> None:
        self.pauses: list[tuple[int, float, float, int]] = []
        self._wall = 0.0
        self._cpu = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._wall, self._cpu = time.perf_counter(), time.thread_time()
            return
        wall_ms = (time.perf_counter() - self._wall) * 1000
        cpu_ms = (time.thread_time() - self._cpu) * 1000
        self.pauses.append((int(info["generation"]), wall_ms, cpu_ms, int(info["collected"])))
        del self.pauses[:-PAUSES_MAX]


def _dump(recorder: _Recorder, out: Path) -> None:
    while True:
        time.sleep(DUMP_INTERVAL_S)
        state = {
            "pauses": list(recorder.pauses),
            "threshold": gc.get_threshold(),
            "objects": [len(gc.get_objects(generation=g)) for g in range(3)],
            "frozen": gc.get_freeze_count(),
        }
        out.write_text(json.dumps(state))


def summarize(path: Path) -> list[str]:
    """One line per generation: count, wall and CPU ms (median, max), CPU ms in all."""
    state = json.loads(path.read_text())
    lines = []
    for generation in range(3):
        rows = [p for p in state["pauses"] if p[0] == generation]
        if not rows:
            continue
        wall = [p[1] for p in rows]
        cpu = [p[2] for p in rows]
        lines.append(
            f"gen {generation}: {len(rows)} collections, wall ms median"
            f" {statistics.median(wall):.1f} max {max(wall):.1f}, CPU ms median"
            f" {statistics.median(cpu):.1f} max {max(cpu):.1f} total {sum(cpu):.0f},"
            f" freed {sum(p[3] for p in rows)}"
        )
    lines.append(
        f"objects per generation {state['objects']}, frozen {state['frozen']},"
        f" thresholds {state['threshold']}"
    )
    return lines


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "--summarize":
        print(*summarize(Path(sys.argv[2])), sep="\n")
        return 0
    out = Path(sys.argv.pop(1))
    recorder = _Recorder()
    gc.callbacks.append(recorder)
    threading.Thread(target=_dump, args=(recorder, out), daemon=True).start()
    from walletd.cli.main import main as walletd_main

    return walletd_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
