"""Layer by layer for torch int4 (rtn, gptq, awq): the tensors the whole-model path writes, in shards
that load without the float model; and calibration activations spilled to disk give the results kept
in memory gives, with too small a disk refused before any block runs."""

import shutil
from collections import namedtuple

import pytest
import torch

from compressor import fit
from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.errors import UserError
from compressor.shards import INDEX_FILE, read_state
from compressor.stages.blockwise import activations, layerwise
from compressor.stages.quantize.int4_onnx import Int4WeightOnlyConfig
from compressor.stages.prune.prune import PruneConfig

from .test_layerwise import IDS, TASK, sharded_copy
from .test_stages import run_stage


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama, tmp_path_factory):
    return sharded_copy(tiny_llama, tmp_path_factory.mktemp("sharded") / "llama")


def _calibration(text_file) -> dict:
    return {"data": {"path": str(text_file), "segment": "window"}, "samples": 8, "max_length": 32, "batch_size": 4}


def quantize(checkpoint, workdir, text_file, algorithm, **options):
    if algorithm != "rtn":
        options["calibration"] = _calibration(text_file)
    config = Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", algorithm=algorithm, block_size=32,
                                  **options)
    return run_stage(config, TorchModel(checkpoint, TASK), workdir, TASK)


@pytest.mark.parametrize("algorithm", ["rtn", "gptq", "awq"])
def test_layerwise_int4_equals_the_whole_model(algorithm, sharded_llama, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(layerwise, "SHARD_BYTES", 20_000)  # packed int4 is small: several shards all the same
    whole, whole_details = quantize(sharded_llama, tmp_path / "whole", text_file, algorithm, execution="whole")
    streamed, details = quantize(sharded_llama, tmp_path / "layerwise", text_file, algorithm, execution="layerwise")
    assert details["execution"] == "layerwise" and whole_details["execution"] == "whole"
    assert details["quantized_linear_layers"] == whole_details["quantized_linear_layers"] == 14
    assert (streamed.path / INDEX_FILE).is_file() and len(list(streamed.path.glob("*.safetensors"))) > 1
    expected, written = read_state(whole.path), read_state(streamed.path)
    assert set(written) == set(expected)
    packed = [name for name in expected if name.endswith("weight_packed")]
    assert len(packed) == 14
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype, name
        if tensor.is_floating_point():
            assert torch.allclose(written[name], tensor, atol=1e-6), name
        else:  # codes: the same rounding decisions
            assert torch.equal(written[name], tensor), name
    reloaded = load_torch_model(TorchModel(streamed.path, TASK))
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, whole.module(IDS).logits, atol=1e-5)
    if algorithm == "awq":
        assert details["awq_groups_scaled"] == whole_details["awq_groups_scaled"]


def test_gptq_layer_by_layer_keeps_an_untied_head_out_of_4_bit_unless_asked(sharded_llama, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sharded_llama)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    untied = tmp_path / "untied"
    model.save_pretrained(untied, max_shard_size="100KB")
    for item in sharded_llama.iterdir():
        if item.name.startswith("tokenizer") or item.name == "vocab.txt":
            shutil.copy2(item, untied / item.name)
    gptq, details = quantize(untied, tmp_path / "gptq", text_file, "gptq", execution="layerwise")
    state = read_state(gptq.path)
    # out of the calibrated 4-bit blocks, rounded to int8 with the embedding table (embeddings: int8)
    assert "lm_head.weight_int8" in state and "lm_head.weight_packed" not in state
    assert details["kept_in_float"] == [] and details["quantized_linear_layers"] == 14
    assert details["head"] == "int8, rounded to nearest" and "model.embed_tokens.weight_int8" in state
    kept, details = quantize(untied, tmp_path / "gptq-float", text_file, "gptq", execution="layerwise",
                             embeddings="float")
    state = read_state(kept.path)
    assert "lm_head.weight" in state and "model.embed_tokens.weight" in state
    assert details["kept_in_float"] == ["lm_head"] and details["embeddings"] == "float"
    # asked for: rounded to nearest once the blocks are done, the blocks still calibrated
    asked, details = quantize(untied, tmp_path / "gptq-head", text_file, "gptq", execution="layerwise",
                              quantize_head=True)
    state = read_state(asked.path)
    assert "lm_head.weight_packed" in state and details["quantized_linear_layers"] == 15
    rtn, details = quantize(untied, tmp_path / "rtn", text_file, "rtn", execution="layerwise")
    assert "lm_head.weight_packed" in read_state(rtn.path) and details["quantized_linear_layers"] == 15


def test_int4_execution_is_refused_on_onnx():
    config = Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", execution="layerwise")
    assert config.problem("onnx") == "execution applies to torch models"


@pytest.mark.parametrize("stage", ["sparsegpt", "gptq"])
def test_activations_spilled_to_disk_give_the_same_result(stage, tiny_llama, text_file, tmp_path, monkeypatch):
    def run(workdir):
        if stage == "gptq":
            return quantize(tiny_llama, workdir, text_file, "gptq", execution="whole")
        config = PruneConfig(type="prune", method="sparsegpt", sparsity=0.5, calibration=_calibration(text_file))
        return run_stage(config, TorchModel(tiny_llama, TASK), workdir, TASK)

    kept, kept_details = run(tmp_path / "memory")
    assert kept_details["calibration_activations"].startswith("memory")
    written_files = []
    original_replace = activations.BlockInputs.replace

    def replace(self, index, hidden):
        original_replace(self, index, hidden)
        if self.folder is not None:
            written_files.append(len(list(self.folder.iterdir())))
    monkeypatch.setattr(activations.BlockInputs, "replace", replace)
    monkeypatch.setattr(fit, "memory_available", lambda: 4 * 8 * 32 * 64 * 2)  # a quarter holds half of them
    spilled, details = run(tmp_path / "disk")
    assert details["calibration_activations"].startswith("disk")
    assert written_files and max(written_files) == 2  # 8 samples in batches of 4: one file per batch
    assert not (tmp_path / "disk" / "activations").exists()  # removed after the walk
    for name, tensor in read_state(kept.path).items():
        assert torch.equal(read_state(spilled.path)[name], tensor), name


def test_too_small_a_disk_for_the_activations_is_refused_before_calibrating(tiny_llama, text_file, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(fit, "memory_available", lambda: 1000)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda _path: Usage(10 ** 9, 10 ** 9, 1000))
    with pytest.raises(UserError, match=r"activations need 0.0 GB on disk .* has 0.0 GB free") as error:
        quantize(tiny_llama, tmp_path / "gptq", text_file, "gptq", execution="whole")
    assert "hidden size 64" in str(error.value)
