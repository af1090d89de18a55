"""Backends that run detectors (PyTorch, ONNX Runtime, TensorRT) behind one interface
(`backend.Backend`), and the numpy host code around them.

Only `torch_backend` imports torch; the TensorRT modules import tensorrt only when an engine is
built or run (`open.open_model_file` picks the backend for a .onnx or .engine file); everything
else needs numpy, Pillow and onnxruntime.
"""
