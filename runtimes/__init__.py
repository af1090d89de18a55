"""Backends that run detectors (PyTorch, ONNX Runtime) and the numpy host code around them.

Only `torch_backend` imports torch; everything else needs numpy, Pillow and onnxruntime.
"""
