"""How long work reports while it runs. A progress callback is called with one line per stage;
if it also has a `step(done, total, figures)` method, loops over positions call it with their
count and running figures (a terminal shows them live; a CI log, with no terminal, keeps the
stage lines only). Library code never prints."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]


def quiet(message: str) -> None:
    pass


def steps(progress: Progress | None, done: int, total: int, figures: Callable[[], dict]) -> None:
    """Report `done` of `total`; `figures` (called only when shown) gives the running numbers."""
    step = getattr(progress, "step", None)
    if step is not None:
        step(done, total, figures)
