"""Quantized vocabulary matrices in the torch weight-only schemes: the token table (and the head tied to it,
or an untied head a calibrated 4-bit method leaves out of its blocks) as int8 or int4, stored once, reloaded
exactly, and large enough in a large-vocabulary model to decide whether the size goal is met."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import TypeAdapter
from safetensors import safe_open

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.embeddings import is_quantized_embedding
from compressor.pipeline import RunOptions, run
from compressor.recipe import StageConfig, parse_recipe
from compressor.stages import REGISTRY, StageContext

from .architectures import build_architecture

TASK = "text-generation"
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
IDS = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48]])


def quantize(source, raw: dict, tmp_path):
    config = TypeAdapter(StageConfig).validate_python({"type": "quantize", **raw})
    ctx = StageContext(tmp_path / "stage", TASK, threads=2)
    ctx.workdir.mkdir(parents=True)
    return REGISTRY["quantize"].run(config, TorchModel(source, TASK), ctx), ctx


def stored_names(folder) -> set[str]:
    names = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            names.update(handle.keys())
    return names


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    return build_architecture(tmp_path_factory.mktemp("tied") / "llama", "llama", tied=True)


@pytest.fixture(scope="module")
def untied_gemma3(tmp_path_factory):
    return build_architecture(tmp_path_factory.mktemp("untied") / "gemma3", "gemma3_text", tied=False)


def test_int8_table_and_tied_head_share_one_set_of_codes(tied_llama, tmp_path):
    float_model = load_torch_model(TorchModel(tied_llama, TASK))
    table = float_model.get_input_embeddings().weight.detach()
    result, ctx = quantize(tied_llama, {"scheme": "int8-weight-only"}, tmp_path)
    assert ctx.details["embeddings"] == "int8" and ctx.details["embedding_parameters"] == table.numel()
    reloaded = load_torch_model(result)
    embedding, head = reloaded.get_input_embeddings(), reloaded.get_output_embeddings()
    assert is_quantized_embedding(embedding)
    # the head computes with the table module itself: the lookup and the logits cannot drift apart, the
    # file holds the codes once, and moving or casting the model keeps it so
    assert type(head).__name__ == "TiedQuantizedHead" and head.table is embedding
    names = stored_names(result.path)
    assert "model.embed_tokens.weight_int8" in names and not any(n.startswith("lm_head.") for n in names)
    moved = reloaded.to(torch.float64)
    assert moved.get_output_embeddings().table is moved.get_input_embeddings()
    assert moved.get_input_embeddings().weight_scale.dtype == torch.float64
    reloaded = load_torch_model(result)
    # a lookup is the row of the int8 table, per-token scale: within half a step of the float row
    embedding = reloaded.get_input_embeddings()
    rows = embedding(IDS[0])
    step = table.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all((rows - table[IDS[0]]).abs() <= step[IDS[0]] / 2 + 1e-7)
    assert not torch.equal(rows, table[IDS[0]])
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, result.module(IDS).logits)


def test_float_keeps_the_table_and_its_size(tied_llama, tmp_path):
    quantized, _ = quantize(tied_llama, {"scheme": "int8-weight-only"}, tmp_path / "int8")
    kept, ctx = quantize(tied_llama, {"scheme": "int8-weight-only", "embeddings": "float"}, tmp_path / "float")
    assert ctx.details["embeddings"] == "float"
    assert type(load_torch_model(kept).get_input_embeddings()) is torch.nn.Embedding
    assert kept.size_mb() > quantized.size_mb() + 0.01  # the float table: 93 x 64 x 4 bytes vs 1 byte


def test_int4_table_keeps_gemmas_embedding_scale_and_an_untied_head_goes_int4(untied_gemma3, tmp_path):
    float_model = load_torch_model(TorchModel(untied_gemma3, TASK))
    source_table = float_model.get_input_embeddings()
    result, ctx = quantize(untied_gemma3, {"scheme": "int4-weight-only", "block_size": 16, "embeddings": "int4"},
                           tmp_path)
    assert ctx.details["embeddings"] == "int4" and ctx.details["kept_in_float"] == []
    reloaded = load_torch_model(result)
    table = reloaded.get_input_embeddings()
    assert is_quantized_embedding(table) and table.group_size == 16
    # Gemma multiplies every looked-up row by sqrt(hidden): the quantized table must too
    expected = source_table(IDS[0])
    got = table(IDS[0])
    assert table.embed_scale == pytest.approx(float(source_table.embed_scale))
    assert (got - expected).abs().max() < 0.2 * expected.abs().max()
    assert torch.allclose(got, table.dequantized_weight()[IDS[0]] * table.embed_scale)
    assert type(reloaded.get_output_embeddings()).__name__ == "Int4WeightOnlyLinear"  # rtn quantizes the head
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, result.module(IDS).logits)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_a_quantized_table_and_untied_head_export_to_onnx_with_their_codes(untied_gemma3, scheme, tmp_path):
    """export_onnx writes the table as GatherBlockQuantized and the untied head (round to nearest puts it
    with the 4-bit blocks) as MatMulNBits with the torch stage's codes; int4 groups of 256 over 64 hidden
    units pad each row, which the graph cuts off. ONNX Runtime's rows (Gemma's scale applied after them)
    and logits are torch's to float rounding."""
    import onnx
    import onnxruntime as ort

    from compressor.stages.export.export_onnx import ExportOnnxConfig

    result, _ = quantize(untied_gemma3, {"scheme": "int4-weight-only", "block_size": 256, "embeddings": scheme},
                         tmp_path)
    ctx = StageContext(tmp_path / "export", TASK, threads=2)
    ctx.workdir.mkdir(parents=True)
    exported = REGISTRY["export_onnx"].run(ExportOnnxConfig(type="export_onnx", atol=1e-4), result, ctx)
    # round to nearest quantizes the head with the blocks: one of the int4 MatMulNBits
    assert ctx.details["embeddings"] == f"{scheme} (GatherBlockQuantized)" and ctx.details["int4_matmuls"] == 2 * 7 + 1
    graph = onnx.load(str(exported.path))
    table = result.module.get_input_embeddings()
    vocabulary_shaped = [i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                         and sorted(i.dims) == sorted(table.dequantized_weight().shape)]
    assert vocabulary_shaped == []  # neither the float table nor a float head is left
    # int4 rows are padded to the group of 256 and cut; int8 rows are whole blocks of 64
    assert any(n.op_type == "Slice" and n.input[0].endswith("_padded") for n in graph.graph.node) == (scheme == "int4")
    # The looked-up rows, read as an extra output, equal torch's dequantized rows; the logits torch's
    gather = next(n for n in graph.graph.node if n.op_type == "GatherBlockQuantized")
    graph.graph.output.append(onnx.helper.make_tensor_value_info(_reshaped_output(graph, gather),
                                                                 onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString())
    feed = {"input_ids": IDS.numpy(), "attention_mask": np.ones_like(IDS.numpy())}
    logits, rows = session.run(None, {k: v for k, v in feed.items() if k in {i.name for i in session.get_inputs()}})
    assert np.array_equal(rows[0], table.dequantized_weight()[IDS[0]].numpy())
    with torch.no_grad():
        expected = result.module(IDS).logits.numpy()
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def _reshaped_output(graph, gather) -> str:
    """The output of the Reshape (and Slice, when padded) turning GatherBlockQuantized's blocks into rows."""
    reshape = next(n for n in graph.graph.node if n.op_type == "Reshape" and n.input[0] == gather.output[0])
    cut = next((n for n in graph.graph.node if n.op_type == "Slice" and n.input[0] == reshape.output[0]), None)
    return (cut or reshape).output[0]


def test_gptq_leaves_an_untied_head_out_of_4_bit_but_rounds_it_to_int8(untied_gemma3, text_file, tmp_path):
    calibration = {"data": {"path": str(text_file), "segment": "window"}, "samples": 4, "max_length": 32,
                   "batch_size": 4}
    result, ctx = quantize(untied_gemma3, {"scheme": "int4-weight-only", "algorithm": "gptq", "block_size": 16,
                                           "symmetric": True, "calibration": calibration}, tmp_path)
    assert ctx.details["head"] == "int8, rounded to nearest" and ctx.details["kept_in_float"] == []
    reloaded = load_torch_model(result)
    assert type(reloaded.get_output_embeddings()).__name__ == "Int8WeightOnlyLinear"
    record = json.loads((result.path / "compress_transforms.json").read_text())["transforms"][0]["embeddings"]
    assert record == {"name": "model.embed_tokens", "scheme": "int8", "head": "lm_head", "head_tied": False,
                      "embed_scale": pytest.approx(8.0)}
    assert ctx.details["float_parameter_share"] < 0.05


def _large_vocabulary_llama(folder, vocab_size: int):
    """An untied tiny Llama whose vocabulary (16k tokens, the tests' words first) is nearly all of its
    weights, as a 128k-262k vocabulary is much of a small real model's."""
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    from .conftest import _tokenizer, causal_tokenizer

    folder.mkdir(parents=True)
    _, words = _tokenizer(folder)
    vocab = (folder / "vocab.txt").read_text().splitlines()
    vocab += [f"unused{i}" for i in range(vocab_size - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        tie_word_embeddings=False)).eval()
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    causal_tokenizer(folder)
    return folder


def _shipped_gptq_recipe(text_file, embeddings: str | None):
    """The shipped smollm2-int4-gptq recipe, unchanged but for its data (the tests' text, for a model
    with the tests' tokenizer) and, where given, the embeddings option."""
    recipe = yaml.safe_load((RECIPES_DIR / "smollm2-int4-gptq.yaml").read_text())
    stage = recipe["stages"][0]
    stage["calibration"]["data"] = {"path": str(text_file), "segment": "window"}
    stage["calibration"].update(samples=4, max_length=64)
    if embeddings:
        stage["embeddings"] = embeddings
    recipe["evaluation"] = {"data": {"path": str(text_file)}, "max_length": 64, "batch_size": 4}
    recipe["goals"]["accuracy"] = [goal for goal in recipe["goals"]["accuracy"]  # those of the evaluation above
                                   if "/" not in goal["metric"] and not goal["metric"].startswith("generation_")]
    recipe["benchmark"].update(iterations=3, warmup=1, memory=False)
    return parse_recipe(yaml.safe_dump(recipe), "smollm2-int4-gptq.yaml")


def test_shipped_gptq_recipe_meets_its_size_goal_on_a_large_vocabulary_only_with_the_table_quantized(
        text_file, tmp_path):
    model = _large_vocabulary_llama(tmp_path / "model", 16384)
    options = RunOptions(out=tmp_path / "int8", cache=False, max_remeasure_seconds=0, measure_memory=False)
    report = run(_shipped_gptq_recipe(text_file, None), model, options).json
    size = next(g for g in report["gate"] if g["goal"] == "size.max_ratio")
    assert size["passed"] and size["measured"] < 0.3, size  # 0.4 is the recipe's goal
    assert report["stages"][0]["embeddings"] == "int8" and report["stages"][0]["head"] == "int8, rounded to nearest"
    options.out = tmp_path / "float"
    report = run(_shipped_gptq_recipe(text_file, "float"), model, options).json
    size = next(g for g in report["gate"] if g["goal"] == "size.max_ratio")
    assert not size["passed"] and size["measured"] > 0.9  # the vocabulary is 96% of this model
