"""The one exception type for problems with the user's input, and the interrupts (Ctrl-C, SIGTERM) that stop a
command, with the signal handler that raises them (imported before torch, by __main__).

Anything raised as `UserError` is printed by the CLI as a single line on stderr, with exit status 2 and no
traceback; an OSError (the machine's or the network's failure) as one line with exit status 1. Everything else
is a bug in tinygemma and keeps its traceback.
"""

import contextlib
import errno
import functools
import os
import re
import shlex
import signal
import subprocess
import sys


class UserError(Exception):
    """Bad input: a missing or corrupt file, an impossible configuration, a mismatched tokenizer, ..."""


WINDOWS = os.name == "nt"
# What no UTF-8 text holds: a JSON \udc00 escape, or a byte that is not UTF-8 in a command line's argument
# (Python reads it as \udc80-\udcff). No tokenizer takes it: tiktoken's goes on from U+FFFD, tokenizers' raises.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def interrupt_safe(generator_function):
    """contextlib.contextmanager for a generator whose clean-up must run however the block ends: a Ctrl-C (or
    SIGTERM's Terminated) that lands in the instant between its yield and the `with` taking hold of the manager is
    thrown into it at once. (contextlib's manager raises it from __enter__, where no `with` calls __exit__: the
    generator's clean-up waited for the garbage collector, after the clean-ups of the managers around it; an
    interrupted prepare left its new folder, empty, since the temporary in it was still there when the folder's
    own clean-up came.) For `with` alone: its managers are no decorators."""
    manager = contextlib.contextmanager(generator_function)

    @functools.wraps(generator_function)
    def guarded(*args, **kwargs):
        return _CleanedUpOnEntry(manager(*args, **kwargs))
    return guarded


class _CleanedUpOnEntry:
    """A contextlib manager whose generator gets the exception that its __enter__ raised after the yield."""

    def __init__(self, manager):
        self.manager = manager

    def __enter__(self):
        try:
            return self.manager.__enter__()
        except BaseException as e:
            if self.manager.gen.gi_frame is not None:  # it yielded (it did not fail itself): it cleans up now
                self.manager.__exit__(type(e), e, e.__traceback__)
            raise

    def __exit__(self, *exc_info):
        return self.manager.__exit__(*exc_info)


def shell_quote(text: str) -> str:
    """`text` as one argument of a command printed for the user to paste into their shell: POSIX quoting, or on
    Windows double quotes, which cmd.exe (Anaconda Prompt) and PowerShell both read (cmd.exe splits '...')."""
    return subprocess.list2cmdline([text]) if WINDOWS else shlex.quote(text)


def shell_join(parts: list[str]) -> str:
    return " ".join(map(shell_quote, parts))


# The machine's failures, not the input's: a full disk or quota, no permission, a read-only filesystem, out of file
# descriptors or memory, an I/O error, no route to the network (a socket's plain OSError, which no library
# wrapped). (A file not found, and other OSErrors, are the input's.)
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EMFILE,
                            errno.ENFILE, errno.ENOMEM, errno.EIO, errno.ENETUNREACH, errno.ENETDOWN,
                            errno.EHOSTUNREACH, errno.EHOSTDOWN})
# The network's failures, by the names the libraries give them (Python's, requests', httpx's, wandb's, whose
# classes share no base): no connection, a timeout, a transport that broke, wandb's server out of reach.
NETWORK_ERRORS = frozenset({"ConnectionError", "ConnectError", "TimeoutError", "Timeout", "TimeoutException",
                            "TransportError", "CommError"})


def machine_failure(error: BaseException) -> bool:
    """Whether `error` is the machine's or the network's failure rather than a problem with the input."""
    if isinstance(error, OSError) and error.errno in MACHINE_ERRNOS:
        return True
    names = [kind.__name__ for kind in type(error).__mro__]
    status = getattr(getattr(error, "response", None), "status_code", None)  # (an HTTP error's: requests', the hub's)
    if isinstance(status, int) and (status >= 500 or status == 429):  # the service down or busy, not the request
        return True
    if any("Authentication" in name for name in names):  # (wandb's bad API key is a CommError too): the input's
        return False
    return any(name in NETWORK_ERRORS for name in names)


def failure(message: str, cause: BaseException) -> Exception:
    """The error that says `message` about `cause`: an OSError where the machine or the network failed (a full
    disk, no connection: exit status 1), else a UserError (bad input: exit status 2)."""
    return (OSError if machine_failure(cause) else UserError)(message)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, `docker stop`, systemd and Slurm send) taken as Ctrl-C is: the same clean-up (a new
    folder removed, temporaries gone, the trackers told), then one line and exit status 143 (128 + SIGTERM)."""

    exit_status = 143


# SIGINT and SIGTERM as this process found them ignored (`trap '' INT TERM`; a background job of a script, whose
# shell ignores SIGINT for it): they stay ignored, as Python leaves such a SIGINT, where tinygemma's handlers once
# took them (a Ctrl-C meant for the script stopped the training it had put in the background)
IGNORED_AT_START = frozenset(s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) == signal.SIG_IGN)


def handle(signum: int, handler):
    """signal.signal(signum, handler), but for a signal ignored at start, which stays so; the previous handler."""
    return signal.getsignal(signum) if signum in IGNORED_AT_START else signal.signal(signum, handler)


STOPPED: list[int] = []  # the signals `interrupt` took: once one has stopped the command, the entry point holds later
# ones off until it returns (cleared as the entry point starts; in-process calls of cli.main only add to it)


def interrupt(signum, frame) -> None:
    """A SIGINT and SIGTERM handler: raise KeyboardInterrupt, or Terminated for SIGTERM, and from then on hold both
    signals off, so that a second one cannot cut the clean-up short (a Ctrl-C pressed twice left a prepare
    waiting forever on workers never told to stop); under torchrun, SIGTERM keeps its default (torchrun ends a
    worker stuck in a collective with it)."""
    STOPPED.append(signum)
    hold_signals_off()
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def hold_signals_off() -> None:
    """From now on, SIGINT and SIGTERM do nothing (held_off): a clean-up under way is not cut short. Under torchrun
    SIGTERM keeps its default, which ends the process at once."""
    for s in (signal.SIGINT,) + (() if under_torchrun() else (signal.SIGTERM,)):
        handle(s, held_off)


def held_off(signum, frame) -> None:
    """A signal during the clean-up of an earlier one: nothing. (Not SIG_IGN: a signal already pending when the
    first one's handler ran then met SIG_IGN, and Python printed "OSError: Signal 15 ignored due to race
    condition" with a traceback; SIGTERM and Ctrl-C together did that.)"""


def under_torchrun(environ=None) -> bool:
    """Whether torchrun started this process. SIGTERM then keeps its default action: torchrun ends its workers with
    it and must not wait for one blocked in a collective to clean up."""
    environ = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in environ or "LOCAL_RANK" in environ


def says_stops() -> bool:
    """Whether this process says the line of a Ctrl-C or SIGTERM: outside torchrun, or torchrun's first process on
    this machine (LOCAL_RANK 0), since torchrun sends the signal on to every process it started there: one line a
    machine, on each machine's terminal."""
    return not under_torchrun() or os.environ.get("LOCAL_RANK", "0") == "0"


def stop_word(stop: KeyboardInterrupt) -> str:
    """How the command's one line names this interrupt: "terminated" for SIGTERM, "interrupted" for Ctrl-C."""
    return "terminated" if isinstance(stop, Terminated) else "interrupted"


def exit_status(stop: KeyboardInterrupt) -> int:
    """What the shell reports for a process stopped by this interrupt: 130 for Ctrl-C, 143 for SIGTERM."""
    return getattr(stop, "exit_status", 130)


def whole_number(text: str) -> int | None:
    """`text` as a whole number if it is ASCII digits only, else None: str.isdigit() takes "²", which int()
    refuses with a traceback, and int() takes "٤"."""
    return int(text) if text.isascii() and text.isdigit() else None


def describe(error: BaseException, lines: int = 1) -> str:
    """An exception in a few words for a one-line message: its type and its message's first `lines` non-empty
    lines, joined by "; " (a validation error names what is wrong only on its second and third)."""
    kept = [line.strip() for line in str(error).splitlines() if line.strip()][:lines]
    return f"{type(error).__name__}: {'; '.join(kept)[:200 * lines]}" if kept else type(error).__name__


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """This process gets `sig` when its parent dies (Linux; elsewhere nothing: on Windows ctypes.CDLL(None) is a
    TypeError). torchrun starts its workers in sessions of their own, so a launcher killed outright (kill -9, the
    OOM killer, a scheduler killing one pid) left them training and writing the run, beside the resume that
    followed; prepare's tokenizing workers, blocked writing results no one reads, ran forever."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, int(sig))  # PR_SET_PDEATHSIG
