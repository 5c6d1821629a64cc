# C types for protocol.py when Cython compiles it (pure-Python mode): the
# message classes become extension types, whose fields the broker core
# reads as C struct members, and the functions the broker calls per
# message are callable from C (cpdef), without a Python call.

cimport cython

cdef class _Message:
    pass


cdef class Request(_Message):
    cdef public bytes service
    cdef public bytes job_id
    cdef public object data
    cdef public long long ttl_ms
    cdef public object headers


cdef class Reply(_Message):
    cdef public bytes job_id
    cdef public bint ok
    cdef public object data
    cdef public object code
    cdef public object message
    cdef public object exc_type
    cdef public object traceback
    cdef public object worker


cdef class ClientMessage(_Message):
    cdef public bytes address
    cdef public bint extended
    cdef public Request request
    cdef public list body
    cdef public bint wants_worker


cdef class WorkerMessage(_Message):
    cdef public bytes address
    cdef public bytes command
    cdef public bytes service
    cdef public bint extended
    cdef public int credit
    cdef public bytes client
    cdef public list body
    cdef public bytes about
    cdef public bytes endpoint
    cdef public long long epoch
    cdef public long long held
    cdef public DirectCounts counts


cdef class ZapRequest(_Message):
    cdef public bytes request_id
    cdef public bytes domain
    cdef public bytes address
    cdef public bytes mechanism
    cdef public bytes key


cdef class BrokerCommand(_Message):
    cdef public bytes command
    cdef public bytes client
    cdef public Request request
    cdef public long long epoch


cdef class DirectCounts(_Message):
    cdef public long long done
    cdef public dict outcomes
    cdef public list buckets
    cdef public double run_sum
    @cython.locals(i=int)
    cpdef add(self, double seconds, code=*)


cdef class LeaseControl(_Message):
    cdef public bytes address
    cdef public bytes command
    cdef public bytes service
    cdef public long long wanted
    cdef public long long epoch


cdef class LeaseNotice(_Message):
    cdef public bytes command
    cdef public bytes service
    cdef public long long epoch
    cdef public bytes endpoint
    cdef public int credit
    cdef public bytes reason
    cdef public bytes about
    cdef public long long max_job_size


cdef class DirectRequest(_Message):
    cdef public bytes address
    cdef public long long epoch
    cdef public long long deadline_ns
    cdef public Request request


@cython.locals(ttl="long long", digit=int)
cdef long long _decode_ttl(bytes frame) except -1
cdef bytes _decimal(long long number)
cdef bytes _check_service(bytes service)
cdef bytes _check_job_id(bytes job_id)
@cython.locals(number="long long", digit=int)
cdef long long _decode_number(bytes frame, what) except -1
cdef int _put_decimal(char *buffer, int at, unsigned long long number) noexcept

@cython.locals(req=Request)
cpdef Request new_request(bytes service, bytes job_id, data, long long ttl_ms, headers)
@cython.locals(reply=Reply)
cpdef Reply ok_reply(bytes job_id, data)

cpdef list encode_headers(headers)
@cython.locals(msg=ClientMessage)
cpdef ClientMessage parse_frontend(list frames)
cpdef long long job_size(Request req) except -1
cpdef frontend_rejection(list frames, message)
cpdef list frontend_reply(ClientMessage msg, Reply reply, bytes worker=*)
cpdef list frontend_worker_reply(ClientMessage msg, list body, bytes worker=*)
cpdef list frontend_plain_reply(ClientMessage msg, list body, bytes worker=*)
cpdef bint reply_frames_ok(list frames)
@cython.locals(msg=WorkerMessage)
cdef WorkerMessage _worker_reply(bytes address, bytes client, list body)
cpdef WorkerMessage parse_backend(list frames)
cpdef list backend_request(bytes address, bytes client, Request req, bint extended, body=*)
cpdef list backend_command(bytes address, bytes command)
cpdef list backend_lease(bytes address, long long epoch)
cpdef bint is_lease_control(list frames)
cpdef list worker_reply(bytes client, Reply reply)
@cython.locals(req=Request, cmd=BrokerCommand)
cpdef BrokerCommand parse_broker_command(list frames)
cpdef Reply parse_reply_body(bytes job_id, list frames)
@cython.locals(size=int, head=bytes, job_id=bytes)
cpdef list direct_request(long long epoch, long long deadline_ns, Request req)
@cython.locals(direct=DirectRequest, job_id=bytes)
cpdef DirectRequest parse_direct_request(list frames)
@cython.locals(epoch="long long", deadline="long long", field=int, digits=int,
               at="Py_ssize_t", digit="unsigned char")
cdef bytes _read_head(bytes head, DirectRequest direct)
cpdef list direct_reply(bytes address, Reply reply)
cpdef list direct_not_run(bytes address, bytes job_id, bytes reason)
cpdef Reply parse_direct_reply(list frames)
