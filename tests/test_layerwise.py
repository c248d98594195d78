"""Layer by layer: a sharded checkpoint pruned or int8-quantized one block at a time gives the tensors
the whole-model path gives, writes an ordinary sharded folder, and bad shards are named before work."""

import json

import pytest
import torch
from safetensors.torch import load_file

from compressor import fit
from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.errors import UserError
from compressor.shards import INDEX_FILE, ShardedCheckpoint, read_state
from compressor.stages.blockwise import layerwise
from compressor.stages.prune.prune import PruneConfig
from compressor.stages.quantize.weight_only import Int8WeightOnlyConfig

from .conftest import TINY_EVALUATION, write_recipe
from .test_stages import run_stage

TASK = "text-generation"
IDS = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 3]])


def sharded_copy(source, target, dtype=torch.float32):
    """The tiny Llama saved in several shards with an index, as large checkpoints come."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.save_pretrained(target, max_shard_size="100KB")
    for item in source.iterdir():
        if item.suffix != ".safetensors" and not (target / item.name).exists():
            (target / item.name).write_bytes(item.read_bytes())
    assert (target / INDEX_FILE).is_file()
    return target


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama, tmp_path_factory):
    return sharded_copy(tiny_llama, tmp_path_factory.mktemp("sharded") / "llama")


def prune(checkpoint, workdir, **options):
    config = PruneConfig(type="prune", **options)
    return run_stage(config, TorchModel(checkpoint, TASK), workdir, TASK)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_layerwise_pruning_equals_the_whole_model(method, sharded_llama, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(layerwise, "SHARD_BYTES", 100_000)  # several output shards from a tiny model
    options = {"method": method, "sparsity": 0.5}
    if method != "magnitude":
        options["calibration"] = {"data": {"path": str(text_file), "segment": "window"}, "samples": 8,
                                  "max_length": 32, "batch_size": 4}
    whole, whole_details = prune(sharded_llama, tmp_path / "whole", execution="whole", **options)
    streamed, details = prune(sharded_llama, tmp_path / "layerwise", execution="layerwise", **options)
    assert details["execution"] == "layerwise" and whole_details["execution"] == "whole"
    assert details["sparsity_pruned_layers"] == whole_details["sparsity_pruned_layers"] == pytest.approx(0.5, 0.01)
    expected, written = read_state(whole.path), read_state(streamed.path)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=1e-6 if method == "sparsegpt" else 0)
    assert (streamed.path / INDEX_FILE).is_file() and len(list(streamed.path.glob("model-*.safetensors"))) > 1
    reloaded = load_torch_model(TorchModel(streamed.path, TASK))  # an ordinary folder transformers loads
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, whole.module(input_ids=IDS).logits,
                                   atol=1e-4, rtol=0)


def test_a_bfloat16_checkpoint_stays_bfloat16(tiny_llama, tmp_path):
    source = sharded_copy(tiny_llama, tmp_path / "bf16", dtype=torch.bfloat16)
    streamed, _ = prune(source, tmp_path / "run", method="magnitude", execution="layerwise")
    dtypes = {t.dtype for t in read_state(streamed.path).values()}
    assert dtypes == {torch.bfloat16}


def test_layerwise_int8_weight_only_equals_the_whole_model(sharded_llama, tmp_path):
    config = Int8WeightOnlyConfig
    whole, _ = run_stage(config(type="quantize", scheme="int8-weight-only", execution="whole"),
                         TorchModel(sharded_llama, TASK), tmp_path / "whole", TASK)
    streamed, details = run_stage(config(type="quantize", scheme="int8-weight-only", execution="layerwise"),
                                  TorchModel(sharded_llama, TASK), tmp_path / "layerwise", TASK)
    assert details["execution"] == "layerwise"
    expected, written = load_file(str(whole.path / "model.safetensors")), read_state(streamed.path)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    quantized = load_torch_model(TorchModel(streamed.path, TASK))
    with torch.no_grad():
        assert torch.equal(quantized(input_ids=IDS).logits, load_torch_model(whole)(input_ids=IDS).logits)


def test_auto_streams_only_when_the_model_would_not_fit(sharded_llama, monkeypatch):
    mode, why = layerwise.choose_execution(sharded_llama, TASK, "auto", "prune")
    assert mode == "whole" and "fit in memory" in why
    monkeypatch.setattr(fit, "memory_available", lambda: 1000)
    mode, why = layerwise.choose_execution(sharded_llama, TASK, "auto", "prune")
    assert mode == "layerwise" and "more than the 0.0 GB available" in why
    assert layerwise.choose_execution(sharded_llama, "text-classification", "auto", "prune")[0] == "whole"


def test_bad_shards_are_named_before_any_work(sharded_llama, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sharded_llama, broken)
    index = json.loads((broken / INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    data = (broken / shard).read_bytes()
    (broken / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{shard}: truncated"):
        ShardedCheckpoint(broken)
    (broken / shard).unlink()
    with pytest.raises(UserError, match=f"names shard {shard}, which is not in"):
        ShardedCheckpoint(broken)

    mixed = tmp_path / "mixed"
    shutil.copytree(sharded_llama, mixed)
    first = sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(mixed / first))
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(torch.bfloat16)
    from safetensors.torch import save_file

    save_file(tensors, str(mixed / first), metadata={"format": "pt"})
    with pytest.raises(UserError, match="more than one float dtype"):
        ShardedCheckpoint(mixed).float_dtype()


def test_global_scope_and_classifiers_are_refused_layer_by_layer(sharded_llama, tiny_classifier, tmp_path):
    with pytest.raises(UserError, match="scope global ranks every weight"):
        prune(sharded_llama, tmp_path / "g", method="magnitude", scope="global", execution="layerwise")
    with pytest.raises(UserError, match="applies to causal LMs"):
        run_stage(PruneConfig(type="prune", method="magnitude", execution="layerwise"),
                  TorchModel(tiny_classifier, "text-classification"), tmp_path / "c", "text-classification")


def test_a_checkpoint_whose_index_names_a_missing_shard_is_refused_at_inspection(sharded_llama, tmp_path):
    import shutil

    from compressor.checkpoint import inspect_checkpoint

    broken = tmp_path / "missing"
    shutil.copytree(sharded_llama, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(UserError, match=f"names shard {shard.name}, which is not in"):
        inspect_checkpoint(broken)


def test_a_result_the_disk_cannot_hold_is_refused_before_any_work(sharded_llama, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(UserError, match=r"the result needs about 0.0 GB and .* has 0.0 GB free"):
        prune(sharded_llama, tmp_path / "full", method="magnitude", execution="layerwise")
    assert not list((tmp_path / "full").rglob("*.safetensors"))


HALF_RECIPE = """
name: half-{name}
task: text-generation
stages:
  - type: prune
    method: magnitude
    sparsity: 0.3
""" + TINY_EVALUATION + """
goals:
  accuracy:
    - {{metric: perplexity, max_drop_pct: 50}}
    - {{metric: top1_agreement, min: 0.1}}
"""


def _run_half(source, text_file, folder):
    from compressor.pipeline import RunOptions, run
    from compressor.recipe import load_recipe

    folder.mkdir()
    recipe = load_recipe(write_recipe(folder, HALF_RECIPE.format(name="bf16", data=text_file)))
    return run(recipe, source, RunOptions(out=folder / "out", cache=False)).report


def test_evaluation_keeps_bfloat16_or_streams_when_float32_would_not_fit(sharded_llama, text_file, tmp_path,
                                                                           monkeypatch):
    from compressor.fit import Holding, evaluation_holding

    half = sharded_copy(sharded_llama, tmp_path / "half", dtype=torch.bfloat16)
    assert evaluation_holding(half) == Holding()  # fits as float32 on any machine
    params = fit.parameter_count(ShardedCheckpoint(half))
    # as if the tiny model were a 3B model on 24 GB: bf16 copies fit, float32 ones do not
    monkeypatch.setattr(fit, "memory_available", lambda: int(params * 7.5))
    assert evaluation_holding(half) == Holding("bfloat16", False, evaluation_holding(half).why)
    assert evaluation_holding(sharded_llama).streamed  # stored float32: nothing smaller to fall back to
    in_memory = _run_half(half, text_file, tmp_path / "bf16")
    assert in_memory.baseline.backend == in_memory.result.backend == "torch-cpu-bfloat16"
    assert any("evaluated in bfloat16, as stored" in note for note in in_memory.notes)
    assert in_memory.stages[0].details()["execution"] == "layerwise"
    assert load_torch_model(TorchModel(tmp_path / "bf16" / "out" / "model", TASK)).dtype == torch.bfloat16

    # as if it were a 7B model on 24 GB: not even two bf16 copies fit, both sides run block by block
    monkeypatch.setattr(fit, "memory_available", lambda: int(params * 3))
    streamed = _run_half(half, text_file, tmp_path / "streamed")
    assert streamed.baseline.backend == streamed.result.backend == "torch-cpu-streamed-bfloat16"
    assert any("evaluated block by block" in note for note in streamed.notes)
    for metric in ("perplexity", "top1_agreement"):  # the same arithmetic, one block at a time
        assert streamed.baseline.metrics[metric] == pytest.approx(in_memory.baseline.metrics[metric], rel=1e-5)
        assert streamed.result.metrics[metric] == pytest.approx(in_memory.result.metrics[metric], rel=1e-5)
