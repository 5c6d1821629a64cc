# C types for broker.py when Cython compiles it (pure-Python mode): the loop
# becomes an extension type, its fields C struct members, and its calls into
# the core and readiness.py C calls.

from pyramid_powerhose.broker_core cimport BrokerCore, Send
from pyramid_powerhose.multipart cimport readable, recv_within, send

from pyramid_powerhose.readiness cimport ParentWatch, Readiness, now as _now

cimport cython

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
    cdef Readiness _readiness
    cdef ParentWatch _parent

    @cython.locals(ready=int)
    cpdef run(self)
    @cython.locals(core=BrokerCore, i=int)
    cdef _drain(self, int side)
    @cython.locals(waiting=Readiness, out=Send)
    cdef _send(self, list sends)
    cdef _answer_zap(self)
    cdef _read_monitor(self)
    cdef bint _parent_gone(self, double now) except -1
