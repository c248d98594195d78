"""Export: ONNX (with int4 codes as MatMulNBits), ONNX graph optimisation, compressed-tensors folders,
AOTInductor packages and TensorRT engines."""
