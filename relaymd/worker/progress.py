"""Reading a job's progress file for the heartbeat (`progress:` in relaymd.yaml).

Two forms: a JSON object (`{"done": .., "total": .., "unit": "ns", "ns_per_day": ..}`, what the
OpenMM runner writes), or a bare number, the fraction done from 0 to 1 (AToM-OpenMM's `progress`
file: the least sampled replica's share of MAX_SAMPLES). A fraction is shown in ns when the
bundle says what 1.0 stands for (`progress_total_ns`), else as a percentage. When the engine
gives no ns/day and the unit is ns, the rate is taken from this attempt's own readings (first
to latest), so AToM jobs show ns/day without a wrapper. A file being rewritten (AToM truncates
then writes) reads as nothing this time, never as an error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from relaymd.models import BundleSpec, Progress

MIN_RATE_WINDOW_S = 30.0  # readings closer than this give too noisy a rate


class ProgressReader:
    def __init__(self, spec: BundleSpec, job_dir: Path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = job_dir / spec.progress if spec.progress else None
        self.total_ns = spec.progress_total_ns
        self.clock = clock
        self.first: tuple[float, float] | None = None  # (time, done in ns) of the first reading

    def read(self) -> Progress | None:
        if self.path is None:
            return None
        try:
            raw = self.path.read_bytes()
        except OSError:
            return None
        progress = self.parse(raw)
        if progress is None or progress.ns_per_day is not None or progress.unit != "ns":
            return progress
        now = self.clock()
        if self.first is None or progress.done < self.first[1]:
            self.first = (now, progress.done)
            return progress
        t0, done0 = self.first
        if now - t0 < MIN_RATE_WINDOW_S or progress.done <= done0:
            return progress
        rate = (progress.done - done0) / (now - t0) * 86400
        return progress.model_copy(update={"ns_per_day": round(rate, 3)})

    def parse(self, raw: bytes) -> Progress | None:
        text = raw.strip()
        if not text:
            return None
        if text.startswith(b"{"):
            try:
                return Progress.model_validate_json(text)
            except ValueError:
                return None
        try:
            fraction = float(text)
        except ValueError:
            return None
        if not math.isfinite(fraction) or fraction < 0:
            return None
        fraction = min(fraction, 1.0)  # an engine may overshoot its target by a cycle
        if self.total_ns:
            return Progress(done=round(fraction * self.total_ns, 6), total=self.total_ns,
                            unit="ns")
        return Progress(done=round(fraction * 100, 3), total=100, unit="%")
