"""RemoteLMHead: OLMo-core's LMHead.forward, run by an lmhead server over gRPC (lmhead.v1).

Thread-safety: a RemoteLMHead may be shared by threads (gRPC channels are thread-safe, and each
call in flight has a shared-memory buffer of its own).
"""

import collections
import ipaddress
import json
import os
import random
import re
import threading
import time
import warnings
import weakref
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmhead_client import _shared_memory, _tensors
from lmhead_client._errors import LMHeadError
from lmhead_client._micro_batches import SCORING_FIELDS, MicroBatchCombiner
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb
from lmhead_client._proto.lmhead.v1 import lmhead_pb2_grpc as pb_grpc

_REDUCTIONS = {
    "mean": pb.LOSS_REDUCTION_MEAN,
    "sum": pb.LOSS_REDUCTION_SUM,
    "none": pb.LOSS_REDUCTION_NONE,
}
_IMPLEMENTATIONS = {
    "default": pb.LOSS_IMPLEMENTATION_DEFAULT,
    "fused_linear": pb.LOSS_IMPLEMENTATION_FUSED_LINEAR,
}


def _wire_value(table: dict, argument: str, value):
    """table[value] (the wire enum value of a name), or ValueError naming `argument`, as
    upstream raises one for an unknown name."""
    if value not in table:
        raise ValueError(f"{argument}: expected one of {sorted(table)}, got {value!r}")
    return table[value]


def _implementation_name(wire_value: int) -> str:
    """The name of a model's configured loss implementation (lmhead.v1.LossImplementation)."""
    for name, value in _IMPLEMENTATIONS.items():
        if value == wire_value:
            return name
    return "default"
_LOSS_FIELDS = ("loss", "ce_loss", "z_loss")
# The arguments of score() that choose outputs (ScoringOptions), and the forward arguments it
# takes besides them.
_SCORING_ARGS = ("label_logprobs", "entropy", "label_rank", "top_k", "candidate_ids",
                 "segment_ids")
_SCORE_FORWARD_ARGS = ("ignore_index", "loss_reduction", "z_loss_multiplier", "loss_div_factor",
                       "logits_to_keep", "loss_implementation", "logit_tile_bytes")


class LMOutputWithLoss(NamedTuple):
    """As olmo_core.nn.lm_head.LMOutputWithLoss: logits (None when not returned), loss,
    ce_loss, z_loss (None without a z-loss)."""

    logits: Optional[object]
    loss: object
    ce_loss: object
    z_loss: Optional[object]


class Scores(NamedTuple):
    """What `RemoteLMHead.score` returns: the scoring outputs (lmhead.v1.ScoringOutputs; None
    when not asked for), the loss (None without labels) and the number of scored tokens.
    B is the batch, S' the kept positions, G = 1 + the largest kept segment id (docs/API.md
    "Scoring"); log-probabilities are float32 whatever the head's dtype."""

    label_logprobs: Optional[object] = None        # (B, S') float32; 0 where not scored
    entropy: Optional[object] = None               # (B, S') float32
    label_rank: Optional[object] = None            # (B, S') int64; 0 where not scored
    top_k_ids: Optional[object] = None             # (B, S', k) int64
    top_k_logprobs: Optional[object] = None        # (B, S', k) float32
    candidate_logprobs: Optional[object] = None    # (B, S', C) float32
    segment_logprob_sums: Optional[object] = None  # (B, G) float32
    segment_token_counts: Optional[object] = None  # (B, G) int64
    segment_is_greedy: Optional[object] = None     # (B, G) bool
    segment_entropy_sums: Optional[object] = None  # (B, G) float32
    loss: Optional[object] = None                  # as forward's, for loss_reduction
    num_scored_tokens: int = 0


class StreamMicroBatch(NamedTuple):
    """One micro-batch of `iter_forward_stream`: rows [start, stop) of the batch, what
    `forward` returns for them, and how many of their tokens were scored."""

    start: int
    stop: int
    output: object
    num_scored_tokens: int


# Old public names, kept for one release: each still works, with a DeprecationWarning.
_DEPRECATED_NAMES = {"StreamChunk": "StreamMicroBatch"}


def _deprecated_name(module: str, name: str, namespace: dict):
    """The object a deprecated name of `module` stands for (module __getattr__): warns with a
    DeprecationWarning; AttributeError for a name that is not one."""
    if name not in _DEPRECATED_NAMES:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new = _DEPRECATED_NAMES[name]
    warnings.warn(f"{module}.{name} is deprecated, use {new} (the old name goes in the next "
                  "release)", DeprecationWarning, stacklevel=3)
    return namespace[new]


def __getattr__(name: str):
    return _deprecated_name(__name__, name, globals())


# Micro-batches of a streamed job hold this much of its hidden states unless told otherwise.
DEFAULT_MAX_MICRO_BATCH_BYTES = 64 << 20


def _renamed_keyword(kwargs: dict, old: str, new: str, value, method: str, stacklevel: int = 3):
    """The value of keyword `new` (`value`; None when not given), or of its deprecated name `old`
    when kwargs has it (taken out of kwargs, with a DeprecationWarning for the caller
    `stacklevel` - 1 frames up). TypeError when both are given."""
    if old not in kwargs:
        return value
    old_value = kwargs.pop(old)
    if value is not None:
        raise TypeError(f"{method}() got both {new}= and its deprecated name {old}=; "
                        f"give {new}= alone")
    warnings.warn(f"{method}(): {old}= is deprecated, use {new}= (the old name goes in the next "
                  "release)", DeprecationWarning, stacklevel=stacklevel)
    return old_value


def _renamed_forward_args(forward_args: dict, method: str, stacklevel: int = 4) -> None:
    """Moves forward's deprecated keyword fused_chunk_bytes= in forward_args to logit_tile_bytes=
    (_renamed_keyword), for the public method that was called with them."""
    if "fused_chunk_bytes" in forward_args:
        forward_args["logit_tile_bytes"] = _renamed_keyword(
            forward_args, "fused_chunk_bytes", "logit_tile_bytes",
            forward_args.get("logit_tile_bytes"), method, stacklevel)


def _stream_keywords(forward_args: dict, max_micro_batch_bytes: Optional[int], method: str
                     ) -> Optional[int]:
    """The micro-batch budget of a streaming method (max_micro_batch_bytes, or max_chunk_bytes=,
    its deprecated name, taken out of forward_args), after _renamed_forward_args."""
    max_micro_batch_bytes = _renamed_keyword(forward_args, "max_chunk_bytes",
                                             "max_micro_batch_bytes", max_micro_batch_bytes,
                                             method, stacklevel=4)
    _renamed_forward_args(forward_args, method, stacklevel=5)
    return max_micro_batch_bytes


def _reraise(error: grpc.RpcError):
    raise LMHeadError(error.code(), error.details() or "") from None


def retry_service_config(max_attempts: int, round_robin: bool = False) -> str:
    """The gRPC service config of a channel that makes up to `max_attempts` (2 to 5; 1: no
    retry policy) attempts per lmhead.v1.LMHeadService call, and with `round_robin` spreads
    calls over every address its target resolves to (gRPC's round_robin policy). The C++
    client's RetryServiceConfig gives the same."""
    config = {}
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    if max_attempts > 1:
        config["methodConfig"] = [{
            "name": [{"service": "lmhead.v1.LMHeadService"}],
            "retryPolicy": {
                "maxAttempts": max_attempts, "initialBackoff": "0.1s", "maxBackoff": "5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"],
            },
        }]
    return json.dumps(config)


# Target schemes whose name may resolve to several servers: such a channel gets round_robin.
_REPLICA_SCHEMES = ("dns:", "ipv4:", "ipv6:")
# Any scheme gRPC's Python channels know (a list entry may not have one).
_SCHEME = re.compile(r"^(dns|ipv4|ipv6|unix|unix-abstract|vsock|xds|google-c2p):", re.I)


def channel_target(address) -> Tuple[str, bool]:
    """(the gRPC target, whether calls are spread over replicas) for `address`:

    - "host:port": that target, one server (gRPC's default pick_first: unchanged);
    - a gRPC target with a scheme, as it is; "dns:///NAME:PORT", "ipv4:..." and "ipv6:..."
      name replicas (every address the name resolves to, or that the list holds);
    - several addresses, a list or one comma-separated string of "IP:PORT" ("[IPv6]:PORT"),
      all IPv4 or all IPv6: the target "ipv4:A:P,B:Q" (or "ipv6:..."), replicas. gRPC resolves
      one name per channel, so a host name in such a list is a ValueError; give one
      "dns:///NAME:PORT" whose DNS records list every replica instead.
    """
    entries = [address] if isinstance(address, str) else list(address)
    if len(entries) == 1 and isinstance(entries[0], str) and _SCHEME.match(entries[0]):
        return entries[0], entries[0].lower().startswith(_REPLICA_SCHEMES)
    entries = [part.strip() for entry in entries for part in str(entry).split(",")]
    if not entries or not all(entries):
        raise ValueError(f"address: expected HOST:PORT, several IP:PORT separated by commas, "
                         f"or a gRPC target such as dns:///NAME:PORT; got {address!r}")
    if len(entries) == 1:
        return entries[0], False
    families = set()
    for entry in entries:
        match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", entry)
        host = match and (match.group(1) or match.group(3))
        port = match and int(match.group(2) or match.group(4))
        try:
            ip = ipaddress.ip_address(host) if host else None
        except ValueError:
            ip = None
        if ip is None or not 0 < port < 65536 or (ip.version == 6) != (match.group(1) is not None):
            raise ValueError(
                f"address: {entry!r} in a list of several addresses must be IP:PORT (an IPv4 "
                "address, or an IPv6 one in brackets, and a port): gRPC resolves one name per "
                "channel; for host names give one dns:///NAME:PORT whose DNS records list "
                "every replica")
        families.add(ip.version)
    if len(families) > 1:
        raise ValueError(f"address: {address!r} mixes IPv4 and IPv6 addresses; a channel "
                         "takes a list of one family (ipv4: or ipv6: targets)")
    return ("ipv4:" if families == {4} else "ipv6:") + ",".join(entries), True


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `headers` ((key, value) pairs: the bearer token, trace ids) to every call of a
    channel."""

    def __init__(self, headers: List[Tuple[str, str]]):
        self._headers = headers

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout,
                            list(details.metadata or []) + self._headers, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


def _pem(value, variable: str, name: str) -> Optional[bytes]:
    """PEM bytes from `value` (PEM bytes or text, or a file's path), else from the file
    $`variable` names."""
    if value is None:
        value = os.environ.get(variable) or None
        if value is None:
            return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN "):
        return value.encode()
    try:
        with open(value, "rb") as file:
            pem = file.read()
    except OSError as error:
        raise ValueError(f"{name}: cannot read {value}: {error.strerror}") from None
    if b"-----BEGIN " not in pem:
        raise ValueError(f"{name}: {value} is not a PEM file")
    return pem


class RemoteLMHead:
    """A client of one lmhead server, or of several replicas serving the same models.

    address: "host:port"; or several replicas (docs/API.md "Replicas"): a list (or one
      comma-separated string) of "IP:PORT", all IPv4 or all IPv6, or one gRPC target that
      names several, "dns:///NAME:PORT" (e.g. a headless Kubernetes Service) or "ipv4:A:P,B:Q".
      Calls to replicas are spread over them by gRPC's round_robin policy; a replica that goes
      away is left out until it is back, and a call it fails with UNAVAILABLE (refused, or
      lost with its connection before any answer) is retried on another as max_attempts says.
      A host name in a list is a ValueError (gRPC resolves one name per channel).
    model: the model every call uses (None: the server's default).
    timeout: seconds per call (a stream's whole duration); None: no deadline.
    max_attempts: attempts per call, 1 to 5. Calls refused with RESOURCE_EXHAUSTED or
      UNAVAILABLE are retried by gRPC's own retry policy (the channel's service config) after
      an exponential backoff with jitter, about 0.1 s doubling up to 5 s, within the deadline;
      not when the server answers that the same call would fail again (a limit it enforces),
      and not once a stream has received an answer, except that a streamed job whose stream
      ends UNAVAILABLE after answers (its server went away) carries on in a new stream from
      its first micro-batch not answered (docs/API.md "Retries"). 1: no retry (nor failover
      to another replica). Default 5.
    shared_memory: "auto" (default): on a server started with --allow_shared_memory and on this
      host, calls that move at least 1 MiB (hidden states, labels, returned logits) pass their
      tensors through shared memory instead of the messages (a CUDA tensor by CUDA IPC, without
      a copy to the host); if the server refuses, every call goes inline from then on. "on":
      every call uses shared memory, and LMHeadError says why when it cannot. "off": never.
      Results are the same bits either way (client/python/README.md, "Shared memory").
      With replicas "auto" is "off", and "on" a ValueError: a session's regions belong to one
      server's connection.
    auth_token: sent with every call as `authorization: Bearer <auth_token>`, for a server
      started with --auth_token_file; None (default): the LMHEAD_AUTH_TOKEN environment
      variable, if set and not empty.
    metadata: (key, value) pairs sent with every call, e.g. [("traceparent", "00-...")] (a W3C
      trace context) or [("x-request-id", "job-42")]: the server logs every line of the call
      under that id and echoes it (docs/API.md "Operations"). Keys are lower-case.
    tls: speak TLS (docs/API.md "TLS"); implied by any of the four below. tls_roots: the CAs
      the server's certificate must chain to, a PEM file's path or its contents (None: the
      LMHEAD_TLS_ROOTS file, else gRPC's default roots); tls_cert and tls_key: this client's
      certificate chain and key for a mutual-TLS server, both or neither (None: LMHEAD_TLS_CERT
      and LMHEAD_TLS_KEY). tls_server_name: the name the server's certificate must be valid
      for, sent as the calls' authority (None: the address's host; with a list of replicas,
      the first one's, so give the name every replica's certificate holds).
    Messages of any size are allowed on the client side (the server enforces its limits).
    """

    def __init__(self, address: Union[str, Sequence[str]], model: Optional[str] = None,
                 timeout: Optional[float] = None, max_attempts: int = 5,
                 shared_memory: str = "auto", auth_token: Optional[str] = None,
                 metadata: Sequence[Tuple[str, str]] = (), tls: bool = False, tls_roots=None,
                 tls_cert=None, tls_key=None, tls_server_name: Optional[str] = None):
        if not 1 <= max_attempts <= 5:
            raise ValueError(f"max_attempts: expected 1 to 5, got {max_attempts}")
        if shared_memory not in _shared_memory.MODES:
            raise ValueError(f"shared_memory: expected one of {list(_shared_memory.MODES)}, "
                             f"got {shared_memory!r}")
        self._target, replicas = channel_target(address)
        if replicas and shared_memory == "on":
            raise ValueError("shared_memory='on' needs one server: a session's regions belong "
                             f"to one server's connection, and {address!r} names replicas")
        if replicas:
            shared_memory = "off"
        # As given (a list joined by commas): for messages.
        self.address = address if isinstance(address, str) else ",".join(address)
        self.model = model
        self.timeout = timeout
        self._max_attempts = max_attempts
        options = [
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
        ]
        if max_attempts > 1 or replicas:
            options.append(("grpc.service_config",
                            retry_service_config(max_attempts, round_robin=replicas)))
        if max_attempts > 1:
            options += [
                ("grpc.enable_retries", 1),
                # gRPC keeps a call's sent messages for a retry up to this size (256 KiB).
                ("grpc.per_rpc_retry_buffer_size", 256 << 20),
            ]
        else:
            options.append(("grpc.enable_retries", 0))
        self._options = options
        if auth_token is None:
            auth_token = os.environ.get("LMHEAD_AUTH_TOKEN", "")
        auth_token = auth_token.strip() or None  # a token read from a file keeps its newline
        headers = [("authorization", f"Bearer {auth_token}")] if auth_token else []
        for key, value in metadata:
            if key == "authorization":
                raise ValueError("metadata: the bearer token goes in auth_token")
            if not re.fullmatch(r"[0-9a-z._-]+", key):
                raise ValueError(f"metadata: keys are lower-case letters, digits, '.', '_' and "
                                 f"'-', got {key!r}")
            # gRPC's binary headers ("-bin" keys) carry bytes, the others text.
            headers.append((key, value if key.endswith("-bin") else str(value)))
        self._interceptors = [_Metadata(headers)] if headers else []
        pems = [_pem(value, variable, name) for value, variable, name in (
            (tls_roots, "LMHEAD_TLS_ROOTS", "tls_roots"), (tls_cert, "LMHEAD_TLS_CERT", "tls_cert"),
            (tls_key, "LMHEAD_TLS_KEY", "tls_key"))]
        if (pems[1] is None) != (pems[2] is None):
            raise ValueError("tls_cert and tls_key go together")
        tls = tls or tls_server_name is not None or any(pem is not None for pem in pems)
        self._credentials = grpc.ssl_channel_credentials(pems[0], pems[2], pems[1]) if tls else None
        if tls and (tls_server_name is not None or self._target.lower().startswith(
                ("ipv4:", "ipv6:"))):
            # The certificate is checked against the channel's authority, which for an ipv4: or
            # ipv6: list would be the whole list.
            authority = tls_server_name or self._target.split(":", 1)[1].split(",")[0]
            options.append(("grpc.default_authority", authority))
        self._channel = self._new_channel(options)
        self._stub = pb_grpc.LMHeadServiceStub(self._channel)
        # Forward and ForwardStream with requests serialised by WireRequest (one copy of the
        # hidden states instead of three).
        method = "/lmhead.v1.LMHeadService/"
        self._forward = self._channel.unary_unary(
            method + "Forward", request_serializer=_tensors.WireRequest.serialize,
            response_deserializer=pb.ForwardResponse.FromString)
        # ForwardStream on this channel, then on the channels parallel streams add (each its own
        # connection: a local subchannel pool keeps gRPC from sharing one between channels).
        self._forward_streams = [self._stream_method(self._channel)]
        self._more_channels: List[grpc.Channel] = []
        self._channels_lock = threading.Lock()
        # The SharedMemory session lives on the main channel: regions are found only by calls
        # on the connection that registered them. Ended by close(), or when this client is
        # garbage-collected (the finalizer holds the transport, not the client).
        self._shm: Optional[_shared_memory.Transport] = None
        if shared_memory != "off":
            self._shm = _shared_memory.Transport(self._channel, address, shared_memory)
            weakref.finalize(self, self._shm.close)
        self._model_info: Optional[pb.ModelInfo] = None

    def _new_channel(self, options: list) -> grpc.Channel:
        """A channel to the server: TLS or plaintext, with the token's interceptor."""
        channel = (grpc.secure_channel(self._target, self._credentials, options=options)
                   if self._credentials is not None
                   else grpc.insecure_channel(self._target, options=options))
        return grpc.intercept_channel(channel, *self._interceptors)

    @staticmethod
    def _stream_method(channel: grpc.Channel):
        return channel.stream_stream(
            "/lmhead.v1.LMHeadService/ForwardStream",
            request_serializer=_tensors.WireRequest.serialize,
            response_deserializer=pb.ForwardResponse.FromString)

    def _stream_methods(self, count: int) -> list:
        """ForwardStream on `count` channels (connections), opened as needed."""
        with self._channels_lock:
            while len(self._forward_streams) < count:
                channel = self._new_channel(
                    self._options + [("grpc.use_local_subchannel_pool", 1)])
                self._more_channels.append(channel)
                self._forward_streams.append(self._stream_method(channel))
            return self._forward_streams[:count]

    def close(self) -> None:
        """Ends the shared-memory session (the server unregisters its regions), unmaps the
        client's shared memory, and closes the channels."""
        if self._shm is not None:
            self._shm.close()
        self._channel.close()
        for channel in self._more_channels:
            channel.close()

    def __enter__(self) -> "RemoteLMHead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def shared_memory_active(self) -> bool:
        """Whether calls can pass tensors through shared memory now: a session is open and the
        server accepted it (never before the first call large enough to use it)."""
        return self._shm is not None and self._shm.active

    # -- Models and health ---------------------------------------------------------------------

    def health(self, service: str = "") -> str:
        """The standard health check's status name ("SERVING", "NOT_SERVING", ...); `service`
        "" asks about the whole server, "lmhead.v1.LMHeadService" about the service."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                  timeout=self.timeout)
        except grpc.RpcError as e:
            _reraise(e)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def list_models(self) -> List[pb.ModelInfo]:
        """Every loaded model (lmhead.v1.ModelInfo messages), sorted by name."""
        try:
            return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)
        except grpc.RpcError as e:
            _reraise(e)

    def get_model(self, name: Optional[str] = None) -> pb.ModelInfo:
        """One model's lmhead.v1.ModelInfo; name None: this client's model (or the default)."""
        name = self.model if name is None else name
        try:
            return self._stub.GetModel(pb.GetModelRequest(name=name or ""), timeout=self.timeout)
        except grpc.RpcError as e:
            _reraise(e)

    # -- Model administration (lmhead.v1.ModelAdminService) -------------------------------------

    def load_model(self, name: str, path: str, *, replace: bool = False,
                   timeout: Optional[float] = 300) -> pb.ModelInfo:
        """Loads the safetensors weights at `path`, relative to the server's --model_repository,
        as model `name` while the server serves; returns its lmhead.v1.ModelInfo. The client's
        auth_token must be one of the server's administrator tokens (--admin_token_file).
        `replace`: replace a loaded model of that name (its running calls finish on it).
        `timeout`: seconds (reading large weights takes a while); None for none.
        Raises LMHeadError: ALREADY_EXISTS (name taken, not `replace`), INVALID_ARGUMENT or
        NOT_FOUND (bad name or path, a file that is not a head), FAILED_PRECONDITION (model
        administration off, or no repository), UNAUTHENTICATED (not an administrator's token).
        """
        request = pb.LoadModelRequest(name=name, path=path, replace=replace)
        try:
            return pb_grpc.ModelAdminServiceStub(self._channel).LoadModel(request, timeout=timeout)
        except grpc.RpcError as e:
            _reraise(e)

    def unload_model(self, name: str) -> None:
        """Stops serving model `name` (calls already running on it finish); an administrator's
        token as for load_model. Raises LMHeadError: NOT_FOUND when no model has that name."""
        try:
            pb_grpc.ModelAdminServiceStub(self._channel).UnloadModel(
                pb.UnloadModelRequest(name=name), timeout=self.timeout)
        except grpc.RpcError as e:
            _reraise(e)

    # -- Forward -------------------------------------------------------------------------------

    def forward(self, x, *, labels=None, ignore_index: int = -100, loss_reduction: str = "mean",
                z_loss_multiplier: Optional[float] = None, loss_div_factor=None,
                return_logits: Optional[bool] = None, logits_to_keep=0,
                loss_implementation: Optional[str] = None, logits_dtype=None,
                logit_tile_bytes: Optional[int] = None, return_argmax: bool = False,
                **deprecated):
        """LMHead.forward(x, ...) on the server; the arguments are upstream's.

        x: (B, S, d_model) hidden states, a torch tensor (float32/bfloat16/float16) or a numpy
        array (float32/float16; `BF16(bits)` for bfloat16). labels, logits_to_keep (an int or
        a (B, K) int64 tensor) and loss_div_factor (a number or a tensor) likewise.
        Extensions: loss_implementation ("default" or "fused_linear") overrides the model's for
        this call; logits_dtype (e.g. "bf16", torch.float32) is the dtype of returned logits;
        logit_tile_bytes bounds the tile of logits fused_linear holds at once (its old name
        fused_chunk_bytes= still works for one release, with a DeprecationWarning);
        return_argmax=True also
        returns each kept position's most likely token id, (B, S') int64, logits.argmax(-1)
        (with fused_linear found without logits), as a pair (output, argmax).

        Returns the logits when `labels` is None, else an LMOutputWithLoss; torch tensors when
        x is a torch tensor, numpy arrays otherwise (bfloat16 values as float32).
        Raises LMHeadError (with the gRPC status code) when the server refuses the call.
        """
        logit_tile_bytes = _renamed_keyword(deprecated, "fused_chunk_bytes", "logit_tile_bytes",
                                            logit_tile_bytes, "forward")
        for name in deprecated:
            raise TypeError(f"forward() got an unexpected keyword argument {name!r}")
        args = dict(
            labels=labels, ignore_index=ignore_index, loss_reduction=loss_reduction,
            z_loss_multiplier=z_loss_multiplier, loss_div_factor=loss_div_factor,
            return_logits=return_logits, logits_to_keep=logits_to_keep,
            loss_implementation=loss_implementation, logits_dtype=logits_dtype,
            logit_tile_bytes=logit_tile_bytes, return_argmax=return_argmax)
        fields = self._call(x, args)[1]
        return _output(fields, _tensors.is_torch(x), labels is not None, return_argmax)

    def score(self, hidden_states, labels=None, *, label_logprobs: bool = False,
              entropy: bool = False, label_rank: bool = False, top_k: int = 0,
              candidate_ids=None, segment_ids=None, **forward_args) -> Scores:
        """Scoring outputs for evaluation (docs/API.md "Scoring"), computed by the server from
        the same pass as the loss and returned instead of the logits (never the logits).

        hidden_states: (B, S, d_model), as forward's x. labels: (B, S) int64/int32 target ids;
        label_logprobs, label_rank and segment_ids need them (ValueError without). Outputs:
          label_logprobs: log p(label) per kept position (0 where the label is ignore_index);
          entropy: -sum p log p per kept position;
          label_rank: 1 + the number of tokens with a strictly larger logit than the label's;
          top_k (0 to 64): the k most likely ids per kept position and their log-probabilities,
            by descending logit, then ascending id;
          candidate_ids: (C,) token ids for every kept position, or (B, S', C) per position,
            int64/int32: their log-probabilities (B, S', C);
          segment_ids: (B, S) int64/int32 like labels (sliced by logits_to_keep as labels are):
            per position the continuation it belongs to, in [0, S'), or -1 for none; gives per
            row and continuation the sum of log p(label), the scored token count, whether every
            label was the argmax and the summed entropy, (B, G).
        forward_args: forward's ignore_index, loss_reduction, z_loss_multiplier,
        loss_div_factor, logits_to_keep, loss_implementation and logit_tile_bytes.
        Without labels every kept position is scored for entropy, top_k and candidates (at least
        one of them must be asked for; ValueError otherwise), and there is no loss.

        Returns Scores: torch tensors when hidden_states is a torch tensor, numpy arrays
        otherwise, as forward. Raises LMHeadError when the server refuses the call (an
        INVALID_ARGUMENT names the field, e.g. "options.scoring.top_k: ...").
        """
        _renamed_forward_args(forward_args, "score")
        has_labels, args = _score_arguments(
            hidden_states, labels, dict(label_logprobs=label_logprobs, entropy=entropy,
                                        label_rank=label_rank, top_k=top_k,
                                        candidate_ids=candidate_ids, segment_ids=segment_ids),
            forward_args, "score")
        response, fields = self._call(hidden_states, args)
        return _scores(fields, response.num_scored_tokens, _tensors.is_torch(hidden_states),
                       has_labels)

    def score_stream(self, hidden_states, labels=None, *, micro_batch_size: Optional[int] = None,
                     max_micro_batch_bytes: Optional[int] = None, parallel_streams: int = 4,
                     **score_args) -> Scores:
        """score(hidden_states, labels, **score_args) for jobs of any size, sent in
        micro-batches of rows as forward_stream sends them, with the same result as one score
        call: the per-position outputs are concatenated along the batch, the per-continuation
        outputs (B, G) too after padding each micro-batch's to the job's G as one call has an
        absent continuation (count 0, sums 0, is_greedy true), and the loss combined as
        forward_stream combines it. Labels, segment_ids, a (B, S', C) candidate_ids and a
        (B, K) logits_to_keep are split with the rows."""
        max_micro_batch_bytes = _stream_keywords(score_args, max_micro_batch_bytes,
                                                 "score_stream")
        scoring = {name: score_args.pop(name) for name in _SCORING_ARGS if name in score_args}
        has_labels, args = _score_arguments(hidden_states, labels, scoring, score_args,
                                            "score_stream")
        combined, scored = self._stream_job(hidden_states, micro_batch_size,
                                            max_micro_batch_bytes, parallel_streams, args)
        return _scores(combined, scored, _tensors.is_torch(hidden_states), has_labels)

    def iter_forward_stream(self, x, *, micro_batch_size: Optional[int] = None,
                            max_micro_batch_bytes: Optional[int] = None,
                            **forward_args) -> Iterator[StreamMicroBatch]:
        """Runs forward over one ForwardStream call in micro-batches of rows of x (as
        forward_stream splits them), yielding each micro-batch's result as it arrives (see
        StreamMicroBatch). Each micro-batch is reduced on its own: "mean" gives per-micro-batch
        means. `forward_stream` combines them."""
        max_micro_batch_bytes = _stream_keywords(forward_args, max_micro_batch_bytes,
                                                 "iter_forward_stream")
        if "parallel_streams" in forward_args:
            raise TypeError("iter_forward_stream sends one stream; parallel_streams is "
                            "forward_stream's")
        _refuse_scoring(forward_args, "iter_forward_stream")
        for start, stop, response, fields in self._resuming(x, micro_batch_size,
                                                            max_micro_batch_bytes, forward_args):
            output = _output(fields, _tensors.is_torch(x), forward_args.get("labels") is not None,
                             forward_args.get("return_argmax", False))
            yield StreamMicroBatch(start, stop, output, response.num_scored_tokens)

    def forward_stream(self, x, *, micro_batch_size: Optional[int] = None,
                       max_micro_batch_bytes: Optional[int] = None, parallel_streams: int = 4,
                       **forward_args):
        """forward(x, **forward_args) for jobs of any size: x is split along the batch into
        micro-batches (`micro_batch_size` rows, or as many as fit `max_micro_batch_bytes` of
        hidden states, default 64 MiB; `max_chunk_bytes`, its old name, still works for one
        release, with a DeprecationWarning), sent over one ForwardStream, and the answers
        combined into what one forward call returns, by the rule of docs/API.md "Combining
        micro-batches" (the C++ client and the CLI follow the same rule):

        - logits, argmax and "none" losses: concatenated along the batch.
        - "sum" and "mean": each micro-batch is sent as "sum" without loss_div_factor; then
          S / d for "sum" and S / n / d for "mean" (S the float64 sum of the sums, n the scored
          tokens, d the loss_div_factor), rounded to the losses' dtype. With no scored token
          "mean" is NaN for the default implementation and 0 for fused_linear, as upstream.
        loss_div_factor must be a number for "mean"/"sum" (ValueError otherwise); for "none" a
        tensor with B rows is split with the batch, and one of rank 2 or less that broadcasts
        is sent whole. Rows never interact in LMHead.forward, so nothing else changes.

        parallel_streams: the micro-batches are spread over this many ForwardStream calls at
        once, each on a connection of its own, a run of consecutive micro-batches each; the
        answers are combined in the job's order, so the result is exactly one stream's. When a
        stream fails the streams after it are cancelled and the job raises the first failure in
        the job's order, its " (micro-batch N)" counted in the job. Each stream holds one of
        the server's --max_open_streams (64 by default) while it runs. Default 4 (on an H200
        host 4 streams moved a 256 MiB job 1.22 x faster than 1; 8 and 16 no more). With shared
        memory the micro-batches go over the main channel's one stream whatever this says: the
        regions belong to its connection, and the bytes no longer cross a socket.
        """
        max_micro_batch_bytes = _stream_keywords(forward_args, max_micro_batch_bytes,
                                                 "forward_stream")
        _refuse_scoring(forward_args, "forward_stream")
        combined = self._stream_job(x, micro_batch_size, max_micro_batch_bytes, parallel_streams,
                                    forward_args)[0]
        combined = {name: _tensors.to_user(decoded, _tensors.is_torch(x))
                    for name, decoded in combined.items()}
        has_labels = forward_args.get("labels") is not None
        output = (LMOutputWithLoss(*(combined.get(name) for name in ("logits",) + _LOSS_FIELDS))
                  if has_labels else combined.get("logits"))
        return (output, combined.get("argmax")) if forward_args.get("return_argmax") else output

    # -- Internals -----------------------------------------------------------------------------

    def _call(self, x, args: dict) -> Tuple[pb.ForwardResponse, Dict[str, _tensors.Decoded]]:
        """One Forward call of forward(x, **args): the response and its decoded outputs."""
        wire, lease = self._prepare(x, args)
        try:
            try:
                response = self._forward(wire, timeout=self.timeout)
            except grpc.RpcError as e:
                error = LMHeadError(e.code(), e.details() or "")
                if lease is None:
                    raise error from None
                response = self._forward_again(x, args, wire, lease, error)
            return response, _shared_memory.decode_outputs(response, lease)
        finally:
            if lease is not None:
                lease.release()

    def _stream_job(self, x, micro_batch_size, max_micro_batch_bytes, parallel_streams,
                    forward_args) -> Tuple[Dict[str, _tensors.Decoded], int]:
        """forward_stream's job: the micro-batches' outputs combined (docs/API.md "Combining
        micro-batches"), and the scored tokens."""
        if (not isinstance(parallel_streams, (int, np.integer))
                or isinstance(parallel_streams, bool) or parallel_streams < 1):
            raise ValueError(f"parallel_streams must be a positive integer, got "
                             f"{parallel_streams!r}")
        reduction = forward_args.get("loss_reduction", "mean")
        _wire_value(_REDUCTIONS, "loss_reduction", reduction)  # before it is sent as "sum"
        divisor = forward_args.get("loss_div_factor")
        sent_args = dict(forward_args)
        if reduction != "none":
            if divisor is not None and not isinstance(divisor, (int, float, np.number)):
                raise ValueError("loss_div_factor: a tensor divisor cannot be applied to a "
                                 f"'{reduction}' combined from micro-batches; pass a number")
            sent_args["loss_reduction"] = "sum"
            sent_args["loss_div_factor"] = None
        combiner = MicroBatchCombiner(
            reduction, None if reduction == "none" or divisor is None else float(divisor),
            lambda: self._implementation(forward_args))
        if parallel_streams > 1 and self._shared_memory_for(x, micro_batch_size,
                                                            max_micro_batch_bytes, sent_args):
            parallel_streams = 1
        for response, fields in self._parallel_streams(x, micro_batch_size,
                                                       max_micro_batch_bytes, sent_args,
                                                       parallel_streams):
            combiner.add(response, fields)
        return combiner.finish(), combiner.num_scored_tokens

    def _prepare(self, x, args: dict, shared_memory: bool = True
                 ) -> Tuple[_tensors.WireRequest, Optional[_shared_memory.Lease]]:
        """The request of forward(x, **args), and the shared memory it holds (None: inline)."""
        wire = _tensors.WireRequest(self._request(**args))
        lease = None
        if shared_memory and self._shm is not None:
            lease = self._shm.prepare(wire, x, args.get("labels"),
                                      lambda: self._logits_layout(x, args))
        placed = lease.placed if lease is not None else ()
        if "hidden_states" not in placed:
            wire.add(_tensors.WireRequest.HIDDEN_STATES, x)
        if args.get("labels") is not None and "labels" not in placed:
            wire.add(_tensors.WireRequest.LABELS, args["labels"])
        return wire, lease

    def _forward_again(self, x, args: dict, wire: _tensors.WireRequest,
                       lease: _shared_memory.Lease, error: LMHeadError) -> pb.ForwardResponse:
        """The answer to a call that used shared memory and failed with `error`, sent again
        when the failure was the transport's: logits the server would not write where this
        client expected (its picture of the model was stale), or regions lost with the session
        ("auto": inline). Else raises `error`."""
        if _shared_memory.lost_regions(error):
            lease.stale = True  # its buffer and registration are not used again
        if (error.code == grpc.StatusCode.INVALID_ARGUMENT
                and error.details.startswith("outputs.") and wire.small.HasField("outputs")):
            self._model_info = None
            wire.small.ClearField("outputs")  # the logits come back in the response instead
        elif self._shm.retry_inline(error):
            lease.release()
            wire = self._prepare(x, args, shared_memory=False)[0]
        else:
            raise error from None
        try:
            return self._forward(wire, timeout=self.timeout)
        except grpc.RpcError as e:
            _reraise(e)

    def _logits_layout(self, x, args: dict) -> Optional[_tensors.TensorLayout]:
        """The layout of the logits forward(x, **args) returns, None when it returns none (or
        it cannot be told: the logits then come back in the response)."""
        labels = args.get("labels")
        if args.get("return_logits") is False:
            return None
        try:
            info = self._model_info
            if info is None:
                info = self._model_info = self.get_model()
            implementation = (args.get("loss_implementation")
                              or _implementation_name(info.config.loss_implementation))
            if labels is not None and implementation != "default":
                return None
            batch, length = int(x.shape[0]), int(x.shape[1])
            keep = args.get("logits_to_keep", 0)
            if isinstance(keep, (int, np.integer)):
                kept = length - _kept_start(int(keep), length)
            else:
                kept = int(keep.shape[1])
            dtype = args.get("logits_dtype")
            dtype = (_tensors.wire_dtype(dtype) if dtype is not None
                     else info.dtype or pb.DATA_TYPE_FP32)
            return _tensors.TensorLayout((batch, kept, int(info.vocab_size)), dtype)
        except (LMHeadError, KeyError, ValueError, TypeError, AttributeError, IndexError):
            return None  # the server's answer will say what is wrong

    def _shared_memory_for(self, x, micro_batch_size, max_micro_batch_bytes,
                           forward_args) -> bool:
        """Whether the micro-batches of this job would go through shared memory."""
        if self._shm is None:
            return False
        bounds = _micro_batches(x, micro_batch_size, max_micro_batch_bytes)
        rows = bounds[0][1] - bounds[0][0]
        row_bytes = int(np.prod(x.shape[1:])) * _itemsize(x) if len(x.shape) else 0
        return self._shm.wants(rows * row_bytes)

    def _request(self, *, labels=None, ignore_index=-100, loss_reduction="mean",
                 z_loss_multiplier=None, loss_div_factor=None, return_logits=None,
                 logits_to_keep=0, loss_implementation=None, logits_dtype=None,
                 logit_tile_bytes=None, return_argmax=False, label_logprobs=False,
                 entropy=False, label_rank=False, top_k=0, candidate_ids=None,
                 segment_ids=None) -> pb.ForwardRequest:
        """The request's small fields (the hidden states and labels are added by _prepare)."""
        options = pb.ForwardOptions(
            ignore_index=int(ignore_index),
            loss_reduction=_wire_value(_REDUCTIONS, "loss_reduction", loss_reduction))
        if z_loss_multiplier is not None:
            options.z_loss_multiplier = float(z_loss_multiplier)
        if isinstance(loss_div_factor, (int, float, np.number)):
            options.loss_div_factor_value = float(loss_div_factor)
        elif loss_div_factor is not None:
            options.loss_div_factor_tensor.CopyFrom(_tensors.encode(loss_div_factor))
        if return_logits is not None:
            options.return_logits = bool(return_logits)
        if isinstance(logits_to_keep, (int, np.integer)):
            options.logits_to_keep_count = int(logits_to_keep)
        else:
            options.logits_to_keep_positions.CopyFrom(_tensors.encode(logits_to_keep))
        if logits_dtype is not None:
            options.logits_dtype = _tensors.wire_dtype(logits_dtype)
        if logit_tile_bytes is not None:
            options.logit_tile_bytes = int(logit_tile_bytes)
        options.return_argmax = bool(return_argmax)
        scoring = pb.ScoringOptions(label_logprobs=bool(label_logprobs), entropy=bool(entropy),
                                    label_rank=bool(label_rank), top_k=int(top_k))
        if candidate_ids is not None:
            scoring.candidate_ids.CopyFrom(_tensors.encode(candidate_ids))
        if segment_ids is not None:
            scoring.segment_ids.CopyFrom(_tensors.encode(segment_ids))
        if scoring.ByteSize():  # asked for something (absent: no scoring)
            options.scoring.CopyFrom(scoring)

        request = pb.ForwardRequest(model=self.model or "", options=options)
        if loss_implementation is not None:
            request.config.loss_implementation = _wire_value(
                _IMPLEMENTATIONS, "loss_implementation", loss_implementation)
        return request

    def _parallel_streams(self, x, micro_batch_size, max_micro_batch_bytes, forward_args,
                          streams: int) -> List[Tuple[pb.ForwardResponse, Dict]]:
        """(answer, its decoded outputs) for every micro-batch of x, in order, over up to
        `streams` ForwardStream calls at once, each given a run of consecutive micro-batches."""
        bounds = _micro_batches(x, micro_batch_size, max_micro_batch_bytes)
        streams = min(streams, len(bounds))
        if streams == 1:
            return [(r, f) for _, _, r, f in self._resuming(x, micro_batch_size,
                                                            max_micro_batch_bytes, forward_args)]
        size = bounds[1][0] - bounds[0][0]  # rows per micro-batch (all but the last)
        batch = int(x.shape[0])
        row_args = _row_arguments(batch, forward_args)
        # Stream s sends micro-batches [first[s], first[s + 1]).
        first = [len(bounds) * s // streams for s in range(streams + 1)]
        parts = []
        for s in range(streams):
            start, stop = bounds[first[s]][0], bounds[first[s + 1] - 1][1]
            args = dict(forward_args)
            for name in row_args:
                args[name] = forward_args[name][start:stop]
            parts.append((x[start:stop], args))
        results: List[Optional[List[Tuple[pb.ForwardResponse, Dict]]]] = [None] * streams
        errors: List[Optional[BaseException]] = [None] * streams
        calls = _Calls(streams)
        methods = self._stream_methods(streams)

        def run(s):
            try:
                part_x, args = parts[s]
                results[s] = [(r, f) for _, _, r, f in self._resuming(
                    part_x, size, max_micro_batch_bytes, args, method=methods[s],
                    calls=calls, index=s)]
            except LMHeadError as e:
                # The micro-batch the server names, counted in the job rather than the stream.
                details = re.sub(r"\(micro-batch (\d+)\)$",
                                 lambda m: f"(micro-batch {first[s] + int(m.group(1))})",
                                 e.details)
                errors[s] = LMHeadError(e.code, details)
                calls.cancel_after(s)
            except BaseException as e:  # noqa: BLE001 - re-raised by the caller, in job order
                errors[s] = e
                calls.cancel_after(s)

        threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # A failing stream cancels only the streams after it, so the first failure in the job's
        # order is the earliest micro-batch that fails, whichever stream failed first in time.
        failed = [e for e in errors if e is not None]
        if failed:
            raise failed[0]
        return [response for part in results for response in part]

    def _resuming(self, x, micro_batch_size, max_micro_batch_bytes, forward_args, **stream
                  ) -> Iterator[Tuple[int, int, pb.ForwardResponse, Dict[str, _tensors.Decoded]]]:
        """_stream(x, ...), carried on when its server goes away after answers: a stream that
        ends UNAVAILABLE after answering micro-batches is followed, within max_attempts and
        after gRPC's backoff, by a new one (on another replica where there are several) for the
        rows not answered. gRPC's retry policy cannot do this (a stream that has answered is
        committed); an answered micro-batch is never sent again. Yields what _stream yields,
        rows counted in x."""
        batch = int(x.shape[0])
        done, answered, attempts, backoff = 0, 0, 1, 0.1
        while True:
            part, args = x, forward_args
            if done:
                part, args = x[done:], dict(forward_args)
                for name in _row_arguments(batch, forward_args):
                    args[name] = forward_args[name][done:]
            offset, before = done, answered
            try:
                for start, stop, response, fields in self._stream(
                        part, micro_batch_size, max_micro_batch_bytes, args, **stream):
                    done, answered = offset + stop, answered + 1
                    yield offset + start, offset + stop, response, fields
                return
            except LMHeadError as e:
                if done >= batch > 0 and e.code == grpc.StatusCode.UNAVAILABLE:
                    return  # every micro-batch answered; only the stream's end was lost
                if (e.code != grpc.StatusCode.UNAVAILABLE or answered == before
                        or attempts >= self._max_attempts):
                    # " (micro-batch N)" counted from this stream's first micro-batch.
                    raise LMHeadError(e.code, re.sub(
                        r"\(micro-batch (\d+)\)$",
                        lambda m: f"(micro-batch {before + int(m.group(1))})", e.details)
                    ) from None
            attempts += 1
            time.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, 5.0)

    def _stream(self, x, micro_batch_size, max_micro_batch_bytes, forward_args, method=None,
                calls: Optional["_Calls"] = None, index: int = 0
                ) -> Iterator[Tuple[int, int, pb.ForwardResponse, Dict[str, _tensors.Decoded]]]:
        """(start, stop, response, its decoded outputs) per micro-batch of one ForwardStream call
        (on `method`, default this client's channel), registered with `calls` as stream `index`
        when given. On the main channel micro-batches may use shared memory: each holds a buffer
        of its own until its answer is read, at most STREAM_WINDOW at once."""
        batch = int(x.shape[0])
        bounds = _micro_batches(x, micro_batch_size, max_micro_batch_bytes)
        row_args = _row_arguments(batch, forward_args)
        shared = method is None and self._shm is not None
        window = threading.Semaphore(_shared_memory.STREAM_WINDOW)
        lock = threading.Lock()
        leases: collections.deque = collections.deque()  # per micro-batch sent, in order
        state = {"ended": False, "failure": None, "sent": False}

        def request(start, stop):
            args = dict(forward_args)
            for name in row_args:
                args[name] = forward_args[name][start:stop]
            if not shared:
                return self._prepare(x[start:stop], args, shared_memory=False)
            window.acquire()
            if state["ended"]:  # woken by the cleanup below: the call is over
                raise LMHeadError(grpc.StatusCode.CANCELLED, "the stream ended")
            try:
                wire, lease = self._prepare(x[start:stop], args)
            except BaseException:
                window.release()
                raise
            if lease is None:
                window.release()
            return wire, lease

        first = request(*bounds[0])  # argument errors surface here, not in gRPC's thread
        answered = threading.Event()

        def requests():
            for i, b in enumerate(bounds):
                try:
                    wire, lease = first if i == 0 else request(*b)
                except BaseException as e:  # noqa: BLE001 - raised by the reading side
                    state["failure"] = e  # the stream half-closes; the answers then run out
                    return
                with lock:
                    if state["ended"]:  # the call was abandoned meanwhile
                        if lease is not None and i > 0:  # (the first: released below)
                            lease.release()
                        return
                    leases.append(lease)
                    state["sent"] = True
                yield wire
            # The stream is half-closed only once an answer came (or the call ended): gRPC 1.51
            # (C++) was seen to lose a half-close sent while it retried a stream (docs/API.md
            # "Retries"); a precaution here, where gRPC's policy retries streams.
            answered.wait()

        try:
            call = (method or self._forward_streams[0])(requests(), timeout=self.timeout)
        except BaseException:
            if first[1] is not None:
                first[1].release()
            raise
        if calls is not None:
            calls.add(index, call)
        finished = False
        try:
            responses = iter(call)
            for start, stop in bounds:
                response = next(responses, None)
                answered.set()
                if response is None:
                    if state["failure"] is not None:
                        raise state["failure"]
                    raise LMHeadError(grpc.StatusCode.INTERNAL,
                                      f"the stream ended before micro-batch [{start}, {stop})")
                with lock:
                    lease = leases.popleft() if leases else None
                try:
                    fields = _shared_memory.decode_outputs(response, lease)
                finally:
                    if lease is not None:
                        lease.release()  # its outputs are copied out: the buffer may be reused
                        window.release()
                yield start, stop, response, fields
            # Waits for the call's end, so that its status is seen (an error raises here) and
            # the server records a completed call rather than a cancelled one.
            if next(responses, None) is not None:
                raise LMHeadError(grpc.StatusCode.INTERNAL, "more answers than micro-batches")
            finished = True
        except grpc.RpcError as e:
            if state["failure"] is not None:
                raise state["failure"] from None
            _reraise(e)
        finally:
            answered.set()
            if not finished:
                call.cancel()  # stops a call that was abandoned or failed
            with lock:
                state["ended"] = True
                left = list(leases)
                leases.clear()
                if not state["sent"]:
                    left.append(first[1])  # the first micro-batch was never sent
            for lease in left:
                if lease is not None:
                    lease.release()
            for _ in range(_shared_memory.STREAM_WINDOW):
                window.release()  # a request thread waiting for room sees the end

    def _implementation(self, forward_args) -> str:
        """The loss implementation a call with `forward_args` runs: its own, or the model's."""
        implementation = forward_args.get("loss_implementation")
        if implementation is None:
            implementation = _implementation_name(self.get_model().config.loss_implementation)
        return implementation


def _output(decoded: Dict[str, _tensors.Decoded], as_torch: bool, has_labels: bool,
            return_argmax: bool = False):
    """A response's decoded outputs shaped as LMHead.forward's return value, paired with the
    argmax when return_argmax is set."""
    fields = {name: _tensors.to_user(value, as_torch) for name, value in decoded.items()}
    output = (LMOutputWithLoss(*(fields.get(name) for name in ("logits",) + _LOSS_FIELDS))
              if has_labels else fields.get("logits"))
    return (output, fields.get("argmax")) if return_argmax else output


def _scores(decoded: Dict[str, _tensors.Decoded], num_scored_tokens: int, as_torch: bool,
            has_labels: bool) -> Scores:
    """Scores from a response's (or a combined job's) decoded outputs."""
    fields = {name: _tensors.to_user(decoded[name], as_torch)
              for name in SCORING_FIELDS + ("loss",) if name in decoded}
    if not has_labels:
        fields.pop("loss", None)  # the loss over labels score() made up
    return Scores(**fields, num_scored_tokens=int(num_scored_tokens))


def _refuse_scoring(forward_args: dict, method: str) -> None:
    for name in _SCORING_ARGS:
        if name in forward_args:
            raise TypeError(f"{method} got the scoring argument {name!r}; scoring outputs come "
                            "from score() and score_stream()")


def _score_arguments(x, labels, scoring: dict, forward_args: dict, method: str
                     ) -> Tuple[bool, dict]:
    """(whether labels were given, the forward arguments of the request) for score(x, labels,
    **scoring, **forward_args): no logits (return_logits=False, which the server takes without
    labels when a scoring output is asked for); without labels no loss either."""
    for name in forward_args:
        if name not in _SCORE_FORWARD_ARGS:
            raise TypeError(f"{method}() got an unexpected keyword argument {name!r}"
                            + (" (it returns no logits)" if name in (
                                "return_logits", "logits_dtype", "return_argmax") else ""))
    top_k = scoring.get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise TypeError(f"top_k: expected an integer from 0 to 64, got {top_k!r}")
    args = dict(forward_args, **scoring)
    has_labels = labels is not None
    if not has_labels:
        for name in ("label_logprobs", "label_rank", "segment_ids"):
            value = scoring.get(name)
            if value is not None and value is not False:
                raise ValueError(f"scoring: {name} needs labels")
        if not (scoring.get("entropy") or top_k or scoring.get("candidate_ids") is not None):
            raise ValueError(f"{method}: without labels ask for entropy, top_k or "
                             "candidate_ids (the others need labels)")
        for name in ("loss_reduction", "z_loss_multiplier", "loss_div_factor"):
            args.pop(name, None)
    args["labels"] = labels
    args["return_logits"] = False
    return has_labels, args


class _Calls:
    """The calls of one job's parallel streams, by stream: cancel_after(s) cancels the calls of
    the streams after s, running or started later."""

    def __init__(self, streams: int):
        self._lock = threading.Lock()
        self._calls = [None] * streams
        self._cancel_from = streams  # streams from this index on are cancelled

    def add(self, index: int, call) -> None:
        with self._lock:
            self._calls[index] = call
            if index >= self._cancel_from:
                call.cancel()

    def cancel_after(self, index: int) -> None:
        with self._lock:
            self._cancel_from = min(self._cancel_from, index + 1)
            for call in self._calls[index + 1:]:
                if call is not None:
                    call.cancel()


def _kept_start(logits_to_keep: int, length: int) -> int:
    """The first position an integer logits_to_keep keeps (Python slice semantics; core's
    KeptStart)."""
    k = logits_to_keep
    if k == 0:
        return 0
    if k > 0:
        return 0 if k >= length else length - k
    return length if k <= -length else -k


def _micro_batches(x, micro_batch_size: Optional[int], max_micro_batch_bytes: Optional[int]
                   ) -> List[Tuple[int, int]]:
    """[start, stop) rows of each micro-batch of x: `micro_batch_size` rows, or as many as fit
    `max_micro_batch_bytes` (None: DEFAULT_MAX_MICRO_BATCH_BYTES); one empty micro-batch for an
    empty x."""
    batch = int(x.shape[0])
    if micro_batch_size is None:
        if max_micro_batch_bytes is None:
            max_micro_batch_bytes = DEFAULT_MAX_MICRO_BATCH_BYTES
        row_bytes = int(np.prod(x.shape[1:])) * _itemsize(x)
        micro_batch_size = max(1, max_micro_batch_bytes // max(1, row_bytes))
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    return [(a, min(a + micro_batch_size, batch))
            for a in range(0, batch, micro_batch_size)] or [(0, 0)]


def _itemsize(x) -> int:
    if isinstance(x, _tensors.BF16):
        return 2
    return x.element_size() if _tensors.is_torch(x) else np.asarray(x).itemsize


def _row_arguments(batch: int, forward_args: dict) -> List[str]:
    """The forward arguments split with the batch: labels, segment_ids, a (B, K)
    logits_to_keep, a (B, S', C) candidate_ids, and for "none" a loss_div_factor with B rows.
    Refuses (ValueError naming the argument) what cannot be split, and per-row arguments whose
    rows are not the job's: a micro-batch would otherwise drop or lack rows silently."""
    def rows_of(name: str, what: str, rank: int) -> None:
        shape = tuple(np.shape(forward_args[name]))
        if len(shape) != rank or shape[0] != batch:
            raise ValueError(f"{name}: expected {what} with the job's {batch} rows (split with "
                             f"the batch into micro-batches), got shape {list(shape)}")

    names = [name for name in ("labels", "segment_ids") if forward_args.get(name) is not None]
    for name in names:
        rows_of(name, "(batch, seq_len)", 2)
    # The splittable forms (other ranks go whole to every micro-batch: the server names them).
    keep = forward_args.get("logits_to_keep", 0)
    if not isinstance(keep, (int, np.integer)) and len(np.shape(keep)) == 2:
        rows_of("logits_to_keep", "(batch, K) positions", 2)
        names.append("logits_to_keep")
    candidates = forward_args.get("candidate_ids")
    if candidates is not None and len(np.shape(candidates)) == 3:
        rows_of("candidate_ids", "(batch, kept positions, C)", 3)
        names.append("candidate_ids")
    div = forward_args.get("loss_div_factor")
    if (div is not None and not isinstance(div, (int, float, np.number))
            and forward_args.get("loss_reduction", "mean") == "none"):
        shape = tuple(div.shape)
        if len(shape) > 2:
            raise ValueError(f"loss_div_factor: a tensor divisor of rank {len(shape)} would "
                             "change the losses' shape; expected rank 2 or less")
        if len(shape) == 2 and shape[0] == batch:
            names.append("loss_div_factor")
    return names
