"""merge_lora: the merged weights are exactly base + sum(weight * scaling * B @ A), the merged model
reproduces the unmerged one (and a broken merge is caught), and adapters that do not fit the
checkpoint, pickled adapters and quantized bases are refused before any merging."""

import json
import shutil

import numpy as np
import pytest
import torch

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.errors import StageFailed, UserError
from compressor.planning import plan
from compressor.recipe import parse_recipe
from compressor.stages.lora.merge_lora import MergeLoraConfig

from .conftest import TINY_EVALUATION
from .test_stages import outputs, run_stage

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def make_adapter(base_folder, task, folder, targets, seed=0, r=4, alpha=8, task_type=None, modules_to_save=None):
    """A LoRA adapter with random, non-zero A and B (an untrained adapter has B = 0 and changes nothing)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = load_torch_model(TorchModel(base_folder, task))
    settings = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                          task_type=task_type, modules_to_save=modules_to_save)
    model = get_peft_model(base, settings)
    with torch.no_grad():  # B large enough that the adapter visibly changes the outputs
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def merge(*adapters, **fields):
    specs = [{"path": str(a), "weight": w} for a, w in adapters]
    return MergeLoraConfig(type="merge_lora", adapters=specs, **fields)


@pytest.fixture(scope="module")
def llama_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    first = make_adapter(tiny_llama, "text-generation", root / "first", LLAMA_TARGETS, seed=1, task_type="CAUSAL_LM")
    second = make_adapter(tiny_llama, "text-generation", root / "second", ["q_proj", "up_proj"], seed=2, r=2,
                          alpha=4, task_type="CAUSAL_LM")
    return first, second


def lora_update(adapter_folder, layer: str) -> torch.Tensor:
    """scaling * B @ A for one layer, read from the adapter's files, without PEFT."""
    from safetensors.torch import load_file

    config = json.loads((adapter_folder / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_folder / "adapter_model.safetensors"))
    a = tensors[f"base_model.model.{layer}.lora_A.weight"]
    b = tensors[f"base_model.model.{layer}.lora_B.weight"]
    return (config["lora_alpha"] / config["r"]) * b @ a


def test_weighted_merge_is_the_weighted_sum_of_updates(tiny_llama, llama_adapters, tmp_path):
    first, second = llama_adapters
    merged, details = run_stage(merge((first, 0.7), (second, 0.3)), TorchModel(tiny_llama, "text-generation"),
                                tmp_path, "text-generation")
    base = load_torch_model(TorchModel(tiny_llama, "text-generation"))
    reloaded = load_torch_model(TorchModel(merged.path, "text-generation"))  # from the saved folder
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    for layer, expected_parts in (("model.layers.0.self_attn.q_proj", [(first, 0.7), (second, 0.3)]),
                                  ("model.layers.1.mlp.down_proj", [(first, 0.7)]),
                                  ("model.layers.1.mlp.up_proj", [(second, 0.3)]),
                                  ("model.layers.1.self_attn.k_proj", [])):
        expected = base.get_submodule(layer).weight.detach().clone()
        for folder, weight in expected_parts:
            expected += weight * lora_update(folder, layer)
        torch.testing.assert_close(reloaded.get_submodule(layer).weight.detach(), expected, atol=1e-6, rtol=0)
    assert details["max_abs_diff"] <= 1e-4
    assert details["adapter_effect_max_abs"] > 100 * max(details["max_abs_diff"], 1e-7)
    assert [a["weight"] for a in details["adapters"]] == [0.7, 0.3]
    # The record's coverage: the layers either adapter updates, as a share of the model's parameters
    from safetensors import safe_open

    targets = set()
    for folder in (first, second):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
            targets |= {key.removeprefix("base_model.model.").split(".lora_")[0] for key in handle.keys()}
    updated = sum(base.get_submodule(name).weight.numel() for name in targets)
    total = sum(p.numel() for p in base.parameters())  # named_parameters counts a tied tensor once
    assert details["merged_layers"] == len(targets) >= 3
    assert details["changed_parameter_share"] == round(updated / total, 4) > 0


def test_merged_model_reproduces_the_unmerged_one(tiny_classifier, tmp_path):
    adapter = make_adapter(tiny_classifier, "text-classification", tmp_path / "adapter", ["query", "value", "dense"],
                           task_type="SEQ_CLS")
    merged, details = run_stage(merge((adapter, 1.0)), TorchModel(tiny_classifier, "text-classification"),
                                tmp_path / "work", "text-classification")
    from peft import PeftModel

    base = load_torch_model(TorchModel(tiny_classifier, "text-classification"))
    unmerged = PeftModel.from_pretrained(base, str(adapter)).eval()
    actual, feed = outputs(TorchModel(merged.path, "text-classification"), merged.path)
    with torch.inference_mode():
        expected = unmerged(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    plain, _ = outputs(TorchModel(tiny_classifier, "text-classification"), tiny_classifier)
    assert np.abs(actual - plain).max() > 1e-3  # the adapter (and its trained head) really changed the model
    assert details["adapter_effect_max_abs"] > 1e-3


def test_a_merge_that_loses_an_update_fails_the_stage(tiny_llama, llama_adapters, tmp_path, monkeypatch):
    from peft.tuners.lora import Linear

    real_merge = Linear.merge

    def merge_all_but_down_proj(self, *args, **kwargs):
        if self.base_layer.out_features != 64 or self.base_layer.in_features != 128:  # down_proj is 128 -> 64
            return real_merge(self, *args, **kwargs)
        self.merged_adapters.extend(kwargs.get("adapter_names") or self.active_adapters)  # claims, does nothing

    monkeypatch.setattr(Linear, "merge", merge_all_but_down_proj)
    with pytest.raises(StageFailed, match=r"differ from the unmerged model's .* by .* \(max abs\), above atol"):
        run_stage(merge((llama_adapters[0], 1.0)), TorchModel(tiny_llama, "text-generation"), tmp_path,
                  "text-generation")


def test_adapter_for_another_architecture_is_refused(tiny_classifier, llama_adapters, tmp_path):
    config = merge((llama_adapters[0], 1.0))
    with pytest.raises(UserError, match="CAUSAL_LM, but the recipe's task text-classification needs SEQ_CLS"):
        run_stage(config, TorchModel(tiny_classifier, "text-classification"), tmp_path, "text-classification")
    untyped = tmp_path / "untyped"
    shutil.copytree(llama_adapters[0], untyped)
    settings = json.loads((untyped / "adapter_config.json").read_text())
    (untyped / "adapter_config.json").write_text(json.dumps({**settings, "task_type": None,
                                                              "base_model_name_or_path": "someone/else"}))
    with pytest.raises(UserError, match=r"target modules \[.*'q_proj'.*\] are not in the checkpoint"):
        run_stage(merge((untyped, 1.0)), TorchModel(tiny_classifier, "text-classification"), tmp_path / "w",
                  "text-classification")


def test_adapter_for_another_size_is_refused(tiny_llama, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = tmp_path / "wider"
    shutil.copytree(tiny_llama, wider)
    config = LlamaConfig.from_pretrained(wider)
    config.hidden_size, config.intermediate_size = 96, 192
    LlamaForCausalLM(config).save_pretrained(wider, safe_serialization=True)
    adapter = make_adapter(wider, "text-generation", tmp_path / "adapter", LLAMA_TARGETS, task_type="CAUSAL_LM")
    # Recorded base is a local folder whose config differs: named before any weight is read.
    with pytest.raises(UserError, match=r"trained on .*wider, which differs from the checkpoint "
                                        r"\(hidden_size: 96 vs 64"):
        run_stage(merge((adapter, 1.0)), TorchModel(tiny_llama, "text-generation"), tmp_path / "w1", "text-generation")
    shutil.rmtree(wider)  # the recorded base is gone: the tensor shapes decide
    with pytest.raises(UserError, match=r"has shape \[4, (96|192)\] but the checkpoint's layer has (64|128) inputs"):
        run_stage(merge((adapter, 1.0)), TorchModel(tiny_llama, "text-generation"), tmp_path / "w2", "text-generation")


def test_pickled_or_missing_adapters_are_refused(tiny_llama, llama_adapters, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(llama_adapters[0], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(UserError, match="pickle-based weights"):
        run_stage(merge((pickled, 1.0)), TorchModel(tiny_llama, "text-generation"), tmp_path / "w1", "text-generation")
    with pytest.raises(UserError, match="no adapter_config.json"):
        run_stage(merge((tmp_path, 1.0)), TorchModel(tiny_llama, "text-generation"), tmp_path / "w2", "text-generation")


def test_weighting_adapters_that_train_whole_modules_is_refused(tiny_classifier, tmp_path):
    heads = [make_adapter(tiny_classifier, "text-classification", tmp_path / f"a{i}", ["query"], seed=i,
                          task_type="SEQ_CLS") for i in range(2)]
    with pytest.raises(UserError, match=r"also trains whole modules"):
        run_stage(merge((heads[0], 0.5), (heads[1], 0.5)), TorchModel(tiny_classifier, "text-classification"),
                  tmp_path / "w", "text-classification")


def test_quantized_base_is_refused_with_the_order_that_works(tiny_llama, llama_adapters, tmp_path):
    pytest.importorskip("bitsandbytes")
    from compressor.stages.quantize.bnb_4bit import Bnb4bitConfig

    quantized, _ = run_stage(Bnb4bitConfig(type="quantize", scheme="nf4"), TorchModel(tiny_llama, "text-generation"),
                             tmp_path / "q", "text-generation")
    with pytest.raises(UserError, match="is quantized \\(bitsandbytes nf4\\).*put merge_lora before the quantize"):
        run_stage(merge((llama_adapters[0], 1.0)), quantized, tmp_path / "w", "text-generation")
    recipe = f"""
name: t
task: text-generation
stages:
  - {{type: quantize, scheme: int8-weight-only}}
  - {{type: merge_lora, adapters: [{{path: {llama_adapters[0]}}}]}}
evaluation: {{data: {{dataset: lee-background}}}}
goals: {{size: {{max_ratio: 0.5}}}}
"""
    with pytest.raises(UserError, match=r"<recipe>:6: stages\[1\] \(merge_lora\): .* put merge_lora before "
                                        r"stages\[0\] so the recipe merges, then quantizes"):
        plan(parse_recipe(recipe))


RUN_RECIPE = """
name: tiny-lora
task: text-classification
stages:
  - type: merge_lora
    adapters: [{{path: "{adapter}"}}]
  - type: export_onnx
""" + TINY_EVALUATION + """goals:
  accuracy:
    - {{metric: agreement, min: 0.95}}
"""


def test_run_judges_a_merge_against_the_unmerged_adapter(tiny_classifier, sentences_jsonl, tmp_path):
    from compressor.pipeline import RunOptions, run
    from compressor.recipe import load_recipe

    from .conftest import write_recipe

    adapter = make_adapter(tiny_classifier, "text-classification", tmp_path / "adapter", ["query", "value"],
                           task_type="SEQ_CLS")
    recipe = write_recipe(tmp_path, RUN_RECIPE.format(adapter=adapter, data=sentences_jsonl))
    result = run(load_recipe(recipe), tiny_classifier, RunOptions(out=tmp_path / "out"))
    report = result.json
    assert report["baseline"]["model"] == "checkpoint + 1 LoRA adapter(s), unmerged (PEFT)"
    adapter_mb = (adapter / "adapter_model.safetensors").stat().st_size / 1e6
    assert report["baseline"]["size_mb"] == pytest.approx(TorchModel(tiny_classifier, "x").size_mb() + adapter_mb,
                                                          abs=1e-3)
    assert result.passed and report["result"]["metrics"]["agreement"] >= 0.95, report["gate"]
    assert "model | checkpoint + 1 LoRA adapter(s), unmerged (PEFT)" in (result.out / "report.md").read_text()


def test_cli_exits_2_naming_the_adapter_that_does_not_fit(tiny_classifier, llama_adapters, sentences_jsonl,
                                                          tmp_path):
    from click.testing import CliRunner

    from compressor.cli import main

    from .conftest import write_recipe

    recipe = write_recipe(tmp_path, RUN_RECIPE.format(adapter=llama_adapters[0], data=sentences_jsonl))
    outcome = CliRunner().invoke(main, ["run", str(recipe), "--model", str(tiny_classifier),
                                        "--out", str(tmp_path / "out")])
    assert outcome.exit_code == 2, outcome.output
    assert "merge_lora.adapters[0]" in outcome.output and "CAUSAL_LM" in outcome.output
    assert "Traceback" not in outcome.output and not (tmp_path / "out").exists()
