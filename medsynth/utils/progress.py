"""Progress of long training loops (a family's fit, a downstream U-Net): an announcement of the expected
length up front, then a tqdm bar or whole log lines.

- **Announcement.** After the first ``ANNOUNCE_STEPS`` iterations one INFO line says how long the whole loop
  will take, e.g. ``fit vae: 1500 steps × batch 32 on cpu; expected ≈ 4.6 min (2.1 s for the first 5
  steps)``: the user learns within seconds whether to wait or to lower ``steps``.
- **A bar or lines.** A tqdm bar is drawn only where it cannot collide with another one: in the main thread of
  the main process, with stderr on a terminal, and when no other bar of this module is open. Everywhere else
  (the worker threads of Prefect's thread-pool task runner, Dask worker processes, a log file or pipe) the
  loop writes one whole log line every ``LOG_EVERY_S`` seconds instead, each naming its loop (``U-Net
  real+gmm n=6 seed 1: step 150/300 (50 %) …``). Concurrent U-Net seeds therefore never garble each other's
  bar: lines from several loops interleave as whole, attributable lines.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: Iterations timed for the announcement of the expected length.
ANNOUNCE_STEPS = 5
#: Seconds between two progress log lines when no bar is drawn.
LOG_EVERY_S = 30.0

_BARS = {"open": 0}
_BARS_LOCK = threading.Lock()


def format_seconds(seconds: float) -> str:
    """``42 s``, ``4.6 min`` or ``2.3 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def bar_allowed() -> bool:
    """A tqdm bar here would be the only writer of its terminal line: main thread, main process, stderr a TTY."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if multiprocessing.parent_process() is not None:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class Progress:
    """Progress of one loop of ``total`` iterations (``initial`` already done, e.g. resumed from a checkpoint).

    ``label`` names the loop in every line (``fit vae``, ``U-Net real+gmm n=6 seed 1``); ``what`` describes the
    work for the announcement (``1500 steps × batch 32 on cpu``). ``enabled=False`` draws no bar and writes no
    progress lines, but still announces the expected length. Call :meth:`update` after every iteration and
    :meth:`close` at the end (or use it as a context manager)."""

    def __init__(
        self,
        total: int,
        label: str,
        what: str,
        *,
        initial: int = 0,
        enabled: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        if total < 0 or initial < 0:
            raise ValueError(f"total / initial: must be >= 0, got {total} / {initial}")
        self.total, self.label, self.what, self.initial = int(total), label, what, int(initial)
        self.enabled = enabled
        self.log = logger or log
        self.done = self.initial
        self._t0 = time.perf_counter()
        self._last_line = self._t0
        self._bar = None
        self._redirect = None
        with _BARS_LOCK:
            use_bar = enabled and _BARS["open"] == 0 and bar_allowed()
            if use_bar:
                _BARS["open"] += 1
        if use_bar:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # log lines written while the bar is open go through tqdm.write: above the bar, never through it
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._bar = tqdm(total=self.total, initial=self.initial, desc=label, leave=False, mininterval=1.0)

    @property
    def bar(self) -> bool:
        """Whether a tqdm bar is drawn (else progress goes to log lines)."""
        return self._bar is not None

    def update(self, postfix: Mapping[str, float] | None = None) -> None:
        """One more iteration done; ``postfix``: values shown on the bar / in the line (e.g. the loss)."""
        self.done += 1
        ran = self.done - self.initial
        now = time.perf_counter()
        remaining = self.total - self.initial
        if ran == ANNOUNCE_STEPS and remaining > ANNOUNCE_STEPS:
            elapsed = now - self._t0
            self.log.info(
                "%s: %s; expected ≈ %s (%s for the first %d steps)",
                self.label, self.what, format_seconds(elapsed / ran * remaining), format_seconds(elapsed), ran,
            )  # fmt: skip
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.update(1)
        elif self.enabled and self.done < self.total and now - self._last_line >= LOG_EVERY_S:
            self._last_line = now
            self._line(now, postfix)

    def _line(self, now: float, postfix: Mapping[str, float] | None) -> None:
        elapsed = now - self._t0
        ran = self.done - self.initial
        left = elapsed / ran * (self.total - self.done) if ran else float("nan")
        extra = "".join(f", {k} {v:.4g}" for k, v in (postfix or {}).items())
        self.log.info(
            "%s: step %d/%d (%.0f %%)%s; %s elapsed, ≈ %s left",
            self.label, self.done, self.total, 100.0 * self.done / max(1, self.total), extra,
            format_seconds(elapsed), format_seconds(left),
        )  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            if self._redirect is not None:
                self._redirect.__exit__(None, None, None)
                self._redirect = None
            with _BARS_LOCK:
                _BARS["open"] -= 1

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ANNOUNCE_STEPS", "LOG_EVERY_S", "Progress", "bar_allowed", "format_seconds"]
