"""How both panels run slow work: generator jobs, started in a napari worker or drained in a test.

A job is a generator (CellSeg3D's config → worker → report pattern): built from the core's types
on the GUI thread, it yields report dataclasses while it works and returns its result; the panel
only draws the reports and shows the result. :func:`start` runs a job in a napari worker,
:func:`drain` runs it on the calling thread (tests and scripts need no Qt).

One error pattern for both panels: :func:`start` catches the job's exception *inside* the worker
and hands it to ``on_error``. (napari's worker ``errored`` signal would also post every exception
as a notification with its traceback; users get one plain :func:`user_message` instead.)
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass

from training.errors import Cancelled, U2NetError

log = logging.getLogger(__name__)


def iterate_callbacks(fn: Callable, stop: Callable | None = None) -> Generator[tuple, None, object]:
    """Run ``fn(callback)`` in a helper thread; yield each callback's arguments; return its result.

    This turns a blocking function with a progress callback into a generator a napari worker can
    drive. If the consumer closes the generator early, ``stop()`` is called and the helper thread
    is joined before the generator ends; an exception in ``fn`` is re-raised.
    """
    events: queue.Queue = queue.Queue()
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = fn(lambda *args: events.put(("progress", args)))
        except BaseException as e:  # re-raised in the consumer's thread
            outcome["error"] = e
        finally:
            events.put(("end", None))

    thread = threading.Thread(target=target, name="u2net-job", daemon=True)
    thread.start()
    try:
        while True:
            kind, args = events.get()
            if kind == "end":
                break
            yield args
    finally:
        if thread.is_alive():
            if stop is not None:
                stop()
            thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def drain(gen: Generator):
    """Run a job generator to its end on this thread (tests, scripts); returns its value."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


@dataclass
class _Failure:
    """A job's exception, carried to the GUI thread as the worker's return value."""

    error: BaseException


def _guarded(job: Callable, args: tuple, kwargs: dict):
    """Run ``job``: a generator's reports pass through; an exception becomes a :class:`_Failure`."""
    try:
        out = job(*args, **kwargs)
        if isinstance(out, Generator):
            out = yield from out
        return out
    except Exception as e:
        return _Failure(e)


def start(
    job: Callable,
    *args,
    on_report: Callable | None = None,
    on_done: Callable | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    autostart: bool = True,
    owner=None,
    **kwargs,
):
    """Run ``job(*args, **kwargs)`` (a generator function or a plain one) in a napari worker.

    ``on_report(report)`` gets each yielded report, then ``on_done(result)`` or
    ``on_error(exception)``, then ``on_finished()``; all on the GUI thread. Returns the worker,
    started unless ``autostart`` is False (then the caller calls ``worker.start()``).
    ``owner``: the panel (a QObject); once napari has deleted it (the viewer closed while the job
    ran), the callbacks are skipped, as they would touch deleted Qt widgets.
    """
    from napari.qt.threading import create_worker

    alive = [True]
    if owner is not None:
        owner.destroyed.connect(lambda *_: alive.__setitem__(0, False))

    def guard(callback):
        return None if callback is None else (lambda *a: callback(*a) if alive[0] else None)

    on_report, on_done, on_error, on_finished = map(guard, (on_report, on_done, on_error, on_finished))

    def returned(result) -> None:
        if isinstance(result, _Failure):
            if on_error is not None:
                on_error(result.error)
            else:
                log.warning("background job %s failed: %s", getattr(job, "__name__", job), result.error)
        elif on_done is not None:
            on_done(result)

    connect = {"returned": returned}
    if on_report is not None:
        connect["yielded"] = on_report
    if on_finished is not None:
        connect["finished"] = on_finished
    worker = create_worker(_guarded, job, args, kwargs, _connect=connect, _start_thread=False)
    if autostart:
        worker.start()
    return worker


def is_out_of_memory(error: BaseException) -> bool:
    """numpy's MemoryError, or the core's test for a torch (GPU) out-of-memory error."""
    if isinstance(error, MemoryError):
        return True
    if "torch" not in sys.modules:  # no torch error without torch: do not import it on the GUI thread
        return False
    from training.io.devices import is_out_of_memory as torch_oom

    return torch_oom(error)


def user_message(error: BaseException, task: str, oom_advice: str) -> tuple[str, str]:
    """(level, text) for a notification about a failed ``task`` ("segmentation", "fine-tuning"):
    our errors say what to do; out of memory gets ``oom_advice``; anything else a plain hint.

    The text is short and plain (what happened, what to do); the technical detail (exception type,
    message, traceback) goes to this module's log, which napari shows."""
    if isinstance(error, Cancelled):
        log.info("%s cancelled: %s", task, error)
        return "info", str(error) or f"{task.capitalize()} cancelled: nothing was added."
    if isinstance(error, U2NetError):
        log.info("%s refused: %s: %s", task, type(error).__name__, error)
        return "error", str(error)
    if is_out_of_memory(error):
        log.error("%s ran out of memory: %s: %s", task, type(error).__name__, error)
        return "error", f"The computer ran out of memory during {task}: {oom_advice}."
    log.error("%s failed: %s: %s", task, type(error).__name__, error, exc_info=error)
    return "error", (
        f"{task.capitalize()} stopped because of an unexpected problem. Try again; if it happens again, "
        "report it with the details from napari's log."
    )
