"""Same-host shared memory for RemoteLMHead (docs/API.md "Shared memory"): one SharedMemory
session on the client's main channel, a pool of POSIX shared-memory buffers that hidden states,
labels and logits travel through, and CUDA tensors registered by their allocation (CUDA IPC).

How a call uses it (Transport.prepare): the hidden states and labels are copied once into a
buffer of the pool (from the array's or tensor's own memory, any strides; a CUDA tensor that
cannot be shared through a device-to-host copy into it), the request names them by
SharedMemoryRef, and the logits, when the call returns them, are written by the server into the
same buffer and copied out once into the returned array. A CUDA tensor is registered instead as
a region over its CUDA allocation and read by the server where it lies. Small outputs (losses,
argmax, the scoring outputs) stay in the response.

Buffers: a call (or a micro-batch in flight) holds one buffer of its own until its answer is
read, so parallel calls never share one; at most MAX_BUFFERS exist at once, reused by size. Each
is a fresh POSIX object (mode 0600, a random name) that is unlinked as soon as the server has
mapped it: nothing is left in /dev/shm however the process ends (Python's resource_tracker
covers the moment between creating and registering it), and its memory goes when both processes
unmap it (the client at close(), the server when the session ends).

Thread-safety: a Transport is used by every thread of its RemoteLMHead; its state is guarded by
its lock, and a Session may be asked from any thread.
"""

import collections
import concurrent.futures
import logging
import os
import queue
import secrets
import threading
import time
from multiprocessing import shared_memory
from typing import Callable, Dict, List, Optional, Tuple

import grpc

from lmhead_client import _tensors
from lmhead_client._errors import LMHeadError
from lmhead_client._micro_batches import SCORING_FIELDS, decode_scoring
from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb

_LOG = logging.getLogger("lmhead_client")

MODES = ("auto", "on", "off")
# "auto" uses shared memory for calls that move at least this many bytes (hidden states, labels
# and returned logits); below it one inline message is as fast (client/python/README.md has the
# measurements).
AUTO_MIN_BYTES = 1 << 20
# Buffers (one per call or micro-batch in flight) and CUDA registrations held at once; the
# server's --max_shared_memory_regions (64 by default) must hold both.
MAX_BUFFERS = 16
MAX_CUDA_REGIONS = 16
# Micro-batches of one stream in flight with shared memory: the server holds two at a time
# (computing one, reading the next), the third is being written meanwhile.
STREAM_WINDOW = 3
# How long a session request (a registration) may take before the call goes inline.
_REQUEST_TIMEOUT_S = 60.0
# After a session that failed for a reason that may pass (the server's session limit, a lost
# connection), "auto" tries again no sooner than this.
_RETRY_AFTER_S = 10.0
_ALIGN = 64
_OUTPUT_NAMES = ("logits", "argmax", "loss", "ce_loss", "z_loss")

_METHOD = "/lmhead.v1.LMHeadService/SharedMemory"
# The session call itself refused: shared memory cannot work with this server.
_NO_SESSION = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
               grpc.StatusCode.UNIMPLEMENTED)
# A registration of our object refused for a reason that will not change: the server does not
# see it (another host or container: NOT_FOUND) or may not open it (another user).
_NO_REGISTRATION = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INVALID_ARGUMENT)

try:  # torch is optional; CUDA IPC needs it
    import torch
except ImportError:  # pragma: no cover - exercised only where torch is absent
    torch = None


def _code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _buffer_size(n: int) -> int:
    """n rounded up to 1/8 of its power of two (at least 64 KiB), so that calls of slowly
    growing sizes reuse a buffer rather than each making a new one."""
    n = max(n, 64 << 10)
    step = 1 << max(n.bit_length() - 4, 0)
    return (n + step - 1) // step * step


class _Fallback(Exception):
    """Shared memory cannot serve this call: `error` says why; `for_good` when it never will
    with this server."""

    def __init__(self, error: LMHeadError, for_good: bool, what: str):
        super().__init__(what)
        self.error = error
        self.for_good = for_good
        self.what = what


class Session:
    """One SharedMemory call: requests are answered in order, matched to their callers by a
    reader thread. Ends when close() half-closes it (the server then unregisters every region
    it holds), or when the call fails; then every waiting and later request raises the
    LMHeadError it ended with."""

    def __init__(self, channel: grpc.Channel):
        method = channel.stream_stream(
            _METHOD, request_serializer=pb.SharedMemoryRequest.SerializeToString,
            response_deserializer=pb.SharedMemoryResponse.FromString)
        self._lock = threading.Lock()
        self._requests: "queue.SimpleQueue" = queue.SimpleQueue()
        self._waiting: collections.deque = collections.deque()
        self._ended: Optional[LMHeadError] = None
        self._answered = False
        # No deadline: the session lasts until close().
        self._call = method(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, name="lmhead-shared-memory",
                                        daemon=True)
        self._reader.start()

    @property
    def open(self) -> bool:
        return self._ended is None

    @property
    def answered(self) -> bool:
        """Whether the server has answered a request of this session (it was accepted)."""
        return self._answered

    def ask(self, request: pb.SharedMemoryRequest) -> "concurrent.futures.Future":
        """Sends `request`; the future gives its SharedMemoryResponse, or raises the LMHeadError
        the session ended with."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._ended is not None:
                future.set_exception(self._ended)
                return future
            self._waiting.append(future)
            self._requests.put(request)
        return future

    def request(self, request: pb.SharedMemoryRequest) -> pb.SharedMemoryResponse:
        """ask(request)'s answer, waited for (a registration given up on is unregistered when
        its answer comes)."""
        future = self.ask(request)
        try:
            return future.result(_REQUEST_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.add_done_callback(self._forget)
            raise LMHeadError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"the server did not answer a shared memory request in "
                              f"{_REQUEST_TIMEOUT_S:.0f} s") from None

    def _forget(self, future: "concurrent.futures.Future") -> None:
        if future.exception() is None and future.result().code == 0:
            self.ask(pb.SharedMemoryRequest(unregister=future.result().region))

    def _read(self) -> None:
        error = None
        try:
            for response in self._call:
                self._answered = True
                with self._lock:
                    future = self._waiting.popleft() if self._waiting else None
                if future is not None:
                    future.set_result(response)
        except grpc.RpcError as e:
            error = LMHeadError(e.code(), e.details() or "")
        except Exception as e:  # noqa: BLE001 - any failure ends the session for its callers
            error = LMHeadError(grpc.StatusCode.INTERNAL, f"shared memory session: {e!r}")
        with self._lock:
            self._ended = error or LMHeadError(grpc.StatusCode.CANCELLED,
                                               "the shared memory session was closed")
            waiting, self._waiting = list(self._waiting), collections.deque()
        for future in waiting:
            future.set_exception(self._ended)

    def close(self, timeout: float = 10.0) -> None:
        """Half-closes the call and waits (up to `timeout`) for the server to end it, which it
        does once it has unregistered the session's regions; then cancels it if need be."""
        self._requests.put(None)
        if threading.current_thread() is self._reader:
            return
        self._reader.join(timeout)
        if self._reader.is_alive():
            self._call.cancel()
            self._reader.join(timeout)


class _Buffer:
    """A POSIX shared-memory object of this process, mapped read-write, and the region a
    session registered over it."""

    def __init__(self, size: int):
        name = f"lmhead-{os.getpid()}-{secrets.token_hex(8)}"
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        try:
            # The object's pages are taken now: on a full /dev/shm (a container's 64 MiB) a
            # sparse object would fail later, as SIGBUS in whichever process writes it.
            os.posix_fallocate(self._shm._fd, 0, size)
        except OSError:
            self._shm.close()
            self._shm.unlink()
            raise
        self._linked = True
        self.size = size
        self.key = "/" + name
        self.region = ""
        self.session: Optional[Session] = None

    @property
    def buf(self) -> memoryview:
        return self._shm.buf

    def unlink(self) -> None:
        """Removes the object's name (the mappings keep its memory); once only, through
        SharedMemory.unlink, which also tells Python's resource_tracker not to."""
        if self._linked:
            self._linked = False
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.unlink()
        try:
            self._shm.close()
        except BufferError:  # a view of it is still alive somewhere: it unmaps with the view
            pass


class _CudaRegion:
    """A region over one CUDA allocation (by its IPC handle), with the storage that keeps the
    allocation alive while it is registered."""

    def __init__(self, region: str, handle: bytes, byte_size: int, storage, storage_offset: int,
                 session: Session):
        self.region = region
        self.handle = handle
        self.byte_size = byte_size
        self.storage = storage  # the pinned storage: the allocation is not freed under the server
        self.storage_offset = storage_offset  # of `storage` in the allocation, bytes
        self.session = session
        self.users = 0  # calls (micro-batches) holding it
        self.retired = False


class _Placement:
    """Where a call's tensors go in its buffer: offsets 64-byte aligned."""

    def __init__(self):
        self.size = 0

    def take(self, nbytes: int) -> int:
        offset = self.size
        self.size = _aligned(offset + nbytes)
        return offset


class Lease:
    """What one call (or one micro-batch) holds of the shared memory until its answer is read:
    a buffer, a CUDA registration, or both. `placed` names the request fields set to shared
    memory ("hidden_states", "labels"); the caller sends the others inline."""

    def __init__(self, transport: "Transport"):
        self._transport = transport
        self.buffer: Optional[_Buffer] = None
        self.cuda: Optional[_CudaRegion] = None
        self.keep: List[object] = []  # tensors the request reads (a contiguous copy)
        self.placed: set = set()
        self.released = False
        self.stale = False  # its regions were found gone: not to be used again
        self._lock = threading.Lock()

    def decode(self, name: str, tensor: pb.Tensor) -> _tensors.Decoded:
        """Output `name` that the server wrote into this call's buffer, copied out."""
        ref = tensor.shared_memory
        if self.buffer is None or ref.region != self.buffer.region:
            raise LMHeadError(grpc.StatusCode.INTERNAL,
                              f"{name}: the server wrote it to a region this call did not name")
        try:
            return _tensors.decode_from(self.buffer.buf, ref.offset, ref.byte_size, tensor.dtype,
                                        tuple(tensor.shape))
        except ValueError as e:
            raise LMHeadError(grpc.StatusCode.INTERNAL, f"{name}: {e}") from None

    def release(self) -> None:
        """Gives the buffer back to the pool (once; from any thread)."""
        with self._lock:
            if self.released:
                return
            self.released = True
        self._transport.release(self)


class Transport:
    """The shared memory of one RemoteLMHead (see the module's docstring).

    mode: "auto" (when the server allows it, for calls of at least `min_bytes`; otherwise, and
    for good once the server refuses, inline), "on" (every call, else LMHeadError) or "off".
    """

    def __init__(self, channel: grpc.Channel, address: str, mode: str,
                 min_bytes: int = AUTO_MIN_BYTES):
        if mode not in MODES:
            raise ValueError(f"shared_memory: expected one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.min_bytes = 0 if mode == "on" else min_bytes
        self._channel = channel
        self._address = address
        self._pid = os.getpid()
        self._lock = threading.Condition()
        self._session: Optional[Session] = None
        self._off: Optional[str] = "off" if mode == "off" else None  # why, once off for good
        self._retry_at = 0.0
        self._closed = False
        self._free: List[_Buffer] = []  # buffers of the current session not in use
        self._buffers = 0  # buffers that exist (free, in use, or being made)
        self._max_buffers = MAX_BUFFERS  # lowered to what the server's region limit allows
        self._cuda: "collections.OrderedDict[bytes, _CudaRegion]" = collections.OrderedDict()
        self._retired: List[_CudaRegion] = []
        self._cuda_off: Optional[str] = None
        # Calls that went through shared memory, by kind (for tests and benchmarks).
        self.stats = collections.Counter()

    # -- State ---------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether a session is open and has been accepted by the server."""
        session = self._session
        return session is not None and session.open and session.answered

    def wants(self, nbytes: int) -> bool:
        """Whether a call moving `nbytes` would try shared memory now."""
        return (self._off is None and not self._closed and nbytes > 0
                and nbytes >= self.min_bytes)

    def _session_now(self) -> Session:
        """The open session, started when there is none (a lost one is replaced)."""
        with self._lock:
            if self._closed:
                raise _Fallback(LMHeadError(grpc.StatusCode.CANCELLED, "the client is closed"),
                                True, "the client is closed")
            session = self._session
            if session is not None and session.open:
                return session
            if self.mode == "auto" and time.monotonic() < self._retry_at:
                raise _Fallback(LMHeadError(grpc.StatusCode.UNAVAILABLE, "retrying later"),
                                False, "a recent session failed")
            self._session = Session(self._channel)
            # Buffers of the lost session cannot be registered again (their names are gone).
            stale, self._free = self._free, []
            self._buffers -= len(stale)
            self._lock.notify_all()
        for buffer in stale:
            buffer.close()
        return self._session

    def _ask(self, session: Session, request: pb.SharedMemoryRequest) -> pb.SharedMemoryResponse:
        """session.request, a failed session turned into _Fallback."""
        try:
            return session.request(request)
        except LMHeadError as e:
            for_good = e.code in _NO_SESSION
            if not for_good:
                with self._lock:
                    self._retry_at = time.monotonic() + _RETRY_AFTER_S
            raise _Fallback(e, for_good, "the server refused a shared memory session") from None

    def _give_up(self, fallback: _Fallback) -> None:
        """Inline from now on ("auto"), or raise ("on")."""
        if self.mode == "on":
            raise LMHeadError(fallback.error.code,
                              f"shared_memory='on': {fallback.what}: {fallback.error.details}")
        if fallback.for_good:
            with self._lock:
                first = self._off is None
                self._off = f"{fallback.what}: {fallback.error}"
                session, self._session = self._session, None
                free, self._free = self._free, []
                self._buffers -= len(free)
            if first:
                _LOG.debug("lmhead_client: shared memory with %s is off, calls go inline (%s)",
                           self._address, self._off)
            if session is not None:
                session.close(timeout=1.0)
            for buffer in free:
                buffer.close()
        else:
            _LOG.debug("lmhead_client: this call to %s goes inline: %s: %s", self._address,
                       fallback.what, fallback.error)

    # -- Buffers -------------------------------------------------------------------------------

    def _take_buffer(self, session: Session, nbytes: int) -> Optional[_Buffer]:
        """A registered buffer of at least `nbytes` of its own for one call: a free one, or a
        new one; None in "auto" when MAX_BUFFERS are in use ("on" waits for one)."""
        evicted = None
        with self._lock:
            while True:
                fits = [b for b in self._free if b.size >= nbytes and b.session is session]
                if fits:
                    buffer = min(fits, key=lambda b: b.size)
                    self._free.remove(buffer)
                    return buffer
                if self._buffers < self._max_buffers:
                    self._buffers += 1
                    self.stats["most_buffers"] = max(self.stats["most_buffers"], self._buffers)
                    break
                if self._free:  # all too small: the largest makes room for a larger one
                    evicted = max(self._free, key=lambda b: b.size)
                    self._free.remove(evicted)
                    break
                if self.mode != "on":
                    return None
                self._lock.wait()
        if evicted is not None:
            self._drop_buffer(evicted, keep_slot=True)
        try:
            buffer = _Buffer(_buffer_size(nbytes))
        except OSError as e:  # /dev/shm full or absent
            self._buffer_gone()
            raise _Fallback(LMHeadError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)), False,
                            "could not create a shared memory object") from None
        try:
            answer = self._ask(session, pb.SharedMemoryRequest(
                register_system=pb.RegisterSystemSharedMemory(key=buffer.key,
                                                              byte_size=buffer.size)))
        except BaseException:
            buffer.close()
            self._buffer_gone()
            raise
        buffer.unlink()  # the server has mapped it (or failed to): the name is not needed
        if answer.code != 0:
            buffer.close()
            code = _code(answer.code)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # --max_shared_memory_regions
                with self._lock:
                    self._buffers -= 1
                    others = self._buffers
                    self._max_buffers = max(1, min(self._max_buffers, others))
                    self._lock.notify()
                if others > 0 and self.mode == "on":
                    return self._take_buffer(session, nbytes)  # waits for one of the others
                raise _Fallback(LMHeadError(code, answer.message), False,
                                "the server holds as many regions as it allows")
            self._buffer_gone()
            raise _Fallback(LMHeadError(code, answer.message), code in _NO_REGISTRATION,
                            "the server could not map the client's shared memory (is it on "
                            "another host, or run as another user?)")
        buffer.region = answer.region
        buffer.session = session
        self.stats["buffers"] += 1
        return buffer

    def _buffer_gone(self) -> None:
        with self._lock:
            self._buffers -= 1
            self._lock.notify()

    def _drop_buffer(self, buffer: _Buffer, keep_slot: bool = False) -> None:
        """Unregisters (without waiting for the answer) and unmaps a buffer no call holds;
        `keep_slot`: a new buffer takes its place in the count."""
        session = buffer.session
        if session is not None and session.open and buffer.region:
            session.ask(pb.SharedMemoryRequest(unregister=buffer.region))
        buffer.close()
        if not keep_slot:
            self._buffer_gone()

    # -- CUDA ----------------------------------------------------------------------------------

    def _cuda_region(self, session: Session, x) -> Optional[Tuple[_CudaRegion, int]]:
        """(registration, offset of x in it) for a contiguous CUDA tensor x, registering its
        allocation if need be; None when it cannot be shared (the caller copies it)."""
        if self._cuda_off is not None:
            return None
        storage = x.untyped_storage()
        itemsize = x.element_size()
        with self._lock:
            self._sweep_cuda()
            for entry in self._cuda.values():
                if (entry.storage._cdata == storage._cdata and entry.session is session
                        and not entry.retired):
                    entry.users += 1
                    self._cuda.move_to_end(entry.handle)
                    return entry, entry.storage_offset + x.storage_offset() * itemsize
        try:
            shared = storage._share_cuda_()
        except Exception as e:  # noqa: BLE001 - e.g. expandable segments, a received tensor
            _LOG.debug("lmhead_client: cannot share a CUDA tensor by IPC (%s); copying it", e)
            return None
        device, handle, size_bytes, storage_offset = shared[:4]
        # torch counts the consumers of a shared storage and keeps its memory, once freed, until
        # they release it; the server is not one of torch's, so release its count here (this
        # client keeps the storage alive while the server may read it instead).
        try:
            torch.UntypedStorage._release_ipc_counter(shared[4], shared[5], device=x.device)
        except Exception:  # noqa: BLE001 - best effort, as torch's own consumers do
            pass
        raw = _raw_ipc_handle(handle)
        if raw is None:
            return None
        need = storage_offset + size_bytes
        with self._lock:
            entry = self._cuda.get(raw)
            if (entry is not None and entry.session is session and not entry.retired
                    and entry.byte_size >= need):
                entry.users += 1
                self._cuda.move_to_end(raw)
                return entry, storage_offset + x.storage_offset() * itemsize
        answer = self._ask(session, pb.SharedMemoryRequest(
            register_cuda=pb.RegisterCudaSharedMemory(raw_handle=raw, device_id=int(device),
                                                      byte_size=need)))
        if answer.code != 0:
            code = _code(answer.code)
            if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                self._cuda_off = f"{code.name}: {answer.message}"
                _LOG.debug("lmhead_client: CUDA IPC with %s is off, CUDA tensors are copied "
                           "to the host (%s)", self._address, self._cuda_off)
            return None
        entry = _CudaRegion(answer.region, raw, need, storage, storage_offset, session)
        entry.users = 1
        with self._lock:
            old = self._cuda.pop(raw, None)
            if old is not None:
                old.retired = True
                self._retired.append(old)
            self._cuda[raw] = entry
            while len(self._cuda) > MAX_CUDA_REGIONS:
                _, oldest = self._cuda.popitem(last=False)
                oldest.retired = True
                self._retired.append(oldest)
            self._sweep_cuda()
        self.stats["cuda_registrations"] += 1
        return entry, storage_offset + x.storage_offset() * itemsize

    def _sweep_cuda(self) -> None:
        """Unregisters the registrations no call holds that are retired, or whose storage only
        this client still references (its tensors are gone: the memory may go back to torch's
        allocator). Called with the lock held."""
        keep = collections.OrderedDict()
        for handle, entry in self._cuda.items():
            if entry.users == 0 and (entry.session is not self._session
                                     or _only_referenced_here(entry.storage)):
                entry.retired = True
                self._retired.append(entry)
            else:
                keep[handle] = entry
        self._cuda = keep
        still = []
        for entry in self._retired:
            if entry.users > 0:
                still.append(entry)
                continue
            if entry.session.open:
                entry.session.ask(pb.SharedMemoryRequest(unregister=entry.region))
            entry.storage = None  # once unregistered the server no longer reads it
        self._retired = still

    # -- Calls ---------------------------------------------------------------------------------

    def prepare(self, wire: _tensors.WireRequest, x, labels,
                logits: Callable[[], Optional[_tensors.TensorLayout]]) -> Optional[Lease]:
        """Puts a call's hidden states (and labels) into shared memory and has its logits
        written there, setting those fields of `wire.small`; None when the call goes inline
        (too small, a layout that is not plain, shared memory off or refused in "auto").
        `logits()` gives the logits' layout (None when the call returns none). Raises
        LMHeadError in "on" mode when shared memory is unavailable."""
        if self._off is not None or self._closed or os.getpid() != self._pid:
            return None
        x_layout = _tensors.layout(x)
        labels_layout = _tensors.layout(labels) if labels is not None else None
        if (x_layout is None or len(x_layout.shape) != 3 or x_layout.nbytes == 0
                or (labels is not None and (labels_layout is None
                                            or labels_layout.shape != x_layout.shape[:2]))):
            return None  # sent inline: the server's messages for bad inputs stay the same
        nbytes = x_layout.nbytes + (labels_layout.nbytes if labels_layout else 0)
        logits_layout = logits()
        if logits_layout is not None:
            nbytes += logits_layout.nbytes
        if not self.wants(nbytes):
            return None
        lease = Lease(self)
        try:
            self._fill(lease, wire, x, x_layout, labels, labels_layout, logits_layout)
        except _Fallback as fallback:
            lease.release()
            self._give_up(fallback)  # raises in "on"
            for name in ("hidden_states", "labels", "outputs"):
                wire.small.ClearField(name)
            return None
        except BaseException:
            lease.release()
            raise
        return lease

    def _fill(self, lease: Lease, wire, x, x_layout, labels, labels_layout,
              logits_layout) -> None:
        session = self._session_now()
        small = wire.small
        cuda = (torch is not None and _tensors.is_torch(x) and x.is_cuda
                and self._cuda_off is None)
        if cuda:
            x = x.detach()
            if not x.is_contiguous():
                x = x.contiguous()
                lease.keep.append(x)
            found = self._cuda_region(session, x)
            if found is not None:
                lease.cuda, offset = found
                torch.cuda.current_stream(x.device).synchronize()  # x written before it is read
                small.hidden_states.CopyFrom(pb.Tensor(
                    dtype=x_layout.dtype, shape=x_layout.shape,
                    shared_memory=pb.SharedMemoryRef(region=lease.cuda.region, offset=offset,
                                                     byte_size=x_layout.nbytes)))
                lease.placed.add("hidden_states")
                self.stats["cuda_calls"] += 1
        with_logits = logits_layout is not None and logits_layout.nbytes > 0
        layout = _Placement()
        at = {}
        if "hidden_states" not in lease.placed:
            at["hidden_states"] = layout.take(x_layout.nbytes)
        if labels_layout is not None and (at or with_logits):
            at["labels"] = layout.take(labels_layout.nbytes)
        if with_logits:
            at["logits"] = layout.take(logits_layout.nbytes)
        if not at:
            return
        buffer = self._take_buffer(session, layout.size)
        if buffer is None:  # "auto" with every buffer in use
            if lease.placed:
                return  # the rest goes inline
            raise _Fallback(LMHeadError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"{MAX_BUFFERS} buffers in use"), False,
                            "no free shared memory buffer")
        lease.buffer = buffer
        for name, value, value_layout in (("hidden_states", x, x_layout),
                                          ("labels", labels, labels_layout)):
            if name not in at:
                continue
            _tensors.write_into(value, buffer.buf, at[name])
            getattr(small, name).CopyFrom(pb.Tensor(
                dtype=value_layout.dtype, shape=value_layout.shape,
                shared_memory=pb.SharedMemoryRef(region=buffer.region, offset=at[name],
                                                 byte_size=value_layout.nbytes)))
            lease.placed.add(name)
        if "logits" in at:
            small.outputs.logits.CopyFrom(pb.SharedMemoryRef(
                region=buffer.region, offset=at["logits"], byte_size=logits_layout.nbytes))
        self.stats["system_calls"] += 1

    def release(self, lease: Lease) -> None:
        buffer, lease.buffer = lease.buffer, None
        cuda, lease.cuda = lease.cuda, None
        lease.keep = []
        drop = None
        with self._lock:
            if cuda is not None:
                cuda.users -= 1
                if lease.stale and not cuda.retired:
                    if self._cuda.get(cuda.handle) is cuda:
                        del self._cuda[cuda.handle]
                    cuda.retired = True
                    self._retired.append(cuda)
                self._sweep_cuda()
            if buffer is not None:
                if (not self._closed and not lease.stale and buffer.session is self._session
                        and buffer.session.open):
                    self._free.append(buffer)
                    self._lock.notify()
                else:
                    drop = buffer
        if drop is not None:
            self._drop_buffer(drop)

    def retry_inline(self, error: LMHeadError) -> bool:
        """Whether a call that failed with `error` should be sent again inline: its regions were
        lost (with the session: the server restarted, the connection was replaced), in
        "auto"."""
        return self.mode == "auto" and lost_regions(error)

    def close(self) -> None:
        """Ends the session (the server unregisters its regions), then unmaps the buffers and
        lets go of the CUDA storages. Idempotent; in a forked child it only forgets them."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            session, self._session = self._session, None
            free, self._free = self._free, []
            cuda = list(self._cuda.values()) + self._retired
            self._cuda.clear()
            self._retired = []
        if os.getpid() != self._pid:
            return
        if session is not None:
            session.close()
        for entry in cuda:
            entry.storage = None
        for buffer in free:
            buffer.close()


def lost_regions(error: LMHeadError) -> bool:
    """Whether a call failed because a region it named is gone (or shared memory was turned
    off): NOT_FOUND or FAILED_PRECONDITION naming a `shared_memory` field or an output."""
    field = error.details.split(":", 1)[0]
    return (error.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
            and (".shared_memory" in field or field.startswith("outputs.")))


def _raw_ipc_handle(handle) -> Optional[bytes]:
    """The 64-byte cudaIpcMemHandle_t in what UntypedStorage._share_cuda_ returns: the raw bytes
    (older torch), or a version byte, 'c' (a cudaMalloc block) and the raw bytes. None for
    anything else (an expandable segment, 'e', cannot be opened with cudaIpcOpenMemHandle)."""
    if not isinstance(handle, bytes):
        return None
    if len(handle) == 64:
        return handle
    if len(handle) == 66 and handle[1:2] == b"c":
        return handle[2:]
    return None


def _only_referenced_here(storage) -> bool:
    """Whether nothing but this client references `storage` (no tensor uses it any more)."""
    try:
        return torch._C._storage_Use_Count(storage._cdata) <= 1
    except Exception:  # noqa: BLE001 - a torch without it: keep the registration until evicted
        return False


def decode_outputs(response: pb.ForwardResponse, lease: Optional[Lease]
                   ) -> Dict[str, _tensors.Decoded]:
    """A response's outputs by name, copied out of the call's buffer where the server wrote
    them there; the scoring outputs (ForwardResponse.scoring) by their ScoringOutputs names,
    always from the response."""
    fields = {}
    for name in _OUTPUT_NAMES:
        if not response.HasField(name):
            continue
        tensor = getattr(response, name)
        if tensor.HasField("shared_memory"):
            if lease is None:
                raise LMHeadError(grpc.StatusCode.INTERNAL,
                                  f"{name}: the server wrote it to shared memory unasked")
            fields[name] = lease.decode(name, tensor)
        else:
            fields[name] = _tensors.decode(tensor)
    for name in SCORING_FIELDS:
        if response.scoring.HasField(name) and getattr(response.scoring, name).HasField(
                "shared_memory"):
            raise LMHeadError(grpc.StatusCode.INTERNAL,
                              f"scoring.{name}: the server wrote it to shared memory unasked")
    fields.update(decode_scoring(response))
    return fields
