"""The exceptions a user ever sees from tint, and the signals that stop a run."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn


class TintError(Exception):
    """A problem with the user's input or environment.

    The message's first line says what was wrong; the following lines (if any) say how to
    fix it. The CLI prints it without a traceback and exits with ``exit_code``.
    """

    exit_code = 2


class Interrupted(TintError):
    """Ctrl-C or SIGTERM: the run stopped, and its message says where the finished rows are."""

    exit_code = 130  # 128 + SIGINT, as shells report it

    @classmethod
    def by(cls, stop: BaseException, where: str) -> Interrupted:
        """The error for a stop (a KeyboardInterrupt, or its ``Terminated`` kind), with
        ``where`` (the lines saying where the finished rows are) below its first line."""
        terminated = isinstance(stop, Terminated)
        err = cls(("terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)")
                  + (f"\n{where}" if where else ""))
        err.exit_code = 128 + (signal.SIGTERM if terminated else signal.SIGINT)
        return err


def fail(err: TintError) -> NoReturn:
    """Print a TintError as `error: <first line>` plus its hints, and exit (status 2; 130
    after Ctrl-C)."""
    from rich.console import Console
    from rich.markup import escape

    first, *rest = str(err).splitlines() or ["unknown error"]
    console = Console(stderr=True, highlight=False)
    console.print("[bold red]error:[/] " + escape(first), soft_wrap=True)  # one line, unwrapped
    for line in rest:
        console.print(f"  {escape(line)}", soft_wrap=True)
    sys.exit(err.exit_code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM sends at a job's time limit or on pre-emption, and ``kill``):
    raised like Ctrl-C's KeyboardInterrupt, so every path that keeps rows on Ctrl-C keeps
    them on SIGTERM too."""


_RECEIVED: list[int] = []  # the stop signals this process was sent


def _stop(signum: int, frame: object) -> None:
    _RECEIVED.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def install_stop_handlers() -> None:
    """Ctrl-C and SIGTERM stop tint however it was started. A process started with SIGINT
    ignored (a background job of a shell without job control, ``nohup``) inherits that, and
    Python then never installs its KeyboardInterrupt handler: tint restores it. SIGTERM,
    which would kill the process on the spot, unwinds like Ctrl-C instead. Both are
    remembered (``stop_requested``)."""
    _RECEIVED.clear()
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)


def stop_requested() -> KeyboardInterrupt | None:
    """The stop a signal asked for, or None. A KeyboardInterrupt raised while a C extension
    is calling back into Python (pyarrow reading ``datasets``' extension types) is swallowed
    there and comes out as the extension's own error (``ArrowInvalid``): the handlers that
    keep rows ask this to know that such an error was in truth Ctrl-C or SIGTERM."""
    if not _RECEIVED:
        return None
    return Terminated() if _RECEIVED[-1] == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def stops_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while C++ extensions load (a KeyboardInterrupt raised
    inside torch's import aborts the process with a C++ error), then stop as they asked."""
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        raise Terminated() if pending[0] == signal.SIGTERM else KeyboardInterrupt()
