"""8-bit weights and 8-bit activations (FP8 E4M3 or int8): the arithmetic and the torch layer.

The numbers follow compressed-tensors (the format vLLM loads), so that what compress evaluates is what a
server computes and a folder written from it reloads with the same logits:
- a weight scale is max|w| / Q over its slice (an output channel, the whole tensor, or a block of 128 x
  128), Q = 448 for E4M3 (its largest finite value) and 127.5 for int8 (half of 255, so that -max|w| lands
  on -127.5 and rounds into -128..127);
- the weight is w / scale clamped to the format's range, then cast to float8_e4m3fn (which rounds to
  nearest even) or rounded to int8;
- activations are quantized the same way per call: one scale per token (dynamic), per token and group of
  128 inputs (dynamic, with block weights), or one calibrated scale per tensor (static).

On the CPU the layer simulates the kernel: activations are quantized and dequantized, the weight is
dequantized, and the matmul runs in float32. A scaled-matmul kernel (torch._scaled_mm on CUDA, capability
8.9 and newer) computes the same products of 8-bit values with float32 accumulation and applies the same
scales to the result, so the two agree up to float rounding of the accumulation order.
"""

from __future__ import annotations

from typing import Optional

FORMATS = ("fp8", "int8")
FP8_MAX = 448.0           # largest finite float8_e4m3fn
INT8_HALF_RANGE = 127.5   # (127 - (-128)) / 2, compressed-tensors' symmetric int8 scale divisor
WEIGHT_STRATEGIES = ("channel", "tensor", "block")
ACTIVATION_STRATEGIES = ("token", "group", "tensor")  # token and group are dynamic, tensor is static
BLOCK = 128  # FP8_BLOCK's weight block (128 x 128) and its activation group (128 inputs per token)


def divisor(fmt: str) -> float:
    return FP8_MAX if fmt == "fp8" else INT8_HALF_RANGE


def _safe(scale):
    """A zero scale (an all-zero slice) becomes the smallest positive float32, as compressed-tensors does."""
    import torch

    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale.dtype).eps), scale)


def to_codes(scaled, fmt: str):
    """Values already divided by their scale, as 8-bit codes: clamp, then cast (fp8) or round (int8)."""
    import torch

    if fmt == "fp8":
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch.round(scaled.clamp(-128, 127)).to(torch.int8)


def weight_scale(weight, fmt: str, strategy: str):
    """Scales of an (outputs x inputs) weight: [out, 1] per channel, [1] per tensor, [ceil(out/128),
    ceil(in/128)] per block."""
    import torch

    w = weight.detach().float().abs()
    if strategy == "channel":
        peak = w.amax(dim=1, keepdim=True)
    elif strategy == "tensor":
        peak = w.amax().reshape(1)
    elif strategy == "block":
        n, k = w.shape
        padded = torch.nn.functional.pad(w, (0, -k % BLOCK, 0, -n % BLOCK))
        peak = padded.reshape(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK).amax(dim=(1, 3))
    else:
        raise ValueError(f"unknown weight strategy {strategy!r}; one of {WEIGHT_STRATEGIES}")
    return _safe(peak / divisor(fmt))


def expand_scale(scale, shape, strategy: str):
    """A weight scale broadcast to the weight's (outputs x inputs) shape."""
    if strategy != "block":
        return scale
    n, k = shape
    return scale.repeat_interleave(BLOCK, dim=0)[:n].repeat_interleave(BLOCK, dim=1)[:, :k]


def quantize_weight(weight, fmt: str, strategy: str, scale=None):
    """Round to nearest: (codes, scale). `scale` given (a fitted one) is used as it is."""
    if scale is None:
        scale = weight_scale(weight, fmt, strategy)
    codes = to_codes(weight.detach().float() / expand_scale(scale, weight.shape, strategy), fmt)
    return codes, scale


def dequantize_weight(codes, scale, strategy: str, dtype=None):
    import torch

    dtype = dtype or torch.float32
    return codes.to(dtype) * expand_scale(scale, codes.shape, strategy).to(dtype)


def activation_scale(x, fmt: str, strategy: str):
    """Dynamic scales of activations x (..., inputs): one per token, or per token and group of 128."""
    if strategy == "token":
        return _safe(x.abs().amax(dim=-1, keepdim=True) / divisor(fmt))
    if strategy == "group":
        grouped = x.unflatten(-1, (-1, BLOCK))
        return _safe(grouped.abs().amax(dim=-1, keepdim=True) / divisor(fmt))
    raise ValueError(f"activations {strategy!r} are not dynamic")


def fake_quantize_activations(x, fmt: str, strategy: str, static_scale=None):
    """x quantized to the format and dequantized again, as the kernel sees it."""
    if strategy == "tensor":
        scale = static_scale.to(x.dtype)
        return to_codes(x / scale, fmt).to(x.dtype) * scale
    if strategy == "group":
        grouped = x.unflatten(-1, (-1, BLOCK))
        scale = activation_scale(x, fmt, strategy)
        return (to_codes(grouped / scale, fmt).to(x.dtype) * scale).flatten(-2)
    scale = activation_scale(x, fmt, strategy)
    return to_codes(x / scale, fmt).to(x.dtype) * scale


def scaled_mm_available(x, fmt: str, weights: str, activations: str, shape) -> bool:
    """Whether torch's FP8 scaled-matmul kernel can compute this call: CUDA with compute capability 8.9 or
    newer (Ada, Hopper), the scale pairs it takes (per-channel weights with per-token activations, or
    per-tensor with per-tensor), and sizes that are multiples of 16."""
    import torch

    if fmt != "fp8" or not x.is_cuda or (weights, activations) not in (("channel", "token"), ("tensor", "tensor")):
        return False
    if not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    out_features, in_features = shape
    return in_features % 16 == 0 and out_features % 16 == 0


def w8a8_linear_class():
    """The nn.Module class of an 8-bit-weight, 8-bit-activation linear layer (a factory, so torch loads on
    first use)."""
    import torch
    import torch.nn.functional as F

    class W8A8Linear(torch.nn.Module):
        """nn.Linear with 8-bit weight codes (`weight_q`: float8_e4m3fn or int8) and float32 scales
        (`weight_scale`), whose input is quantized to the same format per call (or with the calibrated
        `input_scale`, static). Simulated on the CPU; torch._scaled_mm on capable GPUs (module docstring)."""

        def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, weights: str,
                     activations: str):
            super().__init__()
            if fmt not in FORMATS or weights not in WEIGHT_STRATEGIES or activations not in ACTIVATION_STRATEGIES:
                raise ValueError(f"unknown 8-bit layout {fmt}/{weights}/{activations}")
            self.in_features, self.out_features = in_features, out_features
            self.fmt, self.weights, self.activations = fmt, weights, activations
            dtype = torch.float8_e4m3fn if fmt == "fp8" else torch.int8
            self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=dtype))
            scale_shape = {"channel": (out_features, 1), "tensor": (1,),
                           "block": (-(-out_features // BLOCK), -(-in_features // BLOCK))}[weights]
            self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32))
            if activations == "tensor":
                self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32))
            else:
                self.input_scale = None
            self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

        @classmethod
        def from_codes(cls, linear, codes, scale, fmt: str, weights: str, activations: str,
                       input_scale: Optional[float] = None):
            module = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, weights, activations)
            module.weight_q.copy_(codes)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            if activations == "tensor":
                if input_scale is None or not input_scale > 0:
                    raise ValueError("static activations need a positive calibrated input scale")
                module.input_scale.fill_(float(input_scale))
            if linear.bias is not None:
                module.bias.data.copy_(linear.bias.detach().float())
            return module

        def dequantized_weight(self, dtype=torch.float32):
            return dequantize_weight(self.weight_q, self.weight_scale, self.weights, dtype)

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, "
                    f"weights={self.weights}, activations={self.activations}")

        def forward(self, x):
            if scaled_mm_available(x, self.fmt, self.weights, self.activations, self.weight_q.shape):
                return self._scaled_mm(x)
            quantized = fake_quantize_activations(x, self.fmt, self.activations, self.input_scale)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(quantized, self.dequantized_weight(x.dtype), bias)

        def _scaled_mm(self, x):
            """The FP8 kernel: both operands in E4M3, float32 accumulation, the scales applied to the result."""
            rows = x.reshape(-1, x.shape[-1])
            if self.activations == "tensor":
                scale_a = self.input_scale.reshape(1, 1).to(rows.device)
            else:
                scale_a = activation_scale(rows.float(), "fp8", "token")
            codes = to_codes(rows.float() / scale_a, "fp8")
            scale_b = self.weight_scale.reshape(1, -1) if self.weights == "channel" else \
                self.weight_scale.reshape(1, 1)
            if self.weights == "tensor" and self.activations == "tensor":
                scale_a, scale_b = scale_a.reshape(()), scale_b.reshape(())
            out = torch._scaled_mm(codes, self.weight_q.t(), scale_a=scale_a.float(), scale_b=scale_b.float(),
                                   out_dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16)
            out = out.to(x.dtype)
            if self.bias is not None:
                out = out + self.bias.to(x.dtype)
            return out.reshape(*x.shape[:-1], self.out_features)

    return W8A8Linear


def is_w8a8_linear(layer) -> bool:
    return type(layer).__name__ == "W8A8Linear" and hasattr(layer, "weight_q")
