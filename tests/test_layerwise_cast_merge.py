"""cast and merge_lora layer by layer: on a tiny sharded Llama they write the tensors the whole-model path
writes (cast bit for bit, merging within float rounding), check their outputs one block at a time, and
refuse what they cannot reproduce."""

import json
import shutil

import pytest
import torch

from compressor import fit
from compressor.artifacts import TorchModel
from compressor.checkpoint import TRANSFORMS_FILE, load_torch_model
from compressor.errors import StageFailed, UserError
from compressor.shards import INDEX_FILE, read_state
from compressor.stages.blockwise import layerwise
from compressor.stages.cast.cast import Cast, CastConfig

from .test_layerwise import IDS, TASK, sharded_copy
from .test_merge_lora import LLAMA_TARGETS, make_adapter, merge
from .test_stages import run_stage


@pytest.fixture(scope="module")
def llama(tiny_llama, tmp_path_factory):
    return sharded_copy(tiny_llama, tmp_path_factory.mktemp("sharded") / "llama")


def cast(source, workdir, **options):
    return run_stage(CastConfig(type="cast", **options), TorchModel(source, TASK), workdir, TASK)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_layerwise_cast_equals_the_whole_model(dtype, llama, tmp_path, monkeypatch):
    monkeypatch.setattr(layerwise, "SHARD_BYTES", 100_000)  # several output shards from a tiny model
    whole, whole_details = cast(llama, tmp_path / "whole", dtype=dtype, execution="whole")
    streamed, details = cast(llama, tmp_path / "layerwise", dtype=dtype, execution="layerwise")
    assert (whole_details["execution"], details["execution"]) == ("whole", "layerwise")
    expected, written = read_state(whole.path), read_state(streamed.path)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert written[name].dtype == getattr(torch, dtype) and torch.equal(written[name], tensor), name
    assert (streamed.path / INDEX_FILE).is_file() and len(list(streamed.path.glob("model-*.safetensors"))) > 1
    assert json.loads((streamed.path / TRANSFORMS_FILE).read_text()) == json.loads(
        (whole.path / TRANSFORMS_FILE).read_text())
    config = json.loads((streamed.path / "config.json").read_text())
    assert config["dtype"] == dtype and config == json.loads((whole.path / "config.json").read_text())
    # The check ran block by block on the whole path's sentences: the same figures.
    assert details["relative_diff"] == pytest.approx(whole_details["relative_diff"], rel=1e-3)
    assert 0 < details["relative_diff"] <= details["rtol"]
    reloaded = load_torch_model(TorchModel(streamed.path, TASK))  # loads in the cast dtype, as the whole path's
    assert next(reloaded.parameters()).dtype == getattr(torch, dtype)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, load_torch_model(whole)(input_ids=IDS).logits)


def test_layerwise_cast_fails_a_tolerance_too_tight(llama, tmp_path):
    with pytest.raises(StageFailed, match=r"cast bfloat16: outputs differ from float32 by .* raise rtol"):
        cast(llama, tmp_path, dtype="bfloat16", rtol=1e-9, execution="layerwise")


def test_auto_casts_layer_by_layer_only_when_the_model_would_not_fit(llama, tmp_path, monkeypatch):
    _, details = cast(llama, tmp_path / "fits", dtype="bfloat16")
    assert details["execution"] == "whole" and "fit in memory" in details["execution_reason"]
    monkeypatch.setattr(fit, "memory_available", lambda: 1000)
    _, details = cast(llama, tmp_path / "big", dtype="bfloat16")
    assert details["execution"] == "layerwise" and "more than the" in details["execution_reason"]
    assert "one block at a time" in details["output_check"]


def test_execution_is_refused_for_onnx_casts():
    config = CastConfig(type="cast", dtype="float16", execution="layerwise")
    assert Cast().check(config, "onnx", "text-classification") == "execution applies to torch models"


@pytest.fixture(scope="module")
def sharded_adapters(llama, tmp_path_factory):
    """Two adapters, the second rsLoRA (scaling alpha / sqrt(r)) with another rank and targets."""
    root = tmp_path_factory.mktemp("adapters")
    first = make_adapter(llama, TASK, root / "first", LLAMA_TARGETS, seed=1, task_type="CAUSAL_LM")
    second = make_adapter(llama, TASK, root / "second", ["q_proj", "up_proj"], seed=2, r=2, alpha=4,
                          task_type="CAUSAL_LM")
    settings = json.loads((second / "adapter_config.json").read_text())
    (second / "adapter_config.json").write_text(json.dumps({**settings, "use_rslora": True}))
    return first, second


def merge_with(source, workdir, adapters, **fields):
    return run_stage(merge(*adapters, **fields), TorchModel(source, TASK), workdir, TASK)


def test_layerwise_merge_equals_the_whole_model(llama, sharded_adapters, tmp_path, monkeypatch):
    monkeypatch.setattr(layerwise, "SHARD_BYTES", 100_000)
    first, second = sharded_adapters
    weighted = [(first, 0.7), (second, 0.3)]
    whole, whole_details = merge_with(llama, tmp_path / "whole", weighted, execution="whole")
    streamed, details = merge_with(llama, tmp_path / "layerwise", weighted, execution="layerwise")
    assert (whole_details["execution"], details["execution"]) == ("whole", "layerwise")
    expected, written, base = read_state(whole.path), read_state(streamed.path), read_state(llama)
    assert set(written) == set(expected)
    changed = [name for name in expected if not torch.equal(expected[name], base[name])]
    assert len(changed) == 2 * 4  # q, v, down (first) and up (second; q in both) in each of 2 blocks
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, atol=1e-6, rtol=0)
    assert details["max_abs_diff"] <= 1e-4 and whole_details["max_abs_diff"] <= 1e-4
    assert details["adapter_effect_max_abs"] == pytest.approx(whole_details["adapter_effect_max_abs"], rel=1e-4)
    assert details["adapter_effect_max_abs"] > 100 * max(details["max_abs_diff"], 1e-7)
    assert (streamed.path / INDEX_FILE).is_file() and (streamed.path / "tokenizer_config.json").is_file()


def test_layerwise_merge_keeps_a_bfloat16_checkpoint_bfloat16(llama, sharded_adapters, tmp_path):
    half = sharded_copy(llama, tmp_path / "bf16", dtype=torch.bfloat16)
    adapters = [(sharded_adapters[0], 1.0)]
    whole, _ = merge_with(half, tmp_path / "whole", adapters, execution="whole")  # merges and saves float32
    streamed, details = merge_with(half, tmp_path / "run", adapters, execution="layerwise", atol=0.05)
    expected, written = read_state(whole.path), read_state(streamed.path)
    for name, tensor in expected.items():  # the same float32 merge, rounded to the checkpoint's dtype
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], tensor.to(torch.bfloat16)), name
    assert 0 < details["max_abs_diff"] <= 0.05  # what that rounding costs, measured against the unmerged model


@pytest.mark.parametrize("field, value", [("use_dora", True), ("bias", "all"), ("alpha_pattern", {"q_proj": 2})])
def test_layerwise_merge_refuses_what_it_cannot_reproduce(field, value, llama, sharded_adapters, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(sharded_adapters[0], adapter)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, field: value}))
    with pytest.raises(UserError, match=rf"{field}: .* is not merged layer by layer .* use execution: whole"):
        merge_with(llama, tmp_path / "run", [(adapter, 1.0)], execution="layerwise")
    assert not (tmp_path / "run" / "model").exists()
