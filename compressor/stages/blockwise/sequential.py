"""Calibrated compression one transformer block at a time (the sequential setting of the SparseGPT,
Wanda and GPTQ papers): the calibration batches are run up to the first block once; then, for each
block, the inputs of its targeted layers are recorded, each layer is compressed from those
statistics, and the block is run again with its compressed weights so that the next block sees
what it will see at inference. Memory stays near one block's activations per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ... import anatomy, distributed
from ...data import torch_inputs
from ...errors import UserError
from .activations import BlockInputs, block_inputs_store


class _Captured(Exception):
    """Raised by the hook on the first block once it has recorded that block's inputs."""


def find_blocks(module, layers: dict, stage: str):
    """The repeated transformer blocks (anatomy.find_blocks), refused when targeted layers lie outside them."""
    name, blocks = anatomy.find_blocks(module, layers)
    if name is None:
        raise UserError(f"{stage}: found no repeated transformer blocks (an nn.ModuleList) holding the targeted "
                        "layers")
    outside = [key for key in layers if not key.startswith(name + ".")]
    if outside:
        raise UserError(f"{stage}: {outside[:3]} lie outside the transformer blocks; exclude them (`ignore` / "
                        "`exclude`) or use a method without calibration")
    return name, blocks


def split_by_blocks(module, layers: dict) -> tuple[dict, dict]:
    """(the layers inside the repeated blocks, those outside: a head, a pooler)."""
    name, _ = anatomy.find_blocks(module, layers)
    inside = {key: layer for key, layer in layers.items() if name is not None and key.startswith(name + ".")}
    return inside, {key: layer for key, layer in layers.items() if key not in inside}


def block_inputs(module, blocks, feeds: list[dict], task: str, store: Optional[BlockInputs] = None) -> BlockInputs:
    """Run the model up to the first block and keep, per batch, what that block was called with (in
    `store`: memory unless it says where to spill)."""
    recorded = store if store is not None else BlockInputs()

    def hook(_module, args, kwargs):
        recorded.add(args, kwargs)
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for feed in feeds:
            inputs = torch_inputs(feed)
            try:
                if task == "text-generation":
                    module(**inputs, use_cache=False)
                else:
                    module(**inputs)
            except _Captured:
                pass
    finally:
        handle.remove()
    return recorded


def hidden_of(output):
    """A block's or module's hidden states, whether it returns them alone or first in a tuple."""
    return output[0] if isinstance(output, tuple) else output


class LayerInputs:
    """What a method needs from a layer's inputs: squared column norms (`norms`, Wanda) or the
    Hessian of the layer's reconstruction loss, X^T X (`hessian`, SparseGPT and GPTQ), and always the
    largest |x| seen (`absmax`, static activation scales; alone with kind `absmax`). Each batch's
    product is computed in float32 (twice as fast as float64 on CPUs) and the batches are summed in
    float64."""

    def __init__(self, columns: int, kind: str):
        import torch

        self.kind, self.rows, self.absmax = kind, 0, 0.0
        if kind == "absmax":
            self.value = None
        else:
            self.value = torch.zeros(columns, dtype=torch.float64) if kind == "norms" else \
                torch.zeros(columns, columns, dtype=torch.float64)

    def add(self, x) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.rows += x.shape[0]
        if x.numel():
            self.absmax = max(self.absmax, float(x.abs().max()))
        if self.kind == "norms":
            self.value += (x * x).sum(0).double()
        elif self.kind == "hessian":
            self.value += (x.T @ x).double()

    def hessian(self):
        """X^T X / tokens, in float32 for the per-layer loops."""
        return (self.value / max(self.rows, 1)).float()


def compress_sequentially(module, layers: dict, feeds: list[dict], task: str, kind: str, stage: str,
                          compress_layer: Callable[[str, object, LayerInputs], None], progress=None,
                          block_loaded: Optional[Callable[[int, object], None]] = None,
                          block_done: Optional[Callable[[int, object], None]] = None,
                          spill_dir: Optional[Path] = None, details: Optional[dict] = None,
                          all_experts: bool = True,
                          compress_together: Optional[Callable[[list[tuple[str, object]], LayerInputs], None]] = None
                          ) -> int:
    """Walk the blocks in order; `compress_layer(name, layer, inputs)` changes each targeted layer's
    weight in place. Returns the number of blocks. Layer by layer (layerwise.py), the blocks are empty
    until `block_loaded(index, block)` reads their weights, and `block_done(index, block)` writes and
    drops them once the next block's inputs are computed. The blocks' inputs stay in memory, or go to
    `spill_dir` when they are too large for it (activations.py); `details` records which.

    Across processes (distributed.py), each records its share of the batches, the statistics are
    summed over all, and `compress_layer` runs on process 0 alone, which sends the weights to the others.

    Mixture-of-experts layers (anatomy.LinearExperts) send every calibration token through every expert
    when `all_experts` (the block's output still uses the router's choice), and count the tokens the
    router chose per expert into `details`. A layer whose statistics saw no token (an expert nothing was
    routed to, with `all_experts` off) gets `compress_layer(name, layer, None)`: the method's data-free
    fallback, never statistics of zeros (whose scales are NaN or whose weights would be zeroed).

    Layers reading the same input (q, k and v; gate and up) share one statistic. With `compress_together`,
    each such group is compressed in one call, for methods whose rows are independent given the statistic
    (GPTQ, SparseGPT with an N:M pattern): their weights stacked row-wise go through one column loop and
    one factorization of the Hessian, where one per layer would repeat both."""
    import torch

    prefix, blocks = find_blocks(module, layers, stage)
    feeds = distributed.share(feeds)
    hidden_size = getattr(getattr(module, "config", None), "hidden_size", None)
    recorded = block_inputs_store(feeds, hidden_size, spill_dir, stage, details)
    experts = anatomy.CalibratingExperts(module, all_experts)
    uncalibrated = []
    try:
        with torch.no_grad(), experts:
            block_inputs(module, blocks, feeds, task, recorded)
            indices = range(len(blocks))
            for index in (progress.track(indices, len(blocks), f"{stage}: block by block") if progress else indices):
                block = blocks[index]
                if block_loaded:
                    block_loaded(index, block)
                in_block = {name: layer for name, layer in layers.items() if name.startswith(f"{prefix}.{index}.")}
                experts.counting(True)
                stats = _block_statistics(block, in_block, recorded, kind)
                experts.counting(False)
                distributed.sum_statistics(stats.values())
                for names in _sharing_one_input(in_block, stats):
                    if distributed.leads():
                        shared = stats[names[0]]
                        seen = shared.rows > 0
                        if seen and compress_together is not None and len(names) > 1:
                            compress_together([(name, in_block[name]) for name in names], shared)
                        else:
                            for name in names:
                                compress_layer(name, in_block[name], shared if seen else None)
                        if not seen:
                            uncalibrated.extend(names)
                    for name in names:
                        distributed.broadcast_weights(in_block[name])
                # the next block sees this block's outputs with its weights compressed
                recorded.advance(block)
                if block_done:
                    block_done(index, block)
    finally:
        recorded.close()
    if details is not None:
        details.update(experts.record(anatomy.MIN_EXPERT_TOKENS))
        if uncalibrated:
            details["layers_without_calibration_tokens"] = uncalibrated
    return len(blocks)


def _sharing_one_input(in_block: dict, stats: dict[str, LayerInputs]) -> list[list[str]]:
    """The block's layers grouped by the statistic they share, in the block's order."""
    groups: dict[int, list[str]] = {}
    for name in in_block:
        groups.setdefault(id(stats[name]), []).append(name)
    return list(groups.values())


def stacked_rows(named: list[tuple[str, object]]):
    """The weights of layers reading one input, stacked row-wise (float32), and each layer's rows in it."""
    import torch

    weights = [layer.weight.detach().float() for _, layer in named]
    bounds, start = [], 0
    for weight in weights:
        bounds.append(slice(start, start + weight.shape[0]))
        start += weight.shape[0]
    return torch.cat(weights), bounds


def _block_statistics(block, in_block: dict, recorded: BlockInputs, kind: str) -> dict[str, LayerInputs]:
    """Run every batch through the block and gather each targeted layer's input statistics."""
    stats = {name: LayerInputs(layer.in_features, kind) for name, layer in in_block.items()}
    added: dict[int, tuple] = {}  # id(input) -> (input, its statistics), within one call of the block

    def record(name, x):
        # Layers reading the very same tensor (q, k and v; gate and up) share one statistic:
        # the product is computed once per input, not once per layer.
        seen = added.get(id(x))
        if seen is not None and seen[0] is x:
            stats[name] = seen[1]
        else:
            stats[name].add(x)
            added[id(x)] = (x, stats[name])
    handles = [layer.register_forward_hook(lambda _m, args, _o, n=name: record(n, args[0]))
               for name, layer in in_block.items()]
    try:
        for args, kwargs in recorded.calls():
            block(*args, **kwargs)
            added.clear()
    finally:
        for handle in handles:
            handle.remove()
    return stats
