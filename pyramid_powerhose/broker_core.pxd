# C types for broker_core.py when Cython compiles it (pure-Python mode): its
# classes become extension types, so the broker's state is read and written
# as C struct fields rather than through attribute dictionaries, and the
# core's own methods call each other as C functions.  Events the loop calls
# are cpdef (callable from Python too); internal steps are cdef.

cimport cython

from pyramid_powerhose.protocol cimport (
    ClientMessage, DirectCounts, LeaseControl, Request, WorkerMessage, backend_command,
    backend_lease, backend_request, frontend_plain_reply, frontend_rejection, frontend_reply,
    frontend_worker_reply, is_lease_control, job_size, parse_backend, parse_frontend,
    reply_frames_ok,
)


cdef class Send:
    cdef public object frames
    cdef public bint to_worker
    cdef public object worker
    cdef public object job


cdef Send _send_record(list frames, bint to_worker, worker, job)


cdef double _BOUNDS[18]  # len(BUCKETS)
cdef double NO_DEADLINE
cdef int _NBOUNDS


cdef class Histogram:
    cdef public list counts
    cdef public double total
    cdef public long count

    @cython.locals(i=int)
    cpdef void observe(self, double seconds)
    @cython.locals(i=int)
    cdef void add_counts(self, list counts, double total)
    cdef void add_zeros(self, long n)


cdef long _WINDOW


cdef class Rate:
    cdef public list slots
    cdef public long second

    cdef void _advance(self, long second)
    @cython.locals(second=long)
    cpdef void add(self, double now)
    @cython.locals(second=long)
    cdef void add_many(self, double now, long long count)
    @cython.locals(second=long)
    cpdef double per_second(self, double now)


cdef class PendingJob:
    cdef public ClientMessage msg
    cdef public double received
    cdef public double deadline
    cdef public double sent
    cdef public long long size

    cdef void _start(self, ClientMessage msg, double now, long long size)
    cdef long long ttl_ms(self, double now)


cdef PendingJob _pending_job(ClientMessage msg, double now, long long size)


cdef class Holder:
    cdef public bytes address
    cdef public double heard
    cdef public dict wanted
    cdef public dict wished
    cdef public list leases
    cdef public bint gone


cdef class WorkerRef:
    cdef public bytes address
    cdef public Service service
    cdef public bint extended
    cdef public int credit
    cdef public list jobs
    cdef public double expiry
    cdef public bint spare
    cdef public bint vanished
    cdef public double last_reply
    cdef public bint paused
    cdef public double registered
    cdef public long jobs_done
    cdef public object last_job
    cdef public bytes about
    cdef public bytes endpoint
    cdef public bint direct
    cdef public long long epoch
    cdef public Holder holder
    cdef public bint granting
    cdef public bint ending
    cdef public bint leaving
    cdef public object free_since
    cdef public double granted_at
    cdef public long long direct_jobs
    cdef public object word


cdef void _close_word(WorkerRef worker)


cdef class Service:
    cdef public bytes name
    cdef public set workers
    cdef public list idle
    cdef public list spare
    cdef public object queue
    cdef public long long queued_bytes
    cdef public long done
    cdef public long failed
    cdef public object job_time
    cdef public double last_used
    cdef public double without_workers_since
    cdef public dict outcomes
    cdef public Histogram wait
    cdef public Histogram run
    cdef public Histogram total
    cdef public Rate rate
    cdef public long long direct
    cdef public int leased
    cdef public int ending
    cdef public list wishers
    cdef public bint direct_seen

    cdef void ended(self, code, double now)

    cdef void push(self, PendingJob job)
    cdef void push_front(self, list jobs)
    cdef PendingJob pop(self)
    cdef void keep(self, list jobs)
    cdef void clear(self)
    cdef void ran(self, double seconds)
    cdef int capacity(self, WorkerRef worker)


cdef class BrokerCore:
    cdef public object settings
    cdef public long pid
    cdef public object engine
    cdef public dict counters
    cdef public double started
    cdef public dict services
    cdef public dict workers
    cdef public double heartbeat
    cdef public double liveness
    cdef public object stopping_since
    cdef public list vanished
    cdef int _probes_left
    cdef double _next_heartbeat
    cdef double _next_expiry
    cdef object _plain_ids
    cdef list _out
    cdef long long _max_job_size
    cdef long _max_queue
    cdef long long _max_queue_bytes
    cdef set _queued
    cdef double _next_sweep
    cdef public dict holders
    cdef dict _leases
    cdef long long _next_epoch
    cdef object _open_busy_word

    cdef list _take(self)
    cdef void _to_client(self, list frames)
    cdef void _to_worker(self, list frames, WorkerRef worker=*, PendingJob job=*)
    cpdef int poll_timeout(self)
    cpdef bint drained(self)
    cpdef list client_message(self, list frames, double now)
    cdef Service _service(self, bytes name, double now)
    cdef bytes mmi(self, ClientMessage msg, double now)
    cdef void _fail(self, ClientMessage msg, code, message, bytes worker=*)
    cpdef list worker_message(self, list frames, double now)
    cdef void _register(self, WorkerMessage msg, double now)
    cdef void _pause(self, WorkerRef worker, bint paused, double now)
    cdef void _reply(self, WorkerRef worker, WorkerMessage msg, double now)
    cdef void _worker_ready(self, WorkerRef worker, double now)
    @cython.locals(idle=list, spare=list)
    cdef bint _dispatch(self, Service svc, PendingJob job, double now)
    cdef void _list_spare(self, WorkerRef worker)
    cdef void _send_job(self, WorkerRef worker, PendingJob job, double now)
    cdef void _disconnect(self, bytes address)
    @cython.locals(svc=Service)
    cpdef list undelivered(self, list sends, double now)
    cpdef list bury_vanished(self, double now)
    cpdef list connection_closed(self, double now)
    cpdef list tick(self, double now)
    cdef void _expire_workers(self, double now)
    cdef void _expire_jobs(self, double now)
    cdef void _forget_idle_services(self, double now)
    cdef void _send_heartbeats(self)
    cdef void _delete_worker(self, WorkerRef worker, double now, bint requeue=*)
    @cython.locals(idle=list)
    cdef void _serve_queue(self, Service svc, double now)
    @cython.locals(svc=Service)
    cdef void _abandon_all(self)

    # the direct path
    cdef list _lease_control(self, list frames, double now)
    @cython.locals(granting=int)
    cdef void _wish(self, Holder holder, Service svc, long long wanted, double now)
    @cython.locals(need="long long", outstanding="long long")
    cdef void _answer(self, Holder holder, Service svc, double now)
    cdef void _set_wish(self, Holder holder, Service svc, long long wanted, double now)
    @cython.locals(i=int, fewest=int, held=int, other=Holder, idle=list, wishers=list)
    cdef void _grant_idle(self, Service svc, double now)
    cdef void _grant(self, WorkerRef worker, Holder holder, double now)
    @cython.locals(held=int)
    cdef int _held(self, Holder holder, Service svc)
    @cython.locals(workers=int, holders=int)
    cdef int _share(self, Service svc)
    @cython.locals(share=int, over_by=int, beyond=int, free_since=double)
    cdef WorkerRef _victim(self, Service svc, taker, bint idle_only=*)
    @cython.locals(value="long long")
    cdef object _idle_since(self, WorkerRef worker)
    @cython.locals(count=int)
    cdef int _ending_soon(self, Service svc)
    cdef void _reclaim(self, Service svc)
    cdef void _revoke(self, WorkerRef worker, bytes reason)
    cdef void _end(self, WorkerRef worker)
    cdef void _unlease(self, WorkerRef worker)
    cdef void _worker_direct(self, WorkerRef worker, WorkerMessage msg, double now)
    cdef void _worker_lease(self, WorkerRef worker, WorkerMessage msg, double now)
    cdef void _lease_returned(self, Holder holder, LeaseControl msg)
    @cython.locals(failed="long long", jobs="long long", ran="long long")
    cdef void _direct_counts(self, WorkerRef worker, WorkerMessage msg, double now)
    cdef Holder _lease_lost(self, WorkerRef worker)
    cdef void _expire_holders(self, double now)
    cdef void _drop_wishes(self, Holder holder)
    cdef void _end_all_leases(self)
