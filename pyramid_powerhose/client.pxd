# C types for client.py when Cython compiles it (pure-Python mode): a
# thread's sockets to leased workers (_DirectSockets) become an extension
# type, so a job reads and writes it and its leases (leases.pxd) as C
# struct fields, and take, run and release call each other, the protocol's
# codec and multipart's send and receive as C functions.  Client stays a
# Python class (users subclass it, and patch its methods in their tests):
# its direct-path methods type their locals with annotations instead
# (client.py).

cimport cython

from pyramid_powerhose.multipart cimport recv_within, send
from pyramid_powerhose.readiness cimport now_ns as _now_ns
from pyramid_powerhose.protocol cimport (
    Reply, Request, direct_request, job_size, new_request, parse_direct_reply,
)
from pyramid_powerhose.tracing cimport inject
from pyramid_powerhose.leases cimport Lease, Leases


cdef bytes _hex(long long number)

cpdef check_job(settings, data, headers, timeout)
cpdef note_reply(reply)
@cython.locals(name=bytes, ttl_ms="long long")
cdef tuple _job_request(settings, service, data, headers, timeout)
cdef dict _service_names


@cython.final
cdef class _DirectSockets:
    cdef public dict socks
    cdef public long long gen
    cdef public long long ids
    cdef public object context
    cdef public object watcher
    cdef object __weakref__

    @cython.locals(lease=Lease)
    cpdef sweep(self, long long gen)
    cpdef open(self, Lease lease)
    cpdef close(self)
    @cython.locals(took="long long", sent="long long", now="long long", wait="long long",
                   job_id=bytes, reply=Reply)
    cdef Reply run(self, Leases direct, Lease lease, Request req, long long deadline_ns,
                   timeout)


@cython.locals(deadline_ns="long long", lease=Lease, mine=_DirectSockets, reply=Reply,
               left=double)
cdef _execute_direct(client, Leases direct, Request req, timeout, retries)

cdef _within(bint green, sock, int timeout_ms)
@cython.locals(deadline=double)
cdef _run(client, channel, Request req, timeout)
@cython.locals(remaining=double)
cdef _send(client, channel, Request req, double deadline, timeout, losses)
cdef _check_broker(channel, Request req, losses)
@cython.locals(remaining=double, green=bint)
cpdef _receive(client, channel, wanted, double deadline, Request req, timeout, losses)
