"""PyTorch -> ONNX export (issue 3)."""
