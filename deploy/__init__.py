"""detdeploy: export PyTorch detectors to ONNX/TensorRT and check them against PyTorch."""
__version__ = "0.1.0"
