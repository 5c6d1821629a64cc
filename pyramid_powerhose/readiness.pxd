# C declarations for readiness.py when Cython compiles it (pure-Python mode):
# the broker's and the worker's loops call Readiness as C, and it sleeps in
# poll() on an array.

from pyramid_powerhose.multipart cimport readable

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


cpdef double now() noexcept
cpdef long long now_ns() noexcept


cdef class ParentWatch:
    cdef public long parent
    cdef double next_check

    cpdef bint gone(self, double now) except -1


cdef class Readiness:
    cdef tuple sockets
    cdef public int stale
    cdef public bint stop_signalled
    cdef object poll
    cdef dict slot
    cdef pollfd fds[5]  # MAX_DESCRIPTORS
    cdef int nfds
    cdef int wake_r, wake_w
    cdef object previous_wakeup

    @cython.locals(ready=int, fired=int, wake=int)
    cpdef int wait(self, int timeout_ms) except -1
    @cython.locals(fired=int, rc=int, i=int, err=int)
    cdef int _sleep(self, int timeout_ms) except -1
    @cython.locals(ready=int, i=int, bit=int)
    cdef int _ask(self) except -1
    cpdef void asked(self, int bit)
    cdef _drain_wake_pipe(self)
