"""cast: weights really become float16 / bfloat16 (on disk and in the running model), the model
stays within tolerance of float32, and what cannot be cast is refused before anything runs."""


import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.errors import UserError
from compressor.planning import plan
from compressor.recipe import parse_recipe
from compressor.runners import make_runner
from compressor.stages.cast.cast import CastConfig

from .test_stages import exported_classifier, outputs, run_stage  # noqa: F401 (fixture)


def cast(source, tmp_path, task, **options):
    return run_stage(CastConfig(type="cast", **options), source, tmp_path / "cast", task)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_cast_saves_half_precision_and_runs_in_it(tiny_llama, tmp_path, dtype):
    source = TorchModel(tiny_llama, "text-generation")
    result, details = cast(source, tmp_path, "text-generation", dtype=dtype)
    with safe_open(str(result.path / "model.safetensors"), "pt") as handle:
        dtypes = {handle.get_tensor(key).dtype for key in handle.keys()}
    assert dtypes == {getattr(torch, dtype)}
    assert details["size_mb_after"] < 0.55 * details["size_mb_before"]
    assert 0 < details["relative_diff"] <= details["rtol"]  # really rounded, within tolerance
    assert details["cast_parameter_share"] == 1.0
    # Loading the saved folder afresh keeps the dtype (the record replays the cast), and the runner says so.
    reloaded = TorchModel(result.path, "text-generation")
    module = load_torch_model(reloaded)
    assert next(module.parameters()).dtype == getattr(torch, dtype)
    assert make_runner(reloaded, "x").backend == f"torch-cpu-{dtype}"
    np.testing.assert_array_equal(outputs(reloaded, tiny_llama)[0], outputs(result, tiny_llama)[0])


def test_onnx_float16_keeps_float32_inputs_and_outputs(exported_classifier, tmp_path):  # noqa: F811
    exported, _ = exported_classifier
    result, details = cast(exported, tmp_path, "text-classification", dtype="float16")
    graph = onnx.load(str(result.path)).graph
    types = {init.data_type for init in graph.initializer if len(init.dims) == 2}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types  # 2-D weights all float16
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in graph.output)
    assert details["size_mb_after"] < 0.6 * details["size_mb_before"]
    assert 0 < details["relative_diff"] <= 0.01


def test_a_tolerance_too_tight_fails_the_stage(tiny_llama, tmp_path):
    from compressor.errors import StageFailed

    with pytest.raises(StageFailed, match=r"cast bfloat16: outputs differ from float32 by .* raise rtol"):
        cast(TorchModel(tiny_llama, "text-generation"), tmp_path, "text-generation", dtype="bfloat16", rtol=1e-9)


@pytest.mark.parametrize("stages, message", [
    ("  - type: export_onnx\n  - type: cast\n    dtype: bfloat16\n", "bfloat16 applies to torch models"),
    ("  - type: cast\n    dtype: float16\n    keep_float32: [Softmax]\n", "apply to ONNX models"),
    ("  - type: quantize\n    scheme: int8-weight-only\n  - type: cast\n    dtype: float16\n",
     r"stages\[0\] \(quantize\) comes first; cast the float model"),
    ("  - type: cast\n    dtype: float16\n  - type: export_onnx\n", "it must be the last stage"),
])
def test_what_cannot_be_cast_is_refused_when_planning(stages, message):
    text = ("name: r\ntask: text-classification\nstages:\n" + stages +
            "evaluation:\n  data: {dataset: sentiment-test}\ngoals:\n  size: {max_ratio: 0.6}\n")
    with pytest.raises(UserError, match=message):
        plan(parse_recipe(text, "r.yaml"))
