"""How long work reports while it runs. A progress callback is called with one line per stage;
if it also has a `step(done, total, figures)` method, loops over positions call it with their
count and running figures (a terminal shows them live; a CI log, with no terminal, keeps the
stage lines only). Library code never prints."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Progress = Callable[[str], None]


def quiet(message: str) -> None:
    pass


def steps(progress: Progress | None, done: int, total: int, figures: Callable[[], dict]) -> None:
    """Report `done` of `total`; `figures` (called only when shown) gives the running numbers."""
    step = getattr(progress, "step", None)
    if step is not None:
        step(done, total, figures)


@contextmanager
def heartbeat(progress: Progress, every: float = 30.0) -> Iterator[Progress]:
    """A progress callback that, while the block runs, repeats the last stage line whenever the
    stage has been silent for `every` seconds, with the time spent in it: exporters lower and
    serialize for minutes without calling back, and a CI log should show where the job is."""
    lock, stop = threading.Lock(), threading.Event()
    state = {"msg": None, "since": 0.0, "said": 0.0}

    def relay(msg: str) -> None:
        with lock:
            now = time.monotonic()
            state.update(msg=msg, since=now, said=now)
        progress(msg)

    if hasattr(progress, "step"):
        relay.step = progress.step

    def beat() -> None:
        while not stop.wait(min(1.0, every / 4)):
            with lock:
                now = time.monotonic()
                due = state["msg"] is not None and now - state["said"] >= every
                if due:
                    state["said"] = now
                    line = f"{state['msg']} (still running, {now - state['since']:.0f} s in this stage)"
            if due:
                progress(line)

    thread = threading.Thread(target=beat, name="progress-heartbeat", daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        stop.set()
        thread.join()
