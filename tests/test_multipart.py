"""multipart.py: the compiled (a call per message) and pyzmq paths, on real
sockets; and the import of the compiled module, or its fallback."""

import glob
import os
import subprocess
import sys
import threading
import time

import pytest
import zmq

from pyramid_powerhose import _libzmq, multipart
from tests.conftest import REPO, missing

IMPLEMENTATIONS = {
    "compiled": (multipart.send_compiled, multipart.recv_compiled,
                 multipart.recv_within_compiled),
    "python": (multipart.send_python, multipart.recv_python, multipart.recv_within_python),
}
READABLE = {"compiled": multipart.readable_compiled, "python": multipart.readable_python}


def built():
    """The compiled module's file beside the package's source, if any."""
    here = os.path.dirname(multipart.__spec__.origin)
    return glob.glob(os.path.join(here, "multipart.*.so"))


def test_the_compiled_path_is_used_where_the_readme_set_up_ran():
    if not built():
        missing("pyramid_powerhose/multipart.py was not compiled (needs Cython, "
                "libzmq3-dev and a C compiler at pip install)")
    assert _libzmq.path is not None, "pyzmq's libzmq was not found among the loaded objects"
    assert multipart.COMPILED, "multipart was compiled but its Python source was imported"
    assert multipart.__file__.endswith(".so")
    with zmq.Context() as ctx, ctx.socket(zmq.PAIR) as sock:
        sock.bind("inproc://compiled-path")
        with pytest.raises(TypeError):  # the compiled send takes bytes only
            multipart.send(sock, [memoryview(b"x")])


@pytest.mark.parametrize("promoted", ["no libzmq found", "a load that fails"])
def test_without_pyzmqs_libzmq_the_python_source_runs(promoted):
    """In a fresh interpreter: no libzmq to promote, or (pretending one was
    promoted) the compiled module fails on its undefined symbols; either
    way the package imports multipart's source, and it works."""
    if not built():
        missing("pyramid_powerhose/multipart.py was not compiled")
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location(
    "pyramid_powerhose._libzmq", {os.path.join(REPO, "pyramid_powerhose", "_libzmq.py")!r})
libzmq = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = libzmq
spec.loader.exec_module(libzmq)
libzmq.promote = lambda: {"None" if promoted == "no libzmq found" else "'/nowhere'"}
libzmq.install()
import zmq
from pyramid_powerhose import multipart
assert multipart.__file__.endswith("multipart.py"), multipart.__file__
assert not multipart.COMPILED
with zmq.Context() as ctx:
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://x"); b.connect("inproc://x")
    multipart.send(a, [memoryview(b"1"), b"2"])  # pyzmq's send: any buffer
    assert multipart.recv(b) == [b"1", b"2"]
    a.close(); b.close()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    if promoted == "a load that fails":
        assert "undefined symbol" in done.stderr  # the one-line warning says why


def test_the_finder_leaves_other_modules_alone():
    finder = _libzmq._Finder()
    assert finder.find_spec("json", None) is None
    package = os.path.dirname(multipart.__spec__.origin)
    assert finder.find_spec("pyramid_powerhose.settings", [package]) is None  # never compiled


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl_name(request):
    if request.param == "compiled" and not multipart.COMPILED:
        missing("multipart.py is not compiled (needs Cython and a C compiler at install)")
    return request.param


@pytest.fixture
def impl(impl_name):
    return IMPLEMENTATIONS[impl_name]


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def pair(run_dir, context):
    """A DEALER/ROUTER pair over ipc, as the client and the broker use them."""
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(f"ipc://{run_dir}/mp.sock")
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.setsockopt(zmq.IDENTITY, b"D")
    dealer.connect(f"ipc://{run_dir}/mp.sock")
    return dealer, router


def test_frames_arrive_as_sent(impl, pair):
    send, recv, recv_within = impl
    dealer, router = pair
    frames = [b"", b"PHC01", bytes(range(256)), b"x" * (1 << 20), b""]
    send(dealer, frames)
    assert recv(router) == [b"D", *frames]
    send(router, [b"D", b"back"])
    assert recv_within(dealer, 5000) == [b"back"]


def test_many_frames_and_large_ones(impl, pair):
    send, recv, _ = impl
    dealer, router = pair
    many = [str(i).encode() for i in range(1000)]
    large = [os.urandom(1 << 16), b"y" * (16 << 20)]
    send(dealer, many)
    send(dealer, large)
    assert recv(router) == [b"D", *many]
    assert recv(router) == [b"D", *large]


def test_any_sequence_of_frames_is_sent(impl, pair):
    send, recv, _ = impl
    dealer, router = pair
    send(dealer, (b"a", b"b"))
    assert recv(router) == [b"D", b"a", b"b"]


def test_an_empty_message_is_refused(impl, pair):
    send, _, _ = impl
    with pytest.raises(ValueError):
        send(pair[0], [])


def test_a_frame_that_is_not_bytes_raises_type_error(impl, pair):
    send, _, recv_within = impl
    dealer, router = pair
    with pytest.raises(TypeError):
        send(dealer, ["text"])
    assert recv_within(router, 50) is None


def test_recv_within_returns_none_after_the_timeout(impl, pair):
    _, _, recv_within = impl
    dealer, _ = pair
    started = time.monotonic()
    assert recv_within(dealer, 200) is None
    assert 0.15 < time.monotonic() - started < 2
    assert recv_within(dealer, 0) is None
    assert recv_within(dealer, -5) is None  # as 0: no wait


def test_recv_waits_whatever_timeout_recv_within_left(impl, pair):
    send, recv, recv_within = impl
    dealer, router = pair
    assert recv_within(dealer, 10) is None
    sender = threading.Timer(0.2, lambda: send(router, [b"D", b"late"]))
    sender.start()
    try:
        assert recv(dealer) == [b"late"]  # a blocking receive: no 10 ms timeout
    finally:
        sender.join()


def test_a_waiting_receive_lets_other_threads_run(impl, pair):
    """It waits without the GIL: a thread sends while another waits."""
    send, _, recv_within = impl
    dealer, router = pair
    send(dealer, [b"hello"])
    assert multipart.recv_python(router) == [b"D", b"hello"]
    sender = threading.Timer(0.2, lambda: send(router, [b"D", b"late"]))
    sender.start()
    try:
        assert recv_within(dealer, 5000) == [b"late"]
    finally:
        sender.join()


def test_noblock_on_a_full_queue_raises_again_and_queues_nothing(impl, run_dir, context):
    send, recv, _ = impl
    out = context.socket(zmq.PUSH)
    out.linger = 0
    out.sndhwm = 1
    out.bind(f"ipc://{run_dir}/full.sock")
    with pytest.raises(zmq.Again):  # no peer: nowhere to queue
        send(out, [b"a", b"b"], zmq.NOBLOCK)
    inbound = context.socket(zmq.PULL)
    inbound.linger = 0
    inbound.connect(f"ipc://{run_dir}/full.sock")
    send(out, [b"first", b"message"])  # waits for the peer
    assert recv(inbound) == [b"first", b"message"]
    with pytest.raises(zmq.Again):
        recv(inbound, zmq.NOBLOCK)


def test_a_closed_socket_raises_zmq_error(impl, pair):
    send, recv, recv_within = impl
    dealer, _ = pair
    dealer.close()
    for call in (lambda: send(dealer, [b"x"]), lambda: recv(dealer, zmq.NOBLOCK),
                 lambda: recv_within(dealer, 10)):
        with pytest.raises(zmq.ZMQError) as raised:
            call()
        assert raised.value.errno == zmq.ENOTSOCK


def test_a_terminated_context_raises_context_terminated(impl, context):
    _, _, recv_within = impl
    sock = context.socket(zmq.PULL)
    sock.linger = 0
    sock.bind("inproc://term")
    stopper = threading.Thread(target=context.term)  # waits for sock to close
    stopper.start()
    try:
        with pytest.raises(zmq.ContextTerminated):
            recv_within(sock, 5000)
    finally:
        sock.close()
        stopper.join()


def test_the_compiled_path_refuses_what_is_not_a_pyzmq_socket():
    """It reads the socket's handle from pyzmq's Socket struct: never from
    anything else."""
    if not multipart.COMPILED:
        missing("multipart.py is not compiled")
    for call in (lambda: multipart.send_compiled(object(), [b"x"]),
                 lambda: multipart.recv_within_compiled(object(), 0),
                 lambda: multipart.readable_compiled(b"not a socket")):
        with pytest.raises(TypeError):
            call()


def test_readable_tells_whether_a_message_waits(impl_name, pair):
    readable = READABLE[impl_name]
    send, recv, _ = IMPLEMENTATIONS[impl_name]
    dealer, router = pair
    assert readable(router) is False
    send(dealer, [b"one"])
    deadline = time.monotonic() + 5
    while not readable(router):  # the message crosses libzmq's I/O thread
        assert time.monotonic() < deadline, "a sent message never became readable"
        time.sleep(0.001)
    assert readable(router) is True
    assert recv(router) == [b"D", b"one"]
    assert readable(router) is False
    dealer.close()
    with pytest.raises(zmq.ZMQError):
        readable(dealer)
