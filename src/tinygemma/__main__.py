"""`python -m tinygemma` and the `tinygemma` command: the CLI (cli.main), with a Ctrl-C or SIGTERM that comes while
it is still importing (torch takes a second or two) or reading its arguments ending as one line and exit status
130 or 143, as one later does; a Ctrl-C or SIGTERM that comes once the command is done, while Python shuts down,
ending the process at once with the command's own status, not 130 for work that was completed; and a stdout or
stderr that the shell closed given /dev/null."""

import os
import sys


def _stopped_early() -> None:
    """A Ctrl-C in the first tens of milliseconds, as this module imports what handles signals: one line and 130,
    not a traceback; a later signal held off (SIGTERM keeps its default under torchrun: errors.under_torchrun's
    test, which is not imported yet), and CPython's mark cleared (see _forget_caught_interrupts)."""
    import _signal  # (built in: no code of its own to interrupt)

    torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
    for signum in (_signal.SIGINT,) + (() if torchrun else (_signal.SIGTERM,)):
        _signal.signal(signum, _signal.SIG_IGN)
    if sys.stderr is not None:  # (None: closed by the shell, which _open_standard_streams has not mended yet)
        print("tinygemma: interrupted", file=sys.stderr)
    exec("")  # (subprocess's import runs namedtuple's code, made by eval of a string)
    raise SystemExit(130)


try:  # (a Ctrl-C this early is one line too)
    import atexit
    import signal

    from tinygemma.errors import (  # (no torch)
        STOPPED,
        exit_status,
        handle,
        hold_signals_off,
        interrupt,
        says_stops,
        stop_word,
        under_torchrun,
    )
except KeyboardInterrupt:
    _stopped_early()


def main() -> int:
    _open_standard_streams()
    _done.clear()  # (a second main() in one process: a Python session's)
    STOPPED.clear()
    handle(signal.SIGINT, _signalled)  # (what the command's own handlers give back as it ends)
    if not under_torchrun():  # (torchrun ends its workers with SIGTERM: its default stays)
        handle(signal.SIGTERM, _signalled)
    try:
        from tinygemma.cli import main as cli_main

        status = cli_main()
        _done.append(status)
    except SystemExit as e:  # --help, --version, a usage error: argparse's exit, with its status
        _done.append(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
        raise
    except KeyboardInterrupt as e:  # (a Ctrl-C while importing, before the command's own handlers)
        hold_signals_off()
        if says_stops():  # (under torchrun, once a machine)
            print(f"tinygemma: {stop_word(e)}", file=sys.stderr)
        _done.append(exit_status(e))  # a later signal, while Python shuts down, leaves this status
        _forget_caught_interrupts()
        return exit_status(e)
    _forget_caught_interrupts()  # (a signal from here on: _signalled ends the process with the status)
    return status


def _signalled(signum, frame) -> None:
    """SIGINT's and SIGTERM's handler outside the command's own: before it runs, an interrupt; once a signal
    stopped it, nothing (a second Ctrl-C just after the command's clean-up gave a traceback); once it returned,
    the end with its status."""
    if _done:
        _end(_done[0])
    elif not STOPPED:
        interrupt(signum, frame)


def _forget_caught_interrupts() -> None:
    """CPython marks a KeyboardInterrupt that leaves code run by exec() of a string (dataclasses make their methods
    so: importing torch makes hundreds) as never handled, even where the command caught it; `python -m tinygemma`
    then ended by SIGINT (a parent saw -2, not 130) about one Ctrl-C in ten during a prepare's first second.
    exec() of a string begins by clearing that mark."""
    exec("")


_done: list[int] = []  # the command's status, once it has returned


def _open_standard_streams() -> None:
    """Put /dev/null on a stdout or stderr that the shell closed (`>&-`, `2>&-`) or opened for reading only. Python's
    stream for it failed at its first write: a command whose first status line went to a closed stderr stopped
    there, before its work, with exit status 1 and nothing said, and `generate >&-` gave a traceback."""
    try:
        import fcntl
    except ImportError:  # Windows
        return
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            writable = (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) != os.O_RDONLY
        except OSError:  # closed
            writable = False
        if writable:
            continue
        null = os.open(os.devnull, os.O_WRONLY)  # takes `fd` itself when it is closed (the lowest free number)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if getattr(sys, name) is None:  # Python made no stream for a number closed at its start
            setattr(sys, name, open(fd, "w", buffering=1, closefd=False))


def _ignore_signals_once_done() -> None:
    """The last atexit function (registered first): Python then puts its own handlers back to the defaults for the
    modules' teardown (torch's takes a few tenths of a second), which a signal ended with 130 or 143; ignored ones
    it leaves as they are."""
    if _done:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


atexit.register(_ignore_signals_once_done)


def _end(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    raise SystemExit(main())
