# C declarations for job.py when Cython compiles it (pure-Python mode): a
# Job, made for every job a worker runs, is an extension type whose
# __init__ runs as C.

cdef class Job:
    cdef public object data
    cdef public object headers
    cdef public object id
    cdef public object deadline
    cdef public object service

cpdef bytes to_bytes(data)

cimport cython

@cython.locals(job=Job)
cpdef Job new_job(bytes data, dict headers, bytes id, deadline, service)
