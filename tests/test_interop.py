"""Plain 7/MDP peers, written here from the RFC alone, and malformed traffic."""

import random
import threading
import time

import pytest
import zmq

from pyramid_powerhose import exc
from tests.conftest import read_log

# From 7/MDP, nothing else: headers and one-byte commands.
MDPC01, MDPW01 = b"MDPC01", b"MDPW01"
READY, REQUEST, REPLY, HEARTBEAT, DISCONNECT = b"\x01", b"\x02", b"\x03", b"\x04", b"\x05"


class PlainWorker(threading.Thread):
    """An MDP/Worker echo peer: DEALER, READY, heartbeats, REPLY, reconnect on DISCONNECT."""

    def __init__(self, backend, service, heartbeat=0.2):
        super().__init__(daemon=True)
        self.backend, self.service, self.heartbeat = backend, service, heartbeat
        self.stop = threading.Event()
        self.requests = []
        self.context = zmq.Context()

    def run(self):
        sock = self._connect()
        next_beat = time.monotonic() + self.heartbeat
        while not self.stop.is_set():
            if sock.poll(int(self.heartbeat * 1000)):
                frames = sock.recv_multipart()
                assert frames[:2] == [b"", MDPW01]
                if frames[2] == REQUEST:
                    client, body = frames[3], frames[5:]
                    self.requests.append(body)
                    sock.send_multipart([b"", MDPW01, REPLY, client, b""] + body)
                elif frames[2] == DISCONNECT:
                    sock.close(0)
                    sock = self._connect()
            if time.monotonic() >= next_beat:
                sock.send_multipart([b"", MDPW01, HEARTBEAT])
                next_beat = time.monotonic() + self.heartbeat
        sock.send_multipart([b"", MDPW01, DISCONNECT])
        sock.close(100)
        self.context.term()

    def _connect(self):
        sock = self.context.socket(zmq.DEALER)
        sock.connect(self.backend)
        sock.send_multipart([b"", MDPW01, READY, self.service])
        return sock


@pytest.fixture
def plain_worker(endpoints):
    workers = []

    def start(service=b"plain"):
        worker = PlainWorker(endpoints.backend, service)
        worker.start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop.set()
        worker.join(5)


@pytest.fixture
def req_socket(endpoints):
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.linger = 0
    sock.rcvtimeo = 5000
    sock.connect(endpoints.frontend)
    yield sock
    sock.close()
    context.term()


def test_plain_client_gets_replies_from_our_worker(cluster, req_socket):
    req_socket.send_multipart([MDPC01, b"default", b"from a plain client"])
    assert req_socket.recv_multipart() == [MDPC01, b"default", b"from a plain client"]


def test_plain_client_sees_errors_as_a_body(start_broker, req_socket):
    start_broker("--no-worker-timeout", "0.2")
    req_socket.send_multipart([MDPC01, b"nobody", b"x"])
    reply = req_socket.recv_multipart()
    assert reply[:5] == [MDPC01, b"nobody", b"ERR", b"NoWorkerError", reply[4]]
    assert b"nobody" in reply[4]


def test_plain_client_mmi_service(cluster, req_socket):
    req_socket.send_multipart([MDPC01, b"mmi.service", b"default"])
    assert req_socket.recv_multipart() == [MDPC01, b"mmi.service", b"200"]
    req_socket.send_multipart([MDPC01, b"mmi.service", b"nobody"])
    assert req_socket.recv_multipart() == [MDPC01, b"mmi.service", b"404"]
    req_socket.send_multipart([MDPC01, b"mmi.unknown", b""])
    assert req_socket.recv_multipart() == [MDPC01, b"mmi.unknown", b"501"]


def test_our_client_gets_replies_from_a_plain_worker(start_broker, plain_worker, client,
                                                     wait_workers):
    start_broker()
    worker = plain_worker()
    wait_workers(client, 1, service="plain")
    assert client.execute(b"to a plain worker", service="plain", headers={"h": "v"}) \
        == b"to a plain worker"
    # The plain worker saw exactly the MDP body: no job id, ttl or header frames.
    assert worker.requests == [[b"to a plain worker"]]


def test_plain_worker_stays_registered_between_jobs(start_broker, plain_worker, client,
                                                    wait_workers):
    start_broker()
    plain_worker()
    wait_workers(client, 1, service="plain")
    time.sleep(2)  # ten heartbeat intervals
    assert client.stats()["services"]["plain"]["workers"] == 1
    assert client.execute(b"x", service="plain") == b"x"


def test_plain_client_to_plain_worker_multi_frame(start_broker, plain_worker, client,
                                                  wait_workers, req_socket):
    start_broker()
    plain_worker()
    wait_workers(client, 1, service="plain")
    req_socket.send_multipart([MDPC01, b"plain", b"a", b"b"])
    assert req_socket.recv_multipart() == [MDPC01, b"plain", b"a", b"b"]


def _fuzz_messages(rng, valid):
    """Random garbage, and valid messages with one frame mutated, dropped or added."""
    for _ in range(2000):
        kind = rng.random()
        if kind < 0.4:
            yield [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 9))]
        else:
            frames = list(rng.choice(valid))
            action = rng.randrange(3)
            i = rng.randrange(len(frames))
            if action == 0:
                frames[i] = rng.randbytes(rng.randrange(0, 12))
            elif action == 1 and len(frames) > 1:
                del frames[i]
            else:
                frames.insert(i, rng.randbytes(rng.randrange(0, 12)))
            yield frames


def test_malformed_messages_do_not_take_the_broker_down(cluster, client, endpoints):
    broker, _ = cluster
    rng = random.Random(7)
    frontend_valid = [
        [b"", MDPC01, b"default", b"x"],
        [b"", b"PHC01", b"default", b"1", b"1000", b"x"],
        [b"", b"PHC01", b"default", b"1", b"1000", b"x", b"k", b"v"],
        [b"", MDPC01, b"mmi.service", b"default"],
    ]
    backend_valid = [
        [b"", MDPW01, READY, b"fuzz"],
        [b"", MDPW01, READY, b"fuzz", b"powerhose/1"],
        [b"", MDPW01, REPLY, b"client", b"", b"1", b"OK", b"x"],
        [b"", MDPW01, HEARTBEAT],
        [b"", MDPW01, DISCONNECT],
    ]
    context = zmq.Context()
    try:
        for endpoint, valid in ((endpoints.frontend, frontend_valid),
                                (endpoints.backend, backend_valid)):
            sock = context.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(endpoint)
            for frames in _fuzz_messages(rng, valid):
                sock.send_multipart(frames)
            assert client.ping(timeout=5) == broker.pid  # all processed, still alive
            sock.close()
    finally:
        context.term()
    assert broker.poll() is None
    assert client.execute(b"still fine") == b"still fine"
    assert client.map([b"a", b"b", b"c"]) == [b"a", b"b", b"c"]
    assert "dropped malformed message" in read_log(broker)


def test_oversized_frame_costs_the_sender_its_connection_only(start_broker, start_worker,
                                                              wait_workers, client,
                                                              endpoints):
    start_broker("--max-job-size", "1000")
    start_worker()
    wait_workers(client, 1)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoints.frontend)
    sock.send_multipart([b"", b"PHC01", b"default", b"1", b"1000", b"x" * 100_000])
    sock.close()
    context.term()
    assert client.execute(b"ok") == b"ok"
    with pytest.raises(exc.JobTooLargeError):
        client.execute(b"y" * 1500)


@pytest.mark.parametrize("body", [
    [b"not-the-id", b"OK", b"x"],  # someone else's job
    [b"ID", b"MAYBE", b"x"],  # unknown status
    [b"ID", b"OK", b"x", b"extra"],
    [b"ID", b"ERR", b"ExecutionError", b"too few frames"],
], ids=["wrong-id", "bad-status", "ok-extra-frame", "err-short"])
@pytest.mark.parametrize("plain_client", [False, True], ids=["our-client", "plain-client"])
def test_a_malformed_worker_reply_fails_that_job_and_costs_the_worker_its_place(
        start_broker, endpoints, client, wait_workers, req_socket, body, plain_client):
    start_broker()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoints.backend)
    sock.send_multipart([b"", MDPW01, READY, b"liar", b"powerhose/1"])
    try:
        wait_workers(client, 1, service="liar")
        if plain_client:
            req_socket.send_multipart([MDPC01, b"liar", b"x"])
        else:
            future = client.submit(b"x", service="liar")
        frames = _next_command(sock)
        assert frames[2] == REQUEST and frames[7] == b"x"
        body = [frames[5] if f == b"ID" else f for f in body]
        sock.send_multipart([b"", MDPW01, REPLY, frames[3], b"", *body])
        if plain_client:
            reply = req_socket.recv_multipart()  # at once, not at a timeout
            assert reply[:4] == [MDPC01, b"liar", b"ERR", b"ProtocolError"]
            assert b"malformed reply" in reply[4]
        else:
            with pytest.raises(exc.ProtocolError, match="malformed reply"):
                future.result(timeout=5)
        assert _next_command(sock)[2] == DISCONNECT
        wait_workers(client, 0, service="liar")
    finally:
        sock.close()
        context.term()


def _next_command(sock):
    """The broker's next message to a hand-made worker, HEARTBEATs skipped (the
    broker answers READY with one when it has no job for the worker)."""
    while True:
        assert sock.poll(5000)
        frames = sock.recv_multipart()
        if frames[2] != HEARTBEAT:
            return frames


def test_a_job_for_a_service_name_that_is_not_utf8_expires_cleanly(start_broker, endpoints,
                                                                    client):
    """Messages about the job name its service with replacement characters."""
    broker = start_broker("--no-worker-timeout", "5")
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoints.frontend)
    try:
        sock.send_multipart([b"", b"PHC01", b"\xff\xfe", b"1", b"200", b"x"])
        assert sock.poll(5000)
        reply = sock.recv_multipart()
        assert reply[4:6] == [b"ERR", b"TimeoutError"]
        assert "'\ufffd\ufffd'" in reply[6].decode()
    finally:
        sock.close()
        context.term()
    assert client.ping() == broker.pid  # still serving


def test_only_a_phc01_client_that_asks_gets_the_worker_frame(start_broker, start_worker,
                                                              endpoints, client, wait_workers,
                                                              req_socket):
    """On the wire, with a real broker and worker: the reply to a request with
    the reserved header ``powerhose.worker`` has one more frame, the worker's
    pid@host; the job's target never sees the header; other replies are as
    before."""
    import socket as sockets
    start_broker()
    worker = start_worker("tests.targets:headers")
    wait_workers(client, 1)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoints.frontend)
    try:
        sock.send_multipart([b"", b"PHC01", b"default", b"1", b"5000", b"", b"k", b"v",
                             b"powerhose.worker", b"1"])
        assert sock.poll(5000)
        assert sock.recv_multipart() == [b"", b"PHC01", b"default", b"1", b"OK", b"k=v",
                                         f"{worker.pid}@{sockets.gethostname()}".encode()]
        sock.send_multipart([b"", b"PHC01", b"default", b"2", b"5000", b"", b"k", b"v"])
        assert sock.poll(5000)
        assert sock.recv_multipart() == [b"", b"PHC01", b"default", b"2", b"OK", b"k=v"]
    finally:
        sock.close()
        context.term()
    req_socket.send_multipart([MDPC01, b"default", b""])
    assert req_socket.recv_multipart() == [MDPC01, b"default", b""]
