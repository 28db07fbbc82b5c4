"""Deployment for edgetag: ONNX export, quantization, TensorRT engines."""
