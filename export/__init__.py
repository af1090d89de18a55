"""PyTorch -> ONNX export with NMS in the graph (`exporter.export_onnx`), simplified, with metadata."""
