"""Multipart messages in and out, without pyzmq's per-frame overhead.

``Socket.send_multipart`` computes ``zmq.SNDMORE | flags`` for every frame
and ``recv_multipart`` calls ``getsockopt(zmq.RCVMORE)`` after every frame;
each builds an enum member, which costs more than libzmq's own work on a
small frame (on a 2-core VM, an 8-frame ``send_multipart`` took 35 us, the
same sends with an int flag 7 us).  A job crosses four multipart sends and
four receives of 6 to 9 frames, so the broker, the worker and the client
send and receive through here: the same libzmq calls, with plain ints.
"""

import zmq
from zmq.backend import Socket as _BackendSocket

SNDMORE = int(zmq.SNDMORE)
RCVTIMEO = int(zmq.RCVTIMEO)

# zmq.Socket.send only adds DRAFT routing_id/group handling, then calls the
# backend's send with keyword arguments: a Python frame per sent frame.
# Calling the backend's (Cython) send directly, as it does, saves that.
_send_frame = _BackendSocket.send


def send(sock, frames, flags=0):
    """``sock.send_multipart(frames, flags)`` for a list of bytes.

    As there, a NOBLOCK send that cannot queue raises on the first frame,
    before anything is queued.
    """
    flags = int(flags)
    more = flags | SNDMORE
    for frame in frames[:-1]:
        _send_frame(sock, frame, more)
    _send_frame(sock, frames[-1], flags)


def recv(sock, flags=0):
    """``sock.recv_multipart(flags)``: the frames of one message, as bytes."""
    frame = sock.recv(flags, copy=False)  # a Frame knows whether more follow
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(flags, copy=False)
        frames.append(frame.bytes)
    return frames


def recv_within(sock, timeout_ms):
    """The frames of the next message, or None if none comes within ``timeout_ms``.

    A recv that waits (RCVTIMEO) makes fewer system calls than poll + recv:
    zmq_poll checks the socket before it sleeps and again after.  At 0 it
    only takes a message already there.
    """
    # RCVTIMEO is a C int of milliseconds; -1 would mean forever.
    sock.setsockopt(RCVTIMEO, min(max(0, timeout_ms), 2**31 - 1))
    try:
        return recv(sock)
    except zmq.Again:
        return None
