"""The progress bar of the paper reproduction: one line on stderr over every run's steps, redrawn
in place from the start (while the workers are still starting) to the end, with the time left.
Silent when stderr is not a terminal, so that logs and pipes get only the results."""
from __future__ import annotations

import shutil
import sys
import time
from typing import Optional, Sequence, TextIO

REDRAW_SECONDS = 0.1


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


class ProgressBar:
    def __init__(self, totals: Sequence[int], names: Sequence[str], stream: TextIO = sys.stderr, width: int = 30,
                 live: Optional[bool] = None):
        self.totals = list(totals)
        self.names = list(names)
        self.done = [0] * len(totals)
        self.stream = stream
        self.width = width
        self.live = (hasattr(stream, "isatty") and stream.isatty()) if live is None else live
        self.start = time.perf_counter()
        self._last_draw = float("-inf")
        self._closed = False

    @property
    def fraction(self) -> float:
        return sum(self.done) / max(1, sum(self.totals))

    def update(self, run: int, step: int) -> None:
        self.done[run] = min(max(step, self.done[run]), self.totals[run])
        self.tick()

    def tick(self) -> None:
        """Redraws at most every REDRAW_SECONDS: also called while no run reports, so that the
        clock moves during the workers' start."""
        now = time.perf_counter()
        if self.live and not self._closed and now - self._last_draw >= REDRAW_SECONDS:
            self._last_draw = now
            self._draw(now)

    def line(self, now: float) -> str:
        fraction = self.fraction
        elapsed = now - self.start
        filled = int(fraction * self.width)
        finished = sum(d >= t for d, t in zip(self.done, self.totals))
        if fraction == 0:
            status = "starting"
        elif fraction < 1 and elapsed > 2:
            status = f"~{_seconds(elapsed * (1 - fraction) / fraction)} left"
        else:
            status = ""
        running = " ".join(n for n, d, t in zip(self.names, self.done, self.totals) if 0 < d < t)
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {fraction * 100:5.1f}%  "
                f"{sum(self.done)}/{sum(self.totals)} steps  {finished}/{len(self.totals)} runs  "
                f"{_seconds(elapsed)}  {status}  {running}").rstrip()

    def _draw(self, now: float) -> None:
        columns = max(20, shutil.get_terminal_size().columns - 1)  # a wrapped line cannot be redrawn by \r
        self.stream.write("\r" + self.line(now)[:columns].ljust(columns))
        self.stream.flush()

    def close(self) -> None:
        if self.live and not self._closed:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True
