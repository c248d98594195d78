"""An FP8 KV cache (quantize fp8 / w8a8-int8 with kv_cache: fp8): scales calibrated per layer, the keys and values
that enter the cache on the E4M3 grid, decoding with a cache equal to recomputing, compress's folder and the
compressed-tensors folder reloading to the logits compress evaluated, and refusals where no cache exists."""

import json

import pytest
import torch

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.errors import UserError
from compressor.kv_cache import cached_attention, observed_kv
from compressor.stages.export.compressed_tensors import ExportCompressedTensorsConfig
from compressor.stages import REGISTRY, StageContext
from compressor.stages.quantize.w8a8 import Fp8Config, W8A8Int8Config

from .architectures import build_architecture
from .test_stages import run_stage
from .test_w8a8 import IDS, TASK, calibration


def fp8(text_file, **options):
    return Fp8Config.model_validate({"type": "quantize", "scheme": "fp8", "kv_cache": "fp8",
                                     "calibration": calibration(text_file), **options})


def reloaded(result):
    return load_torch_model(TorchModel(result.path, TASK, transforms=result.transforms))


def test_keys_and_values_entering_the_cache_are_on_each_layers_fp8_grid(tmp_path, text_file):
    source = build_architecture(tmp_path / "llama", "llama")  # untied head
    result, details = run_stage(fp8(text_file), TorchModel(source, TASK), tmp_path / "q", TASK)
    kv = details["kv_cache"]
    assert kv["format"] == "fp8" and kv["attention_layers"] == 2 and kv["tokens_seen"] > 0
    assert 0 < kv["k_scale_range"][0] <= kv["k_scale_range"][1]
    module = reloaded(result)
    attention = cached_attention(module)
    assert set(attention) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    with torch.no_grad():
        cache = module(IDS, use_cache=True).past_key_values  # what the cache holds
    for index, name in enumerate(sorted(attention)):
        stored = cache.layers[index]
        for tensor, scale in ((stored.keys, attention[name].k_scale), (stored.values, attention[name].v_scale)):
            codes = tensor / scale  # on the E4M3 grid, up to float32 rounding of code * scale / scale
            assert torch.allclose(codes.to(torch.float8_e4m3fn).float(), codes, rtol=1e-5, atol=1e-5), name
            assert float(codes.abs().max()) <= 448.0 and tensor.shape[-2] == IDS.shape[1]


def test_the_cache_changes_the_model_and_its_scales_are_the_peaks_seen(tmp_path, text_file, tiny_llama):
    source = TorchModel(tiny_llama, TASK)
    plain, _ = run_stage(Fp8Config(type="quantize", scheme="fp8"), source, tmp_path / "plain", TASK)
    cached, details = run_stage(fp8(text_file), source, tmp_path / "kv", TASK)
    with torch.no_grad():
        without, with_kv = reloaded(plain)(IDS).logits, reloaded(cached)(IDS).logits
    assert not torch.allclose(without, with_kv, atol=1e-6)  # not a no-op
    # scales: the peaks the calibration text puts into each cache, over 448 (recomputed here independently)
    from compressor.checkpoint import load_tokenizer
    from compressor.data import calibration_batches, torch_inputs

    module = reloaded(plain)
    attention = cached_attention(module)
    with observed_kv(attention) as peaks, torch.no_grad():
        for feed in calibration_batches(fp8(text_file).calibration, load_tokenizer(tiny_llama)):
            module(**torch_inputs(feed), use_cache=False)
    scaled = reloaded(cached)
    for name, layer in cached_attention(scaled).items():
        assert float(layer.k_scale) == pytest.approx(peaks[name][0] / 448, rel=1e-6)
        assert float(layer.v_scale) == pytest.approx(peaks[name][1] / 448, rel=1e-6)


def test_decoding_with_the_cache_equals_recomputing(tmp_path, text_file):
    source = build_architecture(tmp_path / "qwen3", "qwen3")
    result, _ = run_stage(fp8(text_file), TorchModel(source, TASK), tmp_path / "q", TASK)
    module = reloaded(result)
    with torch.no_grad():
        full = module(IDS).logits
        first = module(IDS[:, :8], use_cache=True)
        cache = first.past_key_values
        steps = [module(IDS[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(8, IDS.shape[1])]
    # every key and value the cache holds after decoding token by token is on its layer's grid, and one token at
    # a time computes what the whole window does; up to a rounding flip: float-level differences between the
    # two paths can move a value across an E4M3 rounding boundary (3 mantissa bits), measured up to 0.006 here
    for index, layer in enumerate(sorted(cached_attention(module).items())):
        for tensor, scale in ((cache.layers[index].keys, layer[1].k_scale), (cache.layers[index].values, layer[1].v_scale)):
            codes = tensor / scale
            assert tensor.shape[-2] == IDS.shape[1]
            assert torch.allclose(codes.to(torch.float8_e4m3fn).float(), codes, rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch.cat(steps, 1), full[:, 8:], atol=0.02)
    with torch.no_grad():  # without the cache's context the same tokens compute something else entirely
        alone = torch.cat([module(IDS[:, i:i + 1]).logits for i in range(8, IDS.shape[1])], 1)
    assert not torch.allclose(alone, full[:, 8:], atol=0.02)


@pytest.mark.parametrize("kind", ["qwen3_moe", "phi3"])  # experts; a fused qkv_proj
def test_other_architectures_calibrate_every_attention_layer(kind, tmp_path, text_file):
    source = build_architecture(tmp_path / kind, kind)
    config = W8A8Int8Config.model_validate({"type": "quantize", "scheme": "w8a8-int8", "algorithm": "rtn",
                                            "smoothing_strength": None, "kv_cache": "fp8",
                                            "calibration": calibration(text_file)})
    result, details = run_stage(config, TorchModel(source, TASK), tmp_path / "q", TASK)
    assert details["kv_cache"]["attention_layers"] == 2
    assert result.transforms[0]["kv_cache"]["attention"] == sorted(cached_attention(reloaded(result)))


def test_compressed_tensors_folder_carries_the_kv_scheme_and_reloads_identically(tmp_path, text_file):
    source = build_architecture(tmp_path / "llama", "llama")
    quantized, _ = run_stage(fp8(text_file), TorchModel(source, TASK), tmp_path / "q", TASK)
    ctx = StageContext(tmp_path / "ct", TASK, threads=2)
    ctx.workdir.mkdir()
    result = REGISTRY["export_compressed_tensors"].run(
        ExportCompressedTensorsConfig(type="export_compressed_tensors"), quantized, ctx)
    details = ctx.details
    assert details["reload_max_abs_diff"] == 0.0
    config = json.loads((result.path / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                         "dynamic": False, "group_size": None, "block_structure": None,
                                         "actorder": None}
    with open(result.path / "model.safetensors", "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert header["model.layers.1.self_attn.k_scale"]["shape"] == [1]
    assert header["model.layers.1.self_attn.v_scale"]["dtype"] == "F32"
    # The folder as it loads quantizes its cache with the written scales: through compressed-tensors' hook where
    # transformers' loader installs it, else (transformers 5.24 with compressed-tensors 0.20.1, pinned here)
    # through compress's, which the record and a note say; either way the logits above matched compress's model
    loaded = load_torch_model(result)
    attention = loaded.model.layers[1].self_attn
    expected = cached_attention(reloaded(quantized))["model.layers.1.self_attn"].k_scale
    assert float(attention.k_scale) == float(expected)
    if hasattr(attention, "kv_cache"):
        assert details["kv_cache"] == "fp8, run by transformers' compressed-tensors loader"
    else:
        assert details["kv_cache"] == "fp8, run by compress from the written scales"
        assert any("loads the folder with its KV cache float" in note for note in ctx.notes)
    with torch.no_grad():  # and the cache it fills is on the grid
        keys = loaded(IDS, use_cache=True).past_key_values.layers[1].keys / attention.k_scale
    assert torch.allclose(keys.to(torch.float8_e4m3fn).float(), keys, rtol=1e-5, atol=1e-5)


def test_gpt2_has_no_cache_projection_to_scale(tmp_path, text_file):
    source = build_architecture(tmp_path / "gpt2", "gpt2")
    with pytest.raises(UserError, match="found no attention layer with a key / value cache in gpt2"):
        run_stage(fp8(text_file), TorchModel(source, TASK), tmp_path / "q", TASK)


@pytest.mark.parametrize("task,later,words", [
    ("text-generation", None, None),
    ("text-classification", None, "applies to language models"),
    ("text-generation", "  - {type: export_onnx}\n", "does not write an fp8 KV cache"),
])
def test_plan_time_refusals(task, later, words):
    from compressor.planning import plan
    from compressor.recipe import parse_recipe

    text = (f"name: r\ntask: {task}\nstages:\n  - {{type: quantize, scheme: fp8, kv_cache: fp8, calibration: "
            "{data: {dataset: lee-test}}}\n" + (later or "") +
            "evaluation: {data: {dataset: lee-background}}\ngoals: {size: {max_ratio: 0.5}}\n")
    if words is None:
        plan(parse_recipe(text, "r.yaml"))
        with pytest.raises(UserError, match="an fp8 kv_cache needs `calibration:`"):
            plan(parse_recipe(text.replace(", calibration: {data: {dataset: lee-test}}", ""), "r.yaml"))
        return
    with pytest.raises(UserError, match=words):
        plan(parse_recipe(text, "r.yaml"))
