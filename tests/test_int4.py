"""int4 weight-only: ONNX Runtime's MatMulNBits blocks decode to the original weights within half a
quantization step; torch GPTQ and AWQ beat rounding on the data they saw, are sequential, store and
reload exactly, and export to MatMulNBits with their own codes; configs are checked."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from pydantic import ValidationError

from compressor.artifacts import TorchModel
from compressor.stages import REGISTRY
from compressor.stages.export.export_onnx import ExportOnnxConfig
from compressor.stages.quantize.int4_onnx import Int4WeightOnlyConfig
from compressor.stages.quantize.quantize import Int8DynamicConfig

from .test_stages import outputs, run_stage, sqnr_db


@pytest.fixture(scope="module")
def exported_llama(tiny_llama, tmp_path_factory):
    config = ExportOnnxConfig(type="export_onnx", atol=1e-3)
    return run_stage(config, TorchModel(tiny_llama, "text-generation"), tmp_path_factory.mktemp("export"),
                     "text-generation")[0]


def float_weights(path) -> dict[str, np.ndarray]:
    """MatMul name -> its constant float weight (K x N), from the graph before quantization."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits}


def decode_matmulnbits(path, bits: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MatMulNBits node name -> (dequantized K x N weight, per-block step), for the nodes of `bits`. Layout
    as documented for the contrib op: B is [N, blocks, block_size * bits / 8] uint8, 4-bit codes with the low
    nibble first, scales are [N * blocks], 4-bit zero points are packed two per byte (the midpoint, 8 or 128,
    when absent)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    decoded = {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs["bits"] != bits:
            continue
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        blocks = -(-k // block)

        def unpacked(array, width):
            array = array.reshape(n, -1)
            if bits == 4:
                array = np.stack([array & 0x0F, array >> 4], axis=-1).reshape(n, -1)
            return array[:, :width].astype(np.float32)
        values = unpacked(inits[node.input[1]], k)
        scales = inits[node.input[2]].reshape(n, blocks)
        if len(node.input) > 3 and node.input[3]:
            zeros = unpacked(inits[node.input[3]], blocks)
        else:
            zeros = np.full((n, blocks), 2.0 ** (bits - 1), dtype=np.float32)
        step = np.repeat(scales, block, axis=1)[:, :k]
        weight = (values - np.repeat(zeros, block, axis=1)[:, :k]) * step
        decoded[node.name] = (weight.T, step.T)
    return decoded


def logits(artifact):
    return outputs(artifact, artifact.folder)[0]


def quantize(source, tmp_path, **options):
    return run_stage(Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", **options), source, tmp_path,
                     "text-generation")


def test_rtn_blocks_decode_to_the_weights_within_half_a_step(exported_llama, tmp_path):
    result, details = quantize(exported_llama, tmp_path, algorithm="rtn", block_size=32)
    originals = float_weights(exported_llama.path)
    decoded = decode_matmulnbits(result.path)
    assert details["quantized_matmuls"] == len(decoded) == len(originals) and details["float_weight_matmuls"] == 0
    for name, (weight, step) in decoded.items():
        original = originals[name.removesuffix("_Q4")]
        assert np.all(np.abs(weight - original) <= 0.5 * step + 1e-6), name
        assert np.abs(weight - original).max() > 0  # really rounded
    assert sqnr_db(logits(exported_llama), logits(result)) > 10
    assert details["size_mb_after"] < details["size_mb_before"]


def calibration_for(text_file):
    return {"data": {"path": str(text_file), "segment": "window"}, "samples": 16, "max_length": 32,
            "batch_size": 4}


def test_onnxruntime_gptq_still_equals_rtn(exported_llama, text_file, tmp_path):
    """Why compress runs its own GPTQ: ONNX Runtime 1.31's returns round-to-nearest unchanged. When
    this fails, ONNX Runtime has fixed it and its GPTQ can be offered again."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    from compressor.checkpoint import load_tokenizer
    from compressor.data import CalibrationConfig, calibration_batches
    from compressor.onnx_graph import complete_feed
    from compressor.runners import OrtRunner

    session = OrtRunner(exported_llama.path, "text-generation").session
    calibration = CalibrationConfig(**calibration_for(text_file))
    feeds = [complete_feed(session.get_inputs(), f)
             for f in calibration_batches(calibration, load_tokenizer(exported_llama.folder))]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    results = {}
    for name, algo in (("gptq", nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader())),
                       ("rtn", nbits.DefaultWeightOnlyQuantConfig(block_size=32))):
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(exported_llama.path)), block_size=32, algo_config=algo)
        quantizer.process()
        path = tmp_path / f"{name}.onnx"
        quantizer.model.save_model_to_file(str(path))
        results[name] = decode_matmulnbits(path)
    for node, (weight, _) in results["gptq"].items():
        np.testing.assert_allclose(weight, results["rtn"][node][0], atol=1e-7)


def test_hqq_quantizes_every_weight(exported_llama, tmp_path):
    result, details = quantize(exported_llama, tmp_path, algorithm="hqq", block_size=32)
    assert details["quantized_matmuls"] == len(float_weights(exported_llama.path))
    assert sqnr_db(logits(exported_llama), logits(result)) > 10


def test_int4_config_errors():
    stage = REGISTRY["quantize"]

    def check(input_kind="onnx", **options):
        config = Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", **options)
        return stage.check(config, input_kind, "text-generation")

    assert check("torch") is None and check("torch", algorithm="gptq", calibration={"data": {"path": "x"}},
                                           act_order=True) is None
    assert "hqq quantizes ONNX models" in check("torch", algorithm="hqq")
    assert "accuracy_level applies to ONNX" in check("torch", accuracy_level=4)
    assert "algorithm gptq quantizes the torch model block by block; put this stage before export_onnx" in \
        check(algorithm="gptq", calibration={"data": {"path": "x"}})
    assert "algorithm awq quantizes the torch model" in check(algorithm="awq", calibration={"data": {"path": "x"}})
    assert "apply to algorithm gptq, not rtn" in check("torch", dampening=0.1)
    assert "gptq needs `calibration:`" in check("torch", algorithm="gptq")
    assert "hqq always fits a zero point" in check(algorithm="hqq", symmetric=True)
    assert "hqq quantizer does not set it" in check(algorithm="hqq", accuracy_level=4)
    assert "calibration applies to algorithms gptq and awq" in check(calibration={"data": {"path": "x"}})
    assert "symmetric_grid applies with symmetric: true" in check("torch", symmetric_grid="signed-max")
    assert "ONNX Runtime's rtn quantizer fits its own grid (rtn: signed-max)" in \
        check(symmetric=True, symmetric_grid="signed-max")
    assert check("torch", symmetric=True, symmetric_grid="signed-max") is None
    # What pydantic refuses while parsing: a block size ONNX Runtime lacks, an option of another scheme.
    with pytest.raises(ValidationError, match="16, 32, 64, 128 or 256"):
        check(block_size=48)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Int8DynamicConfig(type="quantize", scheme="int8-dynamic", block_size=32)


# ---------------------------------------------------------------------------------------------
# torch: block-by-block GPTQ and RTN into packed int4 layers


def torch_quantize(tiny_llama, tmp_path, **options):
    return run_stage(Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", **options),
                     TorchModel(tiny_llama, "text-generation"), tmp_path, "text-generation")


def layer_inputs_of(module, feeds) -> dict:
    """X^T X / tokens of every nn.Linear's input, from one pass of `module` over the feeds."""
    import torch

    from compressor.data import torch_inputs
    from compressor.stages.blockwise.sequential import LayerInputs

    stats, handles = {}, []
    for name, layer in module.named_modules():
        if (isinstance(layer, torch.nn.Linear) or type(layer).__name__ == "Int4WeightOnlyLinear") and name != "lm_head":
            stats[name] = LayerInputs(layer.in_features, "hessian")
            handles.append(layer.register_forward_hook(lambda _m, args, _o, s=stats[name]: s.add(args[0])))
    with torch.no_grad():
        for feed in feeds:
            module(**torch_inputs(feed), use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: s.hessian().double() for name, s in stats.items()}


def quantized_weights(module) -> dict:
    return {name: layer.dequantized_weight() for name, layer in module.named_modules()
            if type(layer).__name__ == "Int4WeightOnlyLinear"}


def test_torch_gptq_beats_rtn_on_every_layer_and_round_trips(tiny_llama, text_file, tmp_path):
    import torch

    from compressor.checkpoint import load_tokenizer, load_torch_model
    from compressor.data import CalibrationConfig, calibration_batches, torch_inputs

    calibration = calibration_for(text_file)
    gptq, details = torch_quantize(tiny_llama, tmp_path / "g", algorithm="gptq", block_size=32,
                                   calibration=calibration)
    rtn, _ = torch_quantize(tiny_llama, tmp_path / "r", algorithm="rtn", block_size=32)
    # the tied head computes with the int8 embedding table's codes
    assert details["quantized_linear_layers"] == 2 * 7 and details["kept_in_float"] == []
    assert details["embeddings"] == "int8"
    float_model = load_torch_model(TorchModel(tiny_llama, "text-generation"))
    feeds = calibration_batches(CalibrationConfig(**calibration), load_tokenizer(tiny_llama))
    originals = {n: m.weight.detach().double() for n, m in float_model.named_modules()
                 if isinstance(m, torch.nn.Linear)}
    # Each layer's output error on the inputs it sees in the quantized model (GPTQ's objective,
    # block by block): for block 0 these are the float model's; for block 1 the quantized block 0's.
    hessians = layer_inputs_of(gptq.module, feeds)
    by_gptq, by_rtn = quantized_weights(gptq.module), quantized_weights(rtn.module)
    for name, weight in by_gptq.items():
        def output_error(decoded):  # E ||(W - Wq) x||^2 = trace((W - Wq) H (W - Wq)^T)
            delta = decoded.double() - originals[name]
            return float(torch.trace(delta @ hessians[name] @ delta.T))
        assert output_error(weight) < output_error(by_rtn[name]), name
    # The stored form reloads to the same layers: identical logits.
    reloaded = load_torch_model(TorchModel(gptq.path, "text-generation"))
    feed = torch_inputs(feeds[0])
    with torch.no_grad():
        assert torch.equal(gptq.module(**feed).logits, reloaded(**feed).logits)
        float_logits = float_model(**feed).logits
        gptq_error = ((gptq.module(**feed).logits - float_logits) ** 2).mean()
        rtn_error = ((rtn.module(**feed).logits - float_logits) ** 2).mean()
    assert gptq_error < rtn_error
    on_disk = sum(f.stat().st_size for f in gptq.path.glob("*.safetensors"))
    assert on_disk < 0.5 * sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_of_layers_sharing_an_input_gives_each_the_codes_it_gets_alone(act_order):
    import torch

    from compressor.stages.blockwise.sequential import LayerInputs
    from compressor.stages.quantize.int4_gptq import gptq_quantize
    from compressor.stages.quantize.int4_layers import layers_quantizer

    torch.manual_seed(2)
    inputs = torch.randn(512, 64) * torch.rand(64) * 3
    stats = LayerInputs(64, "hessian")
    stats.add(inputs)
    layers = [torch.nn.Linear(64, rows, bias=False) for rows in (64, 32, 32)]
    config = Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", algorithm="gptq",
                                  block_size=32, act_order=act_order, calibration={"data": {"path": "x"}})
    alone = [gptq_quantize(layer.weight, stats.hessian(), 32, config.grid(), config.dampening, act_order)
             for layer in layers]
    grids = {}
    with torch.no_grad():
        layers_quantizer(config, grids)([(str(i), layer) for i, layer in enumerate(layers)], stats)
    for i, expected in enumerate(alone):
        assert all(torch.equal(got, want) for got, want in zip(grids[str(i)], expected))


def test_torch_gptq_is_sequential_and_act_order_changes_the_result(tiny_llama, text_file, tmp_path):
    """Block 1 is quantized on the outputs of the already quantized block 0, not on the float model's:
    the same layer quantized with one-pass Hessians from the float model gives other codes."""
    import torch

    from compressor.checkpoint import load_tokenizer, load_torch_model
    from compressor.data import CalibrationConfig, calibration_batches
    from compressor.stages.quantize.int4_gptq import gptq_quantize

    calibration = calibration_for(text_file)
    gptq, _ = torch_quantize(tiny_llama, tmp_path / "g", algorithm="gptq", block_size=32, calibration=calibration)
    float_model = load_torch_model(TorchModel(tiny_llama, "text-generation"))
    feeds = calibration_batches(CalibrationConfig(**calibration), load_tokenizer(tiny_llama))
    one_pass = layer_inputs_of(float_model, feeds)
    sequential = {name: layer.codes() for name, layer in gptq.module.named_modules()
                  if type(layer).__name__ == "Int4WeightOnlyLinear"}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        weight = float_model.get_submodule(name).weight
        codes, _, _ = gptq_quantize(weight, one_pass[name].float(), 32, "asymmetric")
        same = torch.equal(codes, sequential[name])
        # block 0 sees the float model's inputs either way; block 1 does not
        assert same is (name.startswith("model.layers.0."))
    ordered, _ = torch_quantize(tiny_llama, tmp_path / "a", algorithm="gptq", block_size=32, calibration=calibration,
                                act_order=True)
    assert ordered.module.model.layers[1].mlp.down_proj.codes().ne(
        gptq.module.model.layers[1].mlp.down_proj.codes()).any()


def test_torch_awq_lowers_output_error_below_rtn_and_keeps_the_float_function(tiny_llama, text_file, tmp_path):
    import torch

    from compressor.checkpoint import load_tokenizer, load_torch_model
    from compressor.data import CalibrationConfig, calibration_batches, torch_inputs
    from compressor.stages.quantize.awq import _apply, block_mappings

    calibration = calibration_for(text_file)
    awq, details = torch_quantize(tiny_llama, tmp_path / "a", algorithm="awq", block_size=32, calibration=calibration)
    rtn, _ = torch_quantize(tiny_llama, tmp_path / "r", algorithm="rtn", block_size=32)
    assert details["quantized_linear_layers"] == 2 * 7 and details["awq_groups_scaled"] > 0
    assert details["awq_error_vs_rtn_mean"] < 1
    float_model = load_torch_model(TorchModel(tiny_llama, "text-generation"))
    feed = torch_inputs(calibration_batches(CalibrationConfig(**calibration), load_tokenizer(tiny_llama))[0])
    with torch.no_grad():
        reference = float_model(**feed).logits
        awq_error = float(((awq.module(**feed).logits - reference) ** 2).mean())
        rtn_error = float(((rtn.module(**feed).logits - reference) ** 2).mean())
        assert awq_error < rtn_error
        # Scaling alone (no rounding) leaves the float model's function unchanged.
        block = float_model.model.layers[0]
        mappings = block_mappings(block)
        assert [m.parent for m in mappings] == ["self_attn", "mlp", "mlp.down_proj"]  # v -> o: 2 KV heads, widths differ
        for mapping in mappings:
            width = block.get_submodule(mapping.balance[0]).in_features
            _apply(block, mapping, torch.linspace(0.5, 2.0, width))
        assert torch.allclose(float_model(**feed).logits, reference, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_torch_int4_exports_to_matmulnbits_with_its_own_codes(tiny_llama, text_file, tmp_path, symmetric):
    """export_onnx after torch GPTQ writes the torch stage's codes into MatMulNBits (no refitting),
    and ONNX Runtime then computes what the torch int4 model computes."""
    quantized, _ = torch_quantize(tiny_llama, tmp_path / "q", algorithm="gptq", block_size=32, symmetric=symmetric,
                                  act_order=True, calibration=calibration_for(text_file))
    exported, details = run_stage(ExportOnnxConfig(type="export_onnx", atol=1e-3), quantized, tmp_path / "e",
                                  "text-generation")
    assert details["int4_matmuls"] == 2 * 7 and details["max_abs_diff"] <= 1e-3
    decoded = decode_matmulnbits(exported.path)
    layers = quantized_weights(quantized.module)
    assert len(decoded) == len(layers) == 14
    # Each MatMulNBits decodes to exactly one torch layer's dequantized weight (same codes and scales).
    torch_weights = {w.numpy().T.tobytes() for w in layers.values()}
    assert {weight.astype(np.float32).tobytes() for weight, _ in decoded.values()} == torch_weights
    graph = onnx.load(str(exported.path))
    zero_points = [n for n in graph.graph.node if n.op_type == "MatMulNBits" and len(n.input) > 3]
    assert len(zero_points) == (0 if symmetric else 14)
    # The int8 table's tied head: 8-bit MatMulNBits is far slower than a float MatMul, so both stay one float matrix
    assert details["embeddings"] == "float (dequantized)" and not decode_matmulnbits(exported.path, bits=8)
    assert not any(p.name.startswith("float-source") for p in (tmp_path / "e").iterdir())
    assert not list((tmp_path / "e").glob("*.safetensors"))
    assert sqnr_db(logits(exported), outputs(quantized, tiny_llama)[0]) > 40


def test_an_int4_table_and_its_tied_head_export_as_one_set_of_codes(tiny_llama, tmp_path):
    """With `embeddings: int4` the token table becomes GatherBlockQuantized and the head tied to it a 4-bit
    MatMulNBits reading the very same initializer: no float copy of either is left, the looked-up rows are
    torch's, and the logits torch's."""
    quantized, _ = torch_quantize(tiny_llama, tmp_path / "q", algorithm="rtn", block_size=32, embeddings="int4")
    exported, details = run_stage(ExportOnnxConfig(type="export_onnx", atol=1e-4), quantized, tmp_path / "e",
                                  "text-generation")
    assert details["embeddings"] == "int4 (GatherBlockQuantized)"
    assert details["head"] == "int4 MatMulNBits, reading the table's codes" and details["int4_matmuls"] == 14
    graph = onnx.load(str(exported.path))
    gather = [n for n in graph.graph.node if n.op_type == "GatherBlockQuantized"]
    head = [n for n in graph.graph.node if n.op_type == "MatMulNBits" and n.input[1] == gather[0].input[0]]
    assert len(gather) == len(head) == 1
    table = quantized.module.get_input_embeddings().dequantized_weight().numpy()
    assert np.array_equal(decode_matmulnbits(exported.path)[head[0].name][0].T, table)
    assert not [i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                and sorted(i.dims) == sorted(table.shape)]
    assert sqnr_db(logits(exported), outputs(quantized, tiny_llama)[0]) > 60


def test_quantize_and_export_order_rules():
    from compressor.stages.export.export_onnx import ExportOnnx

    int4 = Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only")
    int8 = Int8DynamicConfig(type="quantize", scheme="int8-dynamic")
    export = ExportOnnxConfig(type="export_onnx")
    assert ExportOnnx().check_order(export, [int4]) is None
    assert "int4 weight-only is the exception" in ExportOnnx().check_order(export, [int8])
    assert "already quantized by an earlier stage (int4-weight-only); quantize once" in \
        REGISTRY["quantize"].check_order(int4, [int4, export])


def test_signed_max_grid_is_onnxruntimes_and_keeps_the_extreme_weight_exact(tiny_llama, exported_llama, tmp_path):
    import torch

    from compressor.stages.quantize.int4_gptq import dequantize, fit_grid, rtn_quantize

    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    codes, scales, zeros = rtn_quantize(weight, 32, "signed-max")
    extremes = weight.reshape(8, 2, 32).abs().argmax(dim=2)
    decoded = dequantize(codes, scales, zeros, 32).reshape(8, 2, 32)
    original = weight.reshape(8, 2, 32)
    assert torch.equal(decoded.gather(2, extremes[..., None]), original.gather(2, extremes[..., None]))
    assert torch.all(codes.reshape(8, 2, 32).gather(2, extremes[..., None]) == 0)
    absmax_scale, _ = fit_grid(weight[:, :32], "absmax")
    assert torch.allclose(scales[:, 0].abs(), absmax_scale * 15 / 16)
    # torch rtn on the signed-max grid, exported, decodes to what ONNX Runtime's own symmetric rtn
    # writes for the float model's weights.
    torch_rtn, _ = torch_quantize(tiny_llama, tmp_path / "t", algorithm="rtn", block_size=32, symmetric=True,
                                  symmetric_grid="signed-max")
    exported, _ = run_stage(ExportOnnxConfig(type="export_onnx", atol=1e-3), torch_rtn, tmp_path / "e",
                            "text-generation")
    ort_rtn, _ = quantize(exported_llama, tmp_path / "o", algorithm="rtn", block_size=32, symmetric=True)
    ours = sorted(w.tobytes() for w, _ in decode_matmulnbits(exported.path).values())
    theirs = decode_matmulnbits(ort_rtn.path)
    theirs = sorted(w.tobytes() for name, (w, _) in theirs.items() if "lm_head" not in name)
    assert len(ours) == len(theirs) == 14 and ours == theirs


# per family, the modules that absorb 1/s in each block (a parallel block's one norm feeds all its readers;
# OLMo 2 norms outputs, so only up -> down; OPT's fc1 -> fc2 has ReLU between; v -> o only without GQA)
AWQ_SMOOTHED = {
    "phi3": ["input_layernorm", "post_attention_layernorm"],
    "phi": ["input_layernorm"],  # its attention's output layer is `dense`, no o_proj
    "gpt_oss": ["input_layernorm", "post_attention_layernorm"],  # no up -> down: (clamp(up) + 1) gating
    "falcon": ["input_layernorm"],
    "gpt_neox": ["input_layernorm", "post_attention_layernorm"],
    "opt": ["self_attn_layer_norm", "final_layer_norm", "self_attn.v_proj", "fc1"],
    "gpt2": ["ln_1", "ln_2"],
    "olmo2": ["mlp.up_proj"],
}


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text", "qwen3", "mistral", "qwen3_moe", "mixtral", "deepseek_v3",
                                  *AWQ_SMOOTHED])
def test_awq_scaling_keeps_the_float_function_of_other_llama_style_blocks(kind, tmp_path):
    """Gemma 2 / 3 norm the MLP's input with pre_feedforward_layernorm (post_attention_layernorm norms the
    attention's output) and multiply by (1 + w): balancing must divide that norm, that way. In a
    mixture-of-experts block every expert and the router read the norm's output: the router is scaled with
    the experts (float), so the routing does not move. Other layouts: the groups of AWQ_SMOOTHED, scaled with
    arbitrary factors, leave the model's function as it was."""
    import torch

    from compressor.anatomy import open_for_compression
    from compressor.checkpoint import load_torch_model
    from compressor.stages.quantize.awq import _apply, block_mappings

    from .architectures import build_architecture

    model = load_torch_model(TorchModel(build_architecture(tmp_path / kind, kind), "text-generation"))
    parts = open_for_compression(model)  # experts one Linear each, GPT-2's Conv1D as Linear
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        reference = model(ids).logits
        for block in parts.blocks:
            mappings = block_mappings(block)
            if kind in AWQ_SMOOTHED:
                assert [m.smooth for m in mappings] == AWQ_SMOOTHED[kind]
            else:
                assert len(mappings) >= 3
            if kind.startswith("gemma"):
                assert "pre_feedforward_layernorm" in [m.smooth for m in mappings]
            if kind in ("qwen3_moe", "mixtral"):  # 4 experts' gate and up; the router scaled alongside
                moe = next(m for m in mappings if m.parent == "mlp")
                assert len(moe.balance) == 8 and moe.scaled_only == ("mlp.gate",)
                assert sum(m.parent.endswith("down_proj") for m in mappings) == 4
            for mapping in mappings:
                width = block.get_submodule(mapping.balance[0]).in_features
                _apply(block, mapping, torch.linspace(0.5, 2.0, width))
        change = float((model(ids).logits - reference).abs().max()) / float(reference.abs().max())
    assert change < 1e-4, change


def test_awq_on_experts_searches_every_expert_and_counts_their_tokens(text_file, tmp_path):
    from .architectures import build_architecture

    source = build_architecture(tmp_path / "moe", "qwen3_moe")
    result, details = torch_quantize(source, tmp_path / "a", algorithm="awq", block_size=16, symmetric=True,
                                     calibration=calibration_for(text_file))
    assert details["experts_changed_share"] == 1.0 and details["calibrate_all_experts"] is True
    counts = details["routed_tokens_per_expert"]
    assert len(counts) == 2 and all(len(v) == 4 and sum(v) > 0 for v in counts.values())
    # per block: attention, the experts' shared input, and each expert's down projection (v -> o is skipped:
    # two KV heads make v narrower than o's input)
    assert details["awq_groups_scaled"] > 2
