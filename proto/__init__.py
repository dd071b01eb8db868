"""The wire contract between monitor clients and the server (protobuf/gRPC)."""
