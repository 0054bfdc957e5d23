"""Progress of the training loop: steps/s after compilation, the ETA, and when to print a line.

A published config on a CPU takes minutes per step (``train.log_every`` 100 would print nothing for hours). After
the first step (compilation included) a line says how long it took; when the second takes longer than
``SLOW_STEP_S`` seconds, the loop waits on every step (``sync_every`` becomes 1) and a progress line comes at least
every ``PROGRESS_EVERY_S`` seconds (console only: ``metrics.jsonl`` keeps the ``log_every`` cadence).
"""

from __future__ import annotations

import time

from absl import logging

from diffseg_jax import writers

SLOW_STEP_S = 2.0
PROGRESS_EVERY_S = 60.0


class Progress:
    """The clocks of one training run from step ``start`` to ``num_steps``; ``sync_every`` is how often the loop
    waits on a step's loss (lowered to 1 once steps are found slow)."""

    def __init__(self, start: int, num_steps: int, log_every: int, sync_every: int):
        self.start, self.num_steps, self.log_every, self.sync_every = start, num_steps, log_every, sync_every
        # t_first: when the first step (and its compilation) ended; steps/s counts the steps after it.
        self.t_start = self.last_log = self.t_first = time.time()

    def update(self, done: int, loss: float) -> tuple[float, bool]:
        """After step ``done``'s loss was read: logs what is due; returns (steps/s, whether ``done`` is a logged
        step, i.e. a multiple of ``log_every`` or the last)."""
        now = time.time()
        if done > self.start + 1:  # the steps since the first, whose time includes compiling
            rate = (done - self.start - 1) / max(now - self.t_first, 1e-9)
        else:
            rate = (done - self.start) / max(now - self.t_start, 1e-9)
        eta = (self.num_steps - done) / max(rate, 1e-9)
        logged = done % self.log_every == 0 or done == self.num_steps
        if done == self.start + 1 and not logged:
            logging.info(
                "step %d/%d  loss %.5f  first step %s (compilation included); logged every %d steps",
                done,
                self.num_steps,
                loss,
                writers.format_duration(now - self.t_start),
                self.log_every,
            )
            self.last_log = now
        elif logged or now - self.last_log >= PROGRESS_EVERY_S:  # the latter: slow steps, between logs
            logging.info(
                "step %d/%d  loss %.5f  %.2f steps/s  ETA %s",
                done,
                self.num_steps,
                loss,
                rate,
                writers.format_duration(eta),
            )
            self.last_log = now
        if done == self.start + 1:
            self.t_first = now
        elif done == self.start + 2 and now - self.t_first > SLOW_STEP_S and self.sync_every > 1:
            self.sync_every = 1  # waiting on each step costs nothing beside its seconds
            logging.info(
                "The second step took %s: progress is logged at least every %s.",
                writers.format_duration(now - self.t_first),
                writers.format_duration(PROGRESS_EVERY_S),
            )
        return rate, logged
