"""The Open Inference Protocol over gRPC: the same service calls as app/http/routes/v2.py, on
grpc.aio in each server process's event loop. ``inference.proto`` is the wire format;
``inference_pb2.py``/``.pyi`` are generated from it (``make grpc``)."""
