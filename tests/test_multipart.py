"""multipart.py: the native (one call per message) and pyzmq paths, on real sockets."""

import threading
import time

import pytest
import zmq

from pyramid_powerhose import multipart
from tests.conftest import missing

IMPLEMENTATIONS = {
    "native": (multipart.send_native, multipart.recv_native, multipart.recv_within_native),
    "python": (multipart.send_python, multipart.recv_python, multipart.recv_within_python),
}
READABLE = {"native": multipart.readable_native, "python": multipart.readable_python}


def test_the_native_path_is_used_where_the_readme_set_up_ran():
    if not multipart.NATIVE:
        missing("pyramid_powerhose._nmultipart was not built (needs g++) or found no libzmq")
    assert multipart.send is multipart.send_native
    assert multipart.readable is multipart.readable_native


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl_name(request):
    if request.param == "native" and not multipart.NATIVE:
        missing("the native multipart module is not built (needs g++ at install)")
    return request.param


@pytest.fixture
def impl(impl_name):
    return IMPLEMENTATIONS[impl_name]


@pytest.fixture
def pair(run_dir):
    """A DEALER/ROUTER pair over ipc, as the client and the broker use them."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(f"ipc://{run_dir}/mp.sock")
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.setsockopt(zmq.IDENTITY, b"D")
    dealer.connect(f"ipc://{run_dir}/mp.sock")
    yield dealer, router
    context.destroy(linger=0)


def test_frames_arrive_as_sent(impl, pair):
    send, recv, recv_within = impl
    dealer, router = pair
    frames = [b"", b"PHC01", bytes(range(256)), b"x" * (1 << 20), b""]
    send(dealer, frames)
    assert recv(router) == [b"D", *frames]
    send(router, [b"D", b"back"])
    assert recv_within(dealer, 5000) == [b"back"]


def test_recv_within_returns_none_after_the_timeout(impl, pair):
    _, _, recv_within = impl
    dealer, _ = pair
    started = time.monotonic()
    assert recv_within(dealer, 200) is None
    assert 0.15 < time.monotonic() - started < 2
    assert recv_within(dealer, 0) is None


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


def test_noblock_on_a_full_queue_raises_again_and_queues_nothing(impl, run_dir):
    send, recv, _ = impl
    context = zmq.Context()
    try:
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
    finally:
        context.destroy(linger=0)


def test_a_closed_socket_raises_zmq_error(impl, pair):
    send, recv, recv_within = impl
    dealer, _ = pair
    dealer.close()
    for call in (lambda: send(dealer, [b"x"]), lambda: recv_within(dealer, 10)):
        with pytest.raises(zmq.ZMQError):
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
