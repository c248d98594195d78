"""Quantization: the quantize stage and its schemes (int8 dynamic, static with SmoothQuant, weight-only
int8 and int4 by rtn, GPTQ, AWQ or HQQ, nf4/fp4), whole or layer by layer, and the embedding tables."""
