"""Bad checkpoints: each problem names the file; pickle weights are refused unless allowed."""

import shutil

import pytest

from compressor.artifacts import TorchModel
from compressor.checkpoint import inspect_checkpoint, load_torch_model
from compressor.errors import UserError


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        inspect_checkpoint(tmp_path / "nope")


def test_missing_and_corrupt_config(tiny_classifier, tmp_path):
    folder = copy(tiny_classifier, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config.json: not valid JSON"):
        inspect_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match=r"config.json: missing"):
        inspect_checkpoint(folder)


def test_truncated_safetensors_names_the_file(tiny_classifier, tmp_path):
    folder = copy(tiny_classifier, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError) as info:
        inspect_checkpoint(folder)
    assert str(weights) in str(info.value) and "not a readable safetensors file" in str(info.value)


def test_pickle_weights_refused_unless_allowed(tiny_classifier, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = copy(tiny_classifier, tmp_path / "m")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model.bin: pickle-based weights .* --allow-pickle"):
        inspect_checkpoint(folder)
    assert inspect_checkpoint(folder, allow_pickle=True) == folder.resolve()
    assert load_torch_model(TorchModel(folder, "text-classification"), allow_pickle=True) is not None


def test_no_weights(tiny_classifier, tmp_path):
    folder = copy(tiny_classifier, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights found"):
        inspect_checkpoint(folder)
