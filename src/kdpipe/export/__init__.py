"""Export and inference: ONNX export, onnxruntime sessions, parity and latency. Imports the layers
below it (core, data, training).
"""
