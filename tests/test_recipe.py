"""Recipe schema: valid recipes parse, every kind of mistake names file:line and the field path."""

from pathlib import Path

import pytest

from compressor.errors import UserError
from compressor.recipe import load_recipe, parse_recipe
from compressor.stages import REGISTRY
from compressor.recipe import StageConfig
from typing import get_args

GOOD = """\
name: r
task: text-classification
stages:
  - type: export_onnx
  - type: quantize
    scheme: int8-dynamic
evaluation:
  data: {dataset: sentiment-test}
goals:
  accuracy:
    - metric: accuracy
      max_drop: 0.01
"""


def test_valid_recipe_gets_defaults():
    recipe = parse_recipe(GOOD, "r.yaml")
    assert recipe.stages[0].opset == 18 and recipe.stages[0].atol == 1e-4
    assert recipe.stages[1].per_channel is True
    assert recipe.benchmark.threads == 2 and recipe.benchmark.seq_len == 128
    assert recipe.where("stages", 1) == "r.yaml:5"


def _error(text: str) -> str:
    with pytest.raises(UserError) as info:
        parse_recipe(text, "r.yaml")
    return str(info.value)


def test_unknown_field_names_line_and_path():
    message = _error(GOOD.replace("    scheme: int8-dynamic", "    scheme: int8-dynamic\n    per_chanel: true"))
    assert "r.yaml:7: stages[1].per_chanel: unknown field" in message


def test_wrong_type_names_line_and_value():
    message = _error(GOOD.replace("max_drop: 0.01", "max_drop: lots"))
    assert "r.yaml:12: goals.accuracy[0].max_drop" in message and "'lots'" in message


def test_closed_choice_rejects_unknown_scheme():
    message = _error(GOOD.replace("int8-dynamic", "int3"))
    assert "r.yaml:6: stages[1].scheme" in message and "int8-dynamic" in message


def test_unknown_stage_type():
    message = _error(GOOD.replace("type: export_onnx", "type: export_tflite"))
    assert "r.yaml:4: stages[0]" in message and "export_tflite" in message


def test_out_of_range_value():
    message = _error(GOOD.replace("  - type: export_onnx", "  - type: export_onnx\n    opset: 7"))
    assert "r.yaml:5: stages[0].opset" in message and "greater than or equal to 14" in message


def test_missing_required_field():
    message = _error(GOOD.replace("task: text-classification\n", ""))
    assert "task: field required" in message


def test_recipe_without_goals_is_refused():
    message = _error(GOOD.split("goals:")[0])
    assert "at least one goal" in message


def test_yaml_syntax_error_names_line():
    message = _error(GOOD.replace("  - type: export_onnx", "  - type: [export_onnx"))
    assert "r.yaml:" in message and "not valid YAML" in message


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_union_and_registry_agree():
    members = get_args(get_args(StageConfig)[0])  # a class, or a union of classes (quantize's schemes)
    assert len(members) == len(REGISTRY)
    assert all(any(stage.config_model is member for stage in REGISTRY.values()) for member in members)
    for name, stage in REGISTRY.items():
        for variant in stage.config_variants():
            assert variant.model.model_fields["type"].annotation.__args__ == (name,)


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("recipes/*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    from compressor.errors import BackendMissing
    from compressor.planning import plan

    try:
        assert plan(load_recipe(path))
    except BackendMissing:  # a GPU recipe on a machine without the GPU or TensorRT: backends are checked last,
        pass  # after every check of the recipe itself passed, so it is valid (tests/test_gpu_recipes.py)


def test_every_option_is_documented():
    import re

    from compressor.data import CalibrationConfig
    from compressor.recipe import AccuracyGoal, BenchmarkConfig, DataConfig, EvaluationConfig, RegressionGoals
    from compressor.stages.export.build_engine import ShapeRange
    from compressor.stages.lora.merge_lora import AdapterSpec
    from compressor.stages.prune.prune_recover import RecoverConfig
    from compressor.stages.quantize.onnx_static_config import FallbackConfig
    from compressor.stages.quantize.quantize_base import QuantizeConfigBase

    docs = (Path(__file__).parent.parent / "docs" / "RECIPES.md").read_text()
    models = [v.model for stage in REGISTRY.values() for v in stage.config_variants() if not v.tag] + [
        BenchmarkConfig, EvaluationConfig, DataConfig, CalibrationConfig, FallbackConfig, RecoverConfig, AccuracyGoal,
        AdapterSpec, RegressionGoals, ShapeRange, QuantizeConfigBase]
    # an option counts as documented where a table row names it, e.g. | `data.segment` | or | `adapters[].weight` |
    row = r"\| `(\w+(\[\])?\.)*{}` \|"
    missing = [f"{m.__name__}.{f}" for m in models for f in m.model_fields
               if f != "type" and not re.search(row.format(f), docs) and f"{f}:" not in docs]
    # a scheme's own options belong in its section of the quantize chapter, headed e.g. #### `scheme: nf4` ...
    chapter = docs.split("### `quantize`")[1].split("\n### ")[0]
    sections = re.findall(r"^#### (.*)\n((?:(?!^#### ).*\n?)*)", chapter, flags=re.M)
    for variant in REGISTRY["quantize"].config_variants():
        section = next((body for heading, body in sections
                        if all(f"`{variant.tag}: {value}`" in heading for value in variant.values)), "")
        missing += [f"{variant.model.__name__}.{f} (under {variant.label})" for f in variant.model.model_fields
                    if f not in QuantizeConfigBase.model_fields and f != variant.tag
                    and not re.search(row.format(f), section)]
    assert not missing, f"document these in docs/RECIPES.md: {missing}"


def test_duplicate_key_at_depth_names_both_lines():
    message = _error(GOOD.replace("    scheme: int8-dynamic", "    scheme: int8-dynamic\n    per_channel: true\n"
                                                             "    per_channel: false"))
    assert "r.yaml:8: stages[1].per_channel: duplicate key, first given at line 7" in message


def test_anchor_is_refused_before_anything_is_built_from_it():
    message = _error(GOOD.replace("max_drop: 0.01", "max_drop: &limit 0.01\n      max_drop_pct: *limit"))
    assert message.startswith("r.yaml:12: YAML anchor &limit")


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1.0e+999"])
def test_non_finite_numbers_are_refused_anywhere(value):
    message = _error(GOOD.replace("max_drop: 0.01", f"min: {value}"))
    assert f"r.yaml:12: goals.accuracy[0].min: {value} is not a finite number" in message


@pytest.mark.parametrize("name", ["../../../tmp/évil", "..", ".hidden", "a/b", "a\\\\b", "", "a\\u0000b", "a\\nb",
                                  "x" * 201])
def test_a_name_that_is_not_a_plain_folder_name_is_refused(name):
    message = _error(GOOD.replace("name: r", f'name: "{name}"'))
    assert "r.yaml:1: name: " in message and "plain folder name" in message


def test_a_plain_unicode_name_is_accepted():
    assert parse_recipe(GOOD.replace("name: r", "name: évaluation-int8_v2"), "r.yaml").name == "évaluation-int8_v2"


# Floats that are tolerances, shares or weights rather than counts, sizes or times: any finite value is
# meaningful (non-finite numbers are refused by the loader) or a lower bound alone suffices.
UNBOUNDED_FLOATS = {"atol", "rtol", "temperature", "weight_decay", "weight", "min", "max"}


def _numeric_fields():
    """(model, field name, FieldInfo) for every int / float option reachable from Recipe (Literal choices excluded)."""
    from typing import get_origin

    from pydantic import BaseModel

    from compressor.recipe import Recipe

    def kinds(annotation):
        if annotation in (int, float):
            return {annotation}
        if get_origin(annotation) is dict:  # static_axes: planning requires them equal to the benchmark's shape
            return set()
        return set().union(*(kinds(arg) for arg in get_args(annotation))) if get_args(annotation) else set()

    def models(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in get_args(annotation) for m in models(arg)]

    seen, found, pending = set(), [], [Recipe]
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            if kinds(info.annotation):
                found.append((model, name, info, kinds(info.annotation)))
            pending += models(info.annotation)
    return found


def _upper_bound(info):
    from compressor.cli import _constraints

    return next((getattr(c, attr) for c in _constraints(info) for attr in ("le", "lt")
                 if getattr(c, attr, None) is not None), None)


def test_every_count_size_and_time_has_an_upper_bound():
    fields = _numeric_fields()
    assert len(fields) > 40  # the walk reached the stages' configs, not only the recipe's own
    unbounded = [f"{model.__name__}.{name}" for model, name, info, kinds in fields if _upper_bound(info) is None
                 and (int in kinds or name not in UNBOUNDED_FLOATS)]
    assert not unbounded, f"give these an upper bound (le=): {unbounded}"


def test_every_upper_bound_is_documented_and_listed_by_compress_stages():
    import re

    from click.testing import CliRunner

    from compressor.cli import _number, main

    docs = (Path(__file__).parent.parent / "docs" / "RECIPES.md").read_text()
    listing = CliRunner().invoke(main, ["stages"], env={"COLUMNS": "400"}).output
    undocumented, unlisted = [], []
    for model, name, info, _ in _numeric_fields():
        bound = _upper_bound(info)
        if bound is None:
            continue
        rows = re.findall(rf"^\| `(?:\w+(?:\[\])?\.)*{name}`.*$", docs, flags=re.M)
        if not any(_number(bound) in row for row in rows):
            undocumented.append(f"{model.__name__}.{name} ({_number(bound)})")
        if not re.search(rf"^│ (?:\w+(?:\[\])?\.)*{name} .*<=? {re.escape(_number(bound))}", listing, flags=re.M):
            unlisted.append(f"{model.__name__}.{name}")
    assert not undocumented, f"give the range in docs/RECIPES.md: {undocumented}"
    assert not unlisted, f"`compress stages` should show the range of: {unlisted}"
