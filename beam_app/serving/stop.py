"""How the streaming job stops on the DirectRunner, which cannot drain: at
--duration_s, Ctrl-C, SIGTERM or a caller's Event, it lets what the
watermark has passed reach the tables, then cancels the pipeline without
waiting for the Pub/Sub reader.

    stop_when_settled(result, written, duration_s, started, stop)
      -> wait_for_stop: until duration_s (0: never) or `stop`; a progress line every 30 s
      -> settle: until `written()` has not changed for 1 s, at most 2.5 s
      -> cancel_in_background: result.cancel(), given 0.5 s
    a second Ctrl-C (`signal_handler`) skips the settle.

Clocks and sleeps are parameters, so the timing is tested without waiting.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Callable, Iterator, Protocol

SETTLE_QUIET_S = 1.0  # the tables unchanged this long: what was in flight has arrived
SETTLE_MAX_S = 2.5  # and the stop waits no longer than this for it
CANCEL_WAIT_S = 0.5  # then result.cancel() gets this long before it is left to its thread
PROGRESS_EVERY_S = 30.0


class Waitable(Protocol):
    """A threading.Event, or anything whose wait(timeout) says whether to stop."""

    def wait(self, timeout: float) -> bool: ...


def settle(counts: Callable[[], object], quiet_s: float, max_s: float,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Waits until `counts()` has not changed for `quiet_s`, or `max_s` has
    passed; True when it settled. The streaming DirectRunner cannot be drained:
    this is how a stop lets the requests the watermark has already passed
    reach their table before the process goes."""
    started = clock()
    last, last_change = counts(), clock()
    while clock() - started < max_s:
        if clock() - last_change >= quiet_s:
            return True
        sleep(min(0.25, quiet_s))
        now = counts()
        if now != last:
            last, last_change = now, clock()
    return clock() - last_change >= quiet_s


def cancel_in_background(result, wait_s: float) -> None:
    """result.cancel() waits for the Pub/Sub reader's blocked pull (up to 30 s):
    give it `wait_s`, then leave it to the daemon thread. Messages it pulled
    and did not ack are redelivered to the next job (at least once): its
    de-duplication starts empty, so a request among them is answered again
    there; the stop's settle keeps that to what was still in flight."""
    thread = threading.Thread(target=result.cancel, name="cancel-pipeline", daemon=True)
    thread.start()
    thread.join(wait_s)


def progress_line(elapsed_s: float, written: dict) -> str:
    """The progress line of a running job: `written` as `table_counts` gives it."""
    return "running %.0f s: %d predictions, dead letters %s" % (elapsed_s, written["predictions"],
                                                                 written["dead_letters"] or 0)


def wait_for_stop(duration_s: float, started: float, stop: Waitable, counts: Callable[[], dict],
                  every_s: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
    """Blocks until `duration_s` after `started` (0: forever) or `stop`, logging
    what has been written (`counts()`) every `every_s`; a count that fails is
    a warning, not the end of the job."""
    next_report = clock() + every_s
    while not duration_s or clock() - started < duration_s:
        if stop.wait(0.5):
            return
        if clock() >= next_report:
            next_report += every_s
            try:
                written = counts()
            except Exception as err:  # noqa: BLE001 - a progress line must not stop the job
                logging.warning("running %.0f s; could not count the rows written: %s", clock() - started, err)
                continue
            logging.info("%s", progress_line(clock() - started, written))


def stop_when_settled(result, written: Callable[[], Any], duration_s: float, started: float,
                      stop: Waitable) -> None:
    """The DirectRunner job's stop: `wait_for_stop`, then `settle` on
    `written()` (a second Ctrl-C skips it), then `cancel_in_background`."""
    try:
        wait_for_stop(duration_s, started, stop, written)
        logging.info("stopping: writing what the watermark has passed")
        settle(written, quiet_s=SETTLE_QUIET_S, max_s=SETTLE_MAX_S)
    except KeyboardInterrupt:
        logging.info("interrupted again: stopping now")
    finally:
        cancel_in_background(result, wait_s=CANCEL_WAIT_S)


def signal_handler(stop: threading.Event) -> Callable[[int, Any], None]:
    """The handler of a stop signal: the first sets `stop` (the job stops as
    above), a second raises KeyboardInterrupt (do not wait for the tables)."""

    def on_signal(signum: int, _frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logging.info("%s: stopping (again to stop at once)", signal.Signals(signum).name)
        stop.set()

    return on_signal


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, signums=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within it, Ctrl-C and SIGTERM (docker stop, a supervisor) stop the
    DirectRunner job the same way (`signal_handler`); the handlers before it
    come back after it (main thread only)."""
    handler = signal_handler(stop)
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)
