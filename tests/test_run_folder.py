"""A run owns its --out: a second run on the same folder is refused while the first holds it; without --out it
writes under runs/, whatever the recipe's name."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compressor.errors import UserError
from compressor.run_folder import RunFolder, default_run_folder

from .test_run import classifier_recipe


def test_second_run_on_the_same_out_exits_2_naming_the_holder(tiny_classifier, sentences_jsonl, tmp_path):
    recipe = classifier_recipe(tmp_path, sentences_jsonl)
    out = tmp_path / "shared"
    command = [sys.executable, "-m", "compressor", "run", str(recipe), "--model", str(tiny_classifier),
               "--out", str(out)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".shared.partial-*/work")) and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second could start"
    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert "another compress run is writing this folder" in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert first.wait(timeout=300) in (0, 1), first.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == "tiny-cls"
    assert not (tmp_path / ".shared.lock").exists()  # released and removed with the run
    with RunFolder(out) as again:  # free again: a new run may take the folder
        assert again.partial.is_dir()


def test_lock_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with RunFolder(out) as folder:
            assert folder.partial.is_dir()
            raise RuntimeError("a stage failed")
    assert not folder.partial.exists() and not out.exists()
    with RunFolder(out) as again:  # not held any more
        (again.partial / "manifest.json").write_text("{}")
        again.commit()
    assert (out / "manifest.json").exists()


def test_lock_is_held_within_one_process_too(tmp_path):
    with RunFolder(tmp_path / "out"):
        with pytest.raises(UserError, match=r"another compress run is writing this folder \(pid"):
            with RunFolder(tmp_path / "out"):
                pass


def test_the_default_run_folder_is_runs_name(tmp_path):
    root = tmp_path / "runs"
    assert default_run_folder("minilm-int8", root) == root / "minilm-int8"
    assert default_run_folder("évaluation v2", root) == root / "évaluation v2"


@pytest.mark.parametrize("name", ["../../../tmp/évil", "..", ".", ".hidden", "a/b", "/etc", "a\\b", "", "a\x00b",
                                  "a\nb", "x" * 201])
def test_no_name_puts_the_default_run_folder_outside_runs(name, tmp_path):
    with pytest.raises(UserError, match="cannot name a run folder under"):
        default_run_folder(name, tmp_path / "runs")


def test_a_link_under_runs_cannot_lead_the_default_run_folder_elsewhere(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "r").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UserError, match="outside"):
        default_run_folder("r", root)


def test_run_refuses_a_name_that_leaves_runs_before_writing_anything(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from compressor.cli import main

    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    recipe = Path(__file__).parent / "hostile" / "path-traversal-name.yaml"
    outcome = CliRunner().invoke(main, ["run", str(recipe), "--model", str(tmp_path / "model")])
    assert outcome.exit_code == 2 and f"{recipe}:2: name: contains '/'" in outcome.output
    # runs/../../../tmp/évil from here is tmp_path/a/tmp/évil: nothing was created there, or anywhere else
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "a", tmp_path / "a" / "b", work]
