"""4-bit grids, round to nearest and GPTQ (Frantar et al., 2022) on torch weights (N outputs x K
inputs): the arithmetic int4_torch.py and awq.py share. GPTQ quantizes a layer's input columns one
at a time and spreads each one's rounding error over the columns not yet quantized through the
upper Cholesky factor of H^-1, H being the layer's input statistics on calibration data.

Why not ONNX Runtime's GPTQ: the version vendored in onnxruntime 1.31 (from Neural Compressor)
propagates each column's rounding error with a column of the *upper* Cholesky factor of H^-1
below its diagonal, which is zero, so no error is ever compensated and its output is bit-identical
to round-to-nearest (tests/test_int4.py keeps a check of that, to notice a fix upstream). GPTQ on
an exported ONNX graph was tried too (Hessians from the float model in one pass): on SmolLM2-135M
it lost to plain rounding (1.221x and 1.462x dense perplexity against 1.218x and 1.339x at blocks
of 32 and 128), so GPTQ runs on the torch model block by block and export_onnx carries its codes."""

from __future__ import annotations

from ...errors import StageFailed

COLUMN_BATCH = 128  # rows of W quantized together before the rest are updated (GPTQ's lazy batch)
GRIDS = ("asymmetric", "absmax", "signed-max")


def fit_grid(columns, grid: str, bits: int = 4):
    """Per-row scale and zero point of a group of columns (rows = output channels), on the 16 codes
    0..15 (2^bits codes 0..2^bits - 1 for other widths: int8's absmax grid is compressed-tensors' int8). `grid`:
    - asymmetric spans [min(w, 0), max(w, 0)] with an integer zero point;
    - absmax (symmetric, as the GPTQ reference and compressed-tensors fit it) spreads
      [-max|w|, max|w|] over 15 steps around code 8, so the largest positive weight may clip by half
      a step and code 0 is only reached past -max|w|;
    - signed-max (symmetric, ONNX Runtime's grid) puts the group's largest-magnitude weight m exactly
      on code 0 (scale = m / -8, negative when m > 0), so all 16 codes are in use and the step is
      15/16 of absmax's; weights of the other sign clip at 7/8 of |m|."""
    import torch

    top, middle = 2 ** bits - 1, 2 ** (bits - 1)
    if grid == "asymmetric":
        low = columns.amin(dim=1).clamp(max=0)
        high = columns.amax(dim=1).clamp(min=0)
        scale = (high - low) / top
        zero = torch.round(-low / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, top)
    elif grid == "absmax":
        scale = columns.abs().amax(dim=1) * 2 / top
        zero = torch.full_like(scale, float(middle))
    elif grid == "signed-max":
        extreme = columns.gather(1, columns.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        scale = extreme / -middle
        zero = torch.full_like(scale, float(middle))
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


def rtn_quantize(weight, group_size: int, grid: str, bits: int = 4):
    """Round to nearest on each group's grid. weight: N x K. Returns codes, scales, zeros (N x groups)."""
    import torch

    top = 2 ** bits - 1
    w = weight.detach().float()
    n, k = w.shape
    groups = -(-k // group_size)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales, zeros = torch.zeros(n, groups), torch.zeros(n, groups)
    for g in range(groups):
        part = w[:, g * group_size:(g + 1) * group_size]
        scale, zero = fit_grid(part, grid, bits)
        scales[:, g], zeros[:, g] = scale, zero
        codes[:, g * group_size:(g + 1) * group_size] = torch.clamp(
            torch.round(part / scale[:, None]) + zero[:, None], 0, top).to(torch.uint8)
    return codes, scales, zeros


def gptq_quantize(weight, hessian, group_size: int, grid: str, dampening: float = 0.01,
                  act_order: bool = False, bits: int = 4):
    """GPTQ (Frantar et al., 2022) of one layer. weight: N x K (rows = output channels); hessian:
    K x K, the mean of x x^T over the layer's calibration inputs. Columns are quantized in order (or,
    with `act_order`, by decreasing Hessian diagonal) and each one's rounding error is spread over
    the columns not yet quantized through the upper Cholesky factor of H^-1.

    Groups stay contiguous in the original column order, as MatMulNBits stores them. Without
    act_order a group's grid is fitted when its first column comes up, to the weights as updated so
    far (the reference implementation); with act_order, columns of one group are visited out of
    order, so every grid is fitted on the original weights first ("static groups")."""
    import torch

    top = 2 ** bits - 1
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    groups = -(-k // group_size)
    scales, zeros = torch.zeros(n, groups), torch.zeros(n, groups)
    # Grids fitted on the original weights up front: with act_order (static groups), and with one group per
    # row (per-channel int8), whose only grid would be fitted at column 0 anyway, before any update
    upfront = act_order or groups == 1
    if upfront:
        for g in range(groups):
            scales[:, g], zeros[:, g] = fit_grid(w[:, g * group_size:(g + 1) * group_size], grid, bits)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    h += torch.eye(k) * dampening * torch.mean(torch.diag(h))
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError as exc:
        raise StageFailed(f"gptq: a layer's Hessian is not positive definite even after dampening ({exc}); "
                          "raise `dampening` or calibrate on more tokens") from None
    codes = torch.zeros(n, k, dtype=torch.uint8)
    # The column loop runs ~150,000 times on a 135M model, so each step is kept to few tensor operations:
    # the column order and the diagonal as Python numbers, each group's scale and zero point as contiguous
    # columns, the codes gathered per batch, the update of the remaining columns as one rank-1 addr_.
    columns = order.tolist()
    diagonal = torch.diagonal(upper).tolist()
    grid_columns = [(scales[:, g].contiguous(), zeros[:, g].contiguous()) for g in range(groups)] if upfront else {}
    # a group fitted in the loop must lie within one batch of columns; grids fitted up front need no such room
    batch = COLUMN_BATCH if upfront else max(COLUMN_BATCH, group_size)
    for start in range(0, k, batch):
        end = min(start + batch, k)
        part = w[:, start:end].clone()
        errors = torch.zeros_like(part)
        quantized = torch.empty_like(part)
        inverse = upper[start:end, start:end]
        for i in range(end - start):
            column = columns[start + i]
            group = column // group_size
            if not upfront and column % group_size == 0:  # a new group: fit it to the weights as they are now
                scales[:, group], zeros[:, group] = fit_grid(part[:, i:i + group_size], grid, bits)
                grid_columns[group] = (scales[:, group].contiguous(), zeros[:, group].contiguous())
            scale, zero = grid_columns[group]
            weights = part[:, i]
            q = torch.round(weights / scale).add_(zero).clamp_(0, top)
            quantized[:, i] = q
            error = (weights - (q - zero) * scale) / diagonal[start + i]
            part[:, i:].addr_(error, inverse[i, i:], alpha=-1)
            errors[:, i] = error
        codes[:, columns[start:end]] = quantized.to(torch.uint8)
        w[:, end:] -= errors @ upper[start:end, end:]
    return codes, scales, zeros
