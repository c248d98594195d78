"""The typed things that flow between stages: a torch (Hugging Face) model, an ONNX model, a TensorRT engine
or an AOTInductor package."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

ArtifactKind = Literal["torch", "onnx", "engine", "aoti"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_files(paths: list[Path]) -> str:
    """sha256 over file names and contents, in name order, so equal folders give equal digests."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def files_size_mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


# A single ONNX protobuf file cannot exceed 2 GB; keep a margin for the graph itself.
EXTERNAL_DATA_ABOVE_MB = 1800


@dataclass
class TorchModel:
    """A Hugging Face checkpoint folder, optionally with in-memory transforms applied on load.

    `transforms` records deterministic, re-playable changes (e.g. torch dynamic int8) that cannot
    be stored in safetensors; the saved folder carries them in `compress_transforms.json`.
    """

    kind: ClassVar[ArtifactKind] = "torch"
    path: Path
    task: str
    transforms: list[dict] = field(default_factory=list)
    module: Optional[Any] = None  # the loaded nn.Module when a stage produced it in memory

    def weight_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    def size_mb(self) -> float:
        """Bytes a deployment ships: the weight files, or the int8-packed tensors when an in-memory
        transform (torch dynamic int8) replaced the float weights."""
        replayed = [t for t in self.transforms if not t.get("stored")]
        if replayed and self.module is not None:
            import io

            import torch

            buffer = io.BytesIO()
            torch.save(self.module.state_dict(), buffer)
            return buffer.tell() / 1e6
        return files_size_mb(self.weight_files())

    def digest(self) -> str:
        files = self.weight_files() + [self.path / "config.json"]
        if not self.transforms:
            return digest_files(files)
        transforms = json.dumps(self.transforms, sort_keys=True).encode()
        return hashlib.sha256(digest_files(files).encode() + transforms).hexdigest()


@dataclass
class OnnxModel:
    """An ONNX file plus the folder holding its tokenizer and config."""

    kind: ClassVar[ArtifactKind] = "onnx"
    path: Path
    task: str
    with_past: bool = False

    @property
    def folder(self) -> Path:
        return self.path.parent

    def files(self) -> list[Path]:
        """The graph and its external-data files, if any."""
        return [self.path] + sorted(self.folder.glob(self.path.name + "?data*"))

    def digest(self) -> str:
        return digest_files(self.files())

    def size_mb(self) -> float:
        return files_size_mb(self.files())

    def needs_external_data(self) -> bool:
        return self.size_mb() > EXTERNAL_DATA_ABOVE_MB


@dataclass
class _CompiledModel:
    """A single compiled file with a `<name>.json` of what it was built with beside it, and the tokenizer
    and config files in the same folder."""

    path: Path
    task: str

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def metadata_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def files(self) -> list[Path]:
        return [self.path, self.metadata_path]

    def digest(self) -> str:
        return digest_files(self.files())

    def size_mb(self) -> float:
        return files_size_mb([self.path])


@dataclass
class EngineModel(_CompiledModel):
    """A serialized TensorRT engine (`model.engine`) and the metadata it was built with (`model.engine.json`)."""

    kind: ClassVar[ArtifactKind] = "engine"


@dataclass
class AotiModel(_CompiledModel):
    """An AOTInductor package (`model.pt2`: compiled kernels and weights, loaded by torch without the
    model's Python code) and the metadata it was compiled with (`model.pt2.json`: device, dtype, inputs,
    torch version)."""

    kind: ClassVar[ArtifactKind] = "aoti"


Artifact = TorchModel | OnnxModel | EngineModel | AotiModel


def artifact_spec(artifact: Artifact) -> dict:
    """What rebuilds the artifact elsewhere (a child process, a cache entry): kind, path, task and
    the kind's own fields."""
    spec = {"kind": artifact.kind, "path": str(artifact.path), "task": artifact.task}
    if isinstance(artifact, TorchModel):
        spec["transforms"] = artifact.transforms
    if isinstance(artifact, OnnxModel):
        spec["with_past"] = artifact.with_past
    return spec


def artifact_from_spec(spec: dict) -> Artifact:
    path = Path(spec["path"])
    if spec["kind"] == "onnx":
        return OnnxModel(path, spec["task"], with_past=spec.get("with_past", False))
    if spec["kind"] == "engine":
        return EngineModel(path, spec["task"])
    if spec["kind"] == "aoti":
        return AotiModel(path, spec["task"])
    return TorchModel(path, spec["task"], transforms=spec.get("transforms", []))
