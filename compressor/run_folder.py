"""A run's output folder: runs/NAME unless given, held by one run at a time, written hidden, renamed into place
only when finished.

Two runs started with the same --out would otherwise both report "PASS, run folder: X" while X holds
only the second one's artifact. The first run to start takes an exclusive lock beside the folder
(`.NAME.lock`, flock: the kernel drops it when the process dies, so a killed run never leaves a stale
lock) and keeps it until its folder is committed or thrown away; a second run exits 2 naming the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
import unicodedata
from pathlib import Path
from typing import Optional

from .artifacts import AotiModel, Artifact, EngineModel, OnnxModel, TorchModel
from .errors import UserError

MANIFEST = "manifest.json"
RUNS = Path("runs")  # where a run given no --out writes: runs/RECIPE_NAME
# A folder name may take 255 bytes; a run writes beside it under `.NAME.partial-PID` and locks `.NAME.lock`.
MAX_NAME_BYTES = 200
# Unicode's control, format (e.g. right-to-left override) and line / paragraph separator characters.
INVISIBLE_CATEGORIES = ("Cc", "Cf", "Zl", "Zp")


def folder_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot be one folder's name inside another folder (None when it can)."""
    if not name:
        return "is empty"
    for separator in ("/", "\\"):
        if separator in name:
            return f"contains {separator!r}"
    if ".." in name:
        return "contains '..'"
    if name.startswith("."):
        return "starts with '.'"
    invisible = next((c for c in name if unicodedata.category(c) in INVISIBLE_CATEGORIES), None)
    if invisible is not None:
        return f"contains the control character U+{ord(invisible):04X}"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is {len(name.encode())} bytes long, more than {MAX_NAME_BYTES}"
    return None


def default_run_folder(name: str, root: Path = RUNS) -> Path:
    """root/NAME, the run folder of a run given no --out. Recipes are parsed with a plain name already; this
    checks the resolved path as well, so that neither a name nor a symlink under root puts a run elsewhere."""
    problem = folder_name_problem(name)
    if problem:
        raise UserError(f"recipe name {name!r} {problem}; it cannot name a run folder under {root}/ (rename the "
                        "recipe or give --out)")
    folder = root / name
    resolved, parent = folder.resolve(), root.resolve()
    if resolved.parent != parent:
        raise UserError(f"{folder}: resolves to {resolved}, outside {parent}; give --out, or remove the link")
    return folder


def check_replaceable(out: Path) -> None:
    """Only an earlier run folder may be replaced; anything else at --out is the user's and stays."""
    if out.exists() and not (out / MANIFEST).exists():
        raise UserError(f"{out}: exists and is not a compress run folder; choose another --out")


class FolderLock:
    """An exclusive flock on `.NAME.lock` beside the folder, with the holder's pid, start time and command."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.lock"
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"{self.out}: another compress run is writing this "
                                f"folder ({self._holder()}); wait for it to finish or choose another --out") from None
            # The previous holder unlinks the file before unlocking; a lock taken on that unlinked file
            # protects nothing, so take it again on the file now at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "command": " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd

    def _holder(self) -> str:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "holder unknown"
        return (f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')}: "
                f"{holder.get('command', '?')}")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


class RunFolder:
    """`with RunFolder(out) as folder:` write into `folder.partial`, then `folder.commit()`; leaving the
    block without committing removes what was written. The folder is locked for the whole block."""

    def __init__(self, out: Path):
        self.out = Path(out).resolve()
        self.partial = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self._lock = FolderLock(self.out)
        self._committed = False

    def __enter__(self) -> "RunFolder":
        check_replaceable(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            # Left by a killed run: with the lock held no other run can be writing them (a pid check
            # would keep those whose pid an unrelated process has taken since).
            for stale in [*self.out.parent.glob(f".{self.out.name}.partial-*"),
                          *self.out.parent.glob(f".{self.out.name}.old-*")]:
                shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir()
        except BaseException:
            self._lock.release()
            raise
        return self

    def commit(self) -> None:
        """Rename the finished folder into place, replacing an earlier run folder at the same path."""
        check_replaceable(self.out)  # again: something may have appeared there while the run was busy
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
            self.partial.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.partial.rename(self.out)
        self._committed = True

    def __exit__(self, *exc) -> None:
        try:
            if not self._committed:
                shutil.rmtree(self.partial, ignore_errors=True)
        finally:
            self._lock.release()


def place(artifact: Artifact, folder: Path) -> Artifact:
    """Move the final artifact into a run folder: model.onnx, model.engine or model.pt2 (with config and
    tokenizer), or model/."""
    if isinstance(artifact, (OnnxModel, EngineModel, AotiModel)):
        for item in artifact.folder.iterdir():
            shutil.move(str(item), folder / item.name)
        if isinstance(artifact, (EngineModel, AotiModel)):
            return type(artifact)(folder / artifact.path.name, artifact.task)
        return OnnxModel(folder / artifact.path.name, artifact.task, with_past=artifact.with_past)
    target = folder / "model"
    if artifact.path.is_relative_to(folder):  # a stage's output inside this run: move, don't copy
        shutil.move(str(artifact.path), target)
    else:
        shutil.copytree(artifact.path, target)
    return TorchModel(target, artifact.task, transforms=artifact.transforms, module=artifact.module)
