"""The outputs' lengths at the instant an engine starts writing a checkpoint.

Some engines delete their sentinel while they rewrite their checkpoint files in place and
create it again when done (AToM-OpenMM: `ckpt_is_valid`), and write their outputs continuously
(AToM appends a sample line per replica cycle, flushed at once). The checkpoint they write holds
the state of that instant; outputs stat'd when the worker later snapshots the set may already
hold samples of later cycles, which the next attempt, resuming from that checkpoint, would write
again. So the worker watches for the sentinel's removal (inotify, a thread blocked on it) and
stats the outputs at once: lengths taken while the sentinel is still absent belong exactly to
the checkpoint being written (the engine does not write outputs while it checkpoints: AToM's
checkpoint and its sample writing run in one thread). If the sentinel is already back by the
time the lengths are read, they are kept but marked inexact (logged when used).

Engines that replace their sentinel by rename (the OpenMM runner's checkpoint.json) never remove
it; for them, and where inotify is unavailable, nothing is marked and the lengths are taken
with the set, which is exact for engines that write outputs in step with their checkpoints.
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("relaymd.worker")
POLL_TIMEOUT_MS = 500  # how often the thread looks at its stop flag


@dataclass(frozen=True)
class Mark:
    lengths: dict[str, int]
    generation: int  # how many removals of the sentinel had been seen when it was taken
    exact: bool  # the sentinel was still absent after the lengths were read


class SentinelMarks:
    """A thread that marks the outputs' lengths each time the sentinel is removed.

    `take()` (at packing) first reads any events the thread has not handled yet, so the mark it
    returns is of the newest removal, which a present sentinel proves came before the sentinel's
    re-creation; a mark serves one shipped checkpoint set only (`shipped()`). `generation()`
    after packing tells whether the engine began another checkpoint meanwhile (then the set is
    not shipped).
    """

    def __init__(self, job_dir: Path, sentinel: str,
                 lengths: Callable[[], dict[str, int]]) -> None:
        self.path = job_dir / sentinel
        self.lengths = lengths
        self.latest: Mark | None = None
        self.removals = 0
        self.used = 0  # the generation of the last mark handed out
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inotify: Any = None

    def start(self) -> bool:
        """Begin watching; False where inotify is unavailable (nothing will be marked)."""
        try:
            from inotify_simple import INotify, flags
        except ImportError:  # not Linux, or the package is missing: lengths with the set
            return False
        try:
            self._inotify = INotify()
            self._inotify.add_watch(str(self.path.parent), flags.DELETE | flags.MOVED_FROM)
        except OSError as exc:  # out of watches, or the directory is not there yet
            log.warning("cannot watch %s for checkpoint starts (%s): output lengths are taken "
                        "with each checkpoint set", self.path.parent, exc)
            self.close()
            return False
        self._thread = threading.Thread(target=self._run, name="sentinel-marks", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        while not self._stop.is_set():
            try:
                if poller.poll(POLL_TIMEOUT_MS):
                    self._handle_pending()
            except (OSError, ValueError):  # closed under us: the run is over
                return

    def _handle_pending(self) -> None:
        from inotify_simple import flags

        with self._lock:
            if self._inotify is None:
                return
            for ev in self._inotify.read(timeout=0):
                if ev.mask & flags.Q_OVERFLOW:
                    self.removals += 1  # events were lost: the last mark is no longer newest
                    self.latest = None
                elif ev.name == self.path.name:
                    self.removals += 1
                    self._mark()

    def _mark(self) -> None:
        try:
            lengths = self.lengths()
        except OSError:
            self.latest = None
            return
        self.latest = Mark(lengths, self.removals, exact=not self.path.exists())

    def take(self) -> Mark | None:
        """The mark of the checkpoint now in place, or None (no removal since the mark of the
        last set shipped: take the lengths with the set)."""
        self._handle_pending()
        with self._lock:
            mark = self.latest
            if mark is None or mark.generation != self.removals or mark.generation == self.used:
                return None
            return mark

    def shipped(self, mark: Mark) -> None:
        """That mark's set was shipped: it serves no other."""
        self.used = mark.generation

    def generation(self) -> int:
        self._handle_pending()
        return self.removals

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * POLL_TIMEOUT_MS / 1000)
        with self._lock:
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
