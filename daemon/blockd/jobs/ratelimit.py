"""The job speed limit, with QEMU's accounting (``include/qemu/ratelimit.h``).

Time is divided into 100 ms slices with a byte quota each.  Copying more than
the quota extends the current slice by the excess, and the job sleeps until
that extended slice ends; so a burst is paid back in full however the job
was woken in between (by ``set-speed``, pause or resume).  A raised speed
shortens the extended slice, possibly to an end already past: the debt is
then paid and the delay is zero, never negative (QEMU returns the negative
difference and its timer fires at once; trio refuses a negative sleep).  The
clock is a parameter so tests can drive time themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SLICE_SECONDS = 0.1


class RateLimiter:
    def __init__(self, clock: Callable[[], float], speed: int) -> None:
        self._clock = clock
        # No slice yet: the first delay() starts one, whatever the clock reads.
        self._slice_end = -math.inf
        self._slice_start: float
        self._dispatched: float
        self.speed: int
        self._quota: float
        self.set_speed(speed)

    def set_speed(self, speed: int) -> None:
        """Bytes per second; 0 means unlimited."""
        self.speed = speed
        self._quota = max(speed * SLICE_SECONDS, 1.0)

    def delay(self, nbytes: int = 0) -> float:
        """Account ``nbytes`` just copied; seconds to wait before copying more."""
        if not self.speed:
            return 0.0
        now = self._clock()
        if self._slice_end < now:
            self._slice_start = now
            self._slice_end = now + SLICE_SECONDS
            self._dispatched = 0.0
        self._dispatched += nbytes
        if self._dispatched < self._quota:
            return 0.0
        slices = self._dispatched / self._quota
        self._slice_end = self._slice_start + slices * SLICE_SECONDS
        return max(0.0, self._slice_end - now)
