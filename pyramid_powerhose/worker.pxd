# C declarations for worker.py when Cython compiles it (pure-Python mode):
# the worker and its per-broker state become extension types, whose fields
# the loop reads as C struct members, and a direct job's path from the
# socket to the reply runs as C calls (a job costs a few Python calls: the
# target's, the lock's and the Job's).

from pyramid_powerhose.job cimport Job, new_job
from pyramid_powerhose.multipart cimport readable, recv, recv_within, send
from pyramid_powerhose.protocol cimport (
    BrokerCommand, DirectCounts, DirectRequest, Reply, Request, direct_not_run,
    direct_reply, ok_reply, parse_broker_command, parse_direct_request, worker_reply,
)
from pyramid_powerhose.readiness cimport ParentWatch, Readiness, now as _now

cimport cython
from cpython.exc cimport PyErr_CheckSignals

cdef int FREE_AFTER_MS
cdef double BROKER_CHECK
cdef int _DIRECT, _BROKER
cdef bint COMPILED


cdef class _Broker:
    cdef public object backend
    cdef public object socket
    cdef public double expiry
    cdef public double next_heartbeat
    cdef public double reconnect_at
    cdef public double backoff
    cdef public bint paused
    cdef public object lost_since


cdef class Worker:
    cdef public object target
    cdef public object settings
    cdef public bytes service
    cdef public object context
    cdef public object curve
    cdef public double heartbeat
    cdef public double liveness
    cdef public list brokers
    cdef public object _inbox
    cdef public object _poller
    cdef public Readiness _readiness
    cdef public bint stop_requested
    cdef public long long jobs_done
    cdef public object _lock
    cdef object _release, _acquire
    cdef public object _busy_since
    cdef public object _current
    cdef public object _current_broker
    cdef public bytes _client_address
    cdef public object backlog_since
    cdef public object _watchdog_stop
    cdef public object _fault_file
    cdef public object retire_at
    cdef public bint over_memory
    cdef public long long max_memory
    cdef public ParentWatch parent
    cdef public object direct
    cdef public bytes direct_endpoint
    cdef public object _direct_path
    cdef public object _busy_word
    cdef public object _word
    cdef public object _direct_client
    cdef public long long lease_epoch
    cdef public DirectCounts counts
    cdef public bint _counted
    cdef public bint _idle_told
    cdef public bint _was_leased
    cdef public bint _owed
    cdef double _broker_check_at
    cdef public bint _leaving
    cdef public bint _lease_over

    @cython.locals(broker=_Broker, now=double, since=double)
    cpdef int _loop(self) except? -1
    @cython.locals(broker=_Broker)
    cdef object _next_message(self, int timeout_ms)
    @cython.locals(broker=_Broker, waiting=Readiness, ready=int, now=double, left=int,
                   message=tuple)
    cdef object _next_direct(self, int timeout_ms)
    @cython.locals(command=BrokerCommand)
    cdef _handle(self, _Broker broker, sock, list frames)
    @cython.locals(req=Request, job=Job, reply=Reply, each=_Broker, now=double,
                   started=double, waited=double)
    cpdef handle_request(self, BrokerCommand command, _Broker broker)
    @cython.locals(broker=_Broker)
    cdef bint _pending(self) except -1
    @cython.locals(direct=DirectRequest, req=Request, job=Job, reply=Reply, each=_Broker,
                   deadline_ns="long long", now_ns="long long", now=double, end=double)
    cpdef handle_direct(self, list frames)
    cdef Reply _run(self, Job job, double now)
    @cython.locals(waiting=Readiness)
    cdef void _broker_used(self)

@cython.locals(reply=Reply)
cpdef Reply run_target(target, Job job)
cdef tuple _waiting_message(_Broker broker)
