"""report.json is an interface: every field is documented, a written report reads back through the
schema, and a stored report that does not fit is refused naming the field."""

import json
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

from compressor.errors import UserError
from compressor.gate import load_report
from compressor.report_schema import SCHEMA_VERSION, Report

from .reports import baseline_side, report, result_side, speedup

DOCS = Path(__file__).parent.parent / "docs" / "REPORT.md"


def _field_names(model: type[BaseModel], seen=None) -> set[str]:
    """Every field name of the report's models, nested ones included."""
    seen = set() if seen is None else seen
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        for kind in (field.annotation,) + get_args(field.annotation):
            for candidate in (kind,) + get_args(kind):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate not in seen:
                    seen.add(candidate)
                    names |= _field_names(candidate, seen)
    return names


def test_every_report_field_is_documented():
    text = DOCS.read_text()
    missing = sorted(name for name in _field_names(Report) if f"`{name}`" not in text and f".{name}`" not in text)
    assert not missing, f"document these in docs/REPORT.md: {missing}"


def test_a_written_report_reads_back_unchanged(tmp_path):
    written = report([], result=result_side(p50=5.0, estimate=speedup(2.0, [1.9, 2.1])))
    path = tmp_path / "report.json"
    path.write_text(json.dumps(written.as_json()))
    assert load_report(path) == written and written.schema_version == SCHEMA_VERSION


def test_a_bad_field_is_named(tmp_path):
    document = report([]).as_json()
    document["result"]["latency_ms"]["p50"] = "fast"
    path = tmp_path / "report.json"
    path.write_text(json.dumps(document))
    with pytest.raises(UserError, match=r"result\.latency_ms\.p50: Input should be a valid number"):
        load_report(path)


def test_a_newer_schema_is_refused_and_an_unversioned_one_is_read(tmp_path):
    document = report([]).as_json()
    path = tmp_path / "report.json"
    path.write_text(json.dumps({**document, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match="newer than this compress reads"):
        load_report(path)
    del document["schema_version"]
    path.write_text(json.dumps(document))
    assert load_report(path).schema_version == 1


def test_a_report_written_before_the_schema_loads(tmp_path):
    document = report([]).as_json()
    del document["schema_version"]
    for field in ("cpu_model", "isa_flags", "gpu", "threads", "device"):
        del document["environment"][field]
    document["against"] = {"report": "earlier/report.json", "recipe": "r", "created": "2026-01-01T00:00:00Z",
                           "verdict": "pass"}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(document))
    loaded = load_report(path)
    assert loaded.schema_version == 1 and loaded.against.same_machine is None
    assert loaded.environment.cpu_model == "unknown" and loaded.environment.isa_flags == []


def test_random_bytes_are_a_user_error(tmp_path):
    path = tmp_path / "report.json"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="not a readable report.json"):
        load_report(path)


def test_int8_on_a_cpu_without_int8_dot_products_gets_a_note():
    from types import SimpleNamespace

    from compressor.pipeline import _machine_notes
    from compressor.recipe import parse_recipe
    from compressor.report import environment

    from .test_recipe import GOOD

    recipe = parse_recipe(GOOD, "r.yaml")
    assert any(getattr(c, "scheme", None) == "int8-dynamic" for c in recipe.stages)
    onnx = SimpleNamespace(backend="onnxruntime-cpu")
    avx2 = environment(2).model_copy(update={"isa_flags": ["avx2", "fma"]})
    vnni = environment(2).model_copy(update={"isa_flags": ["avx2", "fma", "avx512f", "avx512_vnni"]})
    [note] = _machine_notes(recipe, onnx, avx2)
    assert "no int8 dot-product instructions" in note
    assert _machine_notes(recipe, onnx, vnni) == []
    assert _machine_notes(recipe, SimpleNamespace(backend="torch-cpu"), avx2) == []


def test_classes_read_back_and_show_in_report_md(tmp_path):
    from compressor.report import markdown
    from compressor.report_schema import Classes

    def classes(confusion):
        rows = [{"label": label, "support": sum(counts), "precision": 0.5, "recall": 0.25, "f1": 1 / 3}
                for label, counts in zip(["NEGATIVE", "POSITIVE"], confusion)]
        return Classes(rows=rows, confusion=confusion)

    base = baseline_side({"accuracy": 0.9, "f1[NEGATIVE]": 0.8})
    base.classes = classes([[40, 10], [0, 50]])
    result = result_side({"accuracy": 0.8, "f1[NEGATIVE]": 0.7})
    result.classes = classes([[30, 20], [0, 50]])
    written = report([], base=base, result=result)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(written.as_json()))
    assert load_report(path).result.classes.confusion == [[30, 20], [0, 50]]
    text = markdown(written)
    assert "| NEGATIVE | 50 | 0.5000 -> 0.5000 | 0.2500 -> 0.2500 | 0.3333 -> 0.3333 |" in text
    assert "| result | NEGATIVE | POSITIVE |" in text and "| NEGATIVE | 30 | 20 |" in text
    assert "| f1[NEGATIVE] |" not in text  # per-class scores are in the Classes table, not repeated
