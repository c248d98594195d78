"""nf4 / fp4 through bitsandbytes: the saved folder reloads 4-bit with from_pretrained and gives the
same outputs as the model quantized in memory; weights are really 4-bit (size, decoded error); the
output head stays in float; configs and missing backends are refused clearly."""

import json

import numpy as np
import pytest
import torch

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model, quantization_method
from compressor.errors import BackendMissing, UserError
from compressor.planning import plan
from compressor.recipe import parse_recipe
from compressor.stages.quantize.bnb_4bit import Bnb4bitConfig

from .test_stages import outputs, run_stage, sqnr_db

pytest.importorskip("bitsandbytes")


def nf4(**fields):
    return Bnb4bitConfig(type="quantize", **{"scheme": "nf4", **fields})


@pytest.fixture(scope="module", params=["nf4", "fp4"])
def quantized_llama(request, tiny_llama, tmp_path_factory):
    artifact, details = run_stage(nf4(scheme=request.param), TorchModel(tiny_llama, "text-generation"),
                                  tmp_path_factory.mktemp(request.param), "text-generation")
    return request.param, artifact, details


def linear4bit_layers(module) -> dict:
    return {name: child for name, child in module.named_modules() if type(child).__name__ == "Linear4bit"}


def test_saved_folder_reloads_4bit_with_its_settings(quantized_llama):
    scheme, artifact, details = quantized_llama
    settings = json.loads((artifact.path / "config.json").read_text())["quantization_config"]
    assert settings["quant_method"] == "bitsandbytes" and settings["bnb_4bit_quant_type"] == scheme
    assert settings["bnb_4bit_use_double_quant"] is True and settings["llm_int8_skip_modules"] == ["lm_head"]
    assert quantization_method(artifact.path) == f"bitsandbytes {scheme}"
    assert (artifact.path / "tokenizer.json").exists() or (artifact.path / "vocab.txt").exists()
    module = load_torch_model(TorchModel(artifact.path, "text-generation"))
    layers = linear4bit_layers(module)
    assert len(layers) == details["quantized_linear_layers"] == 2 * 7  # q k v o gate up down, two layers
    assert type(module.lm_head).__name__ == "Linear"  # the output head stays in float


def test_reloaded_outputs_equal_the_model_quantized_in_memory(quantized_llama, tiny_llama):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    scheme, artifact, _ = quantized_llama
    settings = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"])
    in_memory = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=settings, device_map="cpu",
                                                     dtype=torch.float32).eval()
    reloaded, feed = outputs(TorchModel(artifact.path, "text-generation"), artifact.path)
    with torch.inference_mode():
        expected = in_memory(input_ids=torch.from_numpy(feed["input_ids"]),
                             attention_mask=torch.from_numpy(feed["attention_mask"]), use_cache=False).logits
    np.testing.assert_allclose(reloaded, expected.numpy(), atol=1e-5)
    floats, _ = outputs(TorchModel(tiny_llama, "text-generation"), tiny_llama)
    # Really quantized (outputs moved), yet still the same model (4-bit noise, not garbage).
    assert 0 < np.abs(reloaded - floats).max()
    assert sqnr_db(floats, reloaded) > 15


def test_weights_decode_to_the_originals_within_4bit_error(quantized_llama, tiny_llama):
    from bitsandbytes.functional import dequantize_4bit

    scheme, artifact, _ = quantized_llama
    original = load_torch_model(TorchModel(tiny_llama, "text-generation"))
    module = load_torch_model(TorchModel(artifact.path, "text-generation"))
    for name, layer in linear4bit_layers(module).items():
        weight = layer.weight
        assert weight.dtype == torch.uint8 and weight.numel() * 2 == layer.in_features * layer.out_features
        decoded = dequantize_4bit(weight.data, weight.quant_state).float()
        reference = original.get_submodule(name).weight.detach()
        relative = ((decoded - reference).norm() / reference.norm()).item()
        # 16 levels per block of 64: a few percent of error, never zero and never near 100%.
        assert 0.02 < relative < 0.2, (name, relative)


def stored_dtypes(folder) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {key: str(handle.get_slice(key).get_dtype()) for key in handle.keys()}


def test_files_shrink_and_double_quant_stores_8bit_scales(quantized_llama, tiny_llama, tmp_path):
    scheme, artifact, details = quantized_llama
    assert details["size_mb_after"] < 0.5 * details["size_mb_before"]
    key = "model.layers.0.mlp.up_proj.weight"
    stored = stored_dtypes(artifact.path)
    assert stored[key] == "U8" and stored[key + ".absmax"] == "U8" and key + ".nested_absmax" in stored
    single, _ = run_stage(nf4(scheme=scheme, double_quant=False), TorchModel(tiny_llama, "text-generation"),
                          tmp_path, "text-generation")
    stored = stored_dtypes(single.path)
    assert stored[key + ".absmax"] == "F32" and key + ".nested_absmax" not in stored


def test_exclude_keeps_layers_in_float(tiny_llama, tmp_path):
    artifact, details = run_stage(nf4(exclude=["*mlp.down_proj"]), TorchModel(tiny_llama, "text-generation"),
                                  tmp_path, "text-generation")
    module = load_torch_model(TorchModel(artifact.path, "text-generation"))
    assert type(module.model.layers[1].mlp.down_proj).__name__ == "Linear"
    assert type(module.model.layers[1].mlp.up_proj).__name__ == "Linear4bit"
    assert details["kept_in_float"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(UserError, match="no linear layer matches"):
        run_stage(nf4(exclude=["*nothing*"]), TorchModel(tiny_llama, "text-generation"), tmp_path / "x",
                  "text-generation")


def test_classifier_keeps_its_head_and_reloads(tiny_classifier, tmp_path):
    artifact, details = run_stage(nf4(), TorchModel(tiny_classifier, "text-classification"), tmp_path,
                                  "text-classification")
    assert details["kept_in_float"] == ["classifier"]
    module = load_torch_model(TorchModel(artifact.path, "text-classification"))
    assert len(linear4bit_layers(module)) == details["quantized_linear_layers"] > 0
    # A random head's logits are ~0.003 and say little; the encoder's last hidden states carry the signal.
    original = load_torch_model(TorchModel(tiny_classifier, "text-classification"))
    _, feed = outputs(TorchModel(artifact.path, "text-classification"), artifact.path)
    inputs = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.inference_mode():
        floats, reloaded = (m(**inputs, output_hidden_states=True).hidden_states[-1].numpy()
                            for m in (original, module))
    assert 0 < np.abs(reloaded - floats).max() and sqnr_db(floats, reloaded) > 15


def test_quantizing_a_quantized_checkpoint_is_refused(quantized_llama, tmp_path):
    _, artifact, _ = quantized_llama
    with pytest.raises(UserError, match="already quantized"):
        run_stage(nf4(), TorchModel(artifact.path, "text-generation"), tmp_path, "text-generation")


RECIPE = """
name: t
task: text-generation
stages:
{stages}
evaluation: {{data: {{dataset: lee-background}}}}
goals: {{size: {{max_ratio: 0.5}}}}
"""


@pytest.mark.parametrize("stages, message", [
    ("  - {type: export_onnx}\n  - {type: quantize, scheme: nf4}", "quantizes torch models through bitsandbytes"),
    ("  - {type: quantize, scheme: int8-weight-only, double_quant: false}",
     r"stages\[0\].double_quant: unknown field for scheme int8-weight-only; only scheme nf4 / fp4 takes it"),
    ("  - {type: quantize, scheme: nf4, per_channel: false}",
     r"stages\[0\].per_channel: unknown field for scheme nf4 / fp4; only schemes int8-dynamic and int8-static"),
    ("  - {type: quantize, scheme: int8-weight-only}\n  - {type: quantize, scheme: fp4}", "already quantized"),
])
def test_plan_refuses_bad_4bit_configs(stages, message):
    with pytest.raises(UserError, match=message):
        plan(parse_recipe(RECIPE.format(stages=stages)))


def test_old_gpu_only_bitsandbytes_stops_in_plan_with_exit_3(monkeypatch):
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.42.0" if name == "bitsandbytes" else real_version(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendMissing, match="CUDA GPUs only") as caught:
        plan(parse_recipe(RECIPE.format(stages="  - {type: quantize, scheme: nf4}")))
    assert caught.value.exit_code == 3
