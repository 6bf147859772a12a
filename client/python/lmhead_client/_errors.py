"""LMHeadError: a call the server (or the transport) refused, with its gRPC status code."""

import grpc


class LMHeadError(Exception):
    """A failed call. `code` is the grpc.StatusCode (e.g. INVALID_ARGUMENT, NOT_FOUND,
    UNIMPLEMENTED, RESOURCE_EXHAUSTED, UNAVAILABLE), `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
