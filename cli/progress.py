"""Progress of a long operator command (seed, verify, restore): a bar on a terminal, a line
in the log otherwise.

    seed   ━━━━━━━━━━━━━━━━╸━━━━━━━━━━━━━━━━━━━  45%  450,000/1,000,000 wallets  6,210/s  ETA 1:28

On a terminal the bar is redrawn in place at most ``redraw_s`` apart; anywhere else (a
log file, a container's output) one plain line is logged at most ``log_every_s`` apart, so
a minutes-long command shows it is alive without flooding the log. The rendering functions
are pure (time is passed in), so tests check them exactly.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Final, TextIO

__all__ = ["Progress", "render_bar", "render_line"]

_log = logging.getLogger("walletd.progress")

BAR_WIDTH: Final = 30
REDRAW_S: Final = 0.1
LOG_EVERY_S: Final = 10.0
# The rate is over the whole run: commands here go at a steady pace, and a whole-run
# average keeps the ETA from jumping with each chunk.
_FILLED: Final = "━"
_EMPTY: Final = "─"


def _duration(seconds: float) -> str:
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _figures(done: int, total: int | None, unit: str, elapsed_s: float) -> list[str]:
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    parts = [f"{done:,}/{total:,} {unit}" if total is not None else f"{done:,} {unit}"]
    if done == 0 and elapsed_s > 0:
        return [*parts, f"running {_duration(elapsed_s)}"]  # no rate yet, so no ETA
    parts.append(f"{rate:,.0f}/s" if rate >= 10 else f"{rate:.1f}/s")  # restore: 0.2/s
    if total is not None and done < total:
        parts.append(f"ETA {_duration((total - done) / rate)}" if rate > 0 else "ETA ?")
    else:
        parts.append(f"in {_duration(elapsed_s)}")
    return parts


def render_bar(
    label: str, done: int, total: int | None, unit: str, elapsed_s: float, width: int = BAR_WIDTH
) -> str:
    """One terminal line: label, bar, percentage, counts, rate, ETA (or elapsed when done)."""
    if total:
        fraction = min(1.0, done / total)
        filled = int(fraction * width)
        bar = _FILLED * filled + _EMPTY * (width - filled)
        head = f"{label:<7} {bar} {fraction:4.0%}"
    else:
        head = f"{label:<7}"
    return "  ".join([head, *_figures(done, total, unit, elapsed_s)])


def render_line(label: str, done: int, total: int | None, unit: str, elapsed_s: float) -> str:
    """One log line: ``verify: 450,000/1,000,000 wallets (45%), 6,210/s, ETA 1:28``."""
    figures = _figures(done, total, unit, elapsed_s)
    if total:
        figures[0] += f" ({min(1.0, done / total):.0%})"
    return f"{label}: " + ", ".join(figures)


class Progress:
    """Counts units of work done and shows them; call ``advance`` often, ``finish`` once."""

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str,
        *,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        redraw_s: float = REDRAW_S,
        log_every_s: float = LOG_EVERY_S,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self._terminal = self._stream.isatty() if terminal is None else terminal
        self._clock = clock
        self._started_s = clock()
        self._every_s = redraw_s if self._terminal else log_every_s
        self._shown_s = self._started_s

    def set_total(self, total: int | None) -> None:
        self.total = total

    def advance(self, units: int) -> None:
        self.done += units
        now_s = self._clock()
        if now_s - self._shown_s >= self._every_s:
            self._shown_s = now_s
            self._show(now_s)

    def tick(self) -> None:
        """Shows the elapsed time while one long step runs (restore's one statement)."""
        self.advance(0)

    def finish(self) -> None:
        """The last figures; on a terminal the bar's line is ended."""
        if self.total is not None:
            self.total = max(self.total, self.done)
        now_s = self._clock()
        if self._terminal:
            self._show(now_s)
            self._stream.write("\n")
            self._stream.flush()
        elif now_s - self._started_s >= self._every_s:
            self._show(now_s)  # short runs log nothing but their summary

    def _show(self, now_s: float) -> None:
        elapsed_s = now_s - self._started_s
        if self._terminal:
            line = render_bar(self.label, self.done, self.total, self.unit, elapsed_s)
            self._stream.write("\r\x1b[2K" + line)  # carriage return, clear the line
            self._stream.flush()
        else:
            _log.info("%s", render_line(self.label, self.done, self.total, self.unit, elapsed_s))
