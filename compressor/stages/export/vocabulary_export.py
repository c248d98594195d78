"""The quantized token table (and the head that computes with it) in an exported ONNX graph, with the
torch stage's own codes: the table becomes ONNX Runtime's GatherBlockQuantized, the head MatMulNBits.

The exporter traces float modules, so the table is exported as the float Gather of its dequantized values
and the head as a float MatMul; afterwards, in the graph, each is found by its float weight (bit for bit)
and replaced. Both operators read one layout: codes N x blocks x block/2 bytes (4-bit, the low nibble
first) or N x blocks x block (8-bit), a scale per row and block, and a zero point (the midpoint of the range
when absent). A head tied to the table reads the very same initializer as the lookup, so the codes are
stored once, as in torch; GatherBlockQuantized reads them as (rows, blocks, block) and its output is
reshaped to (rows, hidden). Both compute (code - zero point) * scale, as the torch modules do, so the
graph's rows and logits equal torch's to float rounding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...errors import StageFailed

# Block sizes MatMulNBits' CPU kernels run fastest with; an int8 row's one scale is repeated per block
EIGHT_BIT_BLOCKS = (256, 128, 64, 32, 16)


@dataclass
class BlockCodes:
    """One matrix (rows x width) in MatMulNBits' terms: unsigned codes, a scale per row and block, and a zero
    point per row and block (None: the midpoint, 8 or 128)."""

    codes: np.ndarray            # rows x width, uint8, 0..2^bits - 1
    scales: np.ndarray           # rows x blocks, float32
    zeros: Optional[np.ndarray]  # rows x blocks, uint8, or None
    bits: int
    block_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def packed(self) -> np.ndarray:
        """The codes as MatMulNBits' B: rows x blocks x block*bits/8 bytes, the rows' tails past `width`
        filled with the zero point (so they decode to zero)."""
        rows, width = self.codes.shape
        blocks = self.scales.shape[1]
        padded = np.empty((rows, blocks * self.block_size), dtype=np.uint8)
        padded[:, :width] = self.codes
        if padded.shape[1] > width:
            fill = (np.repeat(self.zeros, self.block_size, axis=1)[:, width:] if self.zeros is not None
                    else 1 << (self.bits - 1))
            padded[:, width:] = fill
        if self.bits == 4:
            padded = padded[:, 0::2] | (padded[:, 1::2] << 4)
        return padded.reshape(rows, blocks, -1).astype(np.uint8)

    def packed_zeros(self) -> Optional[np.ndarray]:
        """MatMulNBits' zero points: per row, two per byte for 4 bits (low nibble first), flat."""
        if self.zeros is None:
            return None
        zeros = self.zeros.astype(np.uint8)
        if self.bits == 4:
            if zeros.shape[1] % 2:
                zeros = np.concatenate([zeros, np.zeros((zeros.shape[0], 1), dtype=np.uint8)], axis=1)
            zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
        return zeros.reshape(-1)


def int8_rows(codes: np.ndarray, scales: np.ndarray) -> BlockCodes:
    """Symmetric int8 with one scale per row (compress's int8 table and head) as 8-bit blocks: the codes
    shifted by 128 (the operators' default zero point), the row's scale repeated for each block."""
    width = codes.shape[1]
    block = next((b for b in EIGHT_BIT_BLOCKS if width % b == 0), EIGHT_BIT_BLOCKS[-1])
    blocks = -(-width // block)
    unsigned = (codes.astype(np.int16) + 128).astype(np.uint8)
    return BlockCodes(unsigned, np.repeat(scales.reshape(-1, 1).astype(np.float32), blocks, axis=1), None, 8, block)


def int4_rows(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> BlockCodes:
    """compress's int4 layout (codes 0..15, a scale and zero point per row and group) as 4-bit blocks."""
    zeros = zeros.astype(np.uint8)
    return BlockCodes(codes.astype(np.uint8), scales.astype(np.float32), None if (zeros == 8).all() else zeros, 4,
                      group_size)


def codes_of(module) -> BlockCodes:
    """The block codes of a quantized table or head module (compressor.embeddings, torch_transforms)."""
    from ...int4_codes import unpack_codes

    kind = type(module).__name__
    if kind in ("Int8Embedding", "Int8WeightOnlyLinear"):
        return int8_rows(module.weight_int8.numpy(), module.weight_scale.float().numpy())
    if kind == "Int4Embedding":
        return int4_rows(unpack_codes(module.weight_packed, module.embedding_dim).numpy(),
                         module.weight_scale.float().numpy(), module.weight_zero_point.numpy(), module.group_size)
    if kind == "Int4WeightOnlyLinear":
        return int4_rows(module.codes().numpy(), module.weight_scale.float().numpy(),
                         module.weight_zero_point.numpy(), module.group_size)
    raise StageFailed(f"export_onnx: no block-quantized form for {kind}")


def vocabulary_plan(scheme: str, head: Optional[str], head_tied: bool) -> tuple[bool, bool, Optional[str]]:
    """(the lookup quantized, the head quantized, a note on what stays float) for a table of `scheme`.

    A 4-bit head is ONNX Runtime's MatMulNBits at about a float MatMul's speed on the CPU. An 8-bit one is
    not: computed in float arithmetic (what torch computes), 8-bit MatMulNBits ran 12-32x slower than the
    float MatMul on SmolLM2's 49,152 x 576 head (benchmarks/onnx_vocabulary.py, docs/BENCHMARKS.md); its
    fast path quantizes the activations, which torch's int8 head does not. So an int8 head stays a float
    MatMul of its dequantized values; and a head tied to an int8 table keeps the table float too, since a
    float head beside an int8 lookup would hold more than the one float table both read."""
    if scheme == "int4":
        return True, head is not None, None
    if head and head_tied:
        return False, False, (f"the int8 table and the head {head} tied to it are one float matrix in the graph "
                              "(their dequantized values): ONNX Runtime's 8-bit MatMulNBits computes a head far "
                              "slower than a float MatMul on the CPU, and a float head beside an int8 lookup would "
                              "be larger still; `embeddings: int4` writes both 4-bit")
    if head:
        return True, False, (f"the head {head} is a float MatMul of its int8 values: ONNX Runtime's 8-bit "
                             "MatMulNBits computes it far slower than a float MatMul on the CPU")
    return True, False, None


@dataclass
class QuantizedVocabulary:
    """What the exported graph's float table and head must be replaced by."""

    table: str                     # module name, for messages
    table_key: str                 # the float table's weight key (weight_key)
    table_codes: BlockCodes
    scheme: str                    # int8 or int4
    head: Optional[str] = None     # set when the head's MatMul is replaced too (vocabulary_plan)
    head_tied: bool = False
    head_key: Optional[str] = None  # an untied head's float weight key
    head_codes: Optional[BlockCodes] = None


def weight_key(weight: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(weight, dtype=np.float32).tobytes()).hexdigest()


def initializers(codes: BlockCodes, prefix: str, matmul: bool = True) -> tuple[list, dict[str, str]]:
    """The operators' shared initializers for one matrix: (tensors, role -> name). MatMulNBits' packed zero
    points only when a MatMulNBits reads them (`matmul`; GatherBlockQuantized has its own, one per byte)."""
    from onnx import numpy_helper

    tensors = [numpy_helper.from_array(codes.packed(), f"{prefix}_codes"),
               numpy_helper.from_array(codes.scales.reshape(-1), f"{prefix}_scales")]
    zeros = codes.packed_zeros() if matmul else None
    if zeros is not None:
        tensors.append(numpy_helper.from_array(zeros, f"{prefix}_zero_points"))
    return tensors, {"codes": tensors[0].name, "scales": tensors[1].name,
                     "zeros": tensors[2].name if zeros is not None else ""}


def matmul_node(node, codes: BlockCodes, names: dict[str, str], accuracy_level: Optional[int] = None):
    """MatMulNBits in place of the MatMul `node`, reading the initializers `names` (initializers)."""
    from onnx import helper

    rows, width = codes.shape
    inputs = [node.input[0], names["codes"], names["scales"]] + ([names["zeros"]] if names["zeros"] else [])
    attributes = {} if accuracy_level is None else {"accuracy_level": accuracy_level}
    return helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q{codes.bits}",
                            domain="com.microsoft", K=width, N=rows, bits=codes.bits, block_size=codes.block_size,
                            **attributes)


def _gather_nodes(node, codes: BlockCodes, names: dict[str, str], prefix: str) -> tuple[list, list]:
    """GatherBlockQuantized reading the codes as (rows, blocks, block), then its output reshaped to
    (..., width): (nodes, new initializers)."""
    from onnx import helper, numpy_helper

    rows, width = codes.shape
    blocks = codes.scales.shape[1]
    padded = blocks * codes.block_size > width  # the last block's tail is padding, cut off after the lookup
    consts = [numpy_helper.from_array(np.array([rows, blocks, 1], dtype=np.int64), f"{prefix}_scale_shape"),
              numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{prefix}_minus_one")]
    if padded:
        consts += [numpy_helper.from_array(np.array([0], dtype=np.int64), f"{prefix}_start"),
                   numpy_helper.from_array(np.array([width], dtype=np.int64), f"{prefix}_width")]
    out = node.output[0]
    nodes = [helper.make_node("Reshape", [names["scales"], consts[0].name], [f"{prefix}_scales_3d"])]
    inputs = [names["codes"], node.input[1], f"{prefix}_scales_3d"]
    if codes.zeros is not None:  # one zero point per (row, block), in the low nibble of its own byte
        consts.append(numpy_helper.from_array(codes.zeros.reshape(rows, blocks, 1).astype(np.uint8),
                                              f"{prefix}_gather_zero_points"))
        inputs.append(consts[-1].name)
    nodes += [
        helper.make_node("GatherBlockQuantized", inputs, [f"{prefix}_blocks"], name=f"{node.name}_Q{codes.bits}",
                         domain="com.microsoft", gather_axis=0, quantize_axis=2, block_size=codes.block_size,
                         bits=codes.bits),
        helper.make_node("Shape", [f"{prefix}_blocks"], [f"{prefix}_lead"], end=-2),
        helper.make_node("Concat", [f"{prefix}_lead", consts[1].name], [f"{prefix}_row_shape"], axis=0),
        helper.make_node("Reshape", [f"{prefix}_blocks", f"{prefix}_row_shape"],
                         [f"{prefix}_padded" if padded else out])]
    if padded:
        nodes.append(helper.make_node("Slice", [f"{prefix}_padded", f"{prefix}_start", f"{prefix}_width",
                                                f"{prefix}_minus_one"], [out]))
    return nodes, consts


def pack_vocabulary(model, vocabulary: QuantizedVocabulary) -> dict:
    """Replace, in place, the float Gather of the table by GatherBlockQuantized, and the head's MatMul (tied:
    reading the table, transposed; untied: its own weight) by MatMulNBits, with the torch stage's codes.
    Returns what the stage records. Refused (StageFailed) when the table or head is not found as expected."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    keys: dict[tuple[str, bool], Optional[str]] = {}

    def key_of(name: str, transposed: bool = False) -> Optional[str]:
        init = inits.get(name)
        if init is None or len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
            return None
        if (name, transposed) not in keys:
            weight = numpy_helper.to_array(init)
            keys[name, transposed] = weight_key(weight.T if transposed else weight)
        return keys[name, transposed]

    tables = {name for name in inits if key_of(name) == vocabulary.table_key}
    table_inits, table_names = initializers(vocabulary.table_codes, "vocabulary",
                                             matmul=bool(vocabulary.head and vocabulary.head_tied))
    head_inits, head_names = [], table_names
    if vocabulary.head and not vocabulary.head_tied:
        head_inits, head_names = initializers(vocabulary.head_codes, "head")
    replaced, extra_inits, counts = {}, [], {"gathers": 0, "head_matmuls": 0}
    float_weights = set(tables)
    for index, node in enumerate(model.graph.node):
        if node.op_type == "Gather" and node.input[0] in tables and not _attribute(node, "axis", 0):
            nodes, consts = _gather_nodes(node, vocabulary.table_codes, table_names, f"vocabulary_{index}")
            replaced[index] = nodes
            extra_inits += consts
            counts["gathers"] += 1
        elif node.op_type == "MatMul" and vocabulary.head:
            weight = node.input[1]
            if vocabulary.head_tied:
                source = producers.get(weight)
                hit = key_of(weight, transposed=True) == vocabulary.table_key or (
                    source is not None and source.op_type == "Transpose" and source.input[0] in tables
                    and list(_attribute(source, "perm", [1, 0])) == [1, 0])
            else:
                hit = key_of(weight, transposed=True) == vocabulary.head_key
            if hit:
                codes = vocabulary.table_codes if vocabulary.head_tied else vocabulary.head_codes
                replaced[index] = [matmul_node(node, codes, head_names)]
                counts["head_matmuls"] += 1
                float_weights.add(weight)
    if not counts["gathers"]:
        raise StageFailed(f"export_onnx: the {vocabulary.scheme} table {vocabulary.table} was not found as a Gather "
                          "of its float values in the exported graph; the exporter changed it")
    if vocabulary.head and not counts["head_matmuls"]:
        raise StageFailed(f"export_onnx: the head {vocabulary.head} was not found as a MatMul of its float weight "
                          "in the exported graph; the exporter changed it")
    _swap(model, replaced, table_inits + head_inits + extra_inits, float_weights)
    left = {i.name for i in model.graph.initializer} & float_weights
    return {**counts, "float_weights_left": sorted(left)}


def _attribute(node, name: str, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _swap(model, replaced: dict[int, list], new_inits: list, float_weights: set[str]) -> None:
    """Put the nodes of `replaced` (old node index -> new nodes) in place of the old ones, add `new_inits`,
    and drop those of `float_weights` (and a Transpose of them) that nothing reads any more."""
    import onnx

    order = []
    for index, node in enumerate(model.graph.node):
        order.extend(replaced.get(index, [node]))
    read = {name for node in order for name in node.input} | {o.name for o in model.graph.output}
    # a tied head's Transpose of the float table is read by nothing once its MatMul is gone
    order = [node for node in order if not (node.op_type == "Transpose" and node.input[0] in float_weights
                                            and not any(o in read for o in node.output))]
    del model.graph.node[:]
    model.graph.node.extend(order)
    model.graph.initializer.extend(new_inits)
    read = {name for node in order for name in node.input} | {o.name for o in model.graph.output}
    for init in [i for i in model.graph.initializer if i.name in float_weights and i.name not in read]:
        model.graph.initializer.remove(init)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
