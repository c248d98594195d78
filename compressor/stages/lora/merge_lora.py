"""merge_lora: fold one or more PEFT LoRA adapters (optionally weighted) into the base weights.

Before merging, each adapter is checked against the checkpoint without loading the model: task,
base model (when its recorded base is a local folder), target modules and every tensor shape.
After merging, the merged model's outputs are compared with the unmerged model's (adapters on)
on seeded inputs, and the stage fails above `atol`, so a merge is never taken on trust.

A causal LM larger than memory merges layer by layer (`execution`, merge_lora_layerwise.py): the base
weights streamed from its shards, and the same check run with one transformer block in memory at a time.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator

from ... import fixtures
from ...anatomy import open_for_compression, record_coverage, restore_layout
from ...artifacts import TorchModel, files_size_mb
from ...checkpoint import copy_checkpoint_files, load_torch_model, quantization_of
from ...errors import StageFailed, UserError
from ...linear_layers import is_linear_like, shape_of
from ...runners import TorchRunner
from ..base import Stage, StageConfigBase, StageContext
from ...streamed import LayerwiseModel
from ..blockwise.layerwise import choose_execution
from .merge_lora_layerwise import merge_layerwise, refuse_unsupported

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
# PEFT's task_type for each compress task; an adapter with no task_type fits any task.
PEFT_TASKS = {"text-classification": "SEQ_CLS", "text-generation": "CAUSAL_LM",
              "feature-extraction": "FEATURE_EXTRACTION"}
# Fields that fix every weight shape; a base recorded as a local folder must agree on them.
SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "num_labels")
# Stages that change the weights an adapter was trained against.
MUST_COME_AFTER = ("prune", "quantize")


class AdapterSpec(StageConfigBase):
    path: Optional[str] = Field(None, description="a PEFT LoRA adapter folder (adapter_config.json and "
                                                  "adapter_model.safetensors), relative to the working directory")
    fixture: Optional[str] = Field(None, description="a built-in adapter fixture instead of a path "
                                                     "(sentiment-lora)")
    weight: float = Field(1.0, description="the adapter's update is multiplied by this before merging; with "
                                           "several adapters the merged update is their weighted sum")

    @model_validator(mode="after")
    def _one_source(self) -> "AdapterSpec":
        if (self.path is None) == (self.fixture is None):
            raise ValueError("give exactly one of `path` or `fixture`")
        return self

    def folder(self) -> Path:
        if self.fixture is not None:
            if self.fixture not in fixtures.ADAPTERS:
                raise UserError(f"merge_lora: no adapter fixture {self.fixture!r}; built-in: "
                                f"{', '.join(fixtures.ADAPTERS)}")
            return fixtures.ensure(self.fixture)
        return Path(self.path).expanduser()


class MergeLoraConfig(StageConfigBase):
    type: Literal["merge_lora"]
    adapters: list[AdapterSpec] = Field(min_length=1, description="adapters to merge, each with a weight")
    atol: float = Field(1e-3, gt=0, description="largest allowed max abs difference between the merged model's "
                                                "outputs and the unmerged model's with adapters on")
    check_samples: int = Field(8, gt=0, le=256, description="seeded random token sequences the merged and "
                                                            "unmerged models are compared on")
    check_length: int = Field(64, gt=0, le=4096, description="tokens per check sequence")
    execution: Literal["auto", "whole", "layerwise"] = Field(
        "auto", description="causal LMs: layerwise streams the base weights from the safetensors shards, merges "
                            "and writes them one transformer block at a time (models larger than memory) and "
                            "checks outputs one block at a time; auto chooses it when the float32 model would not "
                            "fit; whole loads the model with PEFT")


class MergeLora(Stage):
    type = "merge_lora"
    summary = "Merge PEFT LoRA adapters (weighted) into the base weights; verified against the unmerged model"
    config_model = MergeLoraConfig
    accepts = ("torch",)

    def check_order(self, config: MergeLoraConfig, earlier):
        changed = [(i, c.type) for i, c in enumerate(earlier) if c.type in MUST_COME_AFTER]
        if changed:
            index, kind = changed[0]
            return (f"adapters are trained against the float, unpruned weights, but stages[{index}] ({kind}) "
                    f"changes them first; put merge_lora before stages[{index}] so the recipe merges, then "
                    f"{'quantizes' if kind == 'quantize' else 'prunes'}")
        return None

    def backends(self, config, input_kind):
        return ["peft", "safetensors"]

    def baseline(self, config: MergeLoraConfig, source: TorchModel, task: str, runner_args: dict):
        """The checkpoint with the adapters attached unmerged: how the model is served without this recipe."""
        adapters = read_adapters(config, source)
        wrapped = load_unmerged(config, source, runner_args["trust_remote_code"], adapters)
        runner = TorchRunner(wrapped.get_base_model(), task, name="baseline", threads=runner_args["threads"],
                             device=runner_args["device"])
        size = source.size_mb() + sum(adapter.size_mb() for adapter in adapters)
        return runner, size, f"checkpoint + {len(adapters)} LoRA adapter(s), unmerged (PEFT)"

    def baseline_key(self, config: MergeLoraConfig) -> str:
        return json.dumps(config.model_dump(mode="json"), sort_keys=True)

    def run(self, config: MergeLoraConfig, artifact: TorchModel, ctx: StageContext) -> TorchModel:
        adapters = read_adapters(config, artifact)
        execution, why = choose_execution(artifact.path, artifact.task, config.execution, "merge_lora")
        ctx.details.update({"execution": execution, "execution_reason": why})
        if execution == "layerwise":
            out, difference, effect = _merge_layerwise(config, artifact, adapters, ctx)
            _judge(config, adapters, difference, effect, ctx)
            return TorchModel(out, artifact.task)
        merged_module, difference, effect = _merge_whole(config, artifact, adapters, ctx)
        _judge(config, adapters, difference, effect, ctx)
        _record_merged_layers(merged_module, adapters, ctx)
        out = ctx.workdir / "model"
        merged_module.save_pretrained(out, safe_serialization=True)
        copy_checkpoint_files(artifact.path, out)
        return TorchModel(out, artifact.task, module=merged_module.eval())


def _merge_whole(config: MergeLoraConfig, artifact: TorchModel, adapters: list, ctx: StageContext) -> tuple:
    """(the merged module, largest difference from the unmerged model's outputs, the adapters' effect)."""
    import torch

    wrapped = load_unmerged(config, artifact, ctx.trust_remote_code, adapters)
    inputs = check_inputs(wrapped.get_base_model().config, config.check_samples, config.check_length)
    with torch.inference_mode():
        with wrapped.disable_adapter():
            plain = main_output(wrapped.get_base_model(), inputs)
        unmerged = main_output(wrapped.get_base_model(), inputs)
        merged_module = wrapped.merge_and_unload(safe_merge=True, adapter_names=[a.name for a in adapters])
        merged = main_output(merged_module, inputs)
    return merged_module, float((merged - unmerged).abs().max()), float((unmerged - plain).abs().max())


def _merge_layerwise(config: MergeLoraConfig, artifact: TorchModel, adapters: list, ctx: StageContext) -> tuple:
    """The same merge and check, one transformer block in memory at a time (merge_lora_layerwise.py)."""
    refuse_unsupported(adapters)
    model = LayerwiseModel(artifact.path, artifact.task, ctx.trust_remote_code)
    for adapter in adapters:
        _check_shapes(adapter, model.module)  # the skeleton has every layer's shape, on the meta device
    inputs = check_inputs(model.module.config, config.check_samples, config.check_length)
    out = ctx.workdir / "model"
    return (out, *merge_layerwise(model, artifact.task, adapters, inputs, out, ctx))


def _judge(config: MergeLoraConfig, adapters: list, difference: float, effect: float, ctx: StageContext) -> None:
    """Record the check and fail the stage when the merged model strays from the unmerged one."""
    ctx.details.update({
        "adapters": [a.describe() for a in adapters], "max_abs_diff": difference, "atol": config.atol,
        "adapter_effect_max_abs": effect,
        "check_inputs": f"{config.check_samples} seeded random sequences of {config.check_length} tokens"})
    if not difference <= config.atol:  # also catches NaN
        raise StageFailed(f"merge_lora: the merged model's outputs differ from the unmerged model's with "
                          f"adapters on by {difference:.3g} (max abs), above atol {config.atol:g}")
    if effect == 0.0:
        ctx.notes.append("merge_lora: the adapters do not change the model's outputs on the check inputs "
                         "(an untrained adapter has lora_B = 0)")


def adapter_layers(adapter: "Adapter") -> set[str]:
    """The checkpoint's module names an adapter's LoRA matrices update."""
    from safetensors import safe_open

    with safe_open(str(adapter.folder / ADAPTER_WEIGHTS), framework="pt") as handle:
        names = [key.removeprefix("base_model.model.") for key in handle.keys()]
    return {name.split(marker)[0] for name in names for marker in (".lora_A.", ".lora_B.") if marker in name}


def _record_merged_layers(module, adapters: list, ctx: StageContext) -> None:
    """The anatomy's coverage of the merge: the layers the adapters updated, the rest of the model's linear
    layers counted as left out on purpose (an adapter targets some projections, not all)."""
    merged = set().union(*(adapter_layers(a) for a in adapters))
    parts = open_for_compression(module)
    try:
        record_coverage(parts, merged, "merge_lora", ctx, excluded=[n for n in parts.linears if n not in merged])
        ctx.details["merged_layers"] = len(merged & set(parts.linears))
    finally:
        restore_layout(module, parts)


@dataclass
class Adapter:
    name: str
    folder: Path
    weight: float
    config: dict

    def describe(self) -> dict:
        return {"path": str(self.folder), "weight": self.weight, "r": self.config.get("r"),
                "lora_alpha": self.config.get("lora_alpha"), "target_modules": self.config.get("target_modules"),
                "base_model": self.config.get("base_model_name_or_path")}

    def weights_file(self) -> Path:
        return self.folder / ADAPTER_WEIGHTS

    def size_mb(self) -> float:
        return files_size_mb([self.weights_file()])


def read_adapters(config: MergeLoraConfig, artifact: TorchModel) -> list[Adapter]:
    """Every adapter's config, checked against the checkpoint before any model is loaded."""
    quantized = quantization_of(artifact)
    if quantized:
        raise UserError(f"merge_lora: {artifact.path} is quantized ({quantized}); an adapter's update cannot be "
                        "added to quantized weights exactly. Give the float checkpoint it came from with --model "
                        "and put merge_lora before the quantize stage")
    base_config = json.loads((artifact.path / "config.json").read_text())
    adapters = []
    for index, spec in enumerate(config.adapters):
        folder = spec.folder()
        where = f"merge_lora.adapters[{index}] ({folder})"
        config_file = folder / ADAPTER_CONFIG
        if not config_file.is_file():
            raise UserError(f"{where}: no {ADAPTER_CONFIG}; is this a PEFT adapter folder?")
        try:
            adapter_config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{config_file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if adapter_config.get("peft_type") != "LORA":
            raise UserError(f"{where}: a {adapter_config.get('peft_type')} adapter; merge_lora merges LoRA adapters")
        if adapter_config.get("use_dora") and (len(config.adapters) > 1 or spec.weight != 1.0):
            raise UserError(f"{where}: a DoRA adapter rescales whole weight rows, so it cannot be weighted or "
                            "combined with others; merge it alone with weight 1")
        wanted = PEFT_TASKS[artifact.task]
        if adapter_config.get("task_type") not in (None, wanted):
            raise UserError(f"{where}: trained for task_type {adapter_config['task_type']}, but the recipe's task "
                            f"{artifact.task} needs {wanted}")
        if not (folder / ADAPTER_WEIGHTS).is_file():
            if (folder / PICKLED_WEIGHTS).is_file():
                raise UserError(f"{folder / PICKLED_WEIGHTS}: pickle-based weights can run arbitrary code when "
                                "loaded, and merge_lora reads safetensors only; re-save the adapter with "
                                "save_pretrained(safe_serialization=True) where you trust it")
            raise UserError(f"{where}: no {ADAPTER_WEIGHTS} in the folder")
        _check_base_model(where, adapter_config, base_config)
        adapters.append(Adapter(f"adapter{index}", folder, spec.weight, adapter_config))
    with_heads = [a for a in adapters if a.config.get("modules_to_save")]
    if len(adapters) > 1 and with_heads:
        raise UserError(f"merge_lora: {with_heads[0].folder} also trains whole modules "
                        f"({with_heads[0].config['modules_to_save']}), which cannot be weighted with other "
                        "adapters; merge it alone")
    return adapters


def _check_base_model(where: str, adapter_config: dict, base_config: dict) -> None:
    recorded = adapter_config.get("base_model_name_or_path")
    recorded_config = Path(recorded or "/nonexistent") / "config.json"
    if not recorded_config.is_file():
        return  # a hub name or a moved folder: the shape check on the weights decides
    other = json.loads(recorded_config.read_text())
    differing = [f"{key}: {other.get(key)} vs {base_config.get(key)}" for key in SHAPE_FIELDS
                 if key in other and key in base_config and other[key] != base_config[key]]
    if differing:
        raise UserError(f"{where}: trained on {recorded}, which differs from the checkpoint ({'; '.join(differing)})")


def _check_shapes(adapter: Adapter, module) -> None:
    """Every LoRA matrix must fit the layer it targets; every target module must exist."""
    from safetensors import safe_open

    where = f"merge_lora: {adapter.folder}"
    modules = dict(module.named_modules())
    parameters = dict(module.named_parameters())
    targets = adapter.config.get("target_modules")
    if isinstance(targets, list):
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
        if missing:
            names = [n for n, m in modules.items() if is_linear_like(m)][:4]
            raise UserError(f"{where}: target modules {missing} are not in the checkpoint (its linear layers are "
                            f"named like {names}); the adapter was trained on another architecture")
    with safe_open(str(adapter.folder / ADAPTER_WEIGHTS), framework="pt") as handle:
        for key in handle.keys():
            shape = tuple(handle.get_slice(key).get_shape())
            name = key.removeprefix("base_model.model.")
            for marker in (".lora_A.", ".lora_B."):
                if marker in name:
                    layer = modules.get(name.split(marker)[0])
                    if not is_linear_like(layer):
                        raise UserError(f"{where}: {key} targets {name.split(marker)[0]}, which is not a linear "
                                        "layer of the checkpoint")
                    inputs, outputs = shape_of(layer)  # LoRA matrices are r x inputs and outputs x r for Conv1D too
                    expected = inputs if marker == ".lora_A." else outputs
                    actual = shape[1] if marker == ".lora_A." else shape[0]
                    if actual != expected:
                        raise UserError(f"{where}: {key} has shape {list(shape)} but the checkpoint's layer has "
                                        f"{inputs} inputs and {outputs} outputs; the "
                                        "adapter was trained on a model of another size")
                    break
            else:
                plain = name.replace(".modules_to_save", "")
                if plain in parameters and tuple(parameters[plain].shape) != shape:
                    raise UserError(f"{where}: {key} has shape {list(shape)}, the checkpoint's {plain} has "
                                    f"{list(parameters[plain].shape)}")


def load_unmerged(config: MergeLoraConfig, artifact: TorchModel, trust_remote_code: bool = False,
                  adapters: Optional[list[Adapter]] = None):
    """A fresh copy of the checkpoint with every adapter attached, weighted and active (PEFT, unmerged).
    Fresh because merging changes the base weights in place, and the run's baseline uses the checkpoint."""
    import torch
    from peft import PeftModel

    adapters = adapters if adapters is not None else read_adapters(config, artifact)
    # Seeded: layers the checkpoint lacks (a new classification head that an adapter replaces) are
    # initialised randomly on load, and the adapter-off outputs should be the same in every run.
    torch.manual_seed(0)
    base = load_torch_model(TorchModel(artifact.path, artifact.task), trust_remote_code=trust_remote_code)
    for adapter in adapters:
        _check_shapes(adapter, base)
    first, rest = adapters[0], adapters[1:]
    try:
        wrapped = PeftModel.from_pretrained(base, str(first.folder), adapter_name=first.name, is_trainable=False)
        for adapter in rest:
            wrapped.load_adapter(str(adapter.folder), adapter_name=adapter.name, is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"merge_lora: PEFT could not attach the adapters: {exc}") from None
    _apply_weights(wrapped, adapters)
    wrapped.base_model.set_adapter([a.name for a in adapters])
    return wrapped.eval()


def _apply_weights(wrapped, adapters: list[Adapter]) -> None:
    """Multiply each adapter's scaling (lora_alpha / r) by its weight in every LoRA layer, so both the
    unmerged forward and the merge use the weighted update."""
    from peft.tuners.lora import LoraLayer

    for layer in wrapped.modules():
        if isinstance(layer, LoraLayer):
            for adapter in adapters:
                if adapter.name in layer.scaling:
                    layer.scaling[adapter.name] *= adapter.weight


def check_inputs(model_config, samples: int, length: int) -> dict:
    """Seeded random token ids: merging is an identity on the weights, so any inputs that pass through
    every layer test it; real text would add nothing but a data dependency."""
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = getattr(model_config, "vocab_size", 1000)
    low = min(1000, vocab // 4)  # away from the special tokens most vocabularies put first
    ids = torch.randint(low, vocab, (samples, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main_output(module, inputs: dict):
    output = module(**inputs)
    tensor = output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state
    return tensor.float()
