"""Pruning: unstructured and 2:4 (magnitude, Wanda, SparseGPT), structured channel and head removal with
recovery, layer by layer, and the sparse-kernel stage that runs 2:4 weights."""
