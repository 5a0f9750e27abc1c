"""pf2lora.v1: generated protobuf and gRPC code of the wire protocol, version 1."""
