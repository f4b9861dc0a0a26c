"""Progress while stages run silent for long: the heartbeat repeats the stage with its time."""

import threading
import time

from gemma_export.progress import heartbeat


class Recorder:
    def __init__(self):
        self.lines, self.steps = [], []

    def __call__(self, msg):
        self.lines.append(msg)

    def step(self, done, total, figures):
        self.steps.append((done, total))


def test_a_silent_stage_is_repeated_with_its_time_and_a_talking_one_is_not():
    rec = Recorder()
    with heartbeat(rec, every=0.2) as progress:
        progress("lowering to XNNPACK")
        time.sleep(0.75)  # silent: repeated
        for i in range(8):  # calling back more often than `every`: nothing added
            progress(f"layer {i}")
            time.sleep(0.05)
        progress.step(3, 10, dict)
    stage = [line for line in rec.lines if line.startswith("lowering to XNNPACK")]
    assert len(stage) >= 3 and all("still running" in line for line in stage[1:]), rec.lines
    assert not any("layer" in line and "still running" in line for line in rec.lines), rec.lines
    assert rec.steps == [(3, 10)]


def test_the_heartbeat_stops_with_its_block_even_on_an_error():
    rec, before = Recorder(), threading.active_count()
    try:
        with heartbeat(rec, every=0.1) as progress:
            progress("converting")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert threading.active_count() == before
    n = len(rec.lines)
    time.sleep(0.3)
    assert len(rec.lines) == n
