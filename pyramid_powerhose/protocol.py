"""Frames in, frames out: 7/MDP, 8/MMI and the powerhose extension.

Every module that touches the wire goes through here; nobody else builds
or parses frames by hand.  Pure functions over lists of ``bytes``: no
sockets, no I/O.  ``PROTOCOL.rst`` is the prose companion of this file.

The extension in one paragraph: a client that wants job ids, headers,
deadlines and typed errors speaks ``PHC01`` instead of ``MDPC01`` on the
frontend; a worker that understands them adds the frame ``powerhose/1``
to its READY.  The broker translates between the two dialects, so a plain
MDP client or worker never sees a frame it does not expect.
"""

from __future__ import annotations

from .exc import ProtocolError

try:
    import cython
    from cython.cimports.cpython.bytes import PyBytes_FromStringAndSize
    from cython.cimports.libc.string import memcpy
except (ImportError, AttributeError):  # needed only to compile (AttributeError:
    pass  # Cython installed, cython.cimports exists only when compiling)

# Cython-compiled, this module's file is the extension, not the source.
COMPILED = not __file__.endswith(".py")

# -- 7/MDP -----------------------------------------------------------------
MDP_CLIENT = b"MDPC01"
MDP_WORKER = b"MDPW01"

READY = b"\x01"
REQUEST = b"\x02"
REPLY = b"\x03"
HEARTBEAT = b"\x04"
DISCONNECT = b"\x05"
# Extension (powerhose/1 workers only): a worker registered with several
# brokers runs one job at a time; while it runs one broker's job it tells
# the others to send it nothing (PAUSE), then that it has room again (RESUME).
PAUSE = b"\x06"
RESUME = b"\x07"
# Extension: right after READY, a worker says who it is (pid@host) for the
# broker's stats.  A broker that does not know INFO drops it; nothing else
# changes, so workers and brokers of different versions still work together.
INFO = b"\x08"
# Extension, the direct path on one host (docs/direct_path.rst): a worker
# announces the ipc endpoint of its direct socket (DIRECT); the broker leases
# it to one client process (LEASE with an epoch, "" to end it) and the worker
# answers LEASE with the direct jobs it still holds; a leased worker reports
# the direct jobs it ran when it falls idle (FREE) and, while busy, at most
# once a heartbeat (REPORT).  A broker that does not lease never sees FREE or
# REPORT; a worker that never announced DIRECT is never leased.
DIRECT = b"\x09"
LEASE = b"\x0a"
FREE = b"\x0b"
REPORT = b"\x0c"
WORKER_COMMANDS = {READY, REQUEST, REPLY, HEARTBEAT, DISCONNECT, PAUSE, RESUME, INFO,
                   DIRECT, LEASE, FREE, REPORT}
# A busy worker is handed a second job (credit > 1: by the broker, or by a
# client on a lease) only for services whose recent jobs average less than
# this: behind such jobs a waiting job waits little, while behind a long one
# it could wait although another worker frees up first.
PREFETCH_BELOW = 0.1  # seconds

# -- 8/MMI -----------------------------------------------------------------
MMI_PREFIX = b"mmi."
MMI_SERVICE = b"mmi.service"
MMI_STATS = b"mmi.stats"  # extension: broker statistics as JSON
MMI_PING = b"mmi.ping"  # extension: the broker's pid
MMI_FOUND = b"200"
MMI_NOT_FOUND = b"404"
MMI_NOT_IMPLEMENTED = b"501"

# -- powerhose extension ----------------------------------------------------
EXT_CLIENT = b"PHC01"
EXT_TOKEN = b"powerhose/1"
STATUS_OK = b"OK"
STATUS_ERROR = b"ERR"
# A reserved request header (any value): the client asks which worker ran
# the job.  The broker takes it out of the job's headers and appends one
# frame to its PHC01 reply, the worker's pid@host (empty when no worker ran
# the job or the worker did not say who it is).  A client that does not
# send it never gets that frame.
WORKER_HEADER = "powerhose.worker"

# Error codes carried in an ERR reply; the client maps each to an exception.
ERR_EXECUTION = "ExecutionError"
ERR_TIMEOUT = "TimeoutError"
ERR_NO_WORKER = "NoWorkerError"
ERR_WORKER_LOST = "WorkerLostError"
ERR_TOO_LARGE = "JobTooLargeError"
ERR_OVERLOADED = "OverloadedError"
ERR_BAD_REQUEST = "ProtocolError"
# Not an error a caller sees: a direct job the worker refused before
# starting it (its lease was revoked or it is stopping); the client sends
# it again, relayed.  The reason is one of NOT_RUN_*.
ERR_NOT_RUN = "NotRun"

# -- the direct path: client control (PHL01) and direct jobs ---------------
# A client process's control DEALER speaks PHL01 on the broker's frontend.
EXT_LEASE = b"PHL01"
LEASE_WANTED = b"LEASE"  # client: this many more jobs could use leases
LEASE_GRANT = b"GRANT"  # broker: a worker's direct endpoint, yours under an epoch
LEASE_REVOKE = b"REVOKE"  # broker: stop choosing it
LEASE_RETURN = b"RETURN"  # client: nothing of mine is in flight on it any more
LEASE_HEARTBEAT = b"HEARTBEAT"  # client, every second while it holds leases
LEASE_BUSY = b"BUSY"  # broker: no worker is idle for the rest of your wish now
LEASE_COMMANDS = {LEASE_WANTED, LEASE_GRANT, LEASE_REVOKE, LEASE_RETURN, LEASE_HEARTBEAT,
                  LEASE_BUSY}
# Why a lease was revoked: another process needs the worker; the worker
# is lost (its jobs in flight fail with WorkerLostError); the worker leaves.
REVOKE_SHARE = b"share"
REVOKE_LOST = b"lost"
REVOKE_LEAVING = b"leaving"
# A direct reply's status besides OK and ERR, and its reasons.
STATUS_NOT_RUN = b"NOT_RUN"
NOT_RUN_LEASE = b"lease"  # not the worker's current lease (revoked, or an old epoch)
NOT_RUN_STOPPING = b"stopping"  # the worker is leaving
NOT_RUN_CREDIT = b"credit"  # the holder sent more than the lease's credit
MAX_ENDPOINT_LENGTH = 255

# Upper bounds, in seconds, of the run-time histogram's buckets
# (Prometheus' "le"), from a tenth of a millisecond (a job of a token
# server) to a minute.  On the wire: a leased worker reports its direct
# jobs' run times by bucket (REPORT, FREE).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_NBUCKETS = len(BUCKETS)

MAX_SERVICE_LENGTH = 255
MAX_JOB_ID_LENGTH = 255
MAX_CREDIT = 64  # jobs a worker may hold at once (one running, the rest waiting)
MAX_ABOUT_LENGTH = 255  # a worker's pid@host, in its READY


class _Message:
    """Equality and repr by fields, as a dataclass has them.

    Plain classes rather than dataclasses: compiled, each becomes an
    extension type (``protocol.pxd``) whose fields are C struct members.
    """

    __slots__ = ()
    _fields: tuple = ()

    def _values(self):
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __repr__(self):
        args = ", ".join(f"{n}={v!r}" for n, v in zip(self._fields, self._values()))
        return f"{type(self).__name__}({args})"


class Request(_Message):
    """A job as it travels: client -> broker -> worker.

    ``ttl_ms`` is the time left before the client gives up (0: no deadline);
    ``headers`` map str to str.
    """

    __slots__ = ("service", "job_id", "data", "ttl_ms", "headers")
    _fields = __slots__

    def __init__(self, service, job_id, data, ttl_ms=0, headers=None):
        self.service = service
        self.job_id = job_id
        self.data = data
        self.ttl_ms = ttl_ms
        self.headers = {} if headers is None else headers


class Reply(_Message):
    """A result or an error as it travels back: worker -> broker -> client.

    ``data`` is the result when ``ok``; otherwise ``code`` is one of the
    ERR_* codes, and ``exc_type`` and ``traceback`` describe a remote
    exception (ExecutionError).  ``worker`` is who ran the job (pid@host,
    "" if unknown) when the client asked (:data:`WORKER_HEADER`), else None.
    """

    __slots__ = ("job_id", "ok", "data", "code", "message", "exc_type", "traceback",
                 "worker")
    _fields = __slots__

    def __init__(self, job_id, ok, data=b"", code="", message="", exc_type="",
                 traceback="", worker=None):
        self.job_id = job_id
        self.ok = ok
        self.data = data
        self.code = code
        self.message = message
        self.exc_type = exc_type
        self.traceback = traceback
        self.worker = worker

    @classmethod
    def error(cls, job_id, code, message, exc_type="", traceback=""):
        return cls(job_id, False, b"", code, message, exc_type, traceback)

    def body(self) -> list[bytes]:
        """The frames after the job id: status and payload (not ``worker``,
        which only the broker adds)."""
        if self.ok:
            return [STATUS_OK, self.data]
        return [
            STATUS_ERROR,
            self.code.encode(),
            self.message.encode("utf-8", "replace"),
            self.exc_type.encode("utf-8", "replace"),
            self.traceback.encode("utf-8", "replace"),
        ]


# The per-job paths make their messages with these rather than the classes'
# calls: compiled, a C call that sets the fields, where calling the type
# parses its arguments and runs ``__init__`` (about 500 instructions each).

def new_request(service, job_id, data, ttl_ms, headers) -> Request:
    """``Request(service, job_id, data, ttl_ms, headers)``."""
    req = Request.__new__(Request)
    req.service = service
    req.job_id = job_id
    req.data = data
    req.ttl_ms = ttl_ms
    req.headers = headers
    return req


def ok_reply(job_id, data) -> Reply:
    """``Reply(job_id, True, data)``."""
    reply = Reply.__new__(Reply)
    reply.job_id = job_id
    reply.ok = True
    reply.data = data
    reply.code = reply.message = reply.exc_type = reply.traceback = ""
    reply.worker = None
    return reply


# -- headers: trailing key/value frame pairs --------------------------------


def encode_headers(headers) -> list[bytes]:
    frames = []
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"job headers map str to str; got {key!r}: {value!r}"
            )
        frames.append(key.encode())
        frames.append(value.encode())
    return frames


def decode_headers(frames) -> dict[str, str]:
    if len(frames) % 2:
        raise ProtocolError("headers must come as key/value frame pairs")
    try:
        return {
            frames[i].decode(): frames[i + 1].decode()
            for i in range(0, len(frames), 2)
        }
    except UnicodeDecodeError:
        raise ProtocolError("headers must be UTF-8") from None


def _decode_ttl(frame: bytes) -> int:
    """Decimal milliseconds, digit by digit: compiled, a C loop, where
    ``isdigit`` and ``int`` are a Python call each."""
    if not 0 < len(frame) <= 12:
        raise ProtocolError(f"ttl must be decimal milliseconds, got {frame[:20]!r}")
    ttl = 0
    for digit in frame:  # ints, in Python as in C
        if not 48 <= digit <= 57:  # b"0" to b"9"
            raise ProtocolError(f"ttl must be decimal milliseconds, got {frame[:20]!r}")
        ttl = ttl * 10 + (digit - 48)
    return ttl


def _decimal(number):
    """``b"%d" % number``; compiled, a C integer formatted in C, without
    the bytes formatting machinery."""
    return f"{number}".encode("ascii")


def _check_service(service: bytes) -> bytes:
    if not service or len(service) > MAX_SERVICE_LENGTH:
        raise ProtocolError("service name must be 1 to 255 bytes")
    return service


def _check_job_id(job_id: bytes) -> bytes:
    if not job_id or len(job_id) > MAX_JOB_ID_LENGTH:
        raise ProtocolError("job id must be 1 to 255 bytes")
    return job_id


# -- frontend: client <-> broker --------------------------------------------
# On the broker's ROUTER every message starts [client_address, b""].


def client_request(req: Request) -> list[bytes]:
    """What our client sends on its DEALER (the empty frame included)."""
    frames = [b"", EXT_CLIENT, req.service, req.job_id, _decimal(req.ttl_ms), req.data]
    if req.headers:
        frames += encode_headers(req.headers)
    return frames


def parse_client_reply(frames) -> Reply:
    """What our client receives on its DEALER: [b"", PHC01, service, id, status, ...],
    and, if it asked (:data:`WORKER_HEADER`), the worker's pid@host last."""
    if len(frames) < 6 or frames[0] != b"" or frames[1] != EXT_CLIENT:
        raise ProtocolError("not a PHC01 reply")
    body = frames[4:]
    count = len(body)
    if (count == 3 and body[0] == STATUS_OK) or (count == 6 and body[0] == STATUS_ERROR):
        reply = parse_reply_body(frames[3], body[:-1])
        reply.worker = body[-1].decode("utf-8", "replace")
        return reply
    return parse_reply_body(frames[3], body)


def reply_frames_ok(frames) -> bool:
    """Whether an extended REPLY body is [job id, OK, result] or
    [job id, ERR, code, message, type, traceback]."""
    count = len(frames)
    return count >= 2 and ((frames[1] == STATUS_OK and count == 3) or
                           (frames[1] == STATUS_ERROR and count == 6))


def parse_reply_body(job_id: bytes, frames) -> Reply:
    status = frames[0]
    if status == STATUS_OK and len(frames) == 2:
        return ok_reply(job_id, frames[1])
    if status == STATUS_ERROR and len(frames) == 5:
        code, message, exc_type, tb = [f.decode("utf-8", "replace") for f in frames[1:]]
        return Reply(job_id, False, b"", code, message, exc_type, tb)
    raise ProtocolError(f"bad reply status {status[:10]!r} or frame count")


class ClientMessage(_Message):
    """A request as the broker sees it arrive on the frontend.

    ``extended``: PHC01 (ours) or MDPC01 (plain); ``body``: the plain
    client's body frames, kept as sent; ``wants_worker``: the request carried
    :data:`WORKER_HEADER` (taken out of its headers), so the reply says who
    ran the job.
    """

    __slots__ = ("address", "extended", "request", "body", "wants_worker")
    _fields = __slots__

    def __init__(self, address, extended, request, body, wants_worker=False):
        self.address = address
        self.extended = extended
        self.request = request
        self.body = body
        self.wants_worker = wants_worker


def parse_frontend(frames) -> ClientMessage:
    """Validate one message from the frontend ROUTER."""
    if len(frames) < 5 or frames[1] != b"":
        raise ProtocolError(f"bad frontend envelope ({len(frames)} frames)")
    address, _, header, service = frames[:4]
    _check_service(service)
    if header == MDP_CLIENT:
        body = frames[4:]
        data = body[0] if len(body) == 1 else b"".join(body)
        return ClientMessage(address, False, Request(service, b"", data), body)
    if header == EXT_CLIENT:
        if len(frames) < 7:
            raise ProtocolError("PHC01 request needs job id, ttl and data")
        job_id = _check_job_id(frames[4])
        ttl = _decode_ttl(frames[5])
        wants_worker = False
        if len(frames) > 7:
            headers = decode_headers(frames[7:])
            # Reserved: a question to the broker, not part of the job.
            wants_worker = headers.pop(WORKER_HEADER, None) is not None
        else:
            headers = {}
        msg = ClientMessage.__new__(ClientMessage)  # as new_request, for the same reason
        msg.address = address
        msg.extended = True
        msg.request = new_request(service, job_id, frames[6], ttl, headers)
        msg.body = []
        msg.wants_worker = wants_worker
        return msg
    raise ProtocolError(f"unknown client header {header[:10]!r}")


def job_size(req: Request) -> int:
    """A job's size as ``max_job_size`` counts it: its data and its headers'
    keys and values, encoded (the client checks it before sending, the
    broker again on arrival)."""
    size = len(req.data)
    if req.headers:
        for frame in encode_headers(req.headers):
            size += len(frame)
    return size


def frontend_rejection(frames, message):
    """An error reply (ProtocolError) to a request :func:`parse_frontend`
    refused, or None when it cannot be answered (no client address, or, for
    PHC01, no usable job id to answer to)."""
    if len(frames) < 5 or frames[1] != b"":
        return None
    address, _, header, service = frames[:4]
    service = service[:MAX_SERVICE_LENGTH]  # echo a bounded name, not what was sent
    if header == EXT_CLIENT:
        job_id = frames[4]
        if not job_id or len(job_id) > MAX_JOB_ID_LENGTH:
            return None
        reply = Reply.error(job_id, ERR_BAD_REQUEST, message)
        return [address, b"", EXT_CLIENT, service, job_id, *reply.body()]
    if header == MDP_CLIENT:
        return [address, b"", MDP_CLIENT, service, STATUS_ERROR, ERR_BAD_REQUEST.encode(),
                message.encode("utf-8", "replace")]
    return None


def frontend_reply(msg: ClientMessage, reply: Reply, worker: bytes = b"") -> list[bytes]:
    """The broker's reply to a client, in that client's dialect; ``worker``
    (pid@host of the worker that ran the job, if any) goes to an extended
    client that asked for it."""
    head = [msg.address, b""]
    if msg.extended:
        frames = [*head, EXT_CLIENT, msg.request.service, reply.job_id, *reply.body()]
        if msg.wants_worker:
            frames.append(worker)
        return frames
    if reply.ok:
        return [*head, MDP_CLIENT, msg.request.service, reply.data]
    # A plain client cannot be told an exception; it gets a readable error body.
    return [
        *head,
        MDP_CLIENT,
        msg.request.service,
        STATUS_ERROR,
        reply.code.encode(),
        reply.message.encode("utf-8", "replace"),
    ]


def frontend_worker_reply(msg: ClientMessage, body, worker: bytes = b"") -> list[bytes]:
    """An extended worker's REPLY body (``[job id, status, ...]``, checked
    with :func:`reply_frames_ok`), passed to the client in its dialect
    (``worker`` as in :func:`frontend_reply`)."""
    if msg.extended:
        # Both ends speak the extension: the frames pass through as they are.
        frames = [msg.address, b"", EXT_CLIENT, msg.request.service, *body]
        if msg.wants_worker:
            frames.append(worker)
        return frames
    return frontend_reply(msg, parse_reply_body(body[0], body[1:]))


def frontend_plain_reply(msg: ClientMessage, body, worker: bytes = b"") -> list[bytes]:
    """A plain worker's (or MMI's) reply body, passed to a client (``worker``
    as in :func:`frontend_reply`)."""
    if msg.extended:
        data = body[0] if len(body) == 1 else b"".join(body)
        return frontend_reply(msg, Reply(msg.request.job_id, True, data), worker)
    return [msg.address, b"", MDP_CLIENT, msg.request.service, *body]


# -- backend: broker <-> worker ----------------------------------------------
# On the broker's ROUTER every message starts [worker_address, b"", MDPW01, command].


class WorkerMessage(_Message):
    """A command as the broker sees it arrive on the backend.

    READY sets ``service``, ``extended`` (it carried the powerhose/1 token)
    and ``credit`` (jobs the worker accepts at once); REPLY sets ``client``
    (the client address frame) and ``body`` (the frames after the delimiter).
    """

    __slots__ = ("address", "command", "service", "extended", "credit", "client", "body",
                 "about", "endpoint", "epoch", "held", "counts")
    _fields = __slots__

    def __init__(self, address, command, service=b"", extended=False, credit=1,
                 client=b"", body=None, about=b"", endpoint=b"", epoch=0, held=0,
                 counts=None):
        self.address = address
        self.command = command
        self.service = service
        self.extended = extended
        self.credit = credit
        self.client = client
        self.body = [] if body is None else body
        self.about = about  # INFO: the worker's pid@host
        self.endpoint = endpoint  # DIRECT: the worker's direct socket
        self.epoch = epoch  # LEASE: the lease the worker answers for (0: ended)
        self.held = held  # LEASE: direct jobs it read and has not answered
        self.counts = counts  # FREE, REPORT: a DirectCounts


def _worker_reply(address: bytes, client: bytes, body: list) -> WorkerMessage:
    """``WorkerMessage(address, REPLY, client=client, body=body)``, one per
    job: compiled, a C call that sets the fields, as new_request."""
    msg = WorkerMessage.__new__(WorkerMessage)
    msg.address = address
    msg.command = REPLY
    msg.service = msg.about = msg.endpoint = b""
    msg.extended = False
    msg.credit = 1
    msg.client = client
    msg.body = body
    msg.epoch = msg.held = 0
    msg.counts = None
    return msg


def parse_backend(frames) -> WorkerMessage:
    """Validate one message from the backend ROUTER."""
    if len(frames) < 4 or frames[1] != b"" or frames[2] != MDP_WORKER:
        raise ProtocolError(f"bad backend envelope ({len(frames)} frames)")
    address, command = frames[0], frames[3]
    if command == READY:
        if len(frames) == 5:
            return WorkerMessage(address, command, _check_service(frames[4]))
        if not 6 <= len(frames) <= 7 or frames[5] != EXT_TOKEN:
            raise ProtocolError("READY takes a service name, then optionally "
                                "powerhose/1 and a credit")
        credit = 1
        if len(frames) == 7:
            if not frames[6].isdigit() or not 1 <= int(frames[6]) <= MAX_CREDIT:
                raise ProtocolError(f"credit must be 1 to {MAX_CREDIT}")
            credit = int(frames[6])
        return WorkerMessage(address, command, _check_service(frames[4]), True, credit)
    if command == INFO:
        if len(frames) != 5 or len(frames[4]) > MAX_ABOUT_LENGTH:
            raise ProtocolError(f"INFO takes one frame, pid@host, of at most "
                                f"{MAX_ABOUT_LENGTH} bytes")
        return WorkerMessage(address, command, about=frames[4])
    if command == REPLY:
        if len(frames) < 7 or frames[5] != b"":
            raise ProtocolError("REPLY needs client address, empty frame, body")
        return _worker_reply(address, frames[4], frames[6:])
    if command in (HEARTBEAT, DISCONNECT, PAUSE, RESUME):
        if len(frames) != 4:
            raise ProtocolError("HEARTBEAT, DISCONNECT, PAUSE and RESUME take no body")
        return WorkerMessage(address, command)
    if command == DIRECT:
        if len(frames) != 5 or not frames[4].startswith(b"ipc://") or \
                len(frames[4]) > MAX_ENDPOINT_LENGTH:
            raise ProtocolError(f"DIRECT takes one frame, an ipc:// endpoint of at most "
                                f"{MAX_ENDPOINT_LENGTH} bytes")
        return WorkerMessage(address, command, endpoint=frames[4])
    if command == LEASE:
        if len(frames) != 6:
            raise ProtocolError("a worker's LEASE takes an epoch ('' if none) and a count")
        epoch = _decode_number(frames[4], "epoch") if frames[4] else 0
        return WorkerMessage(address, command, epoch=epoch,
                             held=_decode_number(frames[5], "held"))
    if command == FREE or command == REPORT:
        return WorkerMessage(address, command, counts=parse_counts(frames[4:]))
    raise ProtocolError(f"unknown worker command {command[:4]!r}")


def parse_worker_reply(msg: WorkerMessage) -> Reply:
    """An extended worker's REPLY body: [job_id, status, payload...]."""
    if len(msg.body) < 3:
        raise ProtocolError("extended REPLY needs job id, status and payload")
    return parse_reply_body(msg.body[0], msg.body[1:])


def backend_request(address, client, req: Request, extended, body=None):
    """REQUEST to a worker; extended workers get id, ttl and headers."""
    if extended:
        frames = [address, b"", MDP_WORKER, REQUEST, client, b"", req.job_id,
                  _decimal(req.ttl_ms), req.data]
        if req.headers:
            frames.extend(encode_headers(req.headers))
        return frames
    return [address, b"", MDP_WORKER, REQUEST, client, b"", *(body if body else [req.data])]


def backend_command(address, command) -> list[bytes]:
    """HEARTBEAT or DISCONNECT to a worker."""
    return [address, b"", MDP_WORKER, command]


def backend_lease(address, epoch) -> list[bytes]:
    """LEASE to a worker: accept direct jobs under ``epoch``; 0 ends its lease."""
    return [address, b"", MDP_WORKER, LEASE, _decimal(epoch) if epoch else b""]


# -- worker side (our worker's DEALER) --------------------------------------


def worker_ready(service: bytes, credit: int = 1) -> list[bytes]:
    frames = [b"", MDP_WORKER, READY, service, EXT_TOKEN]
    if credit != 1:
        frames.append(_decimal(credit))
    return frames


def worker_info(about: bytes) -> list[bytes]:
    """INFO: who the worker is (``pid@host``), for the broker's stats."""
    return [b"", MDP_WORKER, INFO, about]


def worker_command(command: bytes) -> list[bytes]:
    return [b"", MDP_WORKER, command]


def worker_reply(client: bytes, reply: Reply) -> list[bytes]:
    if reply.ok:  # most replies: without body()'s call and its list
        return [b"", MDP_WORKER, REPLY, client, b"", reply.job_id, STATUS_OK, reply.data]
    return [b"", MDP_WORKER, REPLY, client, b"", reply.job_id, *reply.body()]


def worker_direct(endpoint: bytes) -> list[bytes]:
    """DIRECT: the ipc endpoint where this worker takes direct jobs."""
    return [b"", MDP_WORKER, DIRECT, endpoint]


def worker_lease(epoch: int, held: int) -> list[bytes]:
    """The worker's answer to LEASE: the lease it now serves (0: none) and
    the direct jobs it read and has not answered."""
    return [b"", MDP_WORKER, LEASE, _decimal(epoch) if epoch else b"", _decimal(held)]


def worker_counts(command: bytes, counts) -> list[bytes]:
    """FREE (idle again) or REPORT (still busy), with the direct jobs it ran
    since its last report."""
    return [b"", MDP_WORKER, command, *counts.frames()]


class BrokerCommand(_Message):
    """A command as our worker sees it arrive from the broker (``client`` and
    ``request`` for a REQUEST)."""

    __slots__ = ("command", "client", "request", "epoch")
    _fields = __slots__

    def __init__(self, command, client=b"", request=None, epoch=0):
        self.command = command
        self.client = client
        self.request = request
        self.epoch = epoch  # LEASE: serve direct jobs of this epoch; 0: the lease ended


def parse_broker_command(frames) -> BrokerCommand:
    """What our worker receives: [b"", MDPW01, command, ...]."""
    if len(frames) < 3 or frames[0] != b"" or frames[1] != MDP_WORKER:
        raise ProtocolError("not an MDPW01 command")
    command = frames[2]
    if command == REQUEST:
        if len(frames) < 8 or frames[4] != b"":
            raise ProtocolError("REQUEST needs client, empty frame, id, ttl, data")
        headers = decode_headers(frames[8:]) if len(frames) > 8 else {}
        req = new_request(b"", _check_job_id(frames[5]), frames[7], _decode_ttl(frames[6]),
                          headers)
        cmd = BrokerCommand.__new__(BrokerCommand)  # as new_request, for the same reason
        cmd.command = command
        cmd.client = frames[3]
        cmd.request = req
        cmd.epoch = 0
        return cmd
    if command in (HEARTBEAT, DISCONNECT):
        return BrokerCommand(command)
    if command == LEASE:
        if len(frames) != 4:
            raise ProtocolError("LEASE takes one frame, an epoch or ''")
        return BrokerCommand(command, epoch=_decode_number(frames[3], "epoch")
                             if frames[3] else 0)
    raise ProtocolError(f"unexpected command {command[:4]!r} from broker")


# -- the direct path (docs/direct_path.rst) ----------------------------------


def _decode_number(frame: bytes, what) -> int:
    """A decimal count or epoch, digit by digit (as :func:`_decode_ttl`); at
    most 18 digits, so that compiled it fits a C long long."""
    if not 0 < len(frame) <= 18:
        raise ProtocolError(f"{what} must be a decimal number, got {frame[:20]!r}")
    number = 0
    for digit in frame:
        if not 48 <= digit <= 57:
            raise ProtocolError(f"{what} must be a decimal number, got {frame[:20]!r}")
        number = number * 10 + (digit - 48)
    return number


class DirectCounts(_Message):
    """The direct jobs a leased worker ran since its last report: how each
    ended (``done``, or ``outcomes`` by error code) and their run times by
    bucket of :data:`BUCKETS` (the last bucket: above every bound), so that
    the broker's stats count them as if it had relayed them."""

    __slots__ = ("done", "outcomes", "buckets", "run_sum")
    _fields = __slots__

    def __init__(self, done=0, outcomes=None, buckets=None, run_sum=0.0):
        self.done = done
        self.outcomes = {} if outcomes is None else outcomes
        self.buckets = [0] * (_NBUCKETS + 1) if buckets is None else buckets
        self.run_sum = run_sum

    def add(self, seconds, code=None):
        """A direct job ended: ``code`` is None if it succeeded; ``seconds``
        is its run time, or a negative number if it never started."""
        if code is None:
            self.done += 1
        else:
            self.outcomes[code] = self.outcomes.get(code, 0) + 1
        if seconds >= 0:
            i = 0
            while i < _NBUCKETS and seconds > BUCKETS[i]:
                i += 1
            self.buckets[i] += 1
            self.run_sum += seconds

    def jobs(self) -> int:
        """How many jobs these counts are of."""
        count = self.done
        for n in self.outcomes.values():
            count += n
        return count

    def frames(self) -> list[bytes]:
        """[done, run-time sum in microseconds, buckets "n,n,...", code, count, ...]."""
        frames = [_decimal(self.done), _decimal(round(self.run_sum * 1e6)),
                  ",".join([str(n) for n in self.buckets]).encode("ascii")]
        for code, count in self.outcomes.items():
            frames.append(code.encode("ascii"))
            frames.append(_decimal(count))
        return frames


def parse_counts(frames) -> DirectCounts:
    """The body of FREE and REPORT (:meth:`DirectCounts.frames`)."""
    if len(frames) < 3 or len(frames) % 2 == 0:
        raise ProtocolError("counts are done, run time, buckets, then code/count pairs")
    buckets = [_decode_number(n, "a bucket count") for n in frames[2].split(b",")]
    if len(buckets) != _NBUCKETS + 1:
        raise ProtocolError(f"counts need {_NBUCKETS + 1} buckets, got {len(buckets)}")
    outcomes = {}
    for i in range(3, len(frames), 2):
        code = frames[i]
        if not code or len(code) > 64 or not code.isascii():
            raise ProtocolError(f"bad error code {code[:20]!r} in counts")
        outcomes[code.decode("ascii")] = _decode_number(frames[i + 1], "a count")
    return DirectCounts(_decode_number(frames[0], "done"), outcomes, buckets,
                        _decode_number(frames[1], "run time") / 1e6)


# Client process <-> broker, on the frontend: [b"", PHL01, command, ...].


class LeaseControl(_Message):
    """A PHL01 message as the broker sees it arrive from a client process:
    LEASE (``service``, ``wanted``), RETURN (``service``, ``epoch``) or
    HEARTBEAT."""

    __slots__ = ("address", "command", "service", "wanted", "epoch")
    _fields = __slots__

    def __init__(self, address, command, service=b"", wanted=0, epoch=0):
        self.address = address
        self.command = command
        self.service = service
        self.wanted = wanted
        self.epoch = epoch


def is_lease_control(frames) -> bool:
    """Whether a frontend message is PHL01 (:func:`parse_lease_control`)
    rather than a job (:func:`parse_frontend`)."""
    return len(frames) > 2 and frames[2] == EXT_LEASE


def parse_lease_control(frames) -> LeaseControl:
    """[address, b"", PHL01, command, ...] from the frontend ROUTER."""
    if len(frames) < 4 or frames[1] != b"" or frames[2] != EXT_LEASE:
        raise ProtocolError(f"bad PHL01 envelope ({len(frames)} frames)")
    address, command = frames[0], frames[3]
    if command == LEASE_HEARTBEAT:
        if len(frames) != 4:
            raise ProtocolError("PHL01 HEARTBEAT takes no body")
        return LeaseControl(address, command)
    if command == LEASE_WANTED or command == LEASE_RETURN:
        if len(frames) != 6:
            raise ProtocolError("PHL01 LEASE and RETURN take a service and a number")
        service = _check_service(frames[4])
        if command == LEASE_WANTED:
            return LeaseControl(address, command, service,
                                _decode_number(frames[5], "wanted"))
        return LeaseControl(address, command, service, 0, _decode_number(frames[5], "epoch"))
    raise ProtocolError(f"unknown PHL01 command {command[:10]!r}")


def lease_wanted(service: bytes, wanted: int) -> list[bytes]:
    """Client: ``wanted`` jobs of mine wait or could run on leases of ``service``."""
    return [b"", EXT_LEASE, LEASE_WANTED, service, _decimal(wanted)]


def lease_return(service: bytes, epoch: int) -> list[bytes]:
    """Client: no job of mine is in flight on that lease any more."""
    return [b"", EXT_LEASE, LEASE_RETURN, service, _decimal(epoch)]


def lease_heartbeat() -> list[bytes]:
    return [b"", EXT_LEASE, LEASE_HEARTBEAT]


def lease_grant(address, service, epoch: int, endpoint: bytes, credit: int,
                about: bytes = b"", max_job_size: int = 16 << 20) -> list[bytes]:
    """Broker: the worker at ``endpoint`` (``about``: its pid@host, if it
    said) is yours under ``epoch``, ``credit`` jobs at a time, each of at
    most ``max_job_size`` bytes (the broker's own limit: a larger job goes
    through the broker, which refuses it)."""
    return [address, b"", EXT_LEASE, LEASE_GRANT, service, _decimal(epoch), endpoint,
            _decimal(credit), about, _decimal(max_job_size)]


def lease_revoke(address, service, epoch: int, reason: bytes) -> list[bytes]:
    """Broker: stop choosing that lease (a REVOKE_* reason)."""
    return [address, b"", EXT_LEASE, LEASE_REVOKE, service, _decimal(epoch), reason]


def lease_busy(address, service) -> list[bytes]:
    """Broker: of your last wish for ``service``, what is not being granted
    finds no idle worker now; it is held, and granted as workers come free."""
    return [address, b"", EXT_LEASE, LEASE_BUSY, service]


class LeaseNotice(_Message):
    """A PHL01 message as a client process sees it: GRANT (``endpoint``,
    ``credit``, ``about``: the worker's pid@host or "", ``max_job_size``)
    or REVOKE (``reason``), each for ``service`` and ``epoch``; or BUSY,
    for ``service`` (epoch 0)."""

    __slots__ = ("command", "service", "epoch", "endpoint", "credit", "reason", "about",
                 "max_job_size")
    _fields = __slots__

    def __init__(self, command, service, epoch, endpoint=b"", credit=1, reason=b"",
                 about=b"", max_job_size=0):
        self.command = command
        self.service = service
        self.epoch = epoch
        self.endpoint = endpoint
        self.credit = credit
        self.reason = reason
        self.about = about
        self.max_job_size = max_job_size


def parse_lease_notice(frames) -> LeaseNotice:
    """[b"", PHL01, GRANT|REVOKE, service, epoch, ...] or [b"", PHL01, BUSY,
    service] on a client's control DEALER."""
    if len(frames) < 4 or frames[0] != b"" or frames[1] != EXT_LEASE:
        raise ProtocolError("not a PHL01 notice")
    command, service = frames[2], frames[3]
    if command == LEASE_BUSY and len(frames) == 4:
        return LeaseNotice(command, service, 0)
    if len(frames) < 6:
        raise ProtocolError(f"bad PHL01 {command[:10]!r} ({len(frames)} frames)")
    epoch = _decode_number(frames[4], "epoch")
    if command == LEASE_GRANT and len(frames) == 9:
        credit = _decode_number(frames[6], "credit")
        if not 1 <= credit <= MAX_CREDIT or not frames[5].startswith(b"ipc://") or \
                len(frames[7]) > MAX_ABOUT_LENGTH:
            raise ProtocolError("GRANT needs an ipc endpoint, a credit of 1 to "
                                f"{MAX_CREDIT}, the worker's pid@host and a job size")
        return LeaseNotice(command, service, epoch, frames[5], credit, about=frames[7],
                           max_job_size=_decode_number(frames[8], "max_job_size"))
    if command == LEASE_REVOKE and len(frames) == 6:
        return LeaseNotice(command, service, epoch, reason=frames[5])
    raise ProtocolError(f"bad PHL01 {command[:10]!r} ({len(frames)} frames)")


# Client thread <-> worker, on the worker's direct ROUTER: one frame packs
# "epoch:deadline_ns:job id" (the job id last: it may hold any byte); the
# deadline is absolute on CLOCK_MONOTONIC, which every process of a host
# shares (0: none).  The reply is the relayed REPLY's body, or NOT_RUN.


class DirectRequest(_Message):
    """A direct job as the worker reads it: ``request``'s ``ttl_ms`` is 0,
    its deadline is ``deadline_ns``."""

    __slots__ = ("address", "epoch", "deadline_ns", "request")
    _fields = __slots__

    def __init__(self, address, epoch, deadline_ns, request):
        self.address = address
        self.epoch = epoch
        self.deadline_ns = deadline_ns
        self.request = request


def direct_request(epoch, deadline_ns, req: Request) -> list[bytes]:
    """What a client thread sends on its DEALER to a leased worker."""
    job_id = req.job_id
    if COMPILED and epoch >= 0 and deadline_ns >= 0 and len(job_id) <= MAX_JOB_ID_LENGTH:
        # Formatted in C, digit by digit: str formatting and encoding cost
        # a job 1,000 instructions, snprintf 1,500.  Two numbers of at most
        # 19 digits, two colons, the job id.
        buffer = cython.declare(cython.char[300])
        size: cython.int = _put_decimal(buffer, 0, epoch)
        buffer[size] = 58  # b":"
        size = _put_decimal(buffer, size + 1, deadline_ns)
        buffer[size] = 58
        memcpy(buffer + size + 1, cython.cast(cython.p_char, job_id), len(job_id))
        head = PyBytes_FromStringAndSize(buffer, size + 1 + len(job_id))
    else:
        head = f"{epoch}:{deadline_ns}:".encode("ascii") + job_id
    frames = [b"", head, req.data]
    if req.headers:
        frames += encode_headers(req.headers)
    return frames


def _put_decimal(buffer, at, number):
    """Compiled only: ``number`` (not negative) in decimal at ``buffer[at]``;
    the index after its last digit."""
    digits = cython.declare(cython.char[20])
    count: cython.int = 0
    while True:
        digits[count] = 48 + number % 10
        number //= 10
        count += 1
        if number == 0:
            break
    while count:
        count -= 1
        buffer[at] = digits[count]
        at += 1
    return at


def parse_direct_request(frames) -> DirectRequest:
    """[client address, b"", head, data, key, value, ...] on the worker's ROUTER."""
    if len(frames) < 4 or frames[1] != b"":
        raise ProtocolError(f"bad direct envelope ({len(frames)} frames)")
    headers = decode_headers(frames[4:]) if len(frames) > 4 else {}
    direct = DirectRequest.__new__(DirectRequest)  # as new_request, for the same reason
    direct.address = frames[0]
    job_id = _read_head(frames[2], direct)
    direct.request = new_request(b"", _check_job_id(job_id), frames[3], 0, headers)
    return direct


def _read_head(head: bytes, direct: DirectRequest) -> bytes:
    """``epoch:deadline:job id``: the two numbers into ``direct``, the job id
    returned.  One pass over the bytes (compiled, a C loop), where a split
    and two decodes made four objects a job."""
    epoch = deadline = 0
    field = digits = 0
    at = 0
    for digit in head:
        at += 1
        if digit == 58:  # b":"
            if digits == 0:
                break  # an empty number: the error below
            if field == 1:
                direct.epoch = epoch
                direct.deadline_ns = deadline
                return head[at:]
            field, digits = 1, 0
            continue
        if not 48 <= digit <= 57 or digits == 18:  # 18 digits: a C long long
            break
        digits += 1
        if field == 0:
            epoch = epoch * 10 + (digit - 48)
        else:
            deadline = deadline * 10 + (digit - 48)
    raise ProtocolError(f"a direct job's head is epoch:deadline:job id, got {head[:40]!r}")


def direct_reply(address: bytes, reply: Reply) -> list[bytes]:
    """The worker's answer to a direct job."""
    if reply.ok:  # as worker_reply
        return [address, b"", reply.job_id, STATUS_OK, reply.data]
    return [address, b"", reply.job_id, *reply.body()]


def direct_not_run(address: bytes, job_id: bytes, reason: bytes) -> list[bytes]:
    """The worker's refusal of a direct job it did not start (a NOT_RUN_* reason)."""
    return [address, b"", job_id, STATUS_NOT_RUN, reason]


def parse_direct_reply(frames) -> Reply:
    """[b"", job id, status, ...] on the client thread's DEALER; NOT_RUN
    becomes an error with code :data:`ERR_NOT_RUN` and the reason as message."""
    if len(frames) < 4 or frames[0] != b"":
        raise ProtocolError(f"bad direct reply ({len(frames)} frames)")
    if frames[2] == STATUS_NOT_RUN and len(frames) == 4:
        return Reply(frames[1], False, b"", ERR_NOT_RUN, frames[3].decode("ascii", "replace"))
    return parse_reply_body(frames[1], frames[2:])


# -- 27/ZAP: libzmq asks the broker whether a peer may connect ---------------


ZAP_VERSION = b"1.0"


class ZapRequest(_Message):
    """What libzmq asks during a handshake (RFC 27): ``key`` is the peer's
    CURVE public key (32 bytes), empty for other mechanisms."""

    __slots__ = ("request_id", "domain", "address", "mechanism", "key")
    _fields = __slots__

    def __init__(self, request_id, domain, address, mechanism, key):
        self.request_id = request_id
        self.domain = domain
        self.address = address
        self.mechanism = mechanism
        self.key = key


def parse_zap_request(frames) -> ZapRequest:
    """[version, request id, domain, address, identity, mechanism, credentials...]."""
    if len(frames) < 6 or frames[0] != ZAP_VERSION:
        raise ProtocolError(f"not a ZAP 1.0 request ({len(frames)} frames)")
    mechanism = frames[5]
    key = b""
    if mechanism == b"CURVE":
        if len(frames) != 7 or len(frames[6]) != 32:
            raise ProtocolError("a CURVE ZAP request carries one 32-byte key")
        key = frames[6]
    return ZapRequest(frames[1], frames[2], frames[3], mechanism, key)


def zap_reply(request_id: bytes, allowed: bool, user_id: bytes = b"") -> list[bytes]:
    """[version, request id, status code, status text, user id, metadata]."""
    if allowed:
        return [ZAP_VERSION, request_id, b"200", b"OK", user_id, b""]
    return [ZAP_VERSION, request_id, b"400", b"key not allowed", b"", b""]
