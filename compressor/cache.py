"""The stage cache: every stage's output kept under a digest of what determines it, so that
`compress run --resume` and `compress compare` re-run a recipe only from its first changed stage.

A stage's key is a sha256 over: the key of its input (the previous stage's key, or the digest of
every file in the checkpoint folder), the stage's config, the recipe task, the benchmark threads
(calibration passes run with them), the digest of any file or folder the config names by `path`,
the versions of the packages that shape outputs, a digest of compress's own source, and what
the stage adds itself (build_engine: the GPU). Chaining
keys rather than hashing each intermediate output means a stage is found again exactly when
everything upstream of it is unchanged.

An entry is written into a hidden temporary folder and renamed into place only when complete, so
a run killed while storing leaves nothing that looks cached; `entry.json` records every output
file's sha256, checked again when the entry is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .artifacts import Artifact, artifact_from_spec, sha256_file
from .fixtures import home
from .machine import package_versions

log = logging.getLogger(__name__)

# Bump when the entry layout or key recipe changes, so that older entries are not reused.
CACHE_VERSION = 1
ENTRY = "entry.json"
TEMPORARY = ".tmp-"


def cache_root() -> Path:
    """$COMPRESS_CACHE, else the `stages` folder beside the fixtures ($COMPRESS_HOME or ~/.cache/compress)."""
    configured = os.environ.get("COMPRESS_CACHE")
    return Path(configured).expanduser() if configured else home() / "stages"


def _digest_folder(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


_checkpoint_keys: dict[tuple, str] = {}


def checkpoint_key(checkpoint: Path) -> str:
    """The first stage's input: every file in the checkpoint folder, weights, config and tokenizer.
    Remembered for the process while no file's size or modification time changes: a run asks for it
    for the stages and again for the baseline's scores, and a 7B checkpoint takes a minute to hash."""
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    state = tuple((str(p), info.st_size, info.st_mtime_ns) for p, info in ((p, p.stat()) for p in files))
    if state not in _checkpoint_keys:
        _checkpoint_keys[state] = _digest_folder(checkpoint)
    return _checkpoint_keys[state]


_code_digest: Optional[str] = None


def code_digest() -> str:
    """sha256 of compress's own Python source: a changed stage implementation invalidates its entries."""
    global _code_digest
    if _code_digest is None:
        package = Path(__file__).parent
        digest = hashlib.sha256()
        for path in sorted(package.rglob("*.py")):
            digest.update(str(path.relative_to(package)).encode())
            digest.update(path.read_bytes())
        _code_digest = digest.hexdigest()
    return _code_digest


def referenced_files(value: Any) -> dict[str, str]:
    """Digests of the files and folders a stage config names under a `path` key (adapters,
    calibration files): a changed file changes the key even when its name stays the same."""
    found: dict[str, str] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "path" and isinstance(item, str) and Path(item).expanduser().exists():
                path = Path(item).expanduser()
                found[item] = sha256_file(path) if path.is_file() else _digest_folder(path)
            else:
                found.update(referenced_files(item))
    elif isinstance(value, list):
        for item in value:
            found.update(referenced_files(item))
    return found


def payload_key(payload: dict) -> str:
    """A key over `payload` and what every entry's key holds: the cache layout, the versions of the
    packages that shape outputs, and compress's own source."""
    payload = {**payload, "cache": CACHE_VERSION, "packages": package_versions(), "code": code_digest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def stage_key(input_key: str, config: Any, task: str, threads: int, trust_remote_code: bool,
              salt: Optional[dict] = None) -> str:
    stage = config.model_dump(mode="json")
    return payload_key({"input": input_key, "stage": stage, "task": task, "threads": threads,
                        "trust_remote_code": trust_remote_code, "files": referenced_files(stage), "salt": salt or {}})


@dataclass
class Entry:
    key: str
    folder: Path
    meta: dict

    @property
    def output(self) -> Path:
        return self.folder / "output"

    def size_mb(self) -> float:
        return sum(p.stat().st_size for p in self.output.rglob("*") if p.is_file()) / 1e6


def lookup(key: str, root: Optional[Path] = None) -> Optional[Entry]:
    folder = (root or cache_root()) / key
    try:
        meta = json.loads((folder / ENTRY).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return Entry(key, folder, meta) if meta.get("cache") == CACHE_VERSION else None


def store(key: str, artifact: Artifact, workdir: Path, record: dict, about: dict, root: Optional[Path] = None
          ) -> Optional[Entry]:
    """Copy a finished stage's folder into the cache. Returns None (and logs why) when the artifact does
    not live inside the stage's folder, which the cache could not restore."""
    root = root or cache_root()
    if not artifact.path.is_relative_to(workdir):
        log.info("stage %s: output %s is outside its folder; not cached", record["type"], artifact.path)
        return None
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f"{TEMPORARY}{key}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        shutil.copytree(workdir, temporary / "output")
        files = {str(p.relative_to(temporary / "output")): sha256_file(p)
                 for p in sorted((temporary / "output").rglob("*")) if p.is_file()}
        meta = {"cache": CACHE_VERSION, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "kind": artifact.kind, "artifact": str(artifact.path.relative_to(workdir)), "task": artifact.task,
                "with_past": getattr(artifact, "with_past", False),
                "transforms": getattr(artifact, "transforms", []), "record": record, "files": files, **about}
        (temporary / ENTRY).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            temporary.rename(root / key)
        except OSError:  # another run stored the same key meanwhile; its entry is as good as ours
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return lookup(key, root)


def store_files(key: str, files: dict[str, bytes], record: dict, about: dict, root: Optional[Path] = None
                ) -> Optional[Entry]:
    """Store files that are not a stage's output (the baseline's scores) as an entry of their own, written
    and renamed into place as a stage's is; `compress cache ls` lists it and `clear` removes it."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f"{TEMPORARY}{key}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        (temporary / "output").mkdir(parents=True)
        for name, data in files.items():
            (temporary / "output" / name).write_bytes(data)
        meta = {"cache": CACHE_VERSION, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "record": record, "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
                **about}
        (temporary / ENTRY).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            temporary.rename(root / key)
        except OSError:  # stored by another run meanwhile
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return lookup(key, root)


def read_files(entry: Entry) -> Optional[dict[str, bytes]]:
    """The files of an entry stored by store_files, or None (the entry is removed) when one no longer
    matches the sha256 recorded when it was stored."""
    found = {}
    for name, expected in entry.meta["files"].items():
        try:
            data = (entry.output / name).read_bytes()
        except OSError:
            data = None
        if data is None or hashlib.sha256(data).hexdigest() != expected:
            log.warning("cache entry %s: %s changed since it was stored; computing it again", entry.key[:12], name)
            shutil.rmtree(entry.folder, ignore_errors=True)
            return None
        found[name] = data
    return found


def restore(entry: Entry, workdir: Path) -> Optional[Artifact]:
    """Copy a cached output into `workdir` and return its artifact, or None (the entry is removed)
    when a file no longer matches the sha256 recorded when it was stored."""
    shutil.copytree(entry.output, workdir, dirs_exist_ok=True)
    for name, expected in entry.meta["files"].items():
        path = workdir / name
        if not path.is_file() or sha256_file(path) != expected:
            log.warning("stage cache entry %s: %s changed since it was stored; running the stage again",
                        entry.key[:12], name)
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            shutil.rmtree(entry.folder, ignore_errors=True)
            return None
    return artifact_from_spec({**entry.meta, "path": str(workdir / entry.meta["artifact"])})


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(root: Optional[Path] = None) -> list[Path]:
    """Half-written entries left by runs that were killed while storing."""
    root = root or cache_root()
    if not root.is_dir():
        return []
    stale = []
    for path in root.glob(f"{TEMPORARY}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not process_alive(int(pid)):
            stale.append(path)
    return stale


def entries(root: Optional[Path] = None) -> list[Entry]:
    root = root or cache_root()
    if not root.is_dir():
        return []
    found = [lookup(path.name, root) for path in root.iterdir()
             if path.is_dir() and not path.name.startswith(TEMPORARY)]
    return sorted((e for e in found if e is not None), key=lambda e: e.meta.get("created", ""))


def clear(root: Optional[Path] = None) -> tuple[int, float]:
    """Remove every entry and every stale half-written one; return (entries removed, MB freed)."""
    root = root or cache_root()
    if not root.is_dir():
        return 0, 0.0
    # Entries of any cache version, not only the ones this version would reuse.
    stored = [path for path in root.iterdir() if path.is_dir() and (path / ENTRY).exists()
              and not path.name.startswith(TEMPORARY)]
    freed = 0.0
    for path in stored + stale_temporaries(root):
        freed += sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
        shutil.rmtree(path, ignore_errors=True)
    return len(stored), freed
