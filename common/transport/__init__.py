"""Daemon transport and identity: gRPC factory, certificate identities, PKI, daemon config."""
