"""Static INT8 quantization of detdeploy ONNX files (QDQ form, ONNX Runtime's quantizer): the
calibration set, the graph parts kept in float, sensitivity-guided exclusion. Torch-free."""
