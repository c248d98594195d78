"""fp8 and w8a8-int8: the 8-bit arithmetic against compressed-tensors' own quantizer, SmoothQuant keeping the float
function while flattening activations, GPTQ on int8 beating rounding, static scales from calibration, the stage
on tiny models (every block linear swapped, the head float, reload identical) and the compressed-tensors folder
transformers reloads to the very logits compress evaluated."""

import json

import pytest
import torch
from safetensors import safe_open

from compressor.anatomy import open_for_compression
from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.errors import StageFailed, UserError
from compressor.stages.export.compressed_tensors import ExportCompressedTensorsConfig
from compressor.stages.quantize import smoothquant
from compressor.stages.quantize.int4_gptq import gptq_quantize
from compressor.stages.quantize.w8a8 import Fp8Config, W8A8Int8Config
from compressor.w8a8_layers import (fake_quantize_activations, quantize_weight, w8a8_linear_class,
                                    weight_scale)

from .architectures import build_architecture
from .test_stages import run_stage

TASK = "text-generation"
IDS = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])


def calibration(text_file, samples=8):
    return {"data": {"path": str(text_file), "segment": "window"}, "samples": samples, "max_length": 32,
            "batch_size": 4}


def logits(artifact):
    with torch.no_grad():
        return load_torch_model(artifact)(IDS).logits.float()


def _ct_args(kind: str, strategy: str, dynamic: bool):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type=kind, strategy=strategy, symmetric=True, dynamic=dynamic)


# --- the arithmetic -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,kind", [("fp8", "float"), ("int8", "int")])
def test_weight_codes_match_compressed_tensors_quantizer(fmt, kind):
    """compress's per-channel scales and codes are the ones compressed-tensors computes from the same weight."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    weight = torch.randn(48, 80) * torch.linspace(0.1, 3, 80)
    codes, scale = quantize_weight(weight, fmt, "channel")
    args = _ct_args(kind, "channel", False)
    reference_scale, _ = calculate_qparams(weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True), args)
    assert torch.equal(scale, reference_scale)
    reference = quantize(weight, reference_scale, None, args, dtype=codes.dtype)
    assert torch.equal(codes.float(), reference.float())
    # each row's largest |w| lands on the format's largest code
    top = 448.0 if fmt == "fp8" else 127.0
    assert torch.allclose(codes.float().abs().amax(dim=1), torch.full((48,), top), atol=1.0)


@pytest.mark.parametrize("fmt,kind", [("fp8", "float"), ("int8", "int")])
def test_per_token_activations_match_compressed_tensors(fmt, kind):
    """Dynamic activations: one scale per token; equal to compressed-tensors' fake quantization, and not a no-op."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    torch.manual_seed(1)
    x = torch.randn(2, 7, 64) * torch.linspace(0.01, 20, 64)
    ours = fake_quantize_activations(x, fmt, "token")
    args = _ct_args(kind, "token", True)
    scale, zero = compute_dynamic_scales_and_zp(x, args, module=None)
    reference = fake_quantize(x, scale, zero, args)
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, x)
    # per token, not per tensor: a token of small values keeps its resolution
    x[0, 0] *= 1e-3
    token = x[0, 0]
    error = float((fake_quantize_activations(x, fmt, "token")[0, 0] - token).abs().max())
    one_scale = x.abs().max() / (448.0 if fmt == "fp8" else 127.5)
    per_tensor = float((fake_quantize_activations(x, fmt, "tensor", one_scale)[0, 0] - token).abs().max())
    assert error < 0.07 * float(token.abs().max())
    if fmt == "int8":  # one int8 scale for all tokens rounds this one to nearly nothing (fp8's exponent copes)
        assert error < 0.1 * per_tensor


def test_block_scales_cover_128_by_128_tiles():
    weight = torch.zeros(200, 300)
    weight[130, 260] = 4.48
    scale = weight_scale(weight, "fp8", "block")
    assert scale.shape == (2, 3)
    assert scale[1, 2] == pytest.approx(0.01) and scale[0, 0] == torch.finfo(torch.float32).eps


def test_layer_simulates_the_scaled_matmul():
    """W8A8Linear: y = (q_x * s_x) @ (q_w * s_w)^T + b, the kernel's products with the scales applied after."""
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 32)
    codes, scale = quantize_weight(linear.weight, "fp8", "channel")
    layer = w8a8_linear_class().from_codes(linear, codes, scale, "fp8", "channel", "token")
    x = torch.randn(3, 5, 64)
    x_scale = x.abs().amax(-1, keepdim=True) / 448
    x_codes = (x / x_scale).to(torch.float8_e4m3fn).float()
    expected = (x_codes @ codes.float().T) * x_scale * scale.reshape(1, -1) + linear.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert not torch.allclose(layer(x), linear(x), atol=1e-4)  # 8 bits are not float


def test_gptq_on_int8_reconstructs_better_than_rounding():
    torch.manual_seed(3)
    x = torch.randn(512, 96) @ torch.randn(96, 96)  # correlated inputs, where GPTQ's compensation pays
    weight = torch.randn(40, 96)
    hessian = x.T @ x / x.shape[0]
    codes, scales, _ = gptq_quantize(weight, hessian, 96, "absmax", bits=8)
    gptq = (codes.float() - 128) * scales[:, :1]
    rtn_codes, rtn_scale = quantize_weight(weight, "int8", "channel")
    rtn = rtn_codes.float() * rtn_scale
    error = lambda w: float(((x @ (weight - w).T) ** 2).mean())  # noqa: E731
    assert error(gptq) < 0.8 * error(rtn)
    assert codes.min() >= 0 and codes.max() <= 255


# --- SmoothQuant ----------------------------------------------------------------------------------------------


def _model(kind, tmp_path, feeds=3):
    from transformers import AutoModelForCausalLM

    folder = build_architecture(tmp_path / kind, kind)
    module = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():  # norms with gains other than 1, and an outlier channel, as trained models have
        for name, p in module.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.normal_(0.5 if "gemma" not in kind else 0.0, 0.2)
        block = module.get_submodule(open_for_compression(module).blocks_name)[0]
        if hasattr(block, "input_layernorm"):
            block.input_layernorm.weight[5] = 12.0
    torch.manual_seed(4)
    return module, [{"input_ids": torch.randint(5, 60, (2, 12)).numpy()} for _ in range(feeds)]


@pytest.mark.parametrize("kind", ["llama", "gemma2", "phi", "gpt2", "qwen3_moe"])
def test_smoothing_keeps_the_function_and_flattens_activations(kind, tmp_path):
    module, feeds = _model(kind, tmp_path)
    parts = open_for_compression(module)
    groups, _ = smoothquant.smoothing_groups(module, parts, feeds[0], TASK, "t")
    first_norm, readers = groups[0]
    reader = module.get_submodule(readers[0])
    seen = []
    handle = reader.register_forward_pre_hook(lambda _m, args: seen.append(args[0].abs().amax(dim=(0, 1))))
    with torch.no_grad():
        before = module(IDS).logits
        module(**{"input_ids": torch.from_numpy(feeds[0]["input_ids"])})
        record = smoothquant.smooth(module, parts, feeds, TASK, 0.8, "t")
        after = module(IDS).logits
        module(**{"input_ids": torch.from_numpy(feeds[0]["input_ids"])})
    handle.remove()
    assert torch.allclose(before, after, atol=1e-4)
    spread = [float(s.max() / s.median()) for s in (seen[0], seen[-1])]
    assert spread[1] < spread[0], spread  # the outlier channel is smaller relative to the rest
    assert record["smoothed_groups"] >= parts.blocks.__len__()
    if kind == "qwen3_moe":  # the norm feeding the experts is left alone, and said so
        assert record["unsmoothed_expert_inputs"] == 2
    if kind == "phi":  # one norm feeds q, k, v and fc1 in parallel: one group of four
        assert len(readers) == 4


def test_smoothing_refuses_blocks_without_norm_fed_linears(tmp_path):
    module, feeds = _model("olmo2", tmp_path)
    with pytest.raises(UserError, match="no norm inside olmo2's blocks"):
        smoothquant.smooth(module, open_for_compression(module), feeds, TASK, 0.8, "t")


def test_smoothing_that_would_change_the_model_is_refused(tmp_path, monkeypatch):
    """A group that misses one reader of the norm (here: the v projection left unscaled) changes the logits."""
    module, feeds = _model("llama", tmp_path)
    real = smoothquant.smoothing_groups

    def missing_one(*args):
        groups, unsmoothed = real(*args)
        return [(norm, readers[:-1]) for norm, readers in groups], unsmoothed
    monkeypatch.setattr(smoothquant, "smoothing_groups", missing_one)
    with pytest.raises(StageFailed, match="smoothing changed the float model's hidden states"):
        smoothquant.smooth(module, open_for_compression(module), feeds, TASK, 0.8, "t")


# --- the stage ------------------------------------------------------------------------------------------------


def test_fp8_stage_quantizes_every_block_linear_and_reloads_identically(tiny_llama, tmp_path):
    result, details = run_stage(Fp8Config(type="quantize", scheme="fp8"), TorchModel(tiny_llama, TASK),
                                tmp_path / "q", TASK)
    assert details["quantized_linear_layers"] == 14 and details["block_weights_changed_share"] == 1.0
    assert (details["format"], details["weights"], details["activations"]) == ("fp8", "channel", "token")
    module = load_torch_model(TorchModel(result.path, TASK, transforms=result.transforms))
    layers = [m for m in module.modules() if type(m).__name__ == "W8A8Linear"]
    assert len(layers) == 14 and all(m.weight_q.dtype == torch.float8_e4m3fn for m in layers)
    assert isinstance(module.lm_head, torch.nn.Linear)  # tied to the table: float
    with torch.no_grad():
        reloaded = module(IDS).logits
    assert torch.equal(reloaded, logits(result))
    assert not torch.allclose(reloaded, logits(TorchModel(tiny_llama, TASK)), atol=1e-6)
    assert details["size_mb_after"] < 0.6 * details["size_mb_before"]


def test_w8a8_static_scales_come_from_calibration_for_every_expert(tmp_path, text_file):
    source = build_architecture(tmp_path / "moe", "qwen3_moe")
    config = W8A8Int8Config(type="quantize", scheme="w8a8-int8", activations="static",
                            calibration=calibration(text_file))
    result, details = run_stage(config, TorchModel(source, TASK), tmp_path / "q", TASK)
    assert details["experts_changed_share"] == 1.0 and details["activations"] == "tensor"
    module = load_torch_model(TorchModel(result.path, TASK, transforms=result.transforms))
    scales = {name: float(m.input_scale) for name, m in module.named_modules() if type(m).__name__ == "W8A8Linear"}
    assert len(scales) == details["quantized_linear_layers"] and all(s > 0 and s != 1.0 for s in scales.values())
    assert details["unsmoothed_expert_inputs"] == 2 and details["smoothed_groups"] == 2
    counts = details["routed_tokens_per_expert"]
    assert all(sum(v) > 0 for v in counts.values())


def test_w8a8_gptq_is_closer_to_float_than_rounding(tmp_path, text_file):
    from compressor.checkpoint import load_tokenizer
    from compressor.data import calibration_batches, torch_inputs

    source = build_architecture(tmp_path / "llama", "llama")
    cal = calibration(text_file, 16)
    feeds = [torch_inputs(f) for f in calibration_batches(
        W8A8Int8Config(type="quantize", scheme="w8a8-int8", calibration=cal).calibration, load_tokenizer(source))]

    def outputs(artifact):  # on the text GPTQ calibrated on: what its objective is about
        module = load_torch_model(artifact)
        with torch.no_grad():
            return torch.cat([module(**feed).logits.flatten() for feed in feeds])
    dense = outputs(TorchModel(source, TASK))
    errors = {}
    for algorithm in ("gptq", "rtn"):
        config = W8A8Int8Config(type="quantize", scheme="w8a8-int8", algorithm=algorithm, smoothing_strength=None,
                                calibration=cal)
        result, _ = run_stage(config, TorchModel(source, TASK), tmp_path / algorithm, TASK)
        errors[algorithm] = float(((outputs(result) - dense) ** 2).mean())
    assert 0 < errors["gptq"] < errors["rtn"], errors


@pytest.mark.parametrize("raw,problem", [
    ({"scheme": "fp8", "activations": "static"}, "needs `calibration:`"),
    ({"scheme": "fp8", "calibration": "CAL"}, "calibration applies to static activations"),
    ({"scheme": "fp8", "weights": "block", "activations": "static", "calibration": "CAL"}, "block weights go with"),
    ({"scheme": "w8a8-int8"}, "smoothing and algorithm gptq needs"),
    ({"scheme": "w8a8-int8", "algorithm": "rtn", "smoothing_strength": None, "dampening": 0.1}, "dampening"),
])
def test_config_problems_are_named(raw, problem, text_file):
    raw = {"type": "quantize", **raw}
    if raw.get("calibration") == "CAL":
        raw["calibration"] = calibration(text_file)
    config = (Fp8Config if raw["scheme"] == "fp8" else W8A8Int8Config).model_validate(raw)
    assert problem in config.problem("torch")
    assert "torch models" in Fp8Config(type="quantize", scheme="fp8").problem("onnx")


# --- compressed-tensors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,options,dtype,ct_format", [
    ("fp8", {}, "F8_E4M3", "float-quantized"),
    ("fp8", {"weights": "tensor", "activations": "static"}, "F8_E4M3", "float-quantized"),
    ("w8a8-int8", {"algorithm": "rtn"}, "I8", "int-quantized"),
    ("w8a8-int8", {"activations": "static"}, "I8", "int-quantized"),
])
def test_compressed_tensors_folder_reloads_to_the_simulated_logits(scheme, options, dtype, ct_format, tiny_llama,
                                                                   tmp_path, text_file):
    config = (Fp8Config if scheme == "fp8" else W8A8Int8Config).model_validate(
        {"type": "quantize", "scheme": scheme, **options})
    if config.needs_calibration():
        config = config.model_copy(update={"calibration": W8A8Int8Config.model_validate(
            {"type": "quantize", "scheme": "w8a8-int8", "calibration": calibration(text_file)}).calibration})
    quantized, _ = run_stage(config, TorchModel(tiny_llama, TASK), tmp_path / "q", TASK)
    result, details = run_stage(ExportCompressedTensorsConfig(type="export_compressed_tensors"), quantized,
                                tmp_path / "ct", TASK)
    assert details["format"] == ct_format and details["reload_max_abs_diff"] == 0.0
    group = json.loads((result.path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    static = options.get("activations") == "static"
    assert group["input_activations"]["dynamic"] is (not static)
    assert group["input_activations"]["strategy"] == ("tensor" if static else "token")
    assert group["weights"]["type"] == ("float" if scheme == "fp8" else "int")
    with open(result.path / "model.safetensors", "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    q_proj = "model.layers.0.self_attn.q_proj"
    assert header[f"{q_proj}.weight"]["dtype"] == dtype
    assert (f"{q_proj}.input_scale" in header) is static
    # transformers' model runs 8-bit activations: without them its logits would differ
    reloaded = load_torch_model(result)
    assert reloaded.model.layers[0].self_attn.q_proj.quantization_scheme.input_activations is not None
    with safe_open(str(result.path / "model.safetensors"), "pt") as stored:
        assert stored.get_tensor(f"{q_proj}.weight_scale").shape == ((1,) if options.get("weights") == "tensor"
                                                                     else (64, 1))


@pytest.mark.parametrize("kind,words", [("qwen3_moe", "experts as fused"), ("opt", "(tokens, features) inputs")])
def test_compressed_tensors_refuses_what_transformers_would_not_compute_alike(kind, words, tmp_path):
    source = build_architecture(tmp_path / kind, kind)
    quantized, _ = run_stage(Fp8Config(type="quantize", scheme="fp8"), TorchModel(source, TASK), tmp_path / "q", TASK)
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        run_stage(ExportCompressedTensorsConfig(type="export_compressed_tensors"), quantized, tmp_path / "ct", TASK)
    assert not (tmp_path / "ct" / "model").exists()


@pytest.mark.parametrize("options,words", [
    ("{type: quantize, scheme: fp8}", "static activation scales"),
    ("{type: quantize, scheme: w8a8-int8, algorithm: rtn, smoothing_strength: null}", "saturate on CPUs without"),
    ("{type: quantize, scheme: fp8, activations: static, calibration: {data: {dataset: lee-test}}}\n"
     "  - {type: export_onnx, opset: 18}", "opset 19 or later"),
])
def test_export_onnx_after_8_bit_is_refused_when_planning_where_it_has_no_qdq_form(options, words):
    from compressor.planning import plan
    from compressor.recipe import parse_recipe

    last = "" if "export_onnx" in options else "  - {type: export_onnx}\n"
    text = (f"name: r\ntask: text-generation\nstages:\n  - {options}\n{last}"
            "evaluation: {data: {dataset: lee-background}}\ngoals: {size: {max_ratio: 0.5}}\n")
    with pytest.raises(UserError, match=words):
        plan(parse_recipe(text, "r.yaml"))


@pytest.mark.parametrize("weights", ["channel", "tensor"])
def test_fp8_static_exports_to_onnx_qdq_that_onnx_runtime_runs_as_torch_does(weights, tiny_llama, tmp_path, text_file):
    import onnx

    from compressor.stages.export.export_onnx import ExportOnnxConfig

    config = Fp8Config.model_validate({"type": "quantize", "scheme": "fp8", "weights": weights,
                                       "activations": "static", "calibration": calibration(text_file)})
    quantized, _ = run_stage(config, TorchModel(tiny_llama, TASK), tmp_path / "q", TASK)
    exported, details = run_stage(ExportOnnxConfig(type="export_onnx"), quantized, tmp_path / "onnx", TASK)
    assert details["qdq_matmuls"] == 14 and details["opset"] == 19
    assert details["max_abs_diff"] < 1e-4  # only float32 summation order differs
    graph = onnx.load(str(exported.path))
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("QuantizeLinear") == 14 and ops.count("DequantizeLinear") == 28
    fp8 = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(i.dims) == 2]
    assert len(fp8) == 14  # the weights are stored as E4M3 codes, not float
    scales = [i for i in graph.graph.initializer if i.name.endswith("_w_scale")]
    assert {tuple(i.dims) for i in scales} == ({(64,), (128,), (32,)} if weights == "channel" else {()})
    # the weights the torch layers hold, read back from the graph: the same codes
    module = load_torch_model(quantized)
    codes = module.model.layers[0].self_attn.q_proj.weight_q
    stored = {bytes(i.raw_data) for i in fp8}
    assert codes.t().contiguous().view(torch.uint8).numpy().tobytes() in stored


def test_fp8_static_classifier_calibrates_its_pooler_and_classifier_and_exports(tiny_classifier, tmp_path,
                                                                              sentences_jsonl):
    """An encoder's layers outside the blocks get input scales from a pass of the calibration data."""
    from compressor.stages.export.export_onnx import ExportOnnxConfig

    config = Fp8Config.model_validate({"type": "quantize", "scheme": "fp8", "activations": "static",
                                       "calibration": {"data": {"path": str(sentences_jsonl)}, "samples": 16,
                                                       "batch_size": 8}})
    task = "text-classification"
    quantized, details = run_stage(config, TorchModel(tiny_classifier, task), tmp_path / "q", task)
    module = load_torch_model(quantized)
    assert type(module.classifier).__name__ == "W8A8Linear" and float(module.classifier.input_scale) != 1.0
    assert type(module.bert.pooler.dense).__name__ == "W8A8Linear"
    exported, onnx_details = run_stage(ExportOnnxConfig(type="export_onnx"), quantized, tmp_path / "onnx", task)
    assert onnx_details["qdq_matmuls"] == details["quantized_linear_layers"] == 14
    assert onnx_details["max_abs_diff"] < 1e-4


def test_fp8_refuses_a_quantized_checkpoint_and_an_fp8_engine_needs_fp8_qdq(tmp_path, tiny_llama):
    import shutil

    from compressor.planning import plan
    from compressor.recipe import parse_recipe

    folder = tmp_path / "quantized"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="holds quantized weights"):
        run_stage(Fp8Config(type="quantize", scheme="fp8"), TorchModel(folder, TASK), tmp_path / "q", TASK)
    text = ("name: r\ntask: text-classification\nstages:\n  - {type: export_onnx}\n"
            "  - {type: quantize, scheme: int8-static, calibration: {data: {dataset: sentiment-train}}}\n"
            "  - {type: build_engine, precision: fp8}\n"
            "evaluation: {data: {dataset: sentiment-test}}\ngoals: {size: {max_ratio: 0.5}}\n")
    with pytest.raises(UserError, match="precision fp8 needs FP8 Q/DQ nodes"):
        plan(parse_recipe(text, "r.yaml"))


@pytest.mark.parametrize("later,words", [
    ("{type: prune, method: magnitude, sparsity: 0.5}", "prune scores and zeroes float weights"),
    ("{type: cast, dtype: bfloat16}", "cast the float model"),
    ("{type: export_aoti}", "export_aoti compiles float weights"),
    ("{type: sparsify}", "sparsify needs float weights"),
    ("{type: quantize, scheme: int8-weight-only}", "already quantized by an earlier stage (fp8)"),
])
def test_a_stage_that_needs_float_weights_after_fp8_is_refused_when_planning(later, words):
    from compressor.planning import plan
    from compressor.recipe import parse_recipe

    text = (f"name: r\ntask: text-generation\nstages:\n  - {{type: quantize, scheme: fp8}}\n  - {later}\n"
            "evaluation: {data: {dataset: lee-background}}\ngoals: {size: {max_ratio: 0.5}}\n")
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        plan(parse_recipe(text, "r.yaml"))
