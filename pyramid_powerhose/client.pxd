# C types for client.py when Cython compiles it (pure-Python mode): the
# direct path's bookkeeping (_Lease, _Service, _Direct) and a thread's
# sockets to leased workers (_DirectSockets) become extension types, so a
# job reads and writes them as C struct fields, and take, run and release
# call each other, the protocol's codec and multipart's send and receive as
# C functions.  Client stays a Python class (users subclass it, and patch
# its methods in their tests): its direct-path methods type their locals
# with annotations instead (client.py).

cimport cython

from pyramid_powerhose.multipart cimport recv_within, send
from pyramid_powerhose.readiness cimport now_ns as _now_ns
from pyramid_powerhose.protocol cimport (
    Reply, Request, direct_request, job_size, new_request, parse_direct_reply,
)
from pyramid_powerhose.tracing cimport inject


cdef bytes _hex(long long number)

cpdef check_job(settings, data, headers, timeout)
cpdef note_reply(reply)
@cython.locals(name=bytes, ttl_ms="long long")
cdef tuple _job_request(settings, service, data, headers, timeout)
cdef dict _service_names


@cython.final
cdef class _Lease:
    cdef public _Service service
    cdef public long long epoch
    cdef public str endpoint
    cdef public int credit
    cdef public str about
    cdef public long long max_job_size
    cdef public int in_flight
    cdef public long long last_used
    cdef public object revoked
    cdef public bint owe_return
    cdef public bint gone
    cdef object __weakref__


@cython.final
cdef class _Service:
    cdef public object name
    cdef public list leases
    cdef public object cond
    cdef public int waiting
    cdef public int relaying
    cdef public long long sent
    cdef public double sent_at
    cdef public long long granted
    cdef public bint busy
    cdef public double job_time
    cdef public long long peak

    @cython.locals(held="long long")
    cdef long long unasked(self)
    @cython.locals(n="long long")
    cdef bint grew(self)
    @cython.locals(n="long long")
    cdef long long wish(self)
    cdef bint answered_busy(self)
    @cython.locals(best=_Lease, lease=_Lease, short=bint)
    cpdef _Lease choose(self)


@cython.final
cdef class _Direct:
    cdef readonly object lock
    cdef object _acquire, _release
    cdef public dict services
    cdef public dict by_epoch
    cdef public list returns
    cdef public long long turn
    cdef public long long gone_gen
    cdef public bint poked
    cdef public double beat_at
    cdef public object holders
    cdef public int wake_fd
    cdef object _wake
    cdef object __weakref__

    cdef _poke(self)
    cdef _Service _service(self, name)
    @cython.locals(svc=_Service, lease=_Lease)
    cpdef _Lease take(self, name, long long deadline_ns)
    @cython.locals(left="long long", lease=_Lease)
    cdef _Lease _wait(self, _Service svc, long long deadline_ns)
    @cython.locals(left="long long", end="long long", lease=_Lease)
    cdef _Lease _await_answer(self, _Service svc, long long deadline_ns, bint idle)
    @cython.locals(svc=_Service)
    cpdef relayed(self, name)
    @cython.locals(svc=_Service, average=double, seconds=double)
    cpdef release(self, _Lease lease, refused=*, long long took=*)
    @cython.locals(svc=_Service)
    cdef _revoke(self, _Lease lease, reason)
    cdef _end(self, _Lease lease)
    @cython.locals(svc=_Service, lease=_Lease)
    cpdef notice(self, notice)
    cpdef lost(self, _Lease lease)
    @cython.locals(svc=_Service, lease=_Lease)
    cpdef drop_all(self)
    @cython.locals(svc=_Service, n="long long", held="long long", wanting=bint, grown=bint)
    cpdef tuple due(self, double now)
    cpdef close(self)


@cython.final
cdef class _DirectSockets:
    cdef public dict socks
    cdef public long long gen
    cdef public long long ids
    cdef public object context
    cdef public object watcher
    cdef object __weakref__

    @cython.locals(lease=_Lease)
    cpdef sweep(self, long long gen)
    cpdef open(self, _Lease lease)
    cpdef close(self)
    @cython.locals(took="long long", sent="long long", now="long long", wait="long long",
                   job_id=bytes, reply=Reply)
    cdef Reply run(self, _Direct direct, _Lease lease, Request req, long long deadline_ns,
                   timeout)


@cython.locals(deadline_ns="long long", lease=_Lease, mine=_DirectSockets, reply=Reply,
               left=double)
cdef _execute_direct(client, _Direct direct, Request req, timeout, retries)

cdef _within(bint green, sock, int timeout_ms)
@cython.locals(deadline=double)
cdef _run(client, channel, Request req, timeout)
@cython.locals(remaining=double)
cdef _send(client, channel, Request req, double deadline, timeout, losses)
cdef _check_broker(channel, Request req, losses)
@cython.locals(remaining=double, green=bint)
cpdef _receive(client, channel, wanted, double deadline, Request req, timeout, losses)
