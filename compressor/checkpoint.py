"""Opening a Hugging Face checkpoint folder safely: checked files, safetensors only unless told otherwise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .artifacts import TorchModel
from .errors import BackendMissing, UserError
from .fit import evaluation_holding
from .kv_cache import apply_written_kv_scheme
from .shards import INDEX_FILE, ShardedCheckpoint
from .torch_transforms import CAST, apply_torch_transform, load_weight_only_torch

log = logging.getLogger(__name__)

PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "tf_model.h5")
TRANSFORMS_FILE = "compress_transforms.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".ckpt", ".h5")


def copy_checkpoint_files(source: Path, target: Path) -> None:
    """Copy config, tokenizer and generation files into a folder that gets new weights: everything
    but weight files and a transforms record, and nothing the target already holds."""
    import shutil

    for item in source.iterdir():
        if item.is_file() and item.name != TRANSFORMS_FILE and not item.name.endswith(WEIGHT_SUFFIXES) \
                and not (target / item.name).exists():
            shutil.copy2(item, target / item.name)


def _check_safetensors(path: Path) -> None:
    """Read the header of each weight file, so a truncated or corrupt file is named before loading."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # safetensors raises several types for a bad header
        raise UserError(f"{path}: not a readable safetensors file ({exc}); re-save or re-download it") from None


def inspect_checkpoint(path: str | Path, allow_pickle: bool = False) -> Path:
    """Validate a checkpoint folder without loading it; return its resolved path."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"{folder}: checkpoint not found (give a local Hugging Face model folder with --model)")
    if not folder.is_dir():
        raise UserError(f"{folder}: a checkpoint is a folder with config.json and *.safetensors, not a file")
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{config}: missing; is {folder} a Hugging Face model folder?")
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    weights = sorted(folder.glob("*.safetensors"))
    if (folder / INDEX_FILE).is_file():
        ShardedCheckpoint(folder)  # every shard the index names is there, whole, and holds its tensors
    if weights:
        for weight in weights:
            _check_safetensors(weight)
        return folder.resolve()
    pickled = [folder / name for name in PICKLE_WEIGHTS if (folder / name).exists()]
    if pickled and not allow_pickle:
        raise UserError(f"{pickled[0]}: pickle-based weights can run arbitrary code when loaded; convert the "
                        "checkpoint to safetensors, or pass --allow-pickle if you trust its source")
    if not pickled:
        raise UserError(f"{folder}: no weights found (expected model.safetensors or sharded *.safetensors)")
    log.warning("loading pickle-based weights from %s because --allow-pickle was given", pickled[0])
    return folder.resolve()


def quantization_method(folder: Path) -> str | None:
    """How a checkpoint folder's weights are quantized ("bitsandbytes nf4", "int8-weight-only"), or None
    for float weights. Stages that need float weights (merging, pruning, export) ask this first."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown")
        kind = quantization.get("bnb_4bit_quant_type") if quantization.get("load_in_4bit") else None
        kind = kind or ("int8" if quantization.get("load_in_8bit") else None)
        return f"{method} {kind}" if kind else str(method)
    transforms_file = folder / TRANSFORMS_FILE
    if transforms_file.exists():
        transforms = json.loads(transforms_file.read_text()).get("transforms", [])
        quantized = [t for t in transforms if t.get("name") != CAST]  # half precision is not quantization
        if quantized:
            return quantized[-1].get("name", "unknown")
    return None


def quantization_of(artifact: TorchModel) -> str | None:
    """How a torch artifact is quantized: its folder's weights, or a transform it carries in memory."""
    return quantization_method(artifact.path) or (artifact.transforms[-1]["name"] if artifact.transforms else None)


def model_class(task: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"text-classification": AutoModelForSequenceClassification,
            "feature-extraction": AutoModel,
            "text-generation": AutoModelForCausalLM}[task]


def cache_keyword(module) -> str:
    """The forward argument that takes past key/values: transformers 5.24 renamed `past_key_values` to `cache`
    (the old name still works, with a deprecation warning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def returned_cache(output):
    """The key/value cache a forward pass returned, under either name."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def load_torch_model(artifact: TorchModel, allow_pickle: bool = False, trust_remote_code: bool = False):
    """Load (or reuse) the nn.Module for a TorchModel, in eval mode, with its transforms applied."""
    if artifact.module is not None:
        return artifact.module
    import torch

    inspect_checkpoint(artifact.path, allow_pickle)
    transforms = list(artifact.transforms)
    transforms_file = artifact.path / TRANSFORMS_FILE
    if transforms_file.exists() and not transforms:
        transforms = json.loads(transforms_file.read_text()).get("transforms", [])
    if transforms and transforms[0].get("stored"):
        # The files hold the transformed weights themselves (int8 weight-only), not a float checkpoint.
        artifact.module = load_weight_only_torch(artifact, transforms[0], model_class(artifact.task),
                                                 trust_remote_code)
        artifact.transforms = transforms
        return artifact.module
    use_safetensors = any(artifact.path.glob("*.safetensors"))
    # A cast model loads in its own dtype: upcasting to float32 first would cost the memory it saves.
    cast = [t for t in transforms if t.get("name") == CAST]
    if cast and len(cast) == len(transforms):
        dtype = getattr(torch, cast[-1]["dtype"])
    else:  # float32, unless a half-precision checkpoint would not fit in memory so (fit.py)
        dtype = getattr(torch, evaluation_holding(artifact.path, artifact.task).dtype or "float32")
    try:
        module = model_class(artifact.task).from_pretrained(
            artifact.path, dtype=dtype, use_safetensors=use_safetensors,
            trust_remote_code=trust_remote_code)
    except ImportError as exc:  # a quantized checkpoint whose backend (e.g. bitsandbytes) is missing
        raise BackendMissing(f"{artifact.path}: loading it needs a package not installed here: {exc}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{artifact.path}: transformers could not load it as a {artifact.task} model: {exc}") from None
    module.eval()
    apply_written_kv_scheme(module, artifact.path)  # a compressed-tensors FP8 KV cache the loader left float
    for name in transforms:
        module = apply_torch_transform(module, name)
    artifact.module = module
    artifact.transforms = transforms
    return module


def empty_model(folder: Path, task: str, trust_remote_code: bool = False):
    """The checkpoint's model built from its config on the meta device: its structure, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    with init_empty_weights():
        return model_class(task).from_config(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code))


def class_names(folder: Path) -> list[str]:
    """A classifier's label names by index, from config.json's id2label (empty when it has none)."""
    try:
        labels = json.loads((folder / "config.json").read_text()).get("id2label") or {}
    except (OSError, ValueError):
        return []
    try:
        by_index = {int(index): str(name) for index, name in labels.items()}
    except (TypeError, ValueError):
        return []
    return [by_index.get(i, str(i)) for i in range(max(by_index, default=-1) + 1)]


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: no usable tokenizer ({exc})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def module_to_change(artifact: TorchModel, allow_pickle: bool = False, trust_remote_code: bool = False):
    """The artifact's module for a stage to change in place. When the artifact held no loaded module,
    the one loaded now is handed over and the artifact forgets it (one copy in memory, not two);
    when it held one, whoever loaded it may still use it (a run's baseline), so a deep copy is returned."""
    import copy

    if artifact.module is not None:
        return copy.deepcopy(artifact.module)
    module = load_torch_model(artifact, allow_pickle, trust_remote_code)
    artifact.module = None
    return module
