"""compress compare: one baseline, every recipe on the same samples and in one interleaved benchmark,
a Pareto frontier that is really the set of non-dominated points, a readable plot, exit codes."""

import json

import pytest
from click.testing import CliRunner

from compressor.cli import main
from compressor.compare import check_comparable, compare, load_recipes, pareto_frontier
from compressor.errors import UserError
from compressor.pipeline import RunOptions
from compressor.recipe import parse_recipe

from .conftest import TINY_EVALUATION, write_recipe

TINY = """
name: {name}
task: text-classification
stages:
{stages}
""" + TINY_EVALUATION + """goals:
  accuracy:
    - {{metric: agreement, min: {agreement}}}
"""
FP32 = "  - type: export_onnx"
INT8 = "  - type: export_onnx\n  - type: quantize\n    scheme: int8-dynamic"


# The tiny random classifier's logits nearly tie, so int8 rounding may flip every prediction on one CPU
# and none on another: these recipes pass on any agreement and "strict" fails on an impossible one.
def tiny_recipe(folder, name, stages, data, agreement=0.0):
    return write_recipe(folder, TINY.format(name=name, stages=stages, data=data, agreement=agreement), f"{name}.yaml")


def test_pareto_frontier_keeps_exactly_the_undominated_points():
    points = {"base": (0.85, 20.0), "fast": (0.80, 5.0), "faster_worse": (0.70, 4.0), "dominated": (0.79, 6.0),
              "tie": (0.85, 20.0), "best": (0.86, 19.0)}
    assert pareto_frontier(points, higher_is_better=True) == {"fast", "faster_worse", "best"}
    # Perplexity: lower is better; the same latencies, so "fast" now loses to nothing faster and better.
    perplexity = {"base": (30.0, 20.0), "fast": (40.0, 5.0), "slow_bad": (45.0, 21.0)}
    assert pareto_frontier(perplexity, higher_is_better=False) == {"base", "fast"}


def test_recipes_that_are_measured_differently_are_refused(tmp_path, sentences_jsonl):
    a = tiny_recipe(tmp_path, "a", FP32, sentences_jsonl)
    other = tmp_path / "other.yaml"
    other.write_text(a.read_text().replace("name: a", "name: b").replace("seq_len: 32", "seq_len: 64"))
    with pytest.raises(UserError, match=r"other.yaml: benchmark differs from .*a.yaml's"):
        check_comparable(load_recipes([a, other]))
    with pytest.raises(UserError, match="recipe names must be unique"):
        check_comparable(load_recipes([a, a]))
    with pytest.raises(UserError, match="at least two recipes"):
        check_comparable(load_recipes([a]))


def test_recipe_list_files_name_recipes_beside_them(tmp_path, sentences_jsonl):
    tiny_recipe(tmp_path, "a", FP32, sentences_jsonl)
    tiny_recipe(tmp_path, "b", INT8, sentences_jsonl)
    listing = tmp_path / "set.txt"
    listing.write_text("# two recipes\na.yaml\n\nb.yaml  # int8\n")
    assert [r.name for r in load_recipes([listing])] == ["a", "b"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="names no recipe"):
        load_recipes([tmp_path / "empty.txt"])


@pytest.fixture(scope="module")
def compared(tiny_classifier, sentences_jsonl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    recipes = load_recipes([tiny_recipe(folder, "fp32", FP32, sentences_jsonl),
                            tiny_recipe(folder, "int8", INT8, sentences_jsonl),
                            tiny_recipe(folder, "strict", INT8, sentences_jsonl, agreement=1.01)])
    return compare(recipes, tiny_classifier, RunOptions(out=folder / "out"))


def test_compare_writes_one_table_and_a_run_folder_per_recipe(compared):
    out, summary = compared.out, compared.summary
    assert json.loads((out / "compare.json").read_text()) == summary
    rows = summary["rows"]
    assert [r["recipe"] for r in rows if r["recipe"] != "baseline"] and len(rows) == 4
    assert [r["latency_p50_ms"] for r in rows] == sorted(r["latency_p50_ms"] for r in rows)
    baseline = summary["baseline"]
    assert baseline["speedup"] == 1.0 and baseline["backend"] == "torch-cpu"
    for row in summary["recipes"]:
        report = json.loads((out / row["report"]).read_text())
        assert report["recipe"] == row["recipe"] and report["verdict"] == row["verdict"]
        # every recipe is judged against the same, once-measured baseline
        assert report["baseline"]["latency_ms"]["p50"] == baseline["latency_p50_ms"]
        assert report["baseline"]["metrics"]["accuracy"] == baseline["metric"]
        assert row["speedup"] == pytest.approx(baseline["latency_p50_ms"] / row["latency_p50_ms"])
        assert (out / row["recipe"] / "model.onnx").exists() and (out / row["recipe"] / "junit.xml").exists()
    verdicts = {r["recipe"]: r["verdict"] for r in summary["recipes"]}
    assert verdicts == {"fp32": "pass", "int8": "pass", "strict": "fail"} and compared.any_passed
    frontier = pareto_frontier({r["recipe"]: (r["metric"], r["latency_p50_ms"]) for r in rows}, True)
    assert {r["recipe"] for r in rows if r["pareto"]} == frontier and frontier
    assert not list(out.parent.glob(".out.partial-*")) and not (out / "fp32" / "work").exists()


def test_compare_markdown_embeds_a_real_plot(compared):
    out = compared.out
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    text = (out / "compare.md").read_text()
    assert "![accuracy vs latency](compare.png)" in text
    assert "| strict |" in text and "**fail** (accuracy.agreement.min)" in text


def test_cli_exit_codes(tiny_classifier, sentences_jsonl, tmp_path):
    good = tiny_recipe(tmp_path, "good", FP32, sentences_jsonl)
    bad = tiny_recipe(tmp_path, "bad", INT8, sentences_jsonl, agreement=1.01)
    worse = tiny_recipe(tmp_path, "worse", FP32, sentences_jsonl, agreement=1.01)
    args = ["--model", str(tiny_classifier)]
    one_passes = CliRunner().invoke(main, ["compare", str(good), str(bad), *args, "--out", str(tmp_path / "o1")])
    assert one_passes.exit_code == 0, one_passes.output
    assert "Pareto" in one_passes.output and "compare.md" in one_passes.output
    none_pass = CliRunner().invoke(main, ["compare", str(bad), str(worse), *args, "--out", str(tmp_path / "o2"),
                                          "--json"])
    assert none_pass.exit_code == 1
    assert {r["verdict"] for r in json.loads(none_pass.output)["recipes"]} == {"fail"}
    mismatch = CliRunner().invoke(main, ["compare", str(good), str(tmp_path / "missing.yaml"), *args])
    assert mismatch.exit_code == 2 and "recipe file not found" in mismatch.output


def test_merge_recipes_cannot_share_a_table_with_plain_ones():
    plain = parse_recipe(TINY.format(name="a", stages=FP32, data="x.jsonl", agreement=0.5), "a.yaml")
    merged = parse_recipe(TINY.format(name="b", stages="  - {type: merge_lora, adapters: [{path: ad}]}",
                                      data="x.jsonl", agreement=0.5), "b.yaml")
    with pytest.raises(UserError, match="b.yaml: its baseline differs"):
        check_comparable([plain, merged])
