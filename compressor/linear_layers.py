"""Linear layers in both of the forms Hugging Face models use: torch's nn.Linear (weight: outputs x
inputs) and transformers' Conv1D (GPT-2 and its family: weight inputs x outputs, y = x W + b).

Stages that score, prune or quantize weights are written for nn.Linear. For a model with Conv1D
layers they first swap each one for an nn.Linear computing the same function (the weight
transposed), and, where the result is saved as an ordinary Hugging Face checkpoint, swap them back
before saving, so that the saved tensors keep the layout the model's own class loads."""

from __future__ import annotations


def is_conv1d(layer) -> bool:
    """transformers.pytorch_utils.Conv1D, recognised without importing transformers' model code."""
    return type(layer).__name__ == "Conv1D" and type(layer).__module__.startswith("transformers")


def is_linear_like(layer) -> bool:
    import torch

    return isinstance(layer, torch.nn.Linear) or is_conv1d(layer)


def shape_of(layer) -> tuple[int, int]:
    """(inputs, outputs) of an nn.Linear or a Conv1D."""
    if is_conv1d(layer):
        inputs, outputs = layer.weight.shape
        return int(inputs), int(outputs)
    return layer.in_features, layer.out_features


def out_in_weight(layer):
    """The weight as outputs x inputs (nn.Linear's layout), a view for a Conv1D."""
    return layer.weight.T if is_conv1d(layer) else layer.weight


def conv1d_names(module) -> list[str]:
    return [name for name, layer in module.named_modules() if is_conv1d(layer)]


def _replace(module, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)


def conv1d_to_linear(module) -> list[str]:
    """Swap every Conv1D of `module` for an equal nn.Linear, in place; return the swapped names."""
    import torch

    names = conv1d_names(module)
    for name in names:
        conv = module.get_submodule(name)
        inputs, outputs = shape_of(conv)
        linear = torch.nn.Linear(inputs, outputs, bias=conv.bias is not None, dtype=conv.weight.dtype,
                                 device=conv.weight.device)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        _replace(module, name, linear)
    return names


def linear_to_conv1d(module, names: list[str]) -> None:
    """Undo conv1d_to_linear for `names` (nn.Linear layers there), in place."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for name in names:
        linear = module.get_submodule(name)
        conv = Conv1D(linear.out_features, linear.in_features)
        with torch.no_grad():  # Conv1D always has a bias (it adds it with addmm); GPT-2's layers all do
            conv.weight.data = linear.weight.detach().T.contiguous()
            conv.bias.data = linear.bias.detach().clone()
        _replace(module, name, conv)
