"""Progress of long loops, written to the job's log.

    with progress("swap: variants", total=len(pairs), unit="sequences") as bar:
        for ...:
            ...
            bar.update()

    for batch in track(batches, "extract activations", total=n, weight=len, unit="sequences"):
        ...

Lines go through :mod:`logging` (logger ``layerscope.progress``, level INFO); in a workflow job
:func:`layerscope.jobs.runtime.job` sends logging to the rule's log file under ``results/logs/``.
At most one line every ``interval`` seconds (the environment variable
``LAYERSCOPE_PROGRESS_SECONDS``, default 5; 0 logs every update) says how far the loop is —
done/total, percent, rate, elapsed time and an estimate of the time left —, and one final line
gives the total time::

    swap: variants 120/435 sequences (27.6%), 3.41/s, elapsed 35s, ETA 1m32s
    swap: variants done: 435/435 sequences in 2m07s (3.42/s)

Nothing is drawn on a terminal (Snakemake interleaves the jobs' stderr). Libraries that take a
tqdm factory (vLLM's ``use_tqdm=``) get one from :func:`tqdm_factory`, which reports the same way.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)

ENV = "LAYERSCOPE_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 5.0

T = TypeVar("T")


def progress_interval() -> float:
    """Seconds between progress lines: ``$LAYERSCOPE_PROGRESS_SECONDS``, else 5 (an unreadable value: 5)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        log.warning("%s=%r is not a number of seconds ≥ 0: progress every %gs", ENV, raw, DEFAULT_INTERVAL)
        return DEFAULT_INTERVAL
    return value


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h03m."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _count(x: float) -> str:
    return str(int(round(x))) if abs(x - round(x)) < 1e-9 else f"{x:.1f}"


def _rate(rate: float) -> str:
    if rate <= 0:
        return "0/s"
    text = f"{rate:.0f}/s" if rate >= 100 else f"{rate:.3g}/s"
    return text if rate >= 1 else f"{text} ({duration(1 / rate)} each)"


class Progress:
    """A throttled progress reporter (see module docstring). ``done`` may be fractional (a sweep
    over several groups of prompts reports sequences as it finishes each group's share)."""

    def __init__(self, label: str, total: float | None = None, *, unit: str = "", interval: float | None = None,
                 logger: logging.Logger | None = None, clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.total = None if total is None else float(total)
        self.unit = unit
        self.interval = progress_interval() if interval is None else max(0.0, float(interval))
        self.logger = logger or log
        self.clock = clock
        self.done = 0.0
        self.started = clock()
        self._last_line = self.started
        self.closed = False

    # ------------------------------------------------------------------ counting

    def update(self, n: float = 1) -> None:
        """``n`` more items done."""
        self.set(self.done + n)

    def set(self, done: float) -> None:
        """``done`` items done in all (never decreases what is reported)."""
        self.done = max(self.done, float(done))
        now = self.clock()
        if not self.closed and now - self._last_line >= self.interval:
            self._last_line = now
            self.logger.info("%s", self.line(now))

    # ------------------------------------------------------------------ lines

    def _of(self) -> str:
        of = _count(self.done) + (f"/{_count(self.total)}" if self.total is not None else "")
        return f"{of} {self.unit}" if self.unit else of

    def line(self, now: float | None = None) -> str:
        """The progress line at ``now``: done/total, percent, rate, elapsed time, ETA."""
        elapsed = (self.clock() if now is None else now) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.label} {self._of()}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.1f}%)"
        parts += [_rate(rate), f"elapsed {duration(elapsed)}"]
        if self.total is not None:
            left = max(0.0, self.total - self.done)
            parts.append(f"ETA {duration(left / rate) if rate > 0 else '?'}" if left else "ETA 0s")
        return ", ".join(parts)

    def close(self, error: BaseException | None = None) -> None:
        """Log the final line (once): the total time, or where the loop stopped."""
        if self.closed:
            return
        self.closed = True
        elapsed = self.clock() - self.started
        rate = f" ({_rate(self.done / elapsed)})" if elapsed > 0 else ""
        if error is None:
            self.logger.info("%s done: %s in %s%s", self.label, self._of(), duration(elapsed), rate)
        else:
            why = "" if isinstance(error, GeneratorExit) else f" ({type(error).__name__})"
            self.logger.info("%s stopped at %s after %s%s", self.label, self._of(), duration(elapsed), why)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)


def progress(label: str, total: float | None = None, *, unit: str = "", interval: float | None = None) -> Progress:
    """A :class:`Progress` for ``total`` items (None: unknown), to use as a context manager."""
    return Progress(label, total, unit=unit, interval=interval)


def track(iterable: Iterable[T], label: str, total: float | None = None, *, unit: str = "",
          weight: Callable[[T], float] | None = None, interval: float | None = None) -> Iterator[T]:
    """Iterate ``iterable``, counting an item done when the loop asks for the next one.

    ``total`` defaults to ``len(iterable)`` when it has one and ``weight`` is None; ``weight(item)``
    is how many units an item counts for (e.g. ``len`` of a batch, with ``total`` in sequences).
    """
    if total is None and weight is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with progress(label, total, unit=unit, interval=interval) as bar:
        for item in iterable:
            yield item
            bar.update(1 if weight is None else weight(item))


def tqdm_factory(label: str, *, unit: str = "", interval: float | None = None) -> Callable[..., Any]:
    """A tqdm class for libraries that take one (vLLM: ``llm.generate(..., use_tqdm=tqdm_factory(...))``):
    it draws nothing and reports through :class:`Progress` as ``"{label}: {desc}"``."""
    from tqdm import tqdm

    class _Null:
        def write(self, s):
            return None

        def flush(self):
            return None

    class LoggingTqdm(tqdm):
        monitor_interval = 0  # no monitor thread

        def __init__(self, *args, **kwargs):
            desc = kwargs.get("desc") or ""
            kwargs.update(file=_Null(), disable=False, mininterval=0, miniters=1, dynamic_ncols=False, ncols=80,
                          leave=False)
            self._progress = None
            super().__init__(*args, **kwargs)
            self._progress = Progress(f"{label}: {desc}" if desc else label, self.total, unit=unit, interval=interval)

        def update(self, n=1):
            displayed = super().update(n)
            if self._progress is not None:
                self._progress.set(self.n)
            return displayed

        def display(self, msg=None, pos=None):
            return True

        def close(self):
            super().close()
            if getattr(self, "_progress", None) is not None:
                self._progress.close()

    return LoggingTqdm
