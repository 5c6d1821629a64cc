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

This module is plain Python that Cython compiles in its pure-Python mode
when a compiler is there at install (setup.py's ``COMPILED``; C
declarations in ``multipart.pxd``).  Compiled, a message is one call on
the socket's libzmq handle (pyzmq's ``Socket.handle``, through the
``.pxd`` files pyzmq installs) that holds the GIL except while it waits;
:mod:`._libzmq` makes those calls reach the libzmq pyzmq itself uses.
Uncompiled, the same libzmq calls go through pyzmq, a call per frame with
plain int flags.  ``COMPILED`` says which runs.  Both behave alike: a
NOBLOCK send that cannot queue raises ``zmq.Again`` before anything is
queued, a closed socket raises ``zmq.ZMQError``.
"""

from __future__ import annotations

import zmq
from zmq.backend import Socket as _BackendSocket

from . import _libzmq

try:
    import cython

    _CYTHON = cython.compiled  # a constant, True, once compiled
except ImportError:  # Cython is needed only to build; uncompiled, we do without
    _CYTHON = False

# pyzmq's constants are enum members: an operation on one costs several
# Python calls.  Plain ints for the hot paths.
SNDMORE = int(zmq.SNDMORE)
RCVTIMEO = int(zmq.RCVTIMEO)
NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_FOREVER = 2**31 - 1  # RCVTIMEO is a C int of milliseconds; -1 means forever

# zmq.Socket.send only adds DRAFT routing_id/group handling, then calls the
# backend's send with keyword arguments: a Python frame per sent frame.
# Calling the backend's (Cython) send directly, as it does, saves that.
_send_frame = _BackendSocket.send


def _error(errno: int) -> zmq.ZMQError:
    """The exception pyzmq raises for ``errno``."""
    if errno == zmq.EAGAIN:
        return zmq.Again(errno)
    if errno == zmq.ETERM:
        return zmq.ContextTerminated(errno)
    return zmq.ZMQError(errno)


# -- through pyzmq, a call per frame ------------------------------------------


def send_python(sock, frames, flags=0):
    """``sock.send_multipart(frames, flags)`` for a list of bytes."""
    if not frames:
        raise ValueError("a message needs a frame")
    flags = int(flags)
    more = flags | SNDMORE
    for frame in frames[:-1]:
        _send_frame(sock, frame, more)
    _send_frame(sock, frames[-1], flags)


def recv_python(sock, flags=0):
    """``sock.recv_multipart(flags)``: the frames of one message, as bytes."""
    if not int(flags) & NOBLOCK:
        sock.setsockopt(RCVTIMEO, -1)  # wait as long as it takes, whatever recv_within set
    return _frames(sock, flags)


def _frames(sock, flags):
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
    sock.setsockopt(RCVTIMEO, min(max(0, timeout_ms), _FOREVER))
    try:
        return _frames(sock, 0)
    except zmq.Again:
        return None


# -- compiled: a call per message ---------------------------------------------
#
# Run only where Cython compiled this module (names such as ``libzmq`` come
# from multipart.pxd).  They keep the Python path's semantics, call for call.


def send_compiled(sock, frames, flags=0):
    """send_python in one call: the GIL is released only to wait for room."""
    handle: cython.p_void = _handle(sock)
    message: list = frames if type(frames) is list else list(frames)
    count: cython.Py_ssize_t = len(message)
    if count == 0:
        raise ValueError("a message needs a frame")
    for frame in message:  # all checked before one is queued
        if not isinstance(frame, bytes):
            raise TypeError(f"frames must be bytes, not {type(frame).__name__}")
    dontwait: cython.bint = (int(flags) & NOBLOCK) != 0
    i: cython.Py_ssize_t
    data: cython.p_char
    size: cython.size_t
    more: cython.int
    rc: cython.int
    err: cython.int
    for i in range(count):
        frame = message[i]
        data = PyBytes_AS_STRING(frame)
        size = PyBytes_GET_SIZE(frame)
        more = libzmq.ZMQ_SNDMORE if i + 1 < count else 0
        while True:
            if libzmq.zmq_send(handle, data, size, more | libzmq.ZMQ_DONTWAIT) >= 0:
                break
            err = libzmq.zmq_errno()
            # Only the first frame may wait: libzmq takes the rest of a
            # message once its first frame is in.  With NOBLOCK, a full
            # queue raises Again before anything is queued.
            if err == EAGAIN and i == 0 and not dontwait:
                # Without the GIL another thread could change the caller's
                # list: the rest of the message comes from a copy.
                message = message[:]
                with cython.nogil:
                    rc = libzmq.zmq_send(handle, data, size, more)
                    err = 0 if rc >= 0 else libzmq.zmq_errno()
                if rc >= 0:
                    break
            if err == EINTR:
                PyErr_CheckSignals()  # raises what a signal handler raised
                continue
            raise _error(err)


def recv_compiled(sock, flags=0):
    """recv_python in one call: the GIL is released only if it may wait."""
    frames = _receive(_handle(sock), 0 if int(flags) & NOBLOCK else -1)
    if frames is None:
        raise zmq.Again(EAGAIN)
    return frames


def recv_within_compiled(sock, timeout_ms):
    """recv_within_python in one call: the GIL is released while it may wait
    (one blocking receive under RCVTIMEO), unless ``timeout_ms`` is 0."""
    return _receive(_handle(sock), min(max(0, timeout_ms), _FOREVER))


def readable_compiled(sock) -> bool:
    """readable_python without pyzmq's getsockopt, which builds an enum member."""
    handle: cython.p_void = _handle(sock)
    events: cython.int = 0
    size: cython.size_t = cython.sizeof(events)
    while libzmq.zmq_getsockopt(handle, libzmq.ZMQ_EVENTS, cython.address(events),
                                cython.address(size)) != 0:
        err: cython.int = libzmq.zmq_errno()
        if err != EINTR:
            raise _error(err)
        PyErr_CheckSignals()
    return (events & libzmq.ZMQ_POLLIN) != 0


def _receive(handle: cython.p_void, timeout_ms: cython.long):
    """The frames of the next message, or None if none comes within
    ``timeout_ms`` (0: only one already there; -1: wait as long as it takes).

    A wait is one blocking receive under RCVTIMEO, without the GIL: libzmq
    then sleeps on the socket's mailbox and takes the message as it wakes,
    five system calls in all.  A try first, or zmq_poll then a receive,
    costs twice as many (each asks the mailbox again, with a poll and a
    getpid), and a job waits for two receives."""
    msg: libzmq.zmq_msg_t
    rc: cython.int
    err: cython.int
    wait: cython.int
    left: cython.double
    deadline: cython.double = _now_ms() + timeout_ms
    libzmq.zmq_msg_init(cython.address(msg))
    try:
        while True:  # the first frame
            if timeout_ms == 0:
                rc = libzmq.zmq_msg_recv(cython.address(msg), handle, libzmq.ZMQ_DONTWAIT)
                err = 0 if rc >= 0 else libzmq.zmq_errno()
            else:
                wait = -1
                if timeout_ms > 0:
                    left = deadline - _now_ms()
                    wait = 0 if left <= 0 else _FOREVER if left >= _FOREVER else cython.cast(
                        cython.int, left)
                if libzmq.zmq_setsockopt(handle, libzmq.ZMQ_RCVTIMEO, cython.address(wait),
                                         cython.sizeof(wait)) != 0:
                    raise _error(libzmq.zmq_errno())
                with cython.nogil:
                    rc = libzmq.zmq_msg_recv(cython.address(msg), handle, 0)
                    err = 0 if rc >= 0 else libzmq.zmq_errno()
            if rc >= 0:
                break
            if err == EAGAIN:  # nothing within the time allowed
                return None
            if err != EINTR:
                raise _error(err)
            PyErr_CheckSignals()
        frames = []
        while True:  # the rest of a message arrives with its first frame
            frames.append(PyBytes_FromStringAndSize(
                cython.cast(cython.p_char, libzmq.zmq_msg_data(cython.address(msg))),
                libzmq.zmq_msg_size(cython.address(msg))))
            if not libzmq.zmq_msg_more(cython.address(msg)):
                return frames
            while libzmq.zmq_msg_recv(cython.address(msg), handle, libzmq.ZMQ_DONTWAIT) < 0:
                err = libzmq.zmq_errno()
                if err != EINTR:
                    raise _error(err)
    finally:
        libzmq.zmq_msg_close(cython.address(msg))


def _handle(sock):
    """The libzmq socket of a pyzmq socket (NULL once closed: libzmq then
    fails with ENOTSOCK, as pyzmq does); TypeError for anything else."""
    return cython.cast(Socket, sock, typecheck=True).handle


def _now_ms() -> cython.double:
    now: timespec
    clock_gettime(CLOCK_MONOTONIC, cython.address(now))
    return now.tv_sec * 1000.0 + now.tv_nsec / 1e6


def _bound_address() -> cython.size_t:
    """Where the dynamic linker bound our calls to ``zmq_msg_recv``."""
    return cython.cast(cython.size_t, cython.cast(cython.p_void, libzmq.zmq_msg_recv))


def _compiled_usable() -> bool:
    if not _CYTHON:
        return False
    # Our libzmq calls must reach the copy pyzmq's sockets live in.
    return _bound_address() == _libzmq.address("zmq_msg_recv")


_C_CALLS = _compiled_usable()
COMPILED = _C_CALLS


# What the rest of the package calls.  Compiled, each is one C function
# that a compiled caller (the broker) calls without a Python call.


def send(sock, frames, flags=0):
    """``sock.send_multipart(frames, flags)`` for a list of bytes."""
    if _C_CALLS:
        return send_compiled(sock, frames, flags)
    return send_python(sock, frames, flags)


def recv(sock, flags=0):
    """``sock.recv_multipart(flags)``: the frames of one message, as bytes."""
    if _C_CALLS:
        return recv_compiled(sock, flags)
    return recv_python(sock, flags)


def recv_within(sock, timeout_ms):
    """The next message's frames, or None if none comes within ``timeout_ms``
    (0: only one already there)."""
    if _C_CALLS:
        return recv_within_compiled(sock, timeout_ms)
    return recv_within_python(sock, timeout_ms)


def readable(sock) -> bool:
    """Whether a message is waiting in ``sock`` (``ZMQ_EVENTS``)."""
    if _C_CALLS:
        return readable_compiled(sock)
    return readable_python(sock)
