"""Quantize options per scheme: each scheme's class takes only its own options, an option of another
scheme is refused while parsing with file:line and the schemes that take it, shipped recipes parse to
the scheme classes, and `compress stages` shows each scheme's options."""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from compressor.cli import main
from compressor.errors import UserError
from compressor.recipe import load_recipe, parse_recipe
from compressor.stages import REGISTRY
from compressor.stages.quantize.bnb_4bit import Bnb4bitConfig
from compressor.stages.quantize.int4_onnx import Int4WeightOnlyConfig
from compressor.stages.quantize.onnx_static_config import Int8StaticConfig
from compressor.stages.quantize.quantize import RUNS, Int8DynamicConfig
from compressor.stages.quantize.quantize_base import QuantizeConfigBase
from compressor.stages.quantize.weight_only import Int8WeightOnlyConfig

RECIPES = Path(__file__).parent.parent / "recipes"

RECIPE = """\
name: r
task: text-generation
stages:
  - type: export_onnx
  - type: quantize
{options}
evaluation:
  data: {{dataset: lee-background}}
goals:
  size: {{max_ratio: 0.5}}
"""


def recipe(*options: str) -> str:
    return RECIPE.format(options="\n".join(f"    {line}" for line in options))


def error(text: str) -> str:
    with pytest.raises(UserError) as info:
        parse_recipe(text, "r.yaml")
    return str(info.value)


def test_each_scheme_parses_to_its_own_class():
    expected = {"int8-dynamic": Int8DynamicConfig, "int8-static": Int8StaticConfig,
                "int8-weight-only": Int8WeightOnlyConfig, "int4-weight-only": Int4WeightOnlyConfig,
                "nf4": Bnb4bitConfig, "fp4": Bnb4bitConfig}
    for scheme, cls in expected.items():
        stage = parse_recipe(recipe(f"scheme: {scheme}"), "r.yaml").stages[1]
        assert type(stage) is cls and stage.scheme == scheme and stage.exclude == []


def test_option_of_another_scheme_names_line_field_and_the_schemes_that_take_it():
    message = error(recipe("scheme: int8-dynamic", "block_size: 32"))
    assert "r.yaml:7: stages[1].block_size: unknown field for scheme int8-dynamic; only scheme " \
           "int4-weight-only takes it" in message
    message = error(recipe("scheme: nf4", "op_types: [MatMul]"))
    assert "r.yaml:7: stages[1].op_types: unknown field for scheme nf4 / fp4; only schemes int8-dynamic, " \
           "int8-static and int8-weight-only take it" in message
    # calibration, nested options included: the line of the key that does not belong
    message = error(recipe("scheme: int8-weight-only", "calibration:", "  data: {dataset: lee-test}"))
    assert "r.yaml:7: stages[1].calibration: unknown field for scheme int8-weight-only" in message


@pytest.mark.parametrize("scheme, option", [
    ("int8-dynamic", "smooth_alpha: 0.5"), ("int8-dynamic", "double_quant: true"),
    ("int8-weight-only", "per_channel: true"), ("int8-weight-only", "method: entropy"),
    ("int4-weight-only", "op_types: [MatMul]"), ("int4-weight-only", "reduce_range: true"),
    ("int8-static", "algorithm: gptq"), ("fp4", "per_channel: false"), ("fp4", "include: ['*']"),
])
def test_no_scheme_takes_an_option_it_ignores(scheme, option):
    field = option.split(":")[0]
    assert f"r.yaml:7: stages[1].{field}: unknown field for scheme" in error(recipe(f"scheme: {scheme}", option))


def test_compress_validate_reports_the_wrong_scheme_option(tmp_path):
    path = tmp_path / "wrong.yaml"
    path.write_text(recipe("scheme: int8-dynamic", "block_size: 32"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}:7: stages[1].block_size: unknown field for scheme int8-dynamic" in " ".join(result.output.split())


def test_misspelt_option_is_still_a_spelling_error():
    message = error(recipe("scheme: int8-dynamic", "per_chanel: true"))
    assert "r.yaml:7: stages[1].per_chanel: unknown field (check the spelling" in message


def test_scheme_is_required_and_named_with_its_choices():
    # scheme has no default: the union needs it to know which options apply
    message = error(recipe("exclude: ['*lm_head*']"))
    assert "r.yaml:5: stages[1].scheme: field required: one of int8-dynamic, int8-static, int8-weight-only, " \
           "int4-weight-only, nf4, fp4" in message


def test_unknown_scheme_and_unknown_stage_type_name_the_field():
    message = error(recipe("scheme: int3"))
    assert "r.yaml:6: stages[1].scheme: unknown scheme 'int3'; expected one of int8-dynamic," in message
    message = error(recipe("scheme: nf4").replace("type: export_onnx", "type: export_tflite"))
    assert "r.yaml:4: stages[0].type: unknown stage type 'export_tflite'" in message


def test_value_errors_inside_a_scheme_point_at_the_yaml_line():
    message = error(recipe("scheme: int4-weight-only", "algorithm: rtn", "block_size: 48"))
    assert "r.yaml:8: stages[1].block_size: Input should be 16, 32, 64, 128 or 256, got 48" in message
    message = error(recipe("scheme: int8-static", "fallback: {max_nodes: 0}"))
    assert "r.yaml:7: stages[1].fallback.max_nodes" in message and "greater than or equal to 1" in message


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse_to_scheme_classes(path):
    recipe_ = load_recipe(path)
    for stage in recipe_.stages:
        if stage.type == "quantize":
            assert isinstance(stage, QuantizeConfigBase) and type(stage) in RUNS
            assert stage.model_fields_set <= set(type(stage).model_fields)


def test_every_scheme_class_runs_and_is_in_the_union():
    classes = [variant.model for variant in REGISTRY["quantize"].config_variants()]
    assert set(RUNS) == set(classes) and len(classes) == len(RUNS)
    values = [value for variant in REGISTRY["quantize"].config_variants() for value in variant.values]
    assert values == ["int8-dynamic", "int8-static", "int8-weight-only", "int4-weight-only", "nf4", "fp4", "fp8",
                      "w8a8-int8"]
    shared = set(QuantizeConfigBase.model_fields)
    assert shared == {"type", "exclude"} and all(shared <= set(cls.model_fields) for cls in classes)


def test_checks_that_depend_on_the_input_stay_with_each_scheme():
    stage = REGISTRY["quantize"]
    assert "add an export_onnx stage" in stage.check(Int8StaticConfig(type="quantize", scheme="int8-static"),
                                                     "torch", "text-generation")
    assert "quantizes torch models" in stage.check(Bnb4bitConfig(type="quantize", scheme="fp4"), "onnx",
                                                   "text-generation")
    dynamic = Int8DynamicConfig(type="quantize", scheme="int8-dynamic", reduce_range=True)
    assert "reduce_range applies to ONNX" in stage.check(dynamic, "torch", "text-generation")
    assert stage.check(dynamic, "onnx", "text-generation") is None
    assert stage.backends(dynamic, "torch") == ["torch.ao.quantization"]
    assert stage.backends(Bnb4bitConfig(type="quantize", scheme="nf4"), "torch") == ["bitsandbytes", "accelerate"]


def test_compress_stages_lists_each_schemes_options_under_it():
    result = CliRunner().invoke(main, ["stages"])
    assert result.exit_code == 0
    output = result.output
    # one table per scheme, titled with the scheme; a block runs to the next title or the stage's footer
    blocks = re.split(r"^quantize scheme ", output.split("\nquantize: ")[1].split("  input:")[0], flags=re.M)[1:]
    variants = REGISTRY["quantize"].config_variants()
    assert [block.split(":")[0] for block in blocks] == [" / ".join(v.values) for v in variants]
    every = {f for v in variants for f in v.model.model_fields} - {"type", "scheme"}
    for block, variant in zip(blocks, variants):
        rows = set(re.findall(r"^│ (\w+) +│", block, flags=re.M))
        assert rows == set(variant.model.model_fields) - {"type", "scheme"}, variant.label
        assert not rows & (every - rows)
    assert "'rtn'" in blocks[3] and "'float32'" in blocks[4]  # defaults shown
    assert "[batch_size," in output  # square brackets in descriptions are text, not rich markup
