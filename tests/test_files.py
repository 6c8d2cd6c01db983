"""Atomic files: the permissions a plain open() gives, one line naming the file when a write fails (the old file
kept), and output paths under a file refused in one line."""

import contextlib
import errno
import json
import os
import re
import signal
import stat
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from tinygemma import files
from tinygemma.errors import UserError
from tinygemma.files import (
    FolderLock,
    WriteError,
    atomic_path,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    check_output_folder,
    check_output_path,
    is_gguf_file,
    read_safetensors,
    remove_temporaries,
    sorted_metadata,
    temporary_target,
)


@contextlib.contextmanager
def umask(mask: int):
    """The process's umask set to `mask` for the block (process-wide: fine in a single-threaded test)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_an_interrupt_as_the_temporary_is_made_leaves_no_temporary(tmp_path, monkeypatch):
    """Ctrl-C just after atomic_path had made its temporary, before the block that removes it on failure began,
    left it behind (an interrupted prepare kept its folder for a .train.bin.*.tmp: a flaky CI run)."""
    close = os.close

    def interrupted(fd):
        close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(tmp_path / "train.bin") as tmp:
            tmp.write_bytes(b"never")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_files_get_the_permissions_open_gives(tmp_path, mask):
    with umask(mask):
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
        atomic_write_text(tmp_path / "a.txt", "text")
        atomic_write_json(tmp_path / "a.json", {"a": 1})
        atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"tokens")
    assert mode(tmp_path / "plain") == 0o666 & ~mask
    for name in ("a.txt", "a.json", "a.safetensors", "a.bin"):
        assert mode(tmp_path / name) == 0o666 & ~mask, name
    # Replacing a file keeps its permissions, as open(path, "w") keeps them: a file its owner made private stays so.
    for name, private in (("a.txt", 0o600), ("plain", 0o640)):
        os.chmod(tmp_path / name, private)
    with umask(mask):
        atomic_write_text(tmp_path / "a.txt", "again")
        with open(tmp_path / "plain", "w") as f:
            f.write("again")
    assert (mode(tmp_path / "a.txt"), mode(tmp_path / "plain")) == (0o600, 0o640)


def test_a_failed_safetensors_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    atomic_save_safetensors({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):  # half a file, then safetensors' own error
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(files, "save_file", disk_full)
    with pytest.raises(WriteError) as raised:
        atomic_save_safetensors({"w": torch.zeros(3)}, path)
    message = str(raised.value)
    assert message.startswith(f"could not write {path} (") and "No space left" in message
    assert message.endswith("the disk may be full") and "\n" not in message
    assert isinstance(raised.value, OSError)  # the CLI prints an OSError as one line, exit status 1
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]  # no temporary left
    assert torch.equal(read_safetensors(path)["w"], torch.ones(3))


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors writes metadata in hash order, which changes from one save to the next: exports of the same
    weights differed byte for byte until the keys were sorted. Sorting leaves what every reader sees unchanged."""
    from safetensors import safe_open

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.bfloat16)}
    metadata = {"format": "pt", "exporter": "tinygemma", "train_block_size": "128", "note": "é, \"q\" \\ /"}
    saved = []
    for i in range(12):
        atomic_save_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata=metadata)
        saved.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(set(saved)) == 1
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata
    header = saved[0][8 : 8 + int.from_bytes(saved[0][:8], "little")]
    assert list(json.loads(header)["__metadata__"]) == sorted(metadata)  # in the file, in key order
    loaded = read_safetensors(tmp_path / "0.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_a_failed_text_write_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_text(path, "old")

    def fail(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(type(path), "write_text", fail)
    with pytest.raises(WriteError, match=r"could not write .*config.json \(No space left on device\); the disk"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]


def test_a_rename_windows_refuses_while_the_file_is_busy_is_tried_again_there_alone(tmp_path, monkeypatch):
    """Windows refuses to replace a file another process holds open for a moment (an antivirus scanning it, a
    reader of last.json): the PermissionError ended a training run at a checkpoint. There the rename is tried
    again, and a file still busy after the last try is the one-line write error, the old file kept; elsewhere a
    PermissionError is a real refusal, said at once."""
    real, calls = os.replace, []

    def busy_for(times: int):
        def replace(source, target):
            calls.append(target)
            if len(calls) <= times:
                raise PermissionError(13, "Access is denied", str(target))
            real(source, target)
        return replace

    path = tmp_path / "last.json"
    atomic_write_json(path, {"step": 1})
    monkeypatch.setattr(files, "BUSY_WAITS", (0.0,) * 3)
    monkeypatch.setattr(os, "replace", busy_for(1))  # (this is Linux: no retry)
    with pytest.raises(WriteError, match=r"could not write .*last.json \(Access is denied\)"):
        atomic_write_json(path, {"step": 2})
    assert len(calls) == 1 and json.loads(path.read_text()) == {"step": 1}
    monkeypatch.setattr(files, "BUSY_ERRORS", (PermissionError,))  # as on Windows
    calls.clear()
    monkeypatch.setattr(os, "replace", busy_for(3))  # busy for all but the last try
    atomic_write_json(path, {"step": 2})
    assert len(calls) == 4 and json.loads(path.read_text()) == {"step": 2}
    calls.clear()
    monkeypatch.setattr(os, "replace", busy_for(4))  # busy past it
    with pytest.raises(WriteError, match=r"could not write .*last.json \(Access is denied\)"):
        atomic_write_json(path, {"step": 3})
    monkeypatch.undo()
    assert len(calls) == 4 and json.loads(path.read_text()) == {"step": 2} and sorted(tmp_path.iterdir()) == [path]


def test_an_output_path_under_a_file_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="metrics.jsonl is a file, not a folder"):
        check_output_path(tmp_path / "metrics.jsonl" / "hf" / "deeper")
    assert check_output_path(tmp_path / "new" / "folder") == tmp_path / "new" / "folder"
    with pytest.raises(WriteError, match="Not a directory"):  # writing there without the check
        atomic_write_text(tmp_path / "metrics.jsonl" / "x.json", "{}")

    # A link to nowhere, as an output folder or above any output: mkdir said only "File exists". A file's own
    # path may be one: the file replaces the link (a GGUF export's --out).
    (tmp_path / "out").symlink_to(tmp_path / "gone" / "x")
    (tmp_path / "up").symlink_to(tmp_path / "gone")
    for check, path in ((check_output_folder, tmp_path / "out"), (check_output_path, tmp_path / "up" / "run")):
        with pytest.raises(UserError, match=r"is a link to .*gone.*, which does not exist"):
            check(path, *(["the run"] if check is check_output_folder else []))
    assert check_output_path(tmp_path / "out") == tmp_path / "out"
    (tmp_path / "gone").mkdir()
    assert check_output_path(tmp_path / "up" / "run") == tmp_path / "up" / "run"


def test_temporary_names_are_recognised(tmp_path, monkeypatch):
    seen = []
    with atomic_path(tmp_path / "train.bin") as tmp:
        seen.append(tmp.name)
    assert temporary_target(seen[0]) == "train.bin"
    assert temporary_target(".meta.json.ab_c1234.tmp") == "meta.json"  # mkstemp's names, left by older versions
    assert temporary_target("train.bin") is None and temporary_target(".x.tmp") is None


def test_only_the_temporaries_of_the_files_named_are_removed(tmp_path):
    """What killed atomic writes of a command's own files left; a temporary of another file, the files
    themselves and folders stay."""
    for name in (".loss.png.0a1b2c3d.tmp", ".config.json.ab_c1234.tmp", ".notes.txt.0a1b2c3d.tmp", "loss.png"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".metrics.jsonl.0a1b2c3d.tmp").mkdir()
    remove_temporaries(tmp_path, {"loss.png", "config.json", "metrics.jsonl"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".metrics.jsonl.0a1b2c3d.tmp", ".notes.txt.0a1b2c3d.tmp",
                                                          "loss.png"]
    remove_temporaries(tmp_path / "missing", {"loss.png"})  # no folder, nothing to do


def test_a_lock_taken_on_a_file_its_holder_removed_is_taken_again(tmp_path, monkeypatch):
    """A holder that lets go with release(remove=True) deletes the lock file first: a process that had opened
    that file just before locked the deleted file, and a third one then locked a new file: two holders. The lock
    now counts only if it is on the file the path names."""
    from tinygemma.files import FolderLock

    a = FolderLock(tmp_path, "a run")
    a.acquire()
    real_open = os.open

    def open_then_a_lets_go(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        if a.fd is not None:
            a.release(remove=True)  # after B opened the file, before B locks it
        return fd

    monkeypatch.setattr(files.os, "open", open_then_a_lets_go)
    b = FolderLock(tmp_path, "a run")
    b.acquire()
    monkeypatch.undo()
    c = FolderLock(tmp_path, "a run")
    with pytest.raises(UserError, match="is a run another process is writing"):
        c.acquire()
    b.release()


def test_a_filesystem_without_locks_is_written_unlocked_leaving_no_lock_file(tmp_path, monkeypatch):
    """Some network mounts have no flock: the writer goes on unlocked, and no .lock is left behind (it stayed
    among an export's files, and --push-to-hub uploaded it)."""
    import errno
    import fcntl

    from tinygemma.files import FolderLock, staged_folder

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = FolderLock(tmp_path, "a run")
    lock.acquire()
    assert lock.fd is None and not (tmp_path / ".lock").exists()
    with staged_folder(tmp_path / "out", frozenset({"a.txt"}), "an export") as stage:
        (stage / "a.txt").write_text("a")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.txt"]


def test_check_unlocked_refuses_a_held_folder_and_leaves_no_lock_file_of_its_own(tmp_path):
    """The probe an export (and `run`) makes before slow work: a folder another writer holds is refused naming it;
    one nobody holds is left as it was, its lock file (a tinygemma writer's, kept) there only if it was before."""
    from tinygemma.files import FolderLock, check_unlocked

    check_unlocked(tmp_path, "an export")
    assert list(tmp_path.iterdir()) == []
    holder = FolderLock(tmp_path, "a dataset")
    holder.acquire()
    with pytest.raises(UserError, match=r"is a dataset another process is writing"):
        check_unlocked(tmp_path, "an export")
    holder.release()  # its file stays, as a killed holder's would
    lock = tmp_path / ".lock"
    os.utime(lock, (1_000_000_000, 1_000_000_000))
    before = lock.read_bytes()
    check_unlocked(tmp_path, "an export")
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]
    # Read only: the lock file is not rewritten (it named the probe's pid, a dry run's, and its time changed)
    assert lock.read_bytes() == before and lock.stat().st_mtime == 1_000_000_000


def test_a_refusal_names_what_the_holder_writes(tmp_path):
    """An export refused by a prepare's lock said "is an export another process is writing": the holder's kind,
    recorded in the lock file beside its pid, is named."""
    from tinygemma.files import FolderLock, is_lock_file

    holder = FolderLock(tmp_path, "a dataset")
    holder.acquire()
    assert is_lock_file(tmp_path / ".lock")
    with pytest.raises(UserError, match=rf"is a dataset another process is writing \(pid {os.getpid()}\)"):
        FolderLock(tmp_path, "an export").acquire()
    holder.release()


@pytest.mark.parametrize("signals,status", [(["SIGINT"], -2), (["SIGINT", "SIGTERM"], -15)])
def test_signals_held_over_the_renames_are_delivered_after_them(signals, status):
    """Ctrl-C (and a SIGTERM) amid an export's renames wait for them; a SIGTERM that came with a SIGINT is not
    lost behind the KeyboardInterrupt."""
    import subprocess
    import sys

    script = ("import os, signal\n"
              "from tinygemma.files import signals_held\n"
              "with signals_held():\n"
              f"    for name in {signals!r}:\n"
              "        os.kill(os.getpid(), getattr(signal, name))\n"
              "    print('renamed', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(files.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout == "renamed\n" and proc.returncode == status, proc.stderr
    if status == -2:  # (Python ends an uncaught KeyboardInterrupt by SIGINT)
        assert proc.stderr.rstrip().endswith("KeyboardInterrupt")


@pytest.mark.parametrize("text, words", [
    ('{"tokens": ' + "9" * 5000 + "}", "Exceeds the limit (4300 digits)"),  # a ValueError, not a JSONDecodeError
    ("[" * 100_000, "maximum recursion depth"),
    ("{not json", "Expecting property name"),
], ids=["long-number", "deep", "not-json"])
def test_a_json_file_python_cannot_read_is_one_line(tmp_path, text, words):
    """meta.json, config.json, checkpoint.json: whatever json.loads raises on them is a UserError naming the file
    (a number of 5,000 digits, or nesting past Python's recursion limit, was a traceback)."""
    path = tmp_path / "meta.json"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"dataset metadata {path} is not valid JSON \(.*{re.escape(words)}"):
        files.read_json(path, "dataset metadata")


def test_a_failed_write_into_new_nested_folders_leaves_none_of_them(tmp_path):
    """--out a/b/c where only tmp_path exists: a write that fails removes c, b and a, which it made, and nothing
    above them; a write that succeeds keeps them all."""
    from tinygemma.files import staged_folder

    out = tmp_path / "a" / "b" / "c"
    with pytest.raises(OSError, match="disk gone"):
        with staged_folder(out, frozenset({"x.txt"}), "an export") as stage:
            (stage / "x.txt").write_text("x")
            raise OSError("disk gone")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("mine")  # a folder the user had: it stays, with what it held
    with pytest.raises(OSError, match="disk gone"):
        with staged_folder(out, frozenset({"x.txt"}), "an export"):
            raise OSError("disk gone")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["keep.txt"]
    with staged_folder(out, frozenset({"x.txt"}), "an export") as stage:
        (stage / "x.txt").write_text("x")
    assert [p.name for p in out.iterdir()] == ["x.txt"]
    (tmp_path / "mine").mkdir()  # through "..": the folder mkdir makes on the way (new) goes, the user's (mine) stays
    with pytest.raises(OSError, match="disk gone"):
        with staged_folder(tmp_path / "new" / ".." / "mine" / "c", frozenset({"x.txt"}), "an export"):
            raise OSError("disk gone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "mine"] and not any((tmp_path / "mine").iterdir())


def test_no_output_goes_inside_a_runs_checkpoints_even_through_a_link(tmp_path):
    """A run's checkpoints/ is pruned, so nothing else may be written there; a run known by its recipe or
    last.json, not a user's own folder of that name; the guard holds where checkpoints/ links to a bigger disk."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {}}))
    (tmp_path / "disk" / "ck").mkdir(parents=True)
    (tmp_path / "disk" / "ck" / "last.json").write_text(json.dumps({"dir": "step_000001", "step": 1}))
    (run / "checkpoints").symlink_to(tmp_path / "disk" / "ck")
    for inside in (run / "checkpoints" / "hf", run / "checkpoints" / "step_000001" / "m.gguf"):
        with pytest.raises(files.UserError, match="a run's checkpoints \\(which that run prunes\\)"):
            files.check_output_path(inside)
    (tmp_path / "mine" / "checkpoints").mkdir(parents=True)
    for fine in (run / "hf", tmp_path / "mine" / "checkpoints" / "model"):
        assert files.check_output_path(fine) == fine


def test_a_machine_or_network_failure_is_told_from_bad_input():
    """Exit status 1 (the machine's or the network's failure) or 2 (the input's), whatever library raised it:
    errors.failure's choice, which prepare's hub download, tiktoken's vocabulary, the trackers and the hub upload
    take."""
    import errno

    import httpx
    import requests

    from tinygemma.errors import UserError, failure, machine_failure

    def hub_error(status: int) -> Exception:
        from huggingface_hub.errors import HfHubHTTPError

        request = httpx.Request("GET", "https://huggingface.co/api/models/me/tiny")
        return HfHubHTTPError(f"{status} Client Error", response=httpx.Response(status, request=request))

    machine = [OSError(errno.ENOSPC, "No space left on device"), PermissionError(errno.EACCES, "Permission denied"),
               OSError(errno.EMFILE, "Too many open files"), ConnectionError("reset"), TimeoutError(),
               OSError(errno.ENETUNREACH, "Network is unreachable"), OSError(errno.EHOSTUNREACH, "No route to host"),
               requests.exceptions.ConnectionError("unreachable"), requests.exceptions.ReadTimeout("slow"),
               httpx.ConnectError("refused"), httpx.ReadTimeout("slow"),
               pytest.importorskip("wandb").errors.CommError("could not reach api.wandb.ai"),
               *(hub_error(status) for status in (500, 503, 429))]  # the hub down or busy (HfHubHTTPError)
    inputs = [FileNotFoundError(errno.ENOENT, "No such file"), IsADirectoryError(errno.EISDIR, "Is a directory"),
              ValueError("bad name"), KeyError("text"), OSError("no errno"),
              pytest.importorskip("wandb").errors.AuthenticationError("WANDB_API_KEY invalid"),
              *(hub_error(status) for status in (401, 403, 404))]  # a bad token or name: the input's
    assert [machine_failure(e) for e in machine] == [True] * len(machine)
    assert [machine_failure(e) for e in inputs] == [False] * len(inputs)
    assert type(failure("x", machine[0])) is OSError and type(failure("x", inputs[0])) is UserError


def test_an_atomic_write_on_a_read_only_disk_is_one_line_naming_its_file(tmp_path, monkeypatch):
    """On a read-only disk the temporary cannot be made, and unlinking its name (which never existed) fails too:
    that second error, "[Errno 30] ... '.m.gguf.1a2b3c4d.tmp'", replaced the line naming the file (export --format
    gguf, compare --plot). Simulated: creating or unlinking a file under the folder is EROFS, as there."""
    real_open, real_unlink = os.open, Path.unlink

    def read_only(function):
        def refuse(path, *args, **kwargs):
            if str(path).startswith(str(tmp_path)):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return function(path, *args, **kwargs)
        return refuse

    monkeypatch.setattr(os, "open", read_only(real_open))
    monkeypatch.setattr(Path, "unlink", read_only(real_unlink))
    with pytest.raises(files.WriteError) as refused, atomic_path(tmp_path / "m.gguf"):
        pass
    assert str(refused.value) == f"could not write {tmp_path / 'm.gguf'} (Read-only file system)"


def test_an_atomic_write_is_synced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    """Durability, not only atomicity: the new file's data reach the disk before the rename makes it the file,
    and the folder's entry after (a power cut otherwise can leave the new name on an empty file)."""
    import tinygemma.files as files_module

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else None))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(files_module.os, "fsync", fsync)
    monkeypatch.setattr(files_module.os, "replace", replace)
    files_module.atomic_write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    if events[0][1] is not None:
        assert [events[0][1], events[2][1]] == [False, True]  # the file's data, then the folder's


# ------------------------------------------------------------------ mutation round 14

def test_a_lock_file_naming_its_holder_is_a_lock_file(tmp_path):  # f04
    from tinygemma.files import FolderLock, is_lock_file, others_than
    lock = FolderLock(tmp_path, "a training run")
    lock.acquire()
    try:
        assert is_lock_file(tmp_path / ".lock")  # "PID a training run\n": over 16 bytes
        assert others_than(tmp_path, set()) == []
    finally:
        lock.release()


def test_a_staging_folder_is_another_s_unless_the_command_stages(tmp_path):  # f03
    from tinygemma.files import STAGE_PREFIX, others_than
    (tmp_path / f"{STAGE_PREFIX}abc").mkdir()
    assert others_than(tmp_path, set()) == [f"{STAGE_PREFIX}abc"]
    assert others_than(tmp_path, set(), stages=True) == []


def test_read_json_of_a_list_is_one_line(tmp_path):  # f06
    from tinygemma.files import read_json
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="does not hold a JSON object"):
        read_json(tmp_path / "x.json")


def test_a_staged_folder_keeps_the_mode_of_the_files_it_replaces(tmp_path):  # f12
    import os
    import stat

    from tinygemma.files import staged_folder
    (tmp_path / "a.txt").write_text("old")
    os.chmod(tmp_path / "a.txt", 0o600)
    with staged_folder(tmp_path, frozenset({"a.txt"}), "an export") as stage:
        (stage / "a.txt").write_text("new")
        os.chmod(stage / "a.txt", 0o644)
    assert (tmp_path / "a.txt").read_text() == "new"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o600


def test_a_full_quota_says_the_disk_may_be_full_too(tmp_path):
    """A write refused by a disk quota (EDQUOT, as on a shared cluster's home) is a full disk for the user."""
    import errno

    from tinygemma.files import WriteError, write_errors

    with pytest.raises(WriteError) as raised:
        with write_errors(tmp_path / "model.safetensors"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert str(raised.value).endswith("(Disk quota exceeded); the disk may be full")


def test_a_long_library_error_is_cut_to_one_short_line(tmp_path, monkeypatch):
    """safetensors' own errors can carry a long first line: the WriteError keeps at most 200 of its characters."""
    from safetensors import SafetensorError

    from tinygemma.files import WriteError, write_errors

    with pytest.raises(WriteError) as raised:
        with write_errors(tmp_path / "model.safetensors"):
            raise SafetensorError("Error while serializing: " + "x" * 5000)
    message = str(raised.value)
    assert message.startswith(f"could not write {tmp_path / 'model.safetensors'} (Error while serializing: ")
    assert len(message) < 200 + len(str(tmp_path)) + 60 and "\n" not in message


def test_no_free_temporary_name_leaves_the_others_temporaries_alone(tmp_path, monkeypatch):
    """When every temporary name is taken, the write fails in one line and deletes none of the files that held
    those names (another writer's temporaries)."""
    from tinygemma.files import WriteError, atomic_write_text

    monkeypatch.setattr(files.secrets, "token_hex", lambda n: "0a1b2c3d")
    theirs = tmp_path / ".a.txt.0a1b2c3d.tmp"
    theirs.write_text("another writer's")
    with pytest.raises(WriteError, match="no free temporary name"):
        atomic_write_text(tmp_path / "a.txt", "mine")
    assert theirs.read_text() == "another writer's" and not (tmp_path / "a.txt").exists()


def test_a_users_dotted_tmp_file_is_no_temporary_and_stays(tmp_path):
    """Only atomic_path's (and mkstemp's) names, 8 characters between the dots: a user's
    .config.json.backup.tmp beside an export is no temporary of config.json, and is not removed."""
    assert temporary_target(".config.json.backup.tmp") is None
    (tmp_path / ".config.json.backup.tmp").write_text("mine")
    remove_temporaries(tmp_path, {"config.json"})
    assert [p.name for p in tmp_path.iterdir()] == [".config.json.backup.tmp"]


def test_a_failed_write_in_a_staged_folder_names_the_file_it_was_to_become(tmp_path):
    """A full disk while an export writes its weights names --out's model.safetensors, not the hidden staging
    folder's (which is gone by the time the user reads the line), and keeps the cause's errno."""
    import errno

    from tinygemma.files import staged_folder, write_errors

    out = tmp_path / "hf"
    with pytest.raises(WriteError) as raised:
        with staged_folder(out, frozenset({"model.safetensors"}), "an export") as stage:
            with write_errors(stage / "model.safetensors"):
                raise OSError(errno.ENOSPC, "No space left on device")
    assert str(raised.value) == f"could not write {out / 'model.safetensors'} (No space left on device); the disk may be full"
    assert raised.value.errno == errno.ENOSPC


def test_temporaries_of_the_files_a_command_replaces_are_not_anothers(tmp_path):
    """A folder holding only what a write killed at its start left (a temporary of an export's weights, of a
    prepare's train.bin) is the command's to write into again; a temporary of any other file is someone's."""
    from tinygemma.files import others_than

    (tmp_path / ".model.safetensors.0a1b2c3d.tmp").write_bytes(b"\0" * 100)
    assert others_than(tmp_path, set(), {"model.safetensors"}) == []
    assert others_than(tmp_path, set()) == [".model.safetensors.0a1b2c3d.tmp"]


def test_an_empty_output_path_is_refused_not_taken_for_the_current_folder(tmp_path):
    """An empty or blank path (out="" from Python, an unset variable) is no path: Path("") is the current folder."""
    for empty in ("", "   "):
        with pytest.raises(UserError, match="--out must be a path"):
            check_output_path(empty)
        with pytest.raises(UserError, match="--out must be a path"):
            check_output_folder(empty, "the export")


def test_an_output_folder_that_is_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--out .*notes.txt is a file; give the folder to write the run into"):
        check_output_folder(tmp_path / "notes.txt", "the run")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_folder_with_a_metrics_log_alone_is_a_training_run(tmp_path):
    from tinygemma.files import is_training_run

    assert not is_training_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    assert is_training_run(tmp_path)


def test_an_output_through_a_link_to_a_runs_checkpoints_is_refused(tmp_path):
    """A link elsewhere (latest -> run/checkpoints) names no checkpoints/ folder itself: what it resolves to does,
    and that run would prune an export written there."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {}}))
    (tmp_path / "latest").symlink_to(run / "checkpoints")
    with pytest.raises(UserError, match="a run's checkpoints \\(which that run prunes\\)"):
        check_output_path(tmp_path / "latest" / "hf")


def test_an_exports_lock_file_is_a_lock_file_and_its_refusal_names_the_holder(tmp_path):
    from tinygemma.files import FolderLock, is_lock_file, others_than

    holder = FolderLock(tmp_path, "an export")
    holder.acquire()
    try:
        assert is_lock_file(tmp_path / ".lock") and others_than(tmp_path, set()) == []
        with pytest.raises(UserError, match=rf"is an export another process is writing \(pid {os.getpid()}\)"):
            FolderLock(tmp_path, "a run").acquire()
    finally:
        holder.release()


def test_a_lock_file_left_by_a_longer_named_holder_is_rewritten_whole(tmp_path):
    """The file a killed holder left stays; the next holder's shorter line replaces it rather than overwriting
    its start (a tail of the old line would make it no lock file, and its refusal name no pid)."""
    from tinygemma.files import FolderLock, is_lock_file

    (tmp_path / ".lock").write_text("4194304 a training run\n")
    lock = FolderLock(tmp_path, "a run")
    lock.acquire()
    try:
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()} a run\n" and is_lock_file(tmp_path / ".lock")
    finally:
        lock.release()


def test_a_probe_beside_another_probe_is_not_refused(tmp_path):
    """check_unlocked probes with a shared lock: two dry runs probing a folder at once do not refuse each other,
    while a writer's exclusive lock is refused."""
    import fcntl

    from tinygemma.files import check_unlocked

    (tmp_path / ".lock").write_text("")
    fd = os.open(tmp_path / ".lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another probe, at this moment
        check_unlocked(tmp_path, "a run")
    finally:
        os.close(fd)


def test_a_read_only_filesystem_is_the_machines_failure_and_interrupts_keep_the_shells_statuses():
    """A read-only filesystem (a full /tmp remounted read-only, a container's image) is exit status 1, like a full
    disk; Ctrl-C ends with 130 and SIGTERM with 143, as the shell reports a process those signals stopped."""
    import errno

    from tinygemma.errors import Terminated, exit_status, failure, machine_failure

    assert machine_failure(OSError(errno.EROFS, "Read-only file system"))
    assert type(failure("x", OSError(errno.EROFS, "Read-only file system"))) is OSError
    assert (exit_status(KeyboardInterrupt()), exit_status(Terminated())) == (130, 143)


def test_describe_keeps_the_lines_asked_for_where_a_validation_error_names_what_is_wrong():
    """A tracker's failure (describe(error, lines=3)): pydantic names the bad field on the second line and the
    reason on the third; describe joins the first non-empty lines asked for."""
    from tinygemma.errors import describe

    error = ValueError("1 validation error for Settings\n\n  project\n    Input should be a valid string\nmore")
    assert describe(error, lines=3) == "ValueError: 1 validation error for Settings; project; Input should be a valid string"
    assert describe(error) == "ValueError: 1 validation error for Settings" and describe(KeyError()) == "KeyError"
    long_lines = ValueError("a" * 150 + "\n" + "b" * 150)  # cut at 200 characters a line asked for, not 200 in all
    assert describe(long_lines, lines=2) == "ValueError: " + "a" * 150 + "; " + "b" * 150


def test_a_signal_handler_installed_outside_python_gives_way_to_pythons_own_not_to_ours(monkeypatch):
    """signal.signal returns None for a handler installed outside Python, which cannot be put back: the block's
    handler stayed installed for good, and every later Ctrl-C or SIGTERM was swallowed. Python's own come back:
    Ctrl-C raises KeyboardInterrupt (the clean-up runs), SIGTERM ends the process."""
    import signal

    from tinygemma.files import signal_handler

    calls = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: calls.append((signum, handler)))  # returns None
    ours = lambda signum, frame: None  # noqa: E731
    with signal_handler(ours):
        assert calls == [(signal.SIGINT, ours), (signal.SIGTERM, ours)]
    assert calls[2:] == [(signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)]


def test_a_disk_full_errno_says_the_disk_may_be_full_whatever_its_words():
    """A full disk is named by its errno, whatever the words of its message (here another language's)."""
    with pytest.raises(WriteError) as raised:
        with files.write_errors("/somewhere/out.bin"):
            raise OSError(errno.ENOSPC, "Plus d'espace disponible sur le peripherique")
    assert str(raised.value) == ("could not write /somewhere/out.bin (Plus d'espace disponible sur le peripherique); "
                                 "the disk may be full")


def test_a_many_line_cause_is_named_by_its_first_line(tmp_path):
    """A cause of several lines is named by its first."""
    with pytest.raises(WriteError) as raised:
        with files.write_errors(tmp_path / "m.safetensors"):
            raise SafetensorError("Error while serializing: I/O error\ncaused by: something deeper")
    assert str(raised.value) == f"could not write {tmp_path / 'm.safetensors'} (Error while serializing: I/O error)"


def test_a_staged_folder_removes_its_own_files_the_block_did_not_write(tmp_path):
    """A staged folder removes its own files that the block did not write again: an export without a tokenizer into
    an earlier export with one would otherwise keep the old tokenizer.json beside the new model."""
    from tinygemma.files import staged_folder

    for name, text in (("a.txt", "old"), ("b.txt", "old"), ("user.txt", "mine")):
        (tmp_path / name).write_text(text)
    with staged_folder(tmp_path, frozenset({"a.txt", "b.txt"}), "an export") as stage:
        (stage / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "user.txt"]
    assert (tmp_path / "a.txt").read_text() == "new"


def test_two_metadata_keys_are_written_in_key_order(tmp_path):
    """An export's metadata without a trained block size has two keys (format, exporter); its bytes must not depend
    on safetensors' hash order."""
    path = tmp_path / "m.safetensors"
    for _ in range(16):
        atomic_save_safetensors({"w": torch.zeros(1)}, path, metadata={"zz": "1", "aa": "2"})
        raw = path.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        assert list(json.loads(raw[8:8 + size])["__metadata__"]) == ["aa", "zz"]


def test_a_transformers_config_is_no_run_recipe_even_with_a_train_key(tmp_path):
    """A transformers config.json is no run's recipe, even with a "train" key."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "train": {"note": "x"}}))
    assert not files.is_training_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"train": {}, "model": {}}))
    assert files.is_training_run(tmp_path)


def test_a_link_named_as_a_staging_folder_is_not_taken_for_one(tmp_path):
    """A link named as a staging folder, to a user's folder, is not taken for a killed staging folder."""
    from tinygemma.files import others_than

    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tinygemma-staged.abcd1234").symlink_to(tmp_path / "elsewhere")
    (out / ".tinygemma-staged.real0001").mkdir()
    assert others_than(out, set(), stages=True) == [".tinygemma-staged.abcd1234"]


def test_an_empty_lock_file_is_tinygemmas(tmp_path):
    """A writer killed between creating .lock and writing its pid
    leaves it empty; the folder is still the command's own."""
    (tmp_path / ".lock").write_bytes(b"")
    assert files.others_than(tmp_path, set()) == []
    (tmp_path / ".lock").write_text("user notes\n")
    assert files.others_than(tmp_path, set()) == [".lock"]


def test_a_header_gives_each_tensor_its_shape_and_dtype(tmp_path):
    """A header read alone gives each tensor its own shape and dtype."""
    atomic_save_safetensors({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(4, dtype=torch.int64)},
                            tmp_path / "m.safetensors")
    header = read_safetensors(tmp_path / "m.safetensors", header_only=True)
    assert {k: (v.dtype, tuple(v.shape), v.device.type) for k, v in header.items()} == {
        "a": (torch.bfloat16, (2, 3), "meta"), "b": (torch.int64, (4,), "meta")}


def test_a_staged_folder_renames_its_first_file_first_and_its_last_file_last(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("old")
    order = []
    replace = os.replace

    def recording(src, dst):
        order.append(os.path.basename(dst))
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", recording)
    own = frozenset({"config.json", "model.safetensors", "README.md"})
    with files.staged_folder(folder, own, "an export", first="model.safetensors", last="config.json") as stage:
        for name in ("README.md", "config.json", "model.safetensors"):
            (stage / name).write_text(name)
    assert order[0] == "model.safetensors" and order[-1] == "config.json"
    assert (folder / "config.json").read_text() == "config.json"


def test_a_header_whose_json_would_grow_is_left_as_it_is(tmp_path):
    header = b'{"__metadata__":{"b":"1","a":"2"},"n":1E5}'  # Python re-spells 1E5 as 100000.0: longer
    path = tmp_path / "w.safetensors"
    data = len(header).to_bytes(8, "little") + header + b"\x00" * 8
    path.write_bytes(data)
    sorted_metadata(path)
    assert path.read_bytes() == data


def test_a_runs_checkpoints_known_by_last_json_alone_are_refused_as_an_output(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.json").write_text(json.dumps({"dir": "step_000001"}))
    with pytest.raises(UserError, match="a run's checkpoints"):
        check_output_path(ckpts / "model.gguf")


def test_a_header_only_read_gives_an_unknown_dtype_as_uint8(tmp_path):
    path = tmp_path / "w.safetensors"
    files.atomic_save_safetensors({"w": torch.zeros(2, 3, dtype=torch.float8_e4m3fn)}, path)
    tensors = read_safetensors(path, header_only=True)
    assert tensors["w"].dtype == torch.uint8 and tuple(tensors["w"].shape) == (2, 3)


def test_acquiring_a_lock_already_held_is_nothing(tmp_path):
    lock = FolderLock(tmp_path, "a training run")
    lock.acquire()
    try:
        fd = lock.fd
        lock.acquire()  # the lock it holds, kept (opening the file again, it would be refused by its own lock)
        assert lock.fd == fd
    finally:
        lock.release(remove=True)
    assert not (tmp_path / ".lock").exists()


def test_a_gguf_file_is_told_by_its_magic(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (tmp_path / "b.gguf").write_bytes(b"not a gguf")
    assert is_gguf_file(tmp_path / "a.gguf")
    assert not is_gguf_file(tmp_path / "b.gguf")
    assert not is_gguf_file(tmp_path / "missing.gguf")


def test_a_json_file_holding_no_object_is_nothing_to_the_folder_checks(tmp_path):
    """peek_json gives {} for JSON that is not an object (an array, a number, a string): a config.json or
    meta.json holding one makes its folder "not that" to every check that reads it, never an AttributeError."""
    from tinygemma.data import is_prepared_dataset
    from tinygemma.hf import is_hf_export

    (tmp_path / "model.safetensors").write_bytes(b"")
    for text in ('["train"]', "[1, 2]", "5", '"text"'):
        (tmp_path / "config.json").write_text(text)
        (tmp_path / "meta.json").write_text(text)
        assert files.peek_json(tmp_path / "config.json") == {}, text
        assert not files.holds_run_recipe(tmp_path), text
        assert not is_hf_export(tmp_path), text
        assert not is_prepared_dataset(tmp_path), text


def test_a_ctrl_c_as_a_manager_is_entered_leaves_what_it_made_removed(tmp_path, interrupt_on_entry):
    """A Ctrl-C in the instant after a manager's generator yields, before the `with` holds the manager: contextlib
    raises it from __enter__, and the generator's clean-up waited for the garbage collector (an interrupted prepare
    left its new folder, empty: the temporary in it was still there when the folder's clean-up came). Each of
    these cleans up at once; checked while the exception, and so the generator, is alive."""
    from tinygemma.files import (
        atomic_path,
        locked_folder,
        made_folders,
        signal_handler,
        signals_held,
        staged_folder,
    )

    (tmp_path / "staged").mkdir()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for name, manager in (("atomic_path", atomic_path(tmp_path / "file.txt")),
                          ("made_folders", made_folders(tmp_path / "new" / "deeper")),
                          ("locked_folder", locked_folder(tmp_path / "locked", "a run")),
                          ("staged_folder", staged_folder(tmp_path / "staged", frozenset(), "a")),
                          ("signals_held", signals_held()), ("signal_handler", signal_handler(signal.SIG_IGN))):
        interrupt_on_entry.arm(1, name)
        with pytest.raises(KeyboardInterrupt) as stopped:
            with manager:
                pytest.fail("the block ran")
        del stopped  # (after the checks: the exception, and the generator with it, lived until here)
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["staged"], interrupt_on_entry.name
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers, interrupt_on_entry.name

    # contextlib's own manager of the same generator leaves the temporary there: the instant is the one meant
    interrupt_on_entry.arm(1, "atomic_path")
    with pytest.raises(KeyboardInterrupt) as stopped:
        with contextlib.contextmanager(atomic_path.__wrapped__)(tmp_path / "file.txt"):
            pytest.fail("the block ran")
    assert [p.name for p in tmp_path.glob(".file.txt.*.tmp")], stopped  # (alive: contextlib's generator with it)


@pytest.mark.parametrize("call", ["mkdir", "lock file", "mkdtemp"])
def test_a_ctrl_c_just_after_a_call_that_makes_something_removes_it(tmp_path, monkeypatch, call):
    """A Ctrl-C just after the call that made something, before the code that removes it on failure knew of it:
    made_folders' mkdir came before its clean-up's try (the folders stayed); a lock file's making before
    acquire() kept it (release() never removed the file, nor so the folder made for it); mkdtemp's staging folder
    before staged_folder named it. Each is removed now, with the folder made for it."""
    from tinygemma.files import locked_folder, made_folders, staged_folder

    owner, name, manager = {"mkdir": (Path, "mkdir", made_folders(tmp_path / "new" / "deeper")),
                            "lock file": (files.os, "open", locked_folder(tmp_path / "new", "a dataset")),
                            "mkdtemp": (files.tempfile, "mkdtemp", staged_folder(tmp_path / "new", frozenset(), "a"))
                            }[call]
    real, calls = getattr(owner, name), []

    def then_ctrl_c(*args, **kwargs):
        made = real(*args, **kwargs)
        if call != "lock file" or Path(args[0]).name == ".lock":
            calls.append(args)
            os.kill(os.getpid(), signal.SIGINT)
        return made

    monkeypatch.setattr(owner, name, then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        with manager:
            pytest.fail("the block ran")
    assert calls and list(tmp_path.iterdir()) == []
