"""Progress outside a terminal: a plain line at least every interval, with step, percentage and ETA."""

from __future__ import annotations

import io

from edgeopt.progress import PlainTracker, duration, progress, step_label


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_non_tty_prints_a_line_every_interval_with_percentage_and_eta():
    clock, out = FakeClock(), io.StringIO()
    with step_label("02-distill"), progress("distill", total=100, stream=out, clock=clock, heartbeat=False) as bar:
        for _ in range(100):
            clock.now += 1.0  # one unit a second: 100 s in all
            bar.advance(info="loss 0.5")
    lines = out.getvalue().splitlines()
    # a line at 30, 60 and 90 s, then the closing one
    assert len(lines) == 4, lines
    assert lines[0] == "02-distill: distill 30/100 (30%), 30s elapsed, ETA 1m10s, loss 0.5"
    assert lines[1].startswith("02-distill: distill 60/100 (60%), 1m00s elapsed, ETA 40s")
    assert lines[-1] == "02-distill: distill 100/100 (100%), done, 1m40s elapsed, loss 0.5"


def test_work_that_never_advances_still_prints_heartbeats():
    clock, out = FakeClock(), io.StringIO()
    with progress("exporting to tflite", stream=out, clock=clock, heartbeat=False) as bar:
        for _ in range(95):  # the heartbeat thread's ticks, one a second
            clock.now += 1.0
            bar.tick()
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["exporting to tflite, 30s elapsed", "exporting to tflite, 1m00s elapsed",
                         "exporting to tflite, 1m30s elapsed"]
    assert lines[3] == "exporting to tflite, done, 1m35s elapsed"


def test_the_heartbeat_thread_ticks_on_its_own():
    import time

    out = io.StringIO()
    with progress("export", stream=out, interval_s=0.05) as bar:
        assert isinstance(bar, PlainTracker)
        deadline = time.monotonic() + 10  # the main thread only waits; lines come from the heartbeat
        while out.getvalue().count("export, ") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert out.getvalue().count("export, ") >= 3


def test_short_work_is_silent_and_resumed_work_estimates_from_its_own_pace():
    clock, out = FakeClock(), io.StringIO()
    with progress("training", total=10, stream=out, clock=clock, heartbeat=False) as bar:
        clock.now += 5
        bar.update(10)
    assert out.getvalue() == ""
    out = io.StringIO()
    with progress("distill", total=100, completed=50, stream=out, clock=clock, heartbeat=False) as bar:
        clock.now += 30
        bar.update(60)  # 10 units in 30 s: 40 left take 2 minutes
    assert "60/100 (60%), 30s elapsed, ETA 2m00s" in out.getvalue()


def test_tty_gets_a_rich_bar_not_plain_lines():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    with progress("distill", total=3, stream=out) as bar:
        assert not isinstance(bar, PlainTracker)
        with progress("inner", total=2, stream=out) as inner:  # nested work joins the same display
            inner.advance()
        bar.advance(3)
    assert "ETA" not in out.getvalue()


def test_disabled_is_silent():
    out = io.StringIO()
    with progress("x", total=1, enabled=False, stream=out) as bar:
        bar.advance()
    assert out.getvalue() == ""


def test_duration():
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]
