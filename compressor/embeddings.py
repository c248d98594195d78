"""Quantized token embedding tables: int8 with one scale per token, or int4 in groups along the hidden
size with a scale and zero point per token and group. A lookup gathers the codes of the requested rows
and dequantizes only those, so the table stays quantized in memory as well as on disk.

When the output head is tied to the table, the two are one matrix: the head is a TiedQuantizedHead that
holds no tensor of its own and computes with the table module's codes and scales. The table is the
only owner, so they are stored once, and moving or casting the model (`.to()`, which replaces buffers
module by module) cannot give the head a copy of its own.

Large vocabularies make this matter: a 262k-token table is most of a small model's weights (63% of a
270M-parameter Gemma), and a model whose blocks are 4-bit but whose table is float barely shrinks.
"""

from __future__ import annotations

from typing import Optional

from .int4_codes import dequantize_packed, pack_codes

EMBEDDING_SCHEMES = ("int8", "int4")


def unsupported_embedding(table) -> Optional[str]:
    """Why this embedding module cannot be replaced by a quantized one (None when it can): nn.Embedding
    itself, or a subclass whose only addition is a constant `embed_scale` multiplier (Gemma's scaled
    word embedding). Any other subclass computes something this module does not know."""
    import torch

    if not isinstance(table, torch.nn.Embedding):
        return f"{type(table).__name__} is not an nn.Embedding"
    if table.max_norm is not None:
        return "max_norm renormalises looked-up rows on every call"
    if type(table) is not torch.nn.Embedding and not hasattr(table, "embed_scale"):
        return f"{type(table).__name__} overrides nn.Embedding's lookup"
    return None


def _embed_scale(table) -> Optional[float]:
    # transformers keeps the exact value as a float beside the buffer, which a bf16 model holds rounded
    scale = getattr(table, "scalar_embed_scale", None)
    if scale is None:
        scale = getattr(table, "embed_scale", None)
    if scale is None:
        return None
    return float(scale.item() if hasattr(scale, "item") else scale)


def int8_embedding_class():
    """The nn.Module class of an int8 embedding table (a factory, so torch loads on first use)."""
    import torch

    class Int8Embedding(torch.nn.Module):
        def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx=None,
                     embed_scale: Optional[float] = None):
            super().__init__()
            self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
            self.embed_scale = embed_scale  # a plain number: Gemma multiplies every looked-up row by sqrt(hidden)
            self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32))

        @classmethod
        def from_codes(cls, table, codes, scales):
            module = cls(table.num_embeddings, table.embedding_dim, table.padding_idx, _embed_scale(table))
            module.weight_int8.copy_(codes)
            module.weight_scale.copy_(scales)
            return module

        def dequantized_weight(self, dtype=torch.float32):
            return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

        def forward(self, ids):
            rows = self.weight_int8[ids].to(self.weight_scale.dtype) * self.weight_scale[ids].unsqueeze(-1)
            return rows * self.embed_scale if self.embed_scale is not None else rows

    return Int8Embedding


def int4_embedding_class():
    """The nn.Module class of an int4 embedding table: codes 0..15, two per byte (low nibble first along
    the hidden axis), per token and group of `group_size` a float scale and a zero point."""
    import torch

    class Int4Embedding(torch.nn.Module):
        def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int, padding_idx=None,
                     embed_scale: Optional[float] = None):
            super().__init__()
            self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
            self.group_size, self.embed_scale = group_size, embed_scale
            groups = -(-embedding_dim // group_size)
            self.register_buffer("weight_packed", torch.zeros(num_embeddings, (embedding_dim + 1) // 2,
                                                              dtype=torch.uint8))
            self.register_buffer("weight_scale", torch.ones(num_embeddings, groups, dtype=torch.float32))
            self.register_buffer("weight_zero_point", torch.full((num_embeddings, groups), 8, dtype=torch.uint8))

        @classmethod
        def from_codes(cls, table, codes, scales, zeros, group_size: int):
            module = cls(table.num_embeddings, table.embedding_dim, group_size, table.padding_idx,
                         _embed_scale(table))
            module.weight_packed.copy_(pack_codes(codes, module.weight_packed.shape[1]))
            module.weight_scale.copy_(scales)
            module.weight_zero_point.copy_(zeros.to(torch.uint8))
            return module

        def dequantized_weight(self, dtype=torch.float32):
            return dequantize_packed(self.weight_packed, self.weight_scale, self.weight_zero_point, self.group_size,
                                     self.embedding_dim, dtype)

        def forward(self, ids):
            rows = dequantize_packed(self.weight_packed[ids], self.weight_scale[ids], self.weight_zero_point[ids],
                                     self.group_size, self.embedding_dim, self.weight_scale.dtype)
            return rows * self.embed_scale if self.embed_scale is not None else rows

    return Int4Embedding


def tied_head_class():
    """The nn.Module class of an output head tied to a quantized table (a factory, so torch loads on first
    use). The table is referenced, not registered: it stays the model's own submodule and the only owner of
    the codes, and the head adds nothing to the state but its bias."""
    import torch
    import torch.nn.functional as F

    class TiedQuantizedHead(torch.nn.Module):
        def __init__(self, table, in_features: int, out_features: int, bias: bool):
            super().__init__()
            self.__dict__["table"] = table  # not a submodule: its tensors belong to the embedding's place
            self.in_features, self.out_features = in_features, out_features
            self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

        def dequantized_weight(self, dtype=torch.float32):
            return self.table.dequantized_weight(dtype)

        def forward(self, x):
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    return TiedQuantizedHead


def tie_head_to_table(module, head_name: str, table) -> None:
    """Replace the head `head_name` of `module` by a TiedQuantizedHead computing with `table`."""
    import torch

    parent_name, _, child = head_name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    old = getattr(parent, child)
    head = tied_head_class()(table, old.in_features, old.out_features, getattr(old, "bias", None) is not None)
    if head.bias is not None and not old.bias.is_meta:
        with torch.no_grad():
            head.bias.copy_(old.bias.detach().float())
    setattr(parent, child, head)


def is_quantized_embedding(module) -> bool:
    return type(module).__name__ in ("Int8Embedding", "Int4Embedding") and module.__module__ == __name__


def embedding_record(name: str, table, scheme: str, head: Optional[str], head_tied: bool,
                     group_size: Optional[int]) -> dict:
    """What loading needs to rebuild the quantized table and the head quantized with it (kept in
    compress_transforms.json): a tied head is rebuilt as a TiedQuantizedHead on the table."""
    record = {"name": name, "scheme": scheme, "head": head, "head_tied": bool(head and head_tied),
              "embed_scale": _embed_scale(table)}
    if scheme == "int4":
        record["group_size"] = group_size
    return record


def empty_quantized_embedding(table, record: dict):
    """An empty quantized table of the recorded scheme shaped like `table` (an empty float table), for
    loading stored codes into."""
    if record["scheme"] == "int8":
        return int8_embedding_class()(table.num_embeddings, table.embedding_dim, table.padding_idx,
                                      record.get("embed_scale"))
    return int4_embedding_class()(table.num_embeddings, table.embedding_dim, record["group_size"],
                                  table.padding_idx, record.get("embed_scale"))


def dequantized_table(table):
    """The float table as a checkpoint stores it (before any `embed_scale`, which the model's own
    embedding class applies), for formats with no quantized lookup."""
    import torch

    return table.dequantized_weight(torch.float32)
