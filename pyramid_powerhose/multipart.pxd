# C declarations for multipart.py when Cython compiles it (pure-Python mode):
# libzmq's functions and pyzmq's Socket, through the .pxd files pyzmq installs.
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EAGAIN, EINTR
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from zmq.backend.cython cimport libzmq
from zmq.backend.cython._zmq cimport Socket

cdef double _now_ms() noexcept nogil
cdef void *_handle(object sock) except? NULL
cdef size_t _bound_address() noexcept
cdef object _receive(void *handle, long timeout_ms)

cdef int _FOREVER
cdef bint _C_CALLS

cpdef send_compiled(sock, frames, flags=*)
cpdef recv_compiled(sock, flags=*)
cpdef recv_within_compiled(sock, long timeout_ms)
cpdef bint readable_compiled(sock) except -1
cpdef send(sock, frames, flags=*)
cpdef recv(sock, flags=*)
cpdef recv_within(sock, long timeout_ms)
cpdef bint readable(sock) except -1
