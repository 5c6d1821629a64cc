// pyramid_powerhose._nmultipart: a whole multipart message in one call.
//
// pyzmq releases and retakes the GIL around every frame it sends or
// receives.  A client thread moves 12 frames per job and a worker 16; in
// a web server with many threads each release lets another thread take
// the GIL, so one job costs a dozen GIL hand-offs (futex calls, task
// switches).  Here the frames of one message are sent or received with the
// GIL held; it is released only around a send that waits for room and a
// receive that may wait (one with a timeout other than 0).
//
// The sockets stay pyzmq's.  libzmq is not linked: init() looks its
// functions up in the library pyzmq's backend was loaded with, so both
// use the same libzmq on the same socket (pyzmq exposes the socket's
// address as Socket.underlying for such interoperation).  multipart.py
// falls back to pyzmq's calls when this module or the lookup is missing.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include <type_traits>

namespace {

// From zmq.h, stable across libzmq 4.x: the message is 64 opaque bytes.
struct zmq_msg_t {
    alignas(8) unsigned char bytes[64];
};
constexpr int ZMQ_DONTWAIT = 1;
constexpr int ZMQ_EVENTS = 15;
constexpr int ZMQ_POLLIN = 1;
constexpr int ZMQ_RCVTIMEO = 27;
constexpr int ZMQ_SNDMORE = 2;

struct Libzmq {
    int (*send)(void*, const void*, size_t, int);
    int (*msg_init)(zmq_msg_t*);
    int (*msg_recv)(zmq_msg_t*, void*, int);
    int (*msg_close)(zmq_msg_t*);
    void* (*msg_data)(zmq_msg_t*);
    size_t (*msg_size)(const zmq_msg_t*);
    int (*msg_more)(const zmq_msg_t*);
    int (*setsockopt)(void*, int, const void*, size_t);
    int (*getsockopt)(void*, int, void*, size_t*);
    int (*errno_)();
};
Libzmq zmq;
bool ready = false;

// A failed call: OSError(errno) for multipart.py to raise as pyzmq would.
PyObject* failure(int err) {
    PyObject* args = Py_BuildValue("(is)", err, "libzmq error");
    if (args != nullptr) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return nullptr;
}

PyObject* init(PyObject*, PyObject* args) {
    const char* path;
    if (!PyArg_ParseTuple(args, "s:init", &path)) return nullptr;
    void* lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) Py_RETURN_FALSE;
    bool ok = true;
    auto find = [&](auto& fn, const char* name) {
        void* symbol = dlsym(lib, name);
        ok = ok && symbol != nullptr;
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(symbol);
    };
    find(zmq.send, "zmq_send");
    find(zmq.msg_init, "zmq_msg_init");
    find(zmq.msg_recv, "zmq_msg_recv");
    find(zmq.msg_close, "zmq_msg_close");
    find(zmq.msg_data, "zmq_msg_data");
    find(zmq.msg_size, "zmq_msg_size");
    find(zmq.msg_more, "zmq_msg_more");
    find(zmq.setsockopt, "zmq_setsockopt");
    find(zmq.getsockopt, "zmq_getsockopt");
    find(zmq.errno_, "zmq_errno");
    ready = ok;  // the handle stays open: pyzmq holds the library anyway
    return PyBool_FromLong(ok);
}

void* socket_of(PyObject* address) {
    return PyLong_AsVoidPtr(address);
}

// send(socket_address, frames, flags): the frames of one message.  With
// NOBLOCK in flags, a full queue raises EAGAIN before anything is queued,
// as pyzmq's send_multipart does.  Without it, the first frame waits
// (without the GIL) for room; libzmq takes the rest of a message once its
// first frame is in.
PyObject* send(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_Check(args[1]))
        return PyErr_Format(PyExc_TypeError, "send(socket_address, frames: list, flags: int)");
    PyObject* frames = args[1];
    long flags = PyLong_AsLong(args[2]);
    if (flags == -1 && PyErr_Occurred()) return nullptr;
    void* sock = socket_of(args[0]);
    if (sock == nullptr && PyErr_Occurred()) return nullptr;
    Py_ssize_t count = PyList_GET_SIZE(frames);
    if (count == 0) return PyErr_Format(PyExc_ValueError, "a message needs a frame");
    for (Py_ssize_t i = 0; i < count; ++i) {
        PyObject* frame = PyList_GET_ITEM(frames, i);
        if (!PyBytes_Check(frame))
            return PyErr_Format(PyExc_TypeError, "frames must be bytes, not %.100s",
                                Py_TYPE(frame)->tp_name);
        const char* data = PyBytes_AS_STRING(frame);
        size_t size = static_cast<size_t>(PyBytes_GET_SIZE(frame));
        int more = i + 1 < count ? ZMQ_SNDMORE : 0;
        for (;;) {
            if (zmq.send(sock, data, size, more | ZMQ_DONTWAIT) >= 0) break;
            int err = zmq.errno_();
            if (err == EAGAIN && i == 0 && !(flags & ZMQ_DONTWAIT)) {
                int rc;
                Py_BEGIN_ALLOW_THREADS
                rc = zmq.send(sock, data, size, more);
                err = rc < 0 ? zmq.errno_() : 0;
                Py_END_ALLOW_THREADS
                if (rc >= 0) break;
            }
            if (err == EINTR) {
                if (PyErr_CheckSignals() < 0) return nullptr;
                continue;
            }
            return failure(err);
        }
    }
    Py_RETURN_NONE;
}

double now_ms() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

// recv(socket_address, timeout_ms): the frames of the next message, or None
// if none comes within timeout_ms (0: only one already there; -1: wait).
//
// A wait is one blocking receive with RCVTIMEO, without the GIL: libzmq
// then sleeps on the socket's mailbox and takes the message as it wakes,
// five system calls in all.  A try first, or zmq_poll then a receive,
// costs twice as many (each asks the mailbox again, with a poll and a
// getpid), and a job waits for two receives.
PyObject* recv(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs != 2)
        return PyErr_Format(PyExc_TypeError, "recv(socket_address, timeout_ms: int)");
    long timeout_ms = PyLong_AsLong(args[1]);
    if (timeout_ms == -1 && PyErr_Occurred()) return nullptr;
    void* sock = socket_of(args[0]);
    if (sock == nullptr && PyErr_Occurred()) return nullptr;
    zmq_msg_t msg;
    zmq.msg_init(&msg);
    double deadline = now_ms() + static_cast<double>(timeout_ms);
    // The first frame: wait for it (without the GIL) unless told not to.
    for (;;) {
        int rc, err;
        if (timeout_ms == 0) {
            rc = zmq.msg_recv(&msg, sock, ZMQ_DONTWAIT);
            err = rc < 0 ? zmq.errno_() : 0;
        } else {
            int wait = -1;
            if (timeout_ms > 0) {
                double left = deadline - now_ms();
                wait = left <= 0 ? 0 : left >= INT32_MAX ? INT32_MAX : static_cast<int>(left);
            }
            if (zmq.setsockopt(sock, ZMQ_RCVTIMEO, &wait, sizeof wait) != 0) {
                err = zmq.errno_();
                zmq.msg_close(&msg);
                return failure(err);
            }
            Py_BEGIN_ALLOW_THREADS
            rc = zmq.msg_recv(&msg, sock, 0);
            err = rc < 0 ? zmq.errno_() : 0;
            Py_END_ALLOW_THREADS
        }
        if (rc >= 0) break;
        if (err == EAGAIN) {  // nothing within the time allowed
            zmq.msg_close(&msg);
            Py_RETURN_NONE;
        }
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                zmq.msg_close(&msg);
                return nullptr;
            }
            continue;
        }
        zmq.msg_close(&msg);
        return failure(err);
    }
    // The rest of a message arrives with its first frame.
    PyObject* frames = PyList_New(0);
    for (;;) {
        PyObject* frame = frames == nullptr ? nullptr
            : PyBytes_FromStringAndSize(static_cast<const char*>(zmq.msg_data(&msg)),
                                        static_cast<Py_ssize_t>(zmq.msg_size(&msg)));
        bool more = zmq.msg_more(&msg);
        if (frame == nullptr || PyList_Append(frames, frame) < 0) {
            Py_XDECREF(frame);
            Py_CLEAR(frames);
        } else {
            Py_DECREF(frame);
        }
        if (!more) break;
        while (zmq.msg_recv(&msg, sock, ZMQ_DONTWAIT) < 0) {
            int err = zmq.errno_();
            if (err != EINTR) {
                zmq.msg_close(&msg);
                Py_XDECREF(frames);
                return failure(err);
            }
        }
    }
    zmq.msg_close(&msg);
    return frames;
}

// readable(socket_address): whether a message is waiting (ZMQ_EVENTS).
PyObject* readable(PyObject*, PyObject* address) {
    void* sock = socket_of(address);
    if (sock == nullptr && PyErr_Occurred()) return nullptr;
    int events = 0;
    size_t size = sizeof events;
    while (zmq.getsockopt(sock, ZMQ_EVENTS, &events, &size) != 0) {
        int err = zmq.errno_();
        if (err != EINTR) return failure(err);
        if (PyErr_CheckSignals() < 0) return nullptr;
    }
    return PyBool_FromLong(events & ZMQ_POLLIN);
}

PyMethodDef methods[] = {
    {"init", init, METH_VARARGS,
     "init(path): look libzmq up in the library at path (pyzmq's backend); True if found."},
    {"send", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(send)), METH_FASTCALL,
     "send(socket_address, frames, flags): send the frames (bytes) of one message."},
    {"recv", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(recv)), METH_FASTCALL,
     "recv(socket_address, timeout_ms): the next message's frames, or None on timeout."},
    {"readable", readable, METH_O,
     "readable(socket_address): whether a message is waiting to be received."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_nmultipart",
                      "Multipart send and receive on pyzmq sockets, one GIL hold per message.",
                      -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__nmultipart(void) { return PyModule_Create(&module); }
