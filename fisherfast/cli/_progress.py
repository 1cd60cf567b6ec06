"""Progress display for the CLI's long steps (tqdm on stderr).

``working(desc)`` wraps one blocking call (loading a model, one steering
run) in a line whose elapsed time ticks while the call runs; ``steps`` is a
tqdm bar over an iterable that also ticks between items, so a slow item
never looks like a hang. When stderr is not a terminal the elapsed-time line
is not shown and bars update only per item."""
from __future__ import annotations

import contextlib
import sys
import threading

from tqdm import tqdm


def _interactive() -> bool:
    """Ticking lines are for a terminal; in a log they would only add noise."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def _ticking(bar: tqdm, every: float = 0.5):
    stop = threading.Event()

    def tick():
        while not stop.wait(every):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    if not bar.disable and _interactive():
        thread.start()
    try:
        yield bar
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        bar.close()


@contextlib.contextmanager
def working(desc: str, enabled: bool = True):
    """A line "desc: elapsed" for the duration of the ``with`` block."""
    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", disable=not (enabled and _interactive()),
               leave=False)
    with _ticking(bar):
        yield


def steps(items, desc: str, enabled: bool = True):
    """Yield ``items`` under a tqdm bar (count, elapsed, rate) that keeps ticking."""
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, disable=not enabled, leave=False)
    with _ticking(bar):
        for item in items:
            bar.set_postfix_str(str(item), refresh=True)
            yield item
            bar.update(1)
