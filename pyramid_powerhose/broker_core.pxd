# C types for broker_core.py when Cython compiles it (pure-Python mode): its
# classes become extension types, so the broker's state is read and written
# as C struct fields rather than through attribute dictionaries.

cdef class Send:
    cdef public object frames
    cdef public bint to_worker
    cdef public object worker
    cdef public object job


cdef class PendingJob:
    cdef public object msg
    cdef public double received
    cdef public object deadline
    cdef public double sent


cdef class Service:
    cdef public bytes name
    cdef public set workers
    cdef public object idle
    cdef public object spare
    cdef public object queue
    cdef public long done
    cdef public long failed
    cdef public object job_time


cdef class WorkerRef:
    cdef public bytes address
    cdef public Service service
    cdef public bint extended
    cdef public int credit
    cdef public object jobs
    cdef public double expiry
    cdef public bint spare
    cdef public bint vanished
    cdef public double last_reply


cdef class BrokerCore:
    cdef public object settings
    cdef public long pid
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
