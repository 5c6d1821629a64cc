# C types for broker.py when Cython compiles it (pure-Python mode): the loop
# and its readiness check become extension types, their fields C struct
# members, and the calls into the core C calls.

from pyramid_powerhose.broker_core cimport BrokerCore, Send
from pyramid_powerhose.multipart cimport readable, recv_within, send

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport errno as errno_of_c
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef double _now() noexcept

cdef int BATCH
cdef int FRONTEND, BACKEND, MONITOR, ZAP


cdef class Broker:
    cdef public object settings
    cdef public object context
    cdef public BrokerCore core
    cdef public object frontend
    cdef public object backend
    cdef public object monitor
    cdef public object zap
    cdef public object allow
    cdef object _curve_pair
    cdef public tuple sockets
    cdef bint _own_context
    cdef list _locks
    cdef bint _stop_signalled
    cdef _Readiness _readiness
    cdef object _parent
    cdef double _next_parent_check

    @cython.locals(ready=int)
    cpdef run(self)
    @cython.locals(core=BrokerCore, i=int)
    cdef _drain(self, int side)
    @cython.locals(waiting=_Readiness, out=Send)
    cdef _send(self, list sends)
    cdef _answer_zap(self)
    cdef _read_monitor(self)
    cdef bint _parent_gone(self, double now) except -1


cdef class _Readiness:
    cdef tuple sockets
    cdef public int stale
    cdef public bint stop_signalled
    cdef object poll
    cdef dict slot
    cdef pollfd fds[5]  # MAX_DESCRIPTORS
    cdef int nfds
    cdef int wake_r, wake_w
    cdef object previous_wakeup

    @cython.locals(ready=int)
    cdef int wait(self, int timeout_ms) except -1
    @cython.locals(fired=int, rc=int, i=int, err=int)
    cdef int _sleep(self, int timeout_ms) except -1
    @cython.locals(ready=int, i=int, bit=int)
    cdef int _ask(self) except -1
    cdef void asked(self, int side)
    cdef _drain_wake_pipe(self)
