# cython: language_level=3, boundscheck=False, wraparound=False
"""The lease's per-job code of bench/direct.py's (iv-e), compiled: (iv-f).

The prototype's gap to the 1-hop floor is the Python each end runs per
job (docs/direct_path.rst).  This is the same work, compiled by Cython
as ``pyramid_powerhose.multipart`` is: ``LeaseCall`` is the client's
steady-state call (the lease chosen under the lock, least loaded then
least recently used, a wait on a condition when every lease is at its
credit, a job id, the epoch, receives in 200 ms slices until the reply
with that id), ``serve`` the one-socket worker's loop (the epoch check,
NOT_RUN, the run-time clock and counts, FREE once idle, heartbeats).
Frames as (iv-e)'s: ["", epoch:job_id, data] and ["", epoch:job_id,
status, result].

Messages go through ``multipart``'s compiled calls (``send_compiled``,
and ``_receive``, cimported from ``multipart.pxd``).  bench/direct.py
builds this module at run time, linked without libzmq like the package's
compiled modules, and uses it only if ``usable()``.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdio cimport snprintf
from libc.string cimport memcmp
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from zmq.backend.cython cimport libzmq
from zmq.backend.cython._zmq cimport Socket

from pyramid_powerhose.multipart cimport _receive

import threading

from pyramid_powerhose import _libzmq, multipart

cdef enum:
    MAX_LEASES = 16

cdef object send = multipart.send_compiled


def usable():
    """Whether the compiled ``multipart`` runs and this module's libzmq calls
    reach the copy pyzmq's sockets live in (as ``multipart._compiled_usable``)."""
    bound = <size_t><void *>libzmq.zmq_msg_recv
    return multipart.COMPILED and bound == _libzmq.address("zmq_msg_recv")


cdef inline long long _now_ns() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec * 1000000000LL + now.tv_nsec


cdef class LeaseCall:
    """``call(data)``: one job on one of the process's leases, from any thread;
    each thread has its own DEALER per lease."""

    cdef object context, lock, cond, local
    cdef list endpoints, prefixes, sockets
    cdef bytes ok
    cdef int count, credit, waiting
    cdef long long turn, ids
    cdef int inflight[MAX_LEASES]
    cdef long long last_used[MAX_LEASES]

    def __init__(self, context, leases, int credit, bytes ok):
        """``leases``: (endpoint, epoch) pairs, as the broker granted them."""
        if not 0 < len(leases) <= MAX_LEASES:
            raise ValueError(f"1 to {MAX_LEASES} leases")
        self.context, self.credit, self.ok = context, credit, ok
        self.endpoints = [endpoint for endpoint, _ in leases]
        self.prefixes = [epoch + b":" for _, epoch in leases]
        self.count = len(leases)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.local = threading.local()
        self.sockets = []
        for i in range(self.count):
            self.inflight[i] = self.last_used[i] = 0

    cdef int _choose(self):
        """The least loaded lease, then the least recently used; under the lock."""
        cdef int i, best = 0
        for i in range(1, self.count):
            if (self.inflight[i] < self.inflight[best] or
                    (self.inflight[i] == self.inflight[best] and
                     self.last_used[i] < self.last_used[best])):
                best = i
        return best

    cdef list _socks(self):
        socks = getattr(self.local, "socks", None)
        if socks is None:
            socks = []
            for endpoint in self.endpoints:
                sock = self.context.socket(libzmq.ZMQ_DEALER)
                sock.linger = 0
                sock.connect(endpoint)
                socks.append(sock)
            self.local.socks = socks
            with self.lock:
                self.sockets += socks
        return socks

    def __call__(self, bytes data):
        cdef int i
        cdef long long job
        cdef char head_buf[64]
        cdef bytes prefix, head
        cdef Socket sock
        lock = self.lock
        lock.acquire()
        try:
            i = self._choose()
            while self.inflight[i] >= self.credit:
                self.waiting += 1  # the real client would also ask the broker for a lease
                try:
                    self.cond.wait()
                finally:
                    self.waiting -= 1
                i = self._choose()
            self.inflight[i] += 1
            self.turn += 1
            self.last_used[i] = self.turn
            self.ids += 1
            job = self.ids
        finally:
            lock.release()
        try:
            sock = <Socket>self._socks()[i]
            prefix = <bytes>self.prefixes[i]
            head = PyBytes_FromStringAndSize(head_buf, snprintf(
                head_buf, sizeof(head_buf), "%s%llx", PyBytes_AS_STRING(prefix), job))
            send(sock, [b"", head, data])
            while True:
                frames = _receive(sock.handle, 200)
                if frames is not None and <bytes>(<list>frames)[1] == head:
                    break
        finally:
            lock.acquire()
            self.inflight[i] -= 1
            if self.waiting:
                self.cond.notify()
            lock.release()
        if <bytes>frames[2] != self.ok:
            raise RuntimeError(f"job {head!r}: {frames[2:]!r}")
        return frames[3]

    def close(self):
        for sock in self.sockets:
            sock.close(0)


cdef inline bint _under(bytes head, bytes prefix):
    """Whether a job's head carries the current epoch (``head.startswith(prefix)``)."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(prefix)
    return (PyBytes_GET_SIZE(head) >= size and
            memcmp(PyBytes_AS_STRING(head), PyBytes_AS_STRING(prefix), size) == 0)


def serve(Socket sock, run, bytes broker_id, bytes leased, list free, bytes ok,
          bytes not_run, list heartbeat, int idle_ms):
    """The one-socket worker's loop (``lease_worker_one``'s, packed frames), until
    killed.  ``free`` and ``heartbeat``: the frames before FREE's counts, and a
    heartbeat's."""
    cdef bytes prefix = None
    cdef long long jobs = 0, run_ns = 0, started, took
    cdef long long next_beat = _now_ns() + 1000000000LL
    cdef bint owed = False
    cdef list frames
    while True:
        # One blocking receive; after a job with a timeout of idle_ms + 1 (libzmq's
        # coarse millisecond clock, see direct.py).
        frames = _receive(sock.handle, idle_ms + 1 if owed else 1000)
        if frames is None:
            if owed:  # idle for about idle_ms after a job: the broker hears it once
                send(sock, free + [b"%d" % jobs, b"%d" % (run_ns // 1000)])
                jobs = run_ns = 0
                owed = False
        elif <bytes>frames[0] == broker_id:
            if <bytes>frames[3] == leased:
                prefix = <bytes>frames[5] + b":"
        elif prefix is None or not _under(<bytes>frames[2], prefix):
            send(sock, [frames[0], b"", frames[2], not_run])
            continue
        else:
            started = _now_ns()
            result = run(frames[3])
            took = _now_ns() - started
            send(sock, [frames[0], b"", frames[2], ok, result])
            jobs += 1
            run_ns += took
            owed = True
        if _now_ns() >= next_beat:
            next_beat = _now_ns() + 1000000000LL
            send(sock, heartbeat)
