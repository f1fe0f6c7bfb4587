"""The speed limit's accounting, with a clock the test moves by hand."""

from __future__ import annotations

import pytest

from blockd.jobs.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unlimited_never_waits() -> None:
    limiter = RateLimiter(Clock(), 0)
    assert limiter.delay(1 << 30) == 0


def test_burst_is_paid_back_in_full() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, 1 << 20)  # 1 MiB/s: 104857.6 bytes per 100 ms slice
    assert limiter.delay(0) == 0
    # One 512 KiB chunk is five slices' worth: wait until that time has passed.
    assert limiter.delay(512 * 1024) == pytest.approx(0.5)
    clock.now += 0.2  # woken early (by a pause, say): the debt is still owed
    assert limiter.delay() == pytest.approx(0.3)
    clock.now += 0.3
    assert limiter.delay() == pytest.approx(0.0)


def test_sustained_rate_matches_speed() -> None:
    clock = Clock()
    speed = 4 << 20
    limiter = RateLimiter(clock, speed)
    copied = 0
    while clock.now < 1010.0:
        copied += 512 * 1024
        clock.now += limiter.delay(512 * 1024) + 1e-9
        while (wait := limiter.delay()) > 0:
            clock.now += wait
    assert copied / (clock.now - 1000.0) == pytest.approx(speed, rel=0.06)


def test_tiny_speed_still_has_a_quota_of_one_byte() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, 1)
    # As in QEMU, a whole 512 KiB chunk then costs 524288 slices.
    assert limiter.delay(512 * 1024) == pytest.approx(524288 * 0.1)


def test_new_speed_applies_to_the_next_computation() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, 1)
    assert limiter.delay(1000) > 10
    limiter.set_speed(0)
    assert limiter.delay() == 0
    assert limiter.speed == 0


def test_a_raised_speed_that_has_paid_the_debt_waits_no_longer() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, 64 * 1024)
    # A 512 KiB chunk at 64 KiB/s is 8 s of debt ...
    assert limiter.delay(512 * 1024) == pytest.approx(8.0)
    clock.now += 1.5
    # ... of which 1.5 s are paid: at 2 MiB/s the chunk costs 0.25 s, long paid.
    limiter.set_speed(2 * 1024 * 1024)
    assert limiter.delay() == 0.0
    # A fresh slice starts: the new speed's quota is available at once.
    assert limiter.delay(200 * 1024) == 0.0
    assert limiter.delay(10 * 1024) == pytest.approx(0.1 * (210 / 204.8), rel=1e-6)


def test_a_raised_speed_with_debt_left_waits_for_the_rest_only() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, 64 * 1024)
    assert limiter.delay(512 * 1024) == pytest.approx(8.0)
    clock.now += 1.0
    limiter.set_speed(128 * 1024)  # the chunk now costs 4 s, 3 of them still owed
    assert limiter.delay() == pytest.approx(3.0)


QUOTA = 65536  # bytes per 100 ms slice at 640 KiB/s


def test_a_slice_that_has_ended_gives_way_to_a_fresh_one() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, QUOTA * 10)
    assert limiter.delay(QUOTA // 2) == 0
    clock.now += 0.15  # the first slice is over: its half quota is forgotten
    assert limiter.delay(QUOTA * 3 // 4) == 0
    clock.now += 0.01  # still in the second slice, now 1.25 quotas into it
    assert limiter.delay(QUOTA // 2) == pytest.approx(0.15 + 0.125 - 0.16)


def test_the_slice_goes_on_up_to_and_including_its_end() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, QUOTA * 10)
    assert limiter.delay(QUOTA // 2) == 0
    clock.now = 1000.0 + 0.1  # exactly the slice's end: QEMU starts a new one only after it
    assert limiter.delay(QUOTA) == pytest.approx(0.05)


def test_a_whole_quota_already_waits() -> None:
    limiter = RateLimiter(Clock(), QUOTA * 10)
    assert limiter.delay(QUOTA) == pytest.approx(0.1)
