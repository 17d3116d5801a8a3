"""The busy share a stage replica reports to Serve's autoscaler."""

from __future__ import annotations

import pytest

from stageline.utilization import BusyMeter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_share_of_the_window_counts_finished_and_running_work() -> None:
    clock = Clock()
    meter = BusyMeter(window_s=10.0, clock=clock)
    assert meter.fraction() == 0.0

    with meter:
        clock.now += 3.0  # 3 s of work
    clock.now += 2.0
    assert meter.fraction() == pytest.approx(0.3)

    meter.start()
    clock.now += 4.0  # still running: counts up to now
    assert meter.fraction() == pytest.approx(0.7)
    meter.stop()

    clock.now += 5.0  # the first piece has left the window, the second is whole in it
    assert meter.fraction() == pytest.approx(0.4)
    clock.now += 3.0  # half of the second has left too
    assert meter.fraction() == pytest.approx(0.2)
    clock.now += 20.0
    assert meter.fraction() == 0.0


def test_work_longer_than_the_window_is_all_busy() -> None:
    clock = Clock()
    meter = BusyMeter(window_s=2.0, clock=clock)
    meter.start()
    clock.now += 30.0
    assert meter.fraction() == 1.0


def test_a_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s"):
        BusyMeter(window_s=0)
