"""GPTQ and AWQ against plain, independent references of the papers' algorithms on tiny layers, written
here in float64 from the papers rather than from compress's code. compress computes in float32, so a
weight sitting within rounding of a half-step may round the other way: codes are compared as "nearly
all identical" and output errors within a small tolerance, never bit for bit.

The int4 grids mirror compress's documented conventions (int4_gptq.fit_grid): 16 codes 0..15 per output row
and group of `group_size` inputs; asymmetric spans [min(w, 0), max(w, 0)] with a rounded zero point,
absmax puts +-max|w| around code 8 in 15 steps, signed-max puts the largest-magnitude weight on code 0
(scale = m / -8); a zero scale becomes 1. Rounding is torch.round (half to even) in both."""

import pytest
import torch

from compressor.stages.blockwise.activations import BlockInputs
from compressor.stages.quantize.awq import Mapping, _balance
from compressor.stages.quantize.int4_gptq import dequantize, gptq_quantize
from compressor.stages.blockwise.sequential import LayerInputs

GRIDS = ("asymmetric", "absmax", "signed-max")


def reference_grid(columns, grid):
    """Per-row (scale, zero) of one group of columns (float64)."""
    if grid == "asymmetric":
        low = columns.min(dim=1).values.clamp(max=0)
        high = columns.max(dim=1).values.clamp(min=0)
        scale = (high - low) / 15
        zero = torch.round(-low / torch.where(scale > 0, scale, 1.0)).clamp(0, 15)
    elif grid == "absmax":
        scale = 2 * columns.abs().max(dim=1).values / 15
        zero = torch.full_like(scale, 8.0)
    else:  # signed-max
        extreme = columns[torch.arange(len(columns)), columns.abs().argmax(dim=1)]
        scale = -extreme / 8
        zero = torch.full_like(scale, 8.0)
    return torch.where(scale != 0, scale, 1.0), zero


def reference_quantize(column, scale, zero):
    """(codes, dequantized values) of one column on its rows' grids."""
    codes = (torch.round(column / scale) + zero).clamp(0, 15)
    return codes, (codes - zero) * scale


def reference_rtn(weight, group_size, grid):
    """Round to nearest per group: the dequantized weight (float64)."""
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[1], group_size):
        part = weight[:, start:start + group_size]
        scale, zero = reference_grid(part, grid)
        out[:, start:start + group_size] = reference_quantize(part, scale[:, None], zero[:, None])[1]
    return out


# ---------------------------------------------------------------------------------------------
# GPTQ (Frantar et al., 2022, Algorithm 1), columns in order (no act_order), one column at a time


def reference_gptq(weight, inputs, group_size, grid, damp):
    """The paper's column loop on W (N x K) from calibration inputs X (tokens x K):
    H = 2 X^T X + damp * mean(diag H) * I;  U = upper Cholesky factor of H^-1 (H^-1 = U^T U);
    for each column i: when a group starts, fit its grid to the weights as updated so far;
    q = quant(w_i); err = (w_i - q) / U_ii; W[:, i+1:] -= err U[i, i+1:].
    Mirrored from compress: the grid is fitted at a group's first column (the paper's reference code), the
    damping is relative to the mean Hessian diagonal. compress passes H as mean(x x^T) without the 2;
    scaling H by c scales U by 1/sqrt(c) and err by sqrt(c), so the update and the codes are the same."""
    w = weight.double().clone()
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    h = 2 * x.T @ x
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    n, k = w.shape
    codes = torch.zeros(n, k, dtype=torch.float64)
    scales = torch.zeros(n, -(-k // group_size), dtype=torch.float64)
    for i in range(k):
        if i % group_size == 0:
            scale, zero = reference_grid(w[:, i:i + group_size], grid)
            scales[:, i // group_size] = scale
        codes[:, i], q = reference_quantize(w[:, i], scale, zero)
        err = (w[:, i] - q) / u[i, i]
        w[:, i + 1:] -= err[:, None] * u[i, i + 1:][None, :]
        w[:, i] = q
    return codes, w, scales


def correlated_inputs(generator, tokens, features, scale=3.0):
    """Strongly correlated input features (a few directions dominate) with an uneven energy per feature, as
    transformer activations have: GPTQ's error feedback and its damping both matter then. `scale` keeps the
    mean Hessian diagonal far from 1, so a damping taken as absolute rather than relative shows."""
    basis = torch.randn(features, features, generator=generator) * torch.logspace(0, -2, features)[:, None]
    energy = torch.logspace(-0.5, 0.5, features)[torch.randperm(features, generator=generator)]
    return scale * (torch.randn(tokens, features, generator=generator) @ basis) * energy


def layer_error(delta, inputs):
    """Mean squared output error of a weight change on the inputs."""
    return float(((inputs.double() @ delta.T) ** 2).mean())


@pytest.mark.parametrize("grid", GRIDS)
def test_gptq_matches_the_papers_column_loop(grid):
    generator = torch.Generator().manual_seed(0)
    # ten groups, and wider than compress's lazy column batch (128 columns): the update of the columns after a
    # batch is exercised too, which the paper's one-column-at-a-time loop does not have
    n, k, group = 16, 160, 16
    weight = torch.randn(n, k, generator=generator)
    batches = [correlated_inputs(generator, 64, k) for _ in range(3)]
    stats = LayerInputs(k, "hessian")  # the statistic compress's GPTQ stage hands to gptq_quantize
    for batch in batches:
        stats.add(batch)
    codes, scales, zeros = gptq_quantize(weight, stats.hessian(), group, grid, dampening=0.01)
    ref_codes, ref_weight, ref_scales = reference_gptq(weight, torch.cat(batches), group, grid, damp=0.01)
    same = (codes.double() == ref_codes).double().mean()
    # float32 (compress) against float64 (the reference): a code at a rounding tie can flip, and its error then
    # moves the later columns; measured 98.0% (absmax) on a Xeon with AMX, 99%+ on AVX2 / AVX-512 EPYC. A wrong
    # column loop agrees on far fewer; the values decoded below are checked within tolerance as well.
    assert same >= 0.97, f"{grid}: only {float(same):.1%} of codes equal the reference's"
    decoded = dequantize(codes, scales, zeros, group).double()
    # A group's grid is fitted to weights the earlier columns' errors moved: compare it, and the values it
    # decodes to, in the rows whose codes matched the reference's through every earlier group.
    agree = codes.double() == ref_codes
    matched = agree.reshape(n, -1, group).all(2).cumprod(1).bool()
    before = torch.cat([torch.ones(n, 1, dtype=torch.bool), matched[:, :-1]], dim=1)
    assert torch.allclose(scales.double()[before], ref_scales[before], rtol=1e-4, atol=1e-7), grid
    step = ref_scales.abs().repeat_interleave(group, dim=1)
    comparable = agree & before.repeat_interleave(group, dim=1)
    assert bool(((decoded - ref_weight).abs() <= 1e-4 * step)[comparable].all()), grid
    # the comparison has power: GPTQ's codes are far from round-to-nearest's, and its output error lower
    inputs = torch.cat(batches)
    rtn = reference_rtn(weight.double(), group, grid)
    assert (decoded != rtn).double().mean() > 0.2
    assert layer_error(decoded - weight.double(), inputs) < 0.7 * layer_error(rtn - weight.double(), inputs)


def test_gptq_dampening_is_relative_to_the_mean_diagonal():
    """A larger dampening follows the reference too and gives other codes: the option reaches the loop, as a
    share of the mean Hessian diagonal (about 70 here, so an absolute dampening would differ)."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 32, generator=generator)
    inputs = correlated_inputs(generator, 128, 32)
    stats = LayerInputs(32, "hessian")
    stats.add(inputs)
    codes = {damp: gptq_quantize(weight, stats.hessian(), 16, "asymmetric", dampening=damp)[0].double()
             for damp in (0.01, 0.5)}
    for damp, got in codes.items():
        expected = reference_gptq(weight, inputs, 16, "asymmetric", damp)[0]
        assert (got == expected).double().mean() >= 0.99, damp
    assert (codes[0.01] != codes[0.5]).double().mean() > 0.05


# ---------------------------------------------------------------------------------------------
# AWQ (Lin et al., 2023): the per-group scale search


class Gain(torch.nn.Module):
    """A per-channel gain, as an RMSNorm's weight: what absorbs 1/s in front of the balanced layers."""

    def __init__(self, width):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.weight


class Pair(torch.nn.Module):
    """Two linears reading one input (like q and k); the search compares their joined outputs."""

    def __init__(self, width, out_a, out_b):
        super().__init__()
        self.a = torch.nn.Linear(width, out_a, bias=False)
        self.b = torch.nn.Linear(width, out_b, bias=False)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=-1)


class TinyBlock(torch.nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.gain = Gain(width)
        self.pair = Pair(width, 16, 8)

    def forward(self, x):
        return self.pair(self.gain(x))


AWQ_RATIOS = [step / 19 for step in range(20)]  # compress's grid: 20 ratios from 0 to 1


def reference_awq(weights, inputs, group_size, grid):
    """(error per ratio, scales per ratio, plain rounding's error) of AWQ's search for layers sharing `inputs`:
    s = mean_t |x_tj|^r / mean|w_j|^(1-r), the weight term being |w| normalised by its row's group maximum,
    averaged over every row of every layer. Each candidate rounds W * s and undoes s on the output:
    error = sum_t ||Q(W s) diag(1/s) x_t - W x_t||^2 over the joined outputs.
    Mirrored from compress: the 1e-4 floor of the weight term and of s, the 1e-6 in the group normalisation,
    and s divided by sqrt(max(s) * min(s)): a constant factor the per-group grids absorb, kept so that the
    scales compare directly."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    x_mean = x.abs().mean(0)
    rows = []
    for w in weights:
        w = w.double().abs()
        groups = w.reshape(w.shape[0], -1, group_size)
        rows.append((groups / (groups.max(dim=2, keepdim=True).values + 1e-6)).reshape(w.shape))
    w_mean = torch.cat(rows).mean(0)
    reference = torch.cat([x @ w.double().T for w in weights], dim=-1)

    def error_with(decoded):
        return float(((torch.cat([x @ d.T for d in decoded], dim=-1) - reference) ** 2).sum())

    errors, candidates = [], []
    for ratio in AWQ_RATIOS:
        s = (x_mean ** ratio / (w_mean ** (1 - ratio) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        decoded = [reference_rtn(w.double() * s[None, :], group_size, grid) / s[None, :] for w in weights]
        errors.append(error_with(decoded))
        candidates.append(s)
    plain = error_with([reference_rtn(w.double(), group_size, grid) for w in weights])
    return errors, candidates, plain


@pytest.mark.parametrize("grid", ["asymmetric", "signed-max"])
def test_awq_search_picks_the_references_scales(grid):
    """Input channels with outlier magnitudes: AWQ scales their weight columns up. compress's chosen scales
    (read back from the gain it divided) must be the reference's best ratio's, or one whose reference error is
    within rounding of the best; the scales are folded into the gain and the weights without changing the
    float function, and the error ratio it reports is the reference's."""
    torch.manual_seed(0)
    width, group = 32, 16
    block = TinyBlock(width)
    with torch.no_grad():
        block.gain.weight.copy_(torch.rand(width) + 0.5)
    outliers = torch.ones(width)
    outliers[[2, 9, 20]] = 12.0
    batches = [torch.randn(4, 8, width) * outliers for _ in range(2)]
    recorded = BlockInputs()
    for batch in batches:
        recorded.add((batch,), {})
    gain_before = block.gain.weight.detach().clone()
    weights = [block.pair.a.weight.detach().clone(), block.pair.b.weight.detach().clone()]
    with torch.no_grad():
        float_out = [block(b) for b in batches]
        ratio = _balance(block, Mapping("gain", ("pair.a", "pair.b"), "pair"), recorded, group, grid)
        for batch, expected in zip(batches, float_out):
            assert torch.allclose(block(batch), expected, atol=1e-4)  # scaling alone keeps the function
    chosen = (gain_before / block.gain.weight.detach()).double()
    for layer, original in zip((block.pair.a, block.pair.b), weights):
        assert torch.allclose(layer.weight.detach().double(), original.double() * chosen[None, :], rtol=1e-5)

    # The reference sees the balanced layers' input: the gain's output on the recorded batches.
    inputs = torch.cat([(b * gain_before).reshape(-1, width) for b in batches])
    errors, candidates, plain = reference_awq(weights, inputs, group, grid)
    best = min(range(len(errors)), key=errors.__getitem__)
    assert errors[best] < 0.9 * plain  # the outliers make scaling worth it
    assert not torch.allclose(chosen, torch.ones_like(chosen)), \
        f"compress kept the weights unscaled, though the reference's best scales cut the error to {errors[best] / plain:.2f}"
    match = [i for i, s in enumerate(candidates) if torch.allclose(chosen, s, rtol=1e-4)]
    assert match, "the chosen scales are none of the search's candidates"
    assert errors[match[0]] <= errors[best] * (1 + 1e-4), (match, best, errors)
    assert ratio == pytest.approx(errors[best] / plain, rel=1e-3)
