"""GPTQ for ONNX MatMul weights, written into ONNX Runtime's MatMulNBits operator.

Why not ONNX Runtime's own GPTQ: the version vendored in onnxruntime 1.31 (from Neural Compressor)
propagates each column's rounding error with a column of the *upper* Cholesky factor of H^-1
below its diagonal, which is zero, so no error is ever compensated and its output is bit-identical
to round-to-nearest (tests/test_int4.py keeps a check of that, to notice a fix upstream).

What runs here (Frantar et al., 2022): H = X^T X of each MatMul's input over the calibration data
(from the float model, all layers at once, not sequentially); then, per weight, input rows are
quantized in order with the error of each spread over the rows not yet quantized through the
upper Cholesky factor of H^-1. Scales and zero points of a block are fitted when the block starts,
to the weights as updated so far."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import StageFailed
from ..onnx_graph import complete_feed

log = logging.getLogger(__name__)

COLUMN_BATCH = 128  # rows of W quantized together before the rest are updated (GPTQ's lazy batch)


def targets(model, excluded: set[str]) -> list:
    """MatMul nodes whose right-hand side is a 2-D float constant, not excluded."""
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.name not in excluded and
            n.input[1] in inits and len(inits[n.input[1]].dims) == 2 and
            inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]


def hessians(model, nodes, feeds: list[dict]) -> dict[str, np.ndarray]:
    """X^T X / rows for every distinct MatMul input, from one pass over the calibration feeds."""
    import onnx
    import onnxruntime as ort

    names = sorted({n.input[0] for n in nodes})
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                                  for name in names if name not in existing)
    session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    rows = 0
    for feed in feeds:
        values = session.run(names, complete_feed(session.get_inputs(), feed))
        rows += int(np.prod(values[0].shape[:-1]))
        for name, value in zip(names, values):
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
    return {name: total / max(rows, 1) for name, total in sums.items()}


GRIDS = ("asymmetric", "absmax", "signed-max")


def fit_grid(columns, grid: str):
    """Per-row scale and zero point of a group of columns (rows = output channels), on the 16 codes
    0..15. `grid`:
    - asymmetric spans [min(w, 0), max(w, 0)] with an integer zero point;
    - absmax (symmetric, as the GPTQ reference and compressed-tensors fit it) spreads
      [-max|w|, max|w|] over 15 steps around code 8, so the largest positive weight may clip by half
      a step and code 0 is only reached past -max|w|;
    - signed-max (symmetric, ONNX Runtime's grid) puts the group's largest-magnitude weight m exactly
      on code 0 (scale = m / -8, negative when m > 0), so all 16 codes are in use and the step is
      15/16 of absmax's; weights of the other sign clip at 7/8 of |m|."""
    import torch

    if grid == "asymmetric":
        low = columns.amin(dim=1).clamp(max=0)
        high = columns.amax(dim=1).clamp(min=0)
        scale = (high - low) / 15
        zero = torch.round(-low / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, 15)
    elif grid == "absmax":
        scale = columns.abs().amax(dim=1) * 2 / 15
        zero = torch.full_like(scale, 8.0)
    elif grid == "signed-max":
        extreme = columns.gather(1, columns.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        scale = extreme / -8
        zero = torch.full_like(scale, 8.0)
    else:
        raise ValueError(f"unknown int4 grid {grid!r}; one of {GRIDS}")
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))
    return scale, zero


def dequantize(codes, scales, zeros, group_size: int):
    """Float weights (N x K) from codes (N x K), and scales and zero points per row and group."""
    k = codes.shape[1]
    scale = scales.repeat_interleave(group_size, dim=1)[:, :k]
    zero = zeros.to(scales.dtype).repeat_interleave(group_size, dim=1)[:, :k]
    return (codes.to(scales.dtype) - zero) * scale


def rtn_quantize(weight, group_size: int, grid: str):
    """Round to nearest on each group's grid. weight: N x K. Returns codes, scales, zeros (N x groups)."""
    import torch

    w = weight.detach().float()
    n, k = w.shape
    groups = -(-k // group_size)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales, zeros = torch.zeros(n, groups), torch.zeros(n, groups)
    for g in range(groups):
        part = w[:, g * group_size:(g + 1) * group_size]
        scale, zero = fit_grid(part, grid)
        scales[:, g], zeros[:, g] = scale, zero
        codes[:, g * group_size:(g + 1) * group_size] = torch.clamp(
            torch.round(part / scale[:, None]) + zero[:, None], 0, 15).to(torch.uint8)
    return codes, scales, zeros


def gptq_quantize(weight, hessian, group_size: int, grid: str, dampening: float = 0.01,
                  act_order: bool = False):
    """GPTQ (Frantar et al., 2022) of one layer. weight: N x K (rows = output channels); hessian:
    K x K, the mean of x x^T over the layer's calibration inputs. Columns are quantized in order (or,
    with `act_order`, by decreasing Hessian diagonal) and each one's rounding error is spread over
    the columns not yet quantized through the upper Cholesky factor of H^-1.

    Groups stay contiguous in the original column order, as MatMulNBits stores them. Without
    act_order a group's grid is fitted when its first column comes up, to the weights as updated so
    far (the reference implementation); with act_order, columns of one group are visited out of
    order, so every grid is fitted on the original weights first ("static groups")."""
    import torch

    w = weight.detach().float().clone()
    h = hessian.float().clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    groups = -(-k // group_size)
    scales, zeros = torch.zeros(n, groups), torch.zeros(n, groups)
    if act_order:
        for g in range(groups):
            scales[:, g], zeros[:, g] = fit_grid(w[:, g * group_size:(g + 1) * group_size], grid)
        order = torch.argsort(torch.diag(h), descending=True)
    else:
        order = torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    h += torch.eye(k) * dampening * torch.mean(torch.diag(h))
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError as exc:
        raise StageFailed(f"gptq: a layer's Hessian is not positive definite even after dampening ({exc}); "
                          "raise `dampening` or calibrate on more tokens") from None
    codes = torch.zeros(n, k, dtype=torch.uint8)
    batch = max(COLUMN_BATCH, group_size)
    for start in range(0, k, batch):
        end = min(start + batch, k)
        part = w[:, start:end].clone()
        errors = torch.zeros_like(part)
        inverse = upper[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            group = column // group_size
            if not act_order and column % group_size == 0:  # a new group: fit it to the weights as they are now
                scales[:, group], zeros[:, group] = fit_grid(part[:, i:i + group_size], grid)
            scale, zero = scales[:, group], zeros[:, group]
            q = torch.clamp(torch.round(part[:, i] / scale) + zero, 0, 15)
            codes[:, column] = q.to(torch.uint8)
            error = (part[:, i] - (q - zero) * scale) / inverse[i, i]
            part[:, i:] -= error[:, None] * inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return codes, scales, zeros


def gptq_codes(weight: np.ndarray, hessian: np.ndarray, block_size: int, grid: str,
               dampening: float = 0.01):
    """GPTQ of an ONNX MatMul weight W (K inputs x N outputs). Returns codes (N x K, 0..15), scales and
    zero points (N x blocks) as numpy arrays."""
    import torch

    codes, scales, zeros = gptq_quantize(torch.from_numpy(weight.T.copy()), torch.from_numpy(hessian), block_size,
                                         grid, dampening)
    return codes.numpy(), scales.numpy(), zeros.numpy().astype(np.uint8)


def pack_matmulnbits(node, codes: np.ndarray, scales: np.ndarray, zeros, block_size: int,
                     accuracy_level, prefix: str):
    """The MatMulNBits node and its initializers: B [N, blocks, block/2] uint8 with the low nibble
    first, scales [N * blocks], zero points packed two per byte per row (omitted when symmetric,
    where the operator's default of 8 applies)."""
    from onnx import helper, numpy_helper

    n, k = codes.shape
    blocks = scales.shape[1]
    padded = np.zeros((n, blocks * block_size), dtype=np.uint8)
    padded[:, :k] = codes
    for b in range(blocks):  # rows past K decode to zero: code = zero point
        tail = slice(max(k, b * block_size), (b + 1) * block_size)
        padded[:, tail] = (zeros[:, b:b + 1] if zeros is not None else 8)
    pairs = padded.reshape(n, blocks, block_size // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    inits = [numpy_helper.from_array(packed, f"{prefix}_Q4"),
             numpy_helper.from_array(scales.astype(np.float32).reshape(-1), f"{prefix}_scales")]
    inputs = [node.input[0], inits[0].name, inits[1].name]
    if zeros is not None:
        zp = np.zeros((n, blocks + blocks % 2), dtype=np.uint8)
        zp[:, :blocks] = zeros
        zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
        inits.append(numpy_helper.from_array(zp.reshape(-1), f"{prefix}_zero_points"))
        inputs.append(inits[-1].name)
    attrs = {"K": k, "N": n, "bits": 4, "block_size": block_size}
    if accuracy_level is not None:
        attrs["accuracy_level"] = accuracy_level
    new = helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q4",
                           domain="com.microsoft", **attrs)
    return new, inits


def gptq_onnx(model, excluded: set[str], feeds: list[dict], block_size: int, grid: str,
              accuracy_level, progress, dampening: float = 0.01) -> int:
    """Replace every target MatMul of `model` in place; return how many were quantized."""
    from onnx import numpy_helper

    nodes = targets(model, excluded)
    h = hessians(model, nodes, feeds)
    inits = {i.name: i for i in model.graph.initializer}
    replaced = {}
    for index in progress.track(range(len(nodes)), len(nodes), "quantizing int4 (GPTQ)"):
        node = nodes[index]
        weight = numpy_helper.to_array(inits[node.input[1]])
        codes, scales, zeros = gptq_codes(weight, h[node.input[0]], block_size, grid, dampening)
        zero_points = zeros if grid == "asymmetric" else None  # symmetric grids sit on MatMulNBits' default 8
        replaced[node.name] = pack_matmulnbits(node, codes, scales, zero_points, block_size, accuracy_level,
                                               prefix=f"{node.input[1]}_{index}")
    swap_matmul_nodes(model, replaced)
    return len(replaced)


def swap_matmul_nodes(model, replaced: dict[str, tuple]) -> None:
    """Put each new node of `replaced` (old node name -> (new node, its initializers)) in place of
    the old one, in place, and drop the float weights no node reads any more."""
    import onnx

    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    order = []
    for node in model.graph.node:
        if node.name in replaced:
            new, new_inits = replaced[node.name]
            order.append(new)
            model.graph.initializer.extend(new_inits)
            readers[node.input[1]] -= 1
        else:
            order.append(node)
    del model.graph.node[:]
    model.graph.node.extend(order)
    unused = [i for i in model.graph.initializer if readers.get(i.name, 1) == 0]
    for init in unused:
        model.graph.initializer.remove(init)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
