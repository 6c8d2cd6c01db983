"""`python -m tinygemma` and the `tinygemma` command: the CLI (cli.main), with a Ctrl-C pressed while it is still
importing (torch takes a second or two) or reading its arguments ending as one line and exit status 130, as one
pressed later does; and a Ctrl-C or SIGTERM that comes once the command is done, while Python shuts down, ending
the process at once with the command's own status, not 130 for work that was completed."""

import atexit
import os
import signal
import sys


def main() -> int:
    try:
        from tinygemma.cli import main as cli_main

        status = cli_main()
    except KeyboardInterrupt:  # (a SIGTERM here still ends the process: cli.main's handler is not set yet)
        print("tinygemma: interrupted", file=sys.stderr)
        return 130
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: _end(status))
    _done.append(status)
    return status


_done: list[int] = []  # the command's status, once it has returned


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
