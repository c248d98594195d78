"""The packed 4-bit layout compress stores (two codes per byte, the low nibble first along the last axis;
a float scale and an integer zero point per row and group), shared by the int4 weight-only linear layer
and the int4 embedding table, which must agree bit for bit when a head is tied to its table."""

from __future__ import annotations


def pack_codes(codes, packed_width: int):
    """Codes 0..15 (rows x K, uint8) packed two per byte into rows x packed_width."""
    import torch

    padded = torch.zeros(codes.shape[0], 2 * packed_width, dtype=torch.uint8)
    padded[:, :codes.shape[1]] = codes
    return padded[:, 0::2] | (padded[:, 1::2] << 4)


def unpack_codes(packed, width: int):
    """The codes of `packed` (any leading shape x packed width), cut to `width` along the last axis."""
    import torch

    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)[..., :width]


def dequantize_packed(packed, scale, zero, group_size: int, width: int, dtype):
    """(code - zero point) * scale, per row and group of `group_size` along the last axis."""
    scale = scale.to(dtype).repeat_interleave(group_size, dim=-1)[..., :width]
    zero = zero.to(dtype).repeat_interleave(group_size, dim=-1)[..., :width]
    return (unpack_codes(packed, width).to(dtype) - zero) * scale
