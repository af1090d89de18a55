"""Parity: proof that an exported file gives PyTorch's answers. Matches detections, compares raw
outputs by name with stated tolerances, and finds the first diverging layer. Never imports the
CLI."""
