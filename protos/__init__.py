"""The project's own gRPC APIs. The *_pb2 modules are generated at install time (see setup.py)."""
