"""Atomic files and directories: the one place where checkpoints, training state and exports are made durable.

A directory is written whole into a temporary sibling (`.<name>.tmp-<pid>-*`), fsynced, and renamed into place;
replacing an existing one takes two renames (`target -> .<name>.old-<pid>`, then `tmp -> target`). A process
killed between them leaves no `target` but the complete old copy: `recover_dir`, called by every reader, moves
it back and removes a dead writer's half-written temporaries. A live writer's files are never touched.

    with atomic_dir(out, CheckpointError, "checkpoint") as tmp:
        ...write files into tmp...          # an OSError -> CheckpointError, the previous `out` kept

A finished build leaves a marker (`build.json` with a fingerprint of what determined it): `is_built` is the
"reuse it?" check of the source model and of every training stage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bard_deploy.errors import BardError

BUILD_MARKER = "build.json"


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (the renames and creations inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: object) -> None:
    """Write `obj` as indented JSON and fsync it (inside an atomic directory: the rename publishes it)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def new_tmp_dir(target: Path) -> Path:
    """A fresh temporary directory beside `target` for `replace_dir`; its name carries our pid so that
    `recover_dir` can tell a killed writer's leftovers from a live one's."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))


def replace_dir(new: Path, target: Path) -> None:
    """Move the complete directory `new` to `target`, replacing an older one only after it is in place.

    Two renames: `target` -> `.<name>.old-<pid>`, then `new` -> `target`. A process killed between them
    leaves no `target` but the complete old copy; `recover_dir` (called by every reader) puts it back."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:                 # an error or an interrupt between the renames: put the old one back
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(target: str | Path, error: type[BardError], what: str) -> Iterator[Path]:
    """Yield a temporary directory; when the block ends normally, fsync its files and put it in place of `target`.

    On any failure the temporary directory is removed and the previous `target` (if any) is left as it was; an
    OSError (disk full, permissions) becomes `error` naming `what` and `target`."""
    target = Path(target)
    tmp = new_tmp_dir(target)
    try:
        yield tmp
        mask = _umask()
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)       # safetensors writes 0600 files: give them the usual mode
                fsync_file(f)
        os.chmod(tmp, 0o777 & ~mask)             # mkdtemp made it 0700: readable like any other directory
        fsync_dir(tmp)
        replace_dir(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise error(f"could not write {what} {target}: {e.strerror or e}; the previous one (if any) is kept",
                    str(target)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_file(staged: Path, target: Path) -> None:
    """Put a finished file in place of `target` atomically, with the usual mode (0666 less the umask)."""
    os.chmod(staged, 0o666 & ~_umask())
    fsync_file(staged)
    os.replace(staged, target)
    fsync_dir(target.parent)


def _umask() -> int:
    """This process's umask, read without changing it (os.umask can only set it); 0o022 where unreadable."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # exists, owned by someone else
        return True
    return True


def recover_dir(target: str | Path) -> None:
    """Finish what a killed `replace_dir` / `new_tmp_dir` writer left beside `target`.

    Only leftovers of processes that are no longer alive are touched: with `target` missing, the newest old
    copy is moved back (the kill fell between the two renames); the other old copies and the half-written
    temporary directories are removed. A live writer's files are left alone."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(old|tmp)-(\d+)(?:-.*)?$")
    olds, tmps = [], []
    for p in target.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(2))):
            (olds if m.group(1) == "old" else tmps).append(p)
    olds.sort(key=lambda p: p.stat().st_mtime if p.exists() else 0.0, reverse=True)
    if olds and not target.exists():
        try:
            os.replace(olds.pop(0), target)
            fsync_dir(target.parent)
        except FileNotFoundError:     # another reader (a second torchrun process) put it back first
            pass
    for p in olds + tmps:
        shutil.rmtree(p, ignore_errors=True)


def built_fingerprint(directory: Path) -> str | None:
    """The fingerprint of the finished build in `directory` (after repairing a killed replace), None when there
    is none."""
    recover_dir(directory)
    marker = directory / BUILD_MARKER
    return json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None


def is_built(directory: Path, fingerprint: str) -> bool:
    """True when `directory` is a finished build of exactly `fingerprint` (after repairing a killed replace)."""
    return built_fingerprint(directory) == fingerprint
