"""Daemon transport and identity: the gRPC factory, certificate identities, the federation PKI,
shared daemon config and the metrics HTTP endpoint.
"""
