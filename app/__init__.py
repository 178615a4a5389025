"""cnnserve: CNN classifiers from models/ served over HTTP on ONNX Runtime."""
