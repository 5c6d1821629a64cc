# C types for leases.py when Cython compiles it (pure-Python mode): one
# process's leases are extension types, so a job's thread reads and writes
# them as C struct fields and calls take and release as C functions (from
# client.py, which cimports these types).

cimport cython


@cython.final
cdef class Lease:
    cdef public ServiceLeases service
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
cdef class ServiceLeases:
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
    cdef long long held(self)
    cdef long long unasked(self)
    @cython.locals(n="long long")
    cdef bint grew(self)
    @cython.locals(n="long long")
    cdef long long wish(self)
    cdef bint answered_busy(self)
    cdef bint awaiting_answer(self)
    @cython.locals(best=Lease, lease=Lease, short=bint)
    cpdef Lease choose(self)


@cython.final
cdef class Leases:
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
    cdef ServiceLeases _service(self, name)
    @cython.locals(svc=ServiceLeases, lease=Lease)
    cpdef Lease take(self, name, long long deadline_ns)
    @cython.locals(left="long long", lease=Lease)
    cdef Lease _wait(self, ServiceLeases svc, long long deadline_ns)
    @cython.locals(left="long long", end="long long", lease=Lease)
    cdef Lease _await_answer(self, ServiceLeases svc, long long deadline_ns, bint idle)
    @cython.locals(svc=ServiceLeases)
    cpdef relayed(self, name)
    @cython.locals(svc=ServiceLeases, average=double, seconds=double)
    cpdef release(self, Lease lease, refused=*, long long took=*)
    @cython.locals(svc=ServiceLeases)
    cdef _revoke(self, Lease lease, reason)
    cdef _end(self, Lease lease)
    @cython.locals(svc=ServiceLeases, lease=Lease)
    cpdef notice(self, notice)
    cpdef lost(self, Lease lease)
    @cython.locals(svc=ServiceLeases, lease=Lease)
    cpdef drop_all(self)
    @cython.locals(svc=ServiceLeases, n="long long", wanting=bint, grown=bint)
    cpdef tuple due(self, double now)
    cpdef close(self)
