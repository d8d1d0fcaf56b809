"""Where a training stage's time goes: the phases it records and the file it writes them to.

    PhaseClock           the worker loop's counters (first batch, steps, validation), cumulative
                         over a run's attempts, carried in each validation row
    stage_timing(...)    the stage's phases: joining Ray and writing outputs (the driver's),
                         plus the loop's from the run's last row
    TIMING_FILE          reports/<stage>/timing.json
"""
from __future__ import annotations

import time

TIMING_FILE = "timing.json"
# The loop's phases, kept in every validation row (and so in MLflow, as cumulative seconds).
LOOP_PHASES = ("data_start_s", "train_s", "val_s")
# A stage's phases in the order they happen.
PHASES = ("join_ray_s", *LOOP_PHASES, "outputs_s")


class PhaseClock:
    """Seconds a worker spends waiting for its first batch, training, and validating.

    Resumed from the history's last row, so a run continued after a failure (or with
    more iterations) reports its whole time, not only its last attempt's."""

    def __init__(self, history: list[dict]):
        last = history[-1] if history else {}
        self.totals = {key: float(last.get(key, 0.0)) for key in LOOP_PHASES}
        self._since = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to `phase`."""
        now = time.perf_counter()
        self.totals[phase] += now - self._since
        self._since = now

    def row(self) -> dict[str, float]:
        return dict(self.totals)


def stage_timing(join_ray_s: float, history: list[dict], outputs_s: float) -> dict[str, float]:
    """The stage's phases, in seconds, rounded to a tenth."""
    last = history[-1] if history else {}
    values = {"join_ray_s": join_ray_s, **{k: float(last.get(k, 0.0)) for k in LOOP_PHASES}, "outputs_s": outputs_s}
    return {k: round(values[k], 1) for k in PHASES}
