"""Files written so that a crash never leaves a half-written one, and read with one clear line when they are bad.

Every file goes to a temporary name beside its target and is renamed into place (an atomic step on POSIX), so a
reader sees the old file or the new one, never a mix; it gets the permissions a plain open() gives (0666 less the
umask). A write that fails (a full disk) is one line naming the file and the cause, and leaves the old file as it
was. Nothing here unpickles: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from tinygemma.errors import UserError, handle, interrupt_safe

if TYPE_CHECKING:
    import torch

# torch (its tensors, safetensors.torch) is imported where a tensor is read or written, not with this module: the
# tokenizer's module imports it, and prepare's worker processes, where they are spawned (macOS, Windows) or come
# from a fork server (Linux from Python 3.14), import that alone, in a second where torch takes 3 and 200 MB each.


def save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file."""
    from safetensors.torch import save_file as save

    save(tensors, filename, metadata=metadata)


# Windows refuses to replace or rename a file that another process holds open for a moment (an antivirus
# scanning the file just written, a `generate --ckpt RUN` reading last.json): a PermissionError that is gone a
# moment later, which ended a training run at its next checkpoint. There such a rename is tried again for about
# 4 s; elsewhere a PermissionError is a real refusal, said at once.
BUSY_ERRORS: tuple[type[OSError], ...] = (PermissionError,) if os.name == "nt" else ()
BUSY_WAITS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # seconds between the tries


def replace_file(source: str | Path, target: str | Path) -> None:
    """os.replace (a file, or a folder onto a name that is free), tried again while Windows says it is busy."""
    for wait in (*BUSY_WAITS, None):
        try:
            os.replace(source, target)
            return
        except BUSY_ERRORS:
            if wait is None:
                raise
            time.sleep(wait)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class WriteError(OSError):
    """A file could not be written; the message names the file and the cause (the CLI prints it, exit status 1)."""


def _disk_full(error: BaseException) -> bool:
    text = str(error)
    return (getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text
            or re.search(r"\d+ requested and \d+ written", text) is not None)  # numpy's words for a short write


@contextlib.contextmanager
def write_errors(path: str | Path):
    """Turn a failure to write `path` (an OSError, or safetensors' own error) into one WriteError line naming
    `path` and the cause, and saying so when the disk may be full."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, SafetensorError) as e:
        cause = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        full = "; the disk may be full" if _disk_full(e) else ""
        error = WriteError(f"could not write {path} ({cause}){full}")
        error.errno = getattr(e, "errno", None)
        raise error from None


def _temporary_names(path: Path) -> Iterator[Path]:
    """Names for a new temporary beside `path`, to be created with O_EXCL (atomic_path)."""
    for _ in range(100):
        yield path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


@interrupt_safe
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; once the block succeeds, fsync it and rename it onto `path`.

    A crash at any moment leaves either the old file or the new one, never a half-written file under `path`. The
    file gets the permissions open() gives a new file (those the temporary was created with), even where the block
    replaced the temporary with a file of its own (safetensors writes one of mode 0600); a file replaced keeps its
    own, as open() keeps them. Failures to create, sync or rename the file are a WriteError naming `path`; the
    block's own are its own.
    """
    path, tmp = Path(path), None
    try:  # from before the temporary exists: a Ctrl-C just after it is made still removes it
        with write_errors(path):
            if path.parent.exists() and not path.parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(path.parent))
            path.parent.mkdir(parents=True, exist_ok=True)
            # Created with mode 0666 as open() creates files, so that the kernel applies the umask (and a default
            # ACL) itself: os.umask reads it only by setting it, process-wide, which races with other threads.
            # (tempfile.mkstemp would create it 0600 whatever the umask.)
            for tmp in _temporary_names(path):
                try:
                    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
                    break
                except FileExistsError:
                    tmp = None  # another's
            # open(path, "w") keeps an existing file's permissions: so does replacing it (a file its owner made 0600
            # stays 0600); a new file gets the temporary's, 0666 less the umask.
            mode = stat.S_IMODE((path if path.is_file() else tmp).stat().st_mode)
        yield tmp
        with write_errors(path):
            with open(tmp, "rb+") as f:
                if stat.S_IMODE(os.fstat(f.fileno()).st_mode) != mode:
                    os.chmod(tmp, mode)
                os.fsync(f.fileno())
            replace_file(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if tmp is not None:  # (a read-only disk: its name was never made, and unlinking it fails too, an error
            with contextlib.suppress(OSError):  # that replaced the one naming `path`)
                tmp.unlink(missing_ok=True)
        raise


def temporary_target(name: str) -> str | None:
    """The file name a temporary file of atomic_path (or of mkstemp, which it once used) stands for, or None when
    `name` is not one: what a killed writer can leave beside its target."""
    match = re.fullmatch(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp", name)
    return match.group(1) if match else None


def remove_temporaries(folder: str | Path, of: set[str] | frozenset[str]) -> None:
    """Delete the temporaries that killed atomic writes of the files named `of` left in `folder` (a killed write
    never reaches its rename, so its temporary stays, as large as the file it was writing). Only files of
    `of`: a temporary of a file some other program writes there is its own."""
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.iterdir():
            if temporary_target(path.name) in of and path.is_file():
                path.unlink(missing_ok=True)


STAGE_PREFIX = ".tinygemma-staged."  # a staging folder inside the folder it is staged for (staged_folder)


@interrupt_safe
def staged_folder(folder: str | Path, own: frozenset[str], what: str, check: Callable[[], object] = lambda: None,
                  first: str | None = None, last: str | None = None):
    """Write a folder of files as one: yield a new staging folder inside `folder` for the block to write; once
    the block succeeds, its files replace `folder`'s in a burst of renames, each keeping the mode of the file it
    replaces, and the files of `own` it did not write are removed. An error or Ctrl-C in the block leaves `folder`
    as it was (a new one is removed); Ctrl-C waits for the burst. `last`, the file that makes the folder what it
    is (an export's config.json), is removed first and renamed in last, and `first` (the export's marked weights)
    renamed in first: a kill amid the burst leaves a folder that is no model, which the next writer recognises
    as its own. `folder` is locked meanwhile (`what` names the writer for a second one's refusal), and `check()`
    runs again once it is, in case another command wrote it between the caller's check and the lock; a kill
    leaves the staging folder, which the next writer removes. Staging inside `folder` keeps the renames on its own
    filesystem (a mount point, a symlink elsewhere) and needs no right to write its parent."""
    folder = Path(folder).absolute()
    stage = None
    with locked_folder(folder, what, check):
        try:
            remove_stages(folder)  # a killed writer's: no live one, since this process holds the lock
            with write_errors(folder), signals_held():  # (a Ctrl-C as mkdtemp returned left the stage unnamed)
                stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=folder))
            try:
                yield stage
            except WriteError as e:  # named as the file it was to become
                error = WriteError(str(e).replace(str(stage), str(folder)))
                error.errno = e.errno
                raise error from None
            with write_errors(folder), signals_held():
                # `first` first (a kill after it leaves a folder the next writer recognises), `last` last
                written = sorted((p.name for p in stage.iterdir()), key=lambda name: (name == last, name != first))
                modes = {name: stat.S_IMODE((folder / name).stat().st_mode) for name in written
                         if (folder / name).is_file()}
                if last is not None:
                    (folder / last).unlink(missing_ok=True)
                for name in own - set(written):
                    (folder / name).unlink(missing_ok=True)
                for name in written:
                    if name in modes:
                        os.chmod(stage / name, modes[name])
                    replace_file(stage / name, folder / name)
                remove_temporaries(folder, own)
                fsync_dir(folder)
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)


@interrupt_safe
def made_folders(folder: str | Path):
    """`folder`, made if need be with any missing parents; those of them the block left empty (a failed write) are
    removed when it ends."""
    folder = Path(folder)
    # The folders mkdir will make, the deepest first; ".." taken lexically, so that none is a folder already there
    # (in new/../mine/c, c and new: never mine).
    made = [Path(p) for p in dict.fromkeys(os.path.abspath(q) for q in (folder, *folder.absolute().parents))
            if not os.path.exists(p)]
    try:  # (a Ctrl-C just after mkdir still removes what it made)
        with write_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)
        yield folder
    finally:
        for path in made:
            try:
                path.rmdir()  # only if empty: the first folder that is not ends it
            except FileNotFoundError:  # (never made: mkdir stopped before it)
                continue
            except OSError:
                break


@interrupt_safe
def locked_folder(folder: str | Path, what: str, check: Callable[[], object] = lambda: None):
    """`folder`, made if need be and locked while the block writes it (`what` names the writer in a second one's
    refusal); `check()` runs once the lock is held, in case another command wrote the folder between the caller's
    own check and the lock. The lock file goes with the lock, and the folders made here (`folder` and any missing
    parents) that the block left empty (a failed write) are removed."""
    with made_folders(folder) as folder:
        lock = FolderLock(folder, what)
        try:
            lock.acquire()
            check()
            yield folder
        finally:
            lock.release(remove=True)


def remove_stages(folder: Path) -> None:
    """Remove the staging folders killed writers left in `folder` (call with its lock held)."""
    with write_errors(folder):
        for left in Path(folder).iterdir():
            if _is_stage(left):
                shutil.rmtree(left, ignore_errors=True)


def _is_stage(path: Path) -> bool:
    """Whether `path` is a staging folder of staged_folder's (a real folder, never a link to one)."""
    return path.name.startswith(STAGE_PREFIX) and path.is_dir() and not path.is_symlink()


@interrupt_safe
def signals_held(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """Hold `signals` (SIGINT and SIGTERM) back while the block runs (a few renames): their handlers run when it
    ends. (A signal mask would not do: the kernel hands a process's signal to any thread not masking it, torch's
    own.)"""
    caught = []
    try:
        with signal_handler(lambda signum, frame: caught.append(signum), signals):
            yield
    finally:
        for s in sorted(set(caught), key=lambda s: s != signal.SIGTERM):  # SIGINT's KeyboardInterrupt would end
            signal.raise_signal(s)  # the loop: a SIGTERM that came with it goes first


# What Python itself does on these signals: Ctrl-C raises KeyboardInterrupt (so clean-up runs), SIGTERM ends it.
PYTHONS_OWN = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


@interrupt_safe
def signal_handler(handler, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """`handler` for `signals` (SIGINT and SIGTERM) while the block runs, then the handlers there were; outside the
    main thread, where Python runs signal handlers and none can be set, nothing."""
    try:
        previous = {s: handle(s, handler) for s in signals}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():  # (None: one installed outside Python, which cannot be put back:
            handle(s, PYTHONS_OWN[s] if handler is None else handler)  # Python's own then, not ours kept)


def others_than(folder: str | Path, own: set[str], temporaries_of: set[str] = frozenset(),
                stages: bool = False) -> list[str]:
    """The names in `folder` that a command writing `own` did not leave there: neither one of `own`, nor a
    temporary a killed atomic write left of one of `own` or of `temporaries_of`, nor a lock file of tinygemma's
    (`stages`: nor a killed staging folder, for a command that writes through staged_folder and removes them).
    None: the folder is the command's to write into again."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in own and temporary_target(p.name) not in own | temporaries_of
                  and not (p.name == LOCK_NAME and is_lock_file(p))
                  and not (stages and _is_stage(p)))


def is_lock_file(path: Path) -> bool:
    """Whether `path` is a FolderLock's file: a plain file holding nothing or its holder's pid and kind (a user's
    own .lock is not)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 64:
            return False
        text = path.read_bytes()
        return not text or LOCK_TEXT.fullmatch(text) is not None
    except OSError:
        return False


def check_output_path(path: str | Path, flag: str = "--out") -> Path:
    """`path` as a Path, refused in one line when it is no path, when no file can be made there because a folder
    above it is a file (rather than the OSError "Not a directory" that writing would meet) or links to nothing, or
    when it lies in a run's checkpoints/, whose pruning would delete it (in_run_checkpoints)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():  # (from Python: prepare(5, ...))
        raise UserError(f"{flag} must be a path, got {path!r}")
    path = Path(path)
    for parent in path.parents:  # nearest first, up to the first that exists (a link to nowhere does not)
        check_not_dangling(parent, path, flag)  # (mkdir would say only "File exists")
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    ckpts = in_run_checkpoints(path)
    if ckpts is not None:
        raise UserError(f"{flag} {path} is inside {ckpts}, a run's checkpoints (which that run prunes): give it a "
                        "place of its own")
    return path


def check_not_dangling(link: Path, path: Path, flag: str) -> None:
    if link.is_symlink() and not link.exists():
        raise UserError(f"{flag} {path}: {link} is a link to {os.readlink(link)}, which does not exist: create that "
                        "folder, or give another place")


def check_output_folder(path: str | Path, what: str, flag: str = "--out") -> Path:
    """`path` as a Path for a command that fills a folder with `what`: refused in one line, naming `flag` (the
    option or setting that gave it), when it or a folder above it is a file. Whether an existing folder is the
    command's to fill is the command's own question."""
    path = check_output_path(path, flag)
    check_not_dangling(path, path, flag)  # (a file's path may: the file replaces the link)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give the folder to write {what} into")
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp, write_errors(path):
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """`tensors` and `metadata` as a safetensors file, written atomically; the same tensors and metadata give the
    same bytes (sorted_metadata)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp, write_errors(path):
        save_file(tensors, str(tmp), metadata=metadata)
        if metadata and len(metadata) > 1:
            sorted_metadata(tmp)


def sorted_metadata(path: str | Path) -> None:
    """Put the metadata in a safetensors file's header in key order, in place. safetensors writes it in its hash
    map's order, which differs from one save to the next, so two exports of the same weights differed in their
    bytes (and in their hashes). Only the order changes, so the header keeps its length and the tensors their
    offsets; a header that would not (another JSON spelling of some value) is left as it is."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8").ljust(size)
        if len(text) == size:
            f.seek(8)
            f.write(text)


def read_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, a number of 4,300 digits, nested too deep
        raise UserError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} does not hold a JSON object")
    return obj


def peek_json(path: str | Path) -> dict:
    """The JSON object in `path`, or {} when there is none (missing, unreadable, not JSON, not an object): for
    telling what a folder holds, where a bad file simply means "not that"."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # (JSON nested past Python's stack)
        return {}
    return obj if isinstance(obj, dict) else {}


def is_training_run(path: str | Path) -> bool:
    """Whether `path` is a folder holding a training run: its checkpoints/, its metrics.jsonl, or the resolved recipe
    that training writes as its config.json (sections such as train and model, where a transformers config.json
    has a model_type)."""
    path = Path(path)
    return (path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists() or holds_run_recipe(path)


def holds_run_recipe(path: Path) -> bool:
    """Whether `path`'s config.json is a training run's recipe (sections such as train), not a transformers
    config.json (which has a model_type)."""
    config = peek_json(path / "config.json")
    return "train" in config and "model_type" not in config


def in_run_checkpoints(path: str | Path) -> Path | None:
    """The checkpoints/ folder of a run that `path` is or lies in, if any: the run prunes what is in there, so no
    other output may live there. A run is known by its checkpoints/last.json or its recipe's config.json (not by
    a folder named checkpoints alone: a user's own may hold saved models)."""
    given, resolved = Path(os.path.abspath(path)), Path(path).resolve()  # (a checkpoints/ linked to a bigger disk)
    for folder in (given, *given.parents, resolved, *resolved.parents):
        if folder.name == "checkpoints" and ((folder / "last.json").exists() or holds_run_recipe(folder.parent)):
            return folder
    return None


# safetensors' dtype names (a header's), as torch's dtypes' names
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors(path: str | Path, header_only: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a truncated or corrupt file is a UserError, never a crash.
    `header_only`: the tensors as meta tensors of their shapes and dtypes (an unknown dtype as uint8), read from
    the header alone, which safetensors checks against the file's length (a truncated file is refused)."""
    import torch

    try:
        with safe_open(str(path), framework="pt") as f:
            if header_only:
                slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118
                return {k: torch.empty(s.get_shape(), device="meta",
                                       dtype=getattr(torch, SAFETENSORS_DTYPES.get(s.get_dtype(), "uint8")))
                        for k, s in slices.items()}
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except FileNotFoundError:
        raise UserError(f"weights not found: {path}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


LOCK_TEXT = re.compile(rb"(\d+)(?: (an? [a-z ]+))?\n")  # what FolderLock writes: its holder's pid and kind
LOCK_NAME = ".lock"  # in a folder one process writes at a time: a training run


class FolderLock:
    """An exclusive lock on FOLDER/.lock, held while one process writes the folder (a run being trained), so that a
    second writer (another `train --resume`, torchrun workers orphaned by a killed launcher) is refused in one line
    instead of pruning the checkpoints the first one reads. The kernel drops the lock with its holder, so a
    killed process leaves no stale lock; the file stays, naming the last holder's pid. Where there is no flock
    (Windows), nothing is locked."""

    def __init__(self, folder: Path, what: str):
        self.folder, self.what, self.fd = Path(folder), what, None

    def acquire(self) -> None:
        """Take the lock if the folder exists and it is not held already (else nothing: call again once it exists)."""
        try:
            import fcntl
        except ImportError:
            return
        if self.fd is not None or not self.folder.is_dir():
            return
        with signals_held():  # (a Ctrl-C between the lock file's making and self.fd left a file release never removed)
            self.fd = self._locked(fcntl)

    def _locked(self, fcntl) -> int | None:
        """A descriptor of the lock file, locked; None where this filesystem has no locks."""
        path = self.folder / LOCK_NAME
        for _ in range(100):
            existed = path.exists()
            with write_errors(path):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0),
                             0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                held = held_by_another(fd, e, self.folder, self.what)
                os.close(fd)
                if held is None:
                    if not existed:  # a filesystem without locks (some network mounts): go on unlocked, leaving
                        path.unlink(missing_ok=True)  # no file behind
                    return None
                raise held from None
            if _same_file(fd, path):
                break
            os.close(fd)  # a holder removed the file as it let go (release(remove=True)): lock the one there now
        else:
            raise UserError(f"could not lock {path}: it keeps being replaced")
        try:  # the holder's pid and kind, for the next one's message; the lock is held whatever happens here
            with write_errors(path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {self.what}\n".encode("ascii"))
        except BaseException:
            if not existed:  # (a disk full: the folder made for it is left as it was found)
                path.unlink(missing_ok=True)
            os.close(fd)  # never a lock this process holds and cannot let go of
            raise
        return fd

    def release(self, remove: bool = False) -> None:
        """Let go; `remove`: delete the lock file first (a folder left as it was), which a process waiting on the
        old file notices (acquire locks only the file the path names)."""
        if self.fd is not None:
            if remove:
                (self.folder / LOCK_NAME).unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def held_by_another(fd: int, error: OSError, folder: Path, what: str) -> UserError | None:
    """The refusal to give when flock on the lock file `fd` failed with `error` because another process holds it
    (naming its pid and kind, which the file holds); None where it failed otherwise (no locks on this filesystem)."""
    if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        return None
    holder = LOCK_TEXT.fullmatch(os.pread(fd, 64, 0).strip() + b"\n")
    pid, kind = (holder.group(1).decode(), (holder.group(2) or b"").decode()) if holder else ("", "")
    return UserError(f"{folder} is {kind or what} another process is writing" + (f" (pid {pid})" if pid else "")
                     + "; wait for it to finish, or stop it, then run this again")


def check_unlocked(folder: str | Path, what: str) -> None:
    """Refuse in one line, now rather than after slow work, a folder that another process is writing (its
    FolderLock held). Read-only: an existing lock file is opened for reading and probed with a shared lock, which
    a writer's exclusive one refuses; nothing is written (a dry run's folder stays as it was), and a lock file
    that is not there is held by no one."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:  # none there (or not ours to read): nothing to probe
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        held = held_by_another(fd, e, Path(folder), what)
        if held is not None:
            raise held from None
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file that starts as a GGUF file does (what an export may replace)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False
