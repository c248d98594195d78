"""plan(): chain checks happen before any model is loaded, with file:line and a hint."""

import pytest

from compressor.errors import BackendMissing, UserError
from compressor.planning import plan
from compressor.recipe import parse_recipe

BASE = """\
name: r
task: {task}
stages:
{stages}
evaluation:
  data: {{dataset: sentiment-test}}
goals:
  latency: {{min_speedup: 1.1}}
"""


def recipe(stages: str, task: str = "text-classification"):
    return parse_recipe(BASE.format(task=task, stages=stages), "r.yaml")


def test_chain_kinds():
    steps = plan(recipe("  - type: export_onnx\n  - type: optimize_onnx\n  - type: quantize\n    scheme: int8-dynamic"))
    assert [(s.input_kind, s.output_kind) for s in steps] == [("torch", "onnx"), ("onnx", "onnx"), ("onnx", "onnx")]
    assert plan(recipe("  - type: quantize\n    scheme: int8-dynamic"))[0].output_kind == "torch"


def test_onnx_stage_before_export_is_refused_with_hint():
    with pytest.raises(UserError) as info:
        plan(recipe("  - type: optimize_onnx\n  - type: export_onnx"))
    message = str(info.value)
    assert message.startswith("r.yaml:4: stages[0] (optimize_onnx)")
    assert "needs an onnx model" in message and "add an export_onnx stage before it" in message


def test_export_twice_is_refused():
    with pytest.raises(UserError, match=r"r.yaml:5: stages\[1\] \(export_onnx\).*move it before export_onnx"):
        plan(recipe("  - type: export_onnx\n  - type: export_onnx"))


def test_with_past_only_for_generation():
    with pytest.raises(UserError, match="with_past applies to text-generation"):
        plan(recipe("  - type: export_onnx\n    with_past: true"))
    plan(recipe("  - type: export_onnx\n    with_past: true", task="text-generation"))


def test_torch_quantize_rejects_onnx_only_options():
    with pytest.raises(UserError, match="op_types applies to ONNX"):
        plan(recipe("  - type: quantize\n    scheme: int8-dynamic\n    op_types: [MatMul]"))


def test_static_axes_must_match_benchmark():
    with pytest.raises(UserError, match="static_axes.sequence_length=64 but the benchmark uses 128"):
        plan(recipe("  - type: export_onnx\n    static_axes: {sequence_length: 64}"))


def test_missing_backend_is_exit_3(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(BackendMissing, match="'onnxscript'") as info:
        plan(recipe("  - type: export_onnx\n    exporter: dynamo"))
    assert info.value.exit_code == 3


def test_goal_metric_must_belong_to_the_task():
    text = BASE.format(task="text-generation", stages="  - type: export_onnx").replace(
        "goals:\n  latency: {min_speedup: 1.1}", "goals:\n  accuracy:\n    - metric: accuracy\n      max_drop: 0.01")
    with pytest.raises(UserError, match=r"r.yaml:9: goals.accuracy\[0\].metric: text-generation measures "
                                        r"perplexity, top1_agreement, not 'accuracy'"):
        plan(parse_recipe(text, "r.yaml"))


@pytest.mark.parametrize("second, message", [
    ("export_onnx", r"r.yaml:6: stages\[1\] \(export_onnx\): export_onnx traces float weights, but stages\[0\] "
                    r"\(quantize\) comes first; move this stage before it, and quantize the ONNX model after export"),
    ("prune\n    method: magnitude\n    sparsity: 0.5",
     r"r.yaml:6: stages\[1\] \(prune\): prune scores and zeroes float weights"),
])
def test_stages_that_need_float_weights_refuse_to_follow_quantize(second, message):
    with pytest.raises(UserError, match=message):
        plan(recipe(f"  - type: quantize\n    scheme: int8-weight-only\n  - type: {second}"))


def test_per_class_goals_name_a_class_of_the_checkpoint(tiny_classifier, tmp_path):
    import json
    import shutil

    from compressor.pipeline import RunOptions, prepare

    text = BASE.format(task="text-classification", stages="  - type: export_onnx").replace(
        "goals:\n  latency: {min_speedup: 1.1}", "goals:\n  accuracy:\n    - metric: recall[LABEL]\n      max_drop: 0.05")
    assert plan(parse_recipe(text.replace("LABEL", "ANY"), "r.yaml"))  # only the form is checked when planning
    # The tiny classifier's config.json has no id2label: its classes are named by index.
    prepare([parse_recipe(text.replace("LABEL", "1"), "r.yaml")], tiny_classifier, RunOptions(out=tmp_path / "a"))
    with pytest.raises(UserError, match=r"r.yaml:9: goals.accuracy\[0\].metric: no class 'ANY' in the checkpoint's "
                                        r"labels \(none named: config.json has no id2label, so use class indices\)"):
        prepare([parse_recipe(text.replace("LABEL", "ANY"), "r.yaml")], tiny_classifier, RunOptions(out=tmp_path / "b"))
    named = shutil.copytree(tiny_classifier, tmp_path / "named")
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "id2label": {"0": "NEGATIVE", "1": "POSITIVE"}}))
    prepare([parse_recipe(text.replace("LABEL", "POSITIVE"), "r.yaml")], named, RunOptions(out=tmp_path / "c"))
    with pytest.raises(UserError, match=r"no class '1' in the checkpoint's labels \(NEGATIVE, POSITIVE\)"):
        prepare([parse_recipe(text.replace("LABEL", "1"), "r.yaml")], named, RunOptions(out=tmp_path / "d"))
    with pytest.raises(UserError, match=r"text-classification measures accuracy, f1_macro, precision_macro, "
                                        r"recall_macro, agreement and per class precision\[LABEL\], recall\[LABEL\], "
                                        r"f1\[LABEL\], not 'f2\[x\]'"):
        plan(parse_recipe(text.replace("recall[LABEL]", "f2[x]"), "r.yaml"))
