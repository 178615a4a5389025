"""Offline pipeline: read data, train the lecture's CNNs, export them to models/ as checked ONNX."""
