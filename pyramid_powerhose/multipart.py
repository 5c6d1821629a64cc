"""Multipart messages in and out, without pyzmq's per-frame overhead.

``Socket.send_multipart`` computes ``zmq.SNDMORE | flags`` for every frame
and ``recv_multipart`` calls ``getsockopt(zmq.RCVMORE)`` after every frame;
each builds an enum member, which costs more than libzmq's own work on a
small frame (on a 2-core VM, an 8-frame ``send_multipart`` took 35 us, the
same sends with an int flag 7 us).  And every frame pyzmq sends or
receives releases and retakes the GIL: a dozen hand-offs per job between
the threads of a web server.  A job crosses four multipart sends and four
receives of 6 to 9 frames, so the broker, the worker and the client send
and receive through here.

Where the native module ``_nmultipart`` (``native/multipart.cpp``) is
built, a message is one call that holds the GIL except while it waits;
otherwise the same libzmq calls go through pyzmq with plain int flags.
Both behave alike: a NOBLOCK send that cannot queue raises ``zmq.Again``
before anything is queued, a closed socket raises ``zmq.ZMQError``.
"""

import zmq
from zmq.backend import Socket as _BackendSocket

try:
    from . import _nmultipart
except ImportError:  # built without a compiler
    _nmultipart = None

# pyzmq's constants are enum members: an operation on one costs several
# Python calls.  Plain ints for the hot paths.
SNDMORE = int(zmq.SNDMORE)
RCVTIMEO = int(zmq.RCVTIMEO)
NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

# zmq.Socket.send only adds DRAFT routing_id/group handling, then calls the
# backend's send with keyword arguments: a Python frame per sent frame.
# Calling the backend's (Cython) send directly, as it does, saves that.
_send_frame = _BackendSocket.send


def _native_available() -> bool:
    if _nmultipart is None:
        return False
    try:
        from zmq.backend.cython import _zmq
    except ImportError:  # pyzmq's cffi backend (PyPy)
        return False
    return _nmultipart.init(_zmq.__file__)


NATIVE = _native_available()


def _error(exc: OSError) -> zmq.ZMQError:
    if exc.errno == zmq.EAGAIN:
        return zmq.Again()
    return zmq.ZMQError(exc.errno)


# -- through pyzmq, a call per frame ------------------------------------------


def send_python(sock, frames, flags=0):
    """``sock.send_multipart(frames, flags)`` for a list of bytes."""
    flags = int(flags)
    more = flags | SNDMORE
    for frame in frames[:-1]:
        _send_frame(sock, frame, more)
    _send_frame(sock, frames[-1], flags)


def recv_python(sock, flags=0):
    """``sock.recv_multipart(flags)``: the frames of one message, as bytes."""
    frame = sock.recv(flags, copy=False)  # a Frame knows whether more follow
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(flags, copy=False)
        frames.append(frame.bytes)
    return frames


def readable_python(sock) -> bool:
    """Whether a message is waiting in ``sock`` (``ZMQ_EVENTS``)."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


def recv_within_python(sock, timeout_ms):
    """The next message's frames, or None if none comes within ``timeout_ms``
    (0: only one already there)."""
    # RCVTIMEO is a C int of milliseconds; -1 would mean forever.
    sock.setsockopt(RCVTIMEO, min(max(0, timeout_ms), 2**31 - 1))
    try:
        return recv_python(sock)
    except zmq.Again:
        return None


# -- through _nmultipart, a call per message ------------------------------------


def send_native(sock, frames, flags=0):
    """send_python in one call: the GIL is released only to wait for room."""
    try:
        _nmultipart.send(sock.underlying, frames if type(frames) is list else list(frames),
                         int(flags))
    except OSError as exc:
        raise _error(exc) from None


def recv_native(sock, flags=0):
    """recv_python in one call: the GIL is released only if it may wait."""
    try:
        frames = _nmultipart.recv(sock.underlying, 0 if int(flags) & NOBLOCK else -1)
    except OSError as exc:
        raise _error(exc) from None
    if frames is None:
        raise zmq.Again()
    return frames


def recv_within_native(sock, timeout_ms):
    """recv_within_python in one call: the GIL is released while it may wait
    (one blocking receive under RCVTIMEO), unless ``timeout_ms`` is 0."""
    try:
        return _nmultipart.recv(sock.underlying, min(max(0, timeout_ms), 2**31 - 1))
    except OSError as exc:
        raise _error(exc) from None


def readable_native(sock) -> bool:
    """readable_python without pyzmq's getsockopt, which builds an enum member."""
    try:
        return _nmultipart.readable(sock.underlying)
    except OSError as exc:
        raise _error(exc) from None


# What the rest of the package calls.
if NATIVE:
    send, recv, recv_within = send_native, recv_native, recv_within_native
    readable = readable_native
else:
    send, recv, recv_within = send_python, recv_python, recv_within_python
    readable = readable_python
