"""CURVE between hosts: keys, the broker's allow-list, and failing closed.

The allow-list and the exposure rule are tested without processes (a fake
clock, files in a temp dir); a real broker on tcp loopback checks that only
allowed keys get through the handshake, that a key added to the directory
takes effect within seconds, and that a broker exposed without CURVE does
not start.
"""

import os
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest
import zmq
import zmq.auth

from pyramid_powerhose import curve, protocol as p
from pyramid_powerhose.exc import BrokerLostError, SettingsError

from .conftest import command, read_log, wait_for


@pytest.fixture
def keys(run_dir):
    """Key pairs for a broker, a client, a worker and a rogue; the allow-list
    directory holds the client's and the worker's public keys."""
    made = os.path.join(run_dir, "keys")
    allowed = os.path.join(run_dir, "allowed")
    os.mkdir(made)
    os.mkdir(allowed)
    pairs = {}
    for name in ("broker", "client", "worker", "rogue"):
        public_file, secret_file = zmq.auth.create_certificates(made, name)
        os.chmod(secret_file, 0o600)
        pairs[name] = SimpleNamespace(public_file=public_file, secret_file=secret_file,
                                      pair=curve.load_pair(secret_file))
    for name in ("client", "worker"):
        os.link(pairs[name].public_file, os.path.join(allowed, f"{name}.key"))
    return SimpleNamespace(allowed=allowed, **pairs)


def zap_request(key, mechanism=b"CURVE", request_id=b"7"):
    return [p.ZAP_VERSION, request_id, curve.ZAP_DOMAIN, b"127.0.0.1", b"", mechanism,
            *([key] if mechanism == b"CURVE" else [])]


def status(reply):
    assert reply[:2] == [p.ZAP_VERSION, b"7"] or reply[0] == p.ZAP_VERSION
    return reply[2]


def raw(key):
    return zmq.utils.z85.decode(key)


# -- the allow-list, exactly ------------------------------------------------------------------


def test_only_keys_in_the_directory_are_allowed(keys):
    allow = curve.AllowList(keys.allowed, now=0.0)
    assert status(allow.answer(zap_request(raw(keys.client.pair[0])))) == b"200"
    assert status(allow.answer(zap_request(raw(keys.worker.pair[0])))) == b"200"
    assert status(allow.answer(zap_request(raw(keys.rogue.pair[0])))) == b"400"
    assert status(allow.answer(zap_request(b"", mechanism=b"NULL"))) == b"400"
    assert status(allow.answer([p.ZAP_VERSION, b"7"])) == b"400"  # malformed: refused


def test_the_directory_is_read_again_when_it_changes(keys):
    allow = curve.AllowList(keys.allowed, now=0.0)
    rogue = raw(keys.rogue.pair[0])
    os.link(keys.rogue.public_file, os.path.join(keys.allowed, "rogue.key"))
    allow.refresh(curve.RELOAD_INTERVAL / 2)  # not yet time to look
    assert status(allow.answer(zap_request(rogue))) == b"400"
    allow.refresh(curve.RELOAD_INTERVAL)
    assert status(allow.answer(zap_request(rogue))) == b"200"
    os.unlink(os.path.join(keys.allowed, "client.key"))
    allow.refresh(2 * curve.RELOAD_INTERVAL)
    assert status(allow.answer(zap_request(raw(keys.client.pair[0])))) == b"400"


def test_a_secret_key_others_can_read_is_refused(keys):
    os.chmod(keys.client.secret_file, 0o644)
    with pytest.raises(SettingsError, match="curve_secret"):
        curve.load_pair(keys.client.secret_file)
    with pytest.raises(SettingsError):
        curve.load_pair(keys.client.public_file)  # no secret in it


@pytest.mark.parametrize("endpoint, loopback", [
    ("ipc:///tmp/x.sock", True),
    ("tcp://127.0.0.1:5555", True),
    ("tcp://127.0.0.3:5555", True),
    ("tcp://[::1]:5555", True),
    ("tcp://localhost:5555", True),
    ("tcp://*:5555", False),
    ("tcp://0.0.0.0:5555", False),
    ("tcp://10.1.2.3:5555", False),
    ("tcp://eth0:5555", False),
    ("tcp://broker.example:5555", False),
])
def test_which_endpoints_other_hosts_can_reach(endpoint, loopback):
    assert curve.is_loopback(endpoint) is loopback
    settings = SimpleNamespace(frontend="ipc:///tmp/f", backend=endpoint, curve_secret="",
                               insecure=False)
    if loopback:
        curve.check_exposure(settings)
    else:
        with pytest.raises(SettingsError, match="curve_secret"):
            curve.check_exposure(settings)
        curve.check_exposure(SimpleNamespace(**{**vars(settings), "insecure": True}))
        curve.check_exposure(SimpleNamespace(**{**vars(settings), "curve_secret": "k"}))


# -- a real broker -----------------------------------------------------------------------------


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
def curve_broker(procs, keys):
    front, back = free_port(), free_port()
    endpoints = SimpleNamespace(frontend=f"tcp://127.0.0.1:{front}",
                                backend=f"tcp://127.0.0.1:{back}")
    proc = procs.start(command("powerhose-broker") + [
        "--frontend", endpoints.frontend, "--backend", endpoints.backend,
        "--heartbeat", "0.2", "--curve-secret", keys.broker.secret_file,
        "--curve-allow", keys.allowed], "broker")
    endpoints.proc = proc
    return endpoints


@pytest.fixture
def sockets():
    context = zmq.Context()
    made = []

    def make(kind, endpoint, pair=None, broker_public=None):
        sock = context.socket(kind)
        sock.linger = 0
        if pair is not None:
            curve.connect_with(sock, pair, broker_public)
        sock.connect(endpoint)
        made.append(sock)
        return sock
    yield make
    for sock in made:
        sock.close(0)
    context.term()


def ping(sock, timeout=0.5):
    """mmi.ping over PHC01: the broker's pid, or None if nothing came back."""
    try:
        sock.send_multipart([b"", p.EXT_CLIENT, p.MMI_PING, b"1", b"1000", b""], zmq.NOBLOCK)
    except zmq.Again:
        # No connection takes it: the broker refused the handshake and libzmq
        # dropped the pipe (a blocking send would wait for ever).
        return None
    if not sock.poll(timeout * 1000):
        return None
    return int(p.parse_client_reply(sock.recv_multipart()).data)


def stats(sock):
    sock.send_multipart([b"", p.EXT_CLIENT, p.MMI_STATS, b"2", b"1000", b""])
    assert sock.poll(3000)
    import json
    return json.loads(p.parse_client_reply(sock.recv_multipart()).data)


def test_only_allowed_keys_get_through_the_handshake(curve_broker, keys, sockets):
    broker_public = keys.broker.pair[0]
    client = sockets(zmq.DEALER, curve_broker.frontend, keys.client.pair, broker_public)
    assert wait_for(lambda: ping(client), what="an answer over CURVE") == curve_broker.proc.pid
    # A key that is not allowed, and no key at all: no answer, ever.
    rogue = sockets(zmq.DEALER, curve_broker.frontend, keys.rogue.pair, broker_public)
    plain = sockets(zmq.DEALER, curve_broker.frontend)
    assert ping(rogue, timeout=1.5) is None
    assert ping(plain, timeout=0.5) is None
    # A rogue worker is never registered, so no job waits on it.
    worker = sockets(zmq.DEALER, curve_broker.backend, keys.rogue.pair, broker_public)
    worker.send_multipart(p.worker_ready(b"default"))
    time.sleep(0.5)
    assert stats(client)["services"] == {}
    assert zmq.utils.z85.encode(raw(keys.rogue.pair[0])).decode() in read_log(
        curve_broker.proc)  # the refusal names the key


def test_an_allowed_worker_serves_an_allowed_client(curve_broker, keys, sockets):
    broker_public = keys.broker.pair[0]
    client = sockets(zmq.DEALER, curve_broker.frontend, keys.client.pair, broker_public)
    worker = sockets(zmq.DEALER, curve_broker.backend, keys.worker.pair, broker_public)
    worker.send_multipart(p.worker_ready(b"default"))
    wait_for(lambda: ping(client), what="the broker over CURVE")
    wait_for(lambda: stats(client)["services"].get("default", {}).get("workers") == 1,
             what="the worker registered over CURVE")
    client.send_multipart(p.client_request(p.Request(b"default", b"9", b"data", 5000)))
    while True:  # heartbeats come first, then the job
        assert worker.poll(3000)
        command_ = p.parse_broker_command(worker.recv_multipart())
        if command_.command == p.REQUEST:
            break
    worker.send_multipart(p.worker_reply(command_.client, p.Reply(b"9", True, b"DATA")))
    assert client.poll(3000)
    assert p.parse_client_reply(client.recv_multipart()) == p.Reply(b"9", True, b"DATA")


def test_a_key_added_to_the_directory_is_accepted_within_seconds(curve_broker, keys,
                                                                 sockets):
    rogue = sockets(zmq.DEALER, curve_broker.frontend, keys.rogue.pair, keys.broker.pair[0])
    assert ping(rogue, timeout=1.0) is None
    os.link(keys.rogue.public_file, os.path.join(keys.allowed, "rogue.key"))
    started = time.monotonic()
    # libzmq retries a refused handshake on its own; a new socket is quicker to see.
    while time.monotonic() - started < 10:
        fresh = sockets(zmq.DEALER, curve_broker.frontend, keys.rogue.pair,
                        keys.broker.pair[0])
        if ping(fresh, timeout=0.5) == curve_broker.proc.pid:
            break
    else:
        raise AssertionError("the added key was not accepted within 10 s")


def test_a_broker_other_hosts_could_reach_without_curve_does_not_start(run_dir):
    # Refused before binding anything: nothing listens on other addresses.
    port = free_port()
    result = subprocess.run(command("powerhose-broker") + [
        "--frontend", f"tcp://0.0.0.0:{port}", "--backend", f"ipc://{run_dir}/b.sock"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(f"{run_dir}/b.sock")


def test_powerhose_keys_writes_pairs_only_their_owner_can_read(run_dir):
    out = os.path.join(run_dir, "k")
    result = subprocess.run(command("powerhose") + ["keys", out, "broker", "web1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for name in ("broker", "web1"):
        for suffix in (".key", ".key_secret"):
            path = os.path.join(out, name + suffix)
            assert os.stat(path).st_mode & 0o777 == 0o600
        public, secret = curve.load_pair(os.path.join(out, f"{name}.key_secret"))
        assert curve.load_public(os.path.join(out, f"{name}.key")) == public
        assert zmq.curve_public(secret) == public  # a real pair
    again = subprocess.run(command("powerhose") + ["keys", out, "web1"],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 1
    assert curve.load_pair(os.path.join(out, "web1.key_secret"))[0] == public  # untouched


# -- our client and worker over CURVE ----------------------------------------------------------


def curve_worker(procs, endpoints, keys, pair):
    return procs.start(command("powerhose-worker") + [
        "tests.targets:echo", "--backend", endpoints.backend, "--heartbeat", "0.2",
        "--curve-secret", pair.secret_file, "--curve-broker", keys.broker.public_file],
        "worker")


def test_our_client_and_worker_over_curve(curve_broker, keys, procs):
    from pyramid_powerhose import Client
    curve_worker(procs, curve_broker, keys, keys.worker)
    with Client(frontend=curve_broker.frontend, curve_secret=keys.client.secret_file,
                curve_broker=keys.broker.public_file, timeout=5) as client:
        wait_for(lambda: client.ping(timeout=0.5) == curve_broker.proc.pid,
                 what="the broker over CURVE")
        wait_for(lambda: client.stats()["services"].get("default", {}).get("workers") == 1,
                 what="the worker over CURVE")
        assert client.execute(b"secret job") == b"secret job"


def test_a_client_whose_key_is_refused_fails_fast_and_never_gets_a_result(curve_broker, keys,
                                                                         procs):
    from pyramid_powerhose import Client
    from pyramid_powerhose.exc import BrokerLostError
    curve_worker(procs, curve_broker, keys, keys.worker)
    with Client(frontend=curve_broker.frontend, curve_secret=keys.rogue.secret_file,
                curve_broker=keys.broker.public_file, timeout=20) as client:
        started = time.monotonic()
        with pytest.raises(BrokerLostError):
            client.execute(b"job")
        assert time.monotonic() - started < 10  # about CONNECT_TIMEOUT, not the timeout


def test_a_rogue_worker_never_gets_a_job(curve_broker, keys, procs):
    from pyramid_powerhose import Client
    rogue = curve_worker(procs, curve_broker, keys, keys.rogue)
    with Client(frontend=curve_broker.frontend, curve_secret=keys.client.secret_file,
                curve_broker=keys.broker.public_file, timeout=5) as client:
        wait_for(lambda: client.ping(timeout=0.5), what="the broker over CURVE")
        time.sleep(1.0)  # time enough for a rogue READY, were it let through
        assert client.stats()["services"] == {}
        assert rogue.poll() is None  # it is left retrying, and gets nothing


def test_curve_settings_need_their_counterpart(keys):
    from pyramid_powerhose import Client
    with pytest.raises(SettingsError):
        Client(frontend="tcp://127.0.0.1:1", curve_secret=keys.client.secret_file)
    with pytest.raises(SettingsError):
        Client(frontend="tcp://127.0.0.1:1", curve_broker=keys.broker.public_file)


# -- a spawned cluster over CURVE ---------------------------------------------------------------


def test_a_spawned_cluster_runs_curve_with_one_key_pair(keys, run_dir):
    """get_cluster passes the CURVE settings to what it spawns: the broker
    serves with the pair, the workers and the cluster's own client connect
    with it, and a client without a key is refused."""
    from pyramid_powerhose import Client, get_cluster
    from pyramid_powerhose.exc import BrokerLostError
    os.link(keys.broker.public_file, os.path.join(keys.allowed, "broker.key"))
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    curve_settings = {"curve_secret": keys.broker.secret_file,
                      "curve_broker": keys.broker.public_file,
                      "curve_allow": keys.allowed}
    with get_cluster("tests.targets:echo", background=True, numprocesses=1, frontend=front,
                     backend=back, heartbeat=0.2, **curve_settings):
        with Client(frontend=front, curve_secret=keys.client.secret_file,
                    curve_broker=keys.broker.public_file) as client:
            assert client.execute(b"spawned over curve") == b"spawned over curve"
        with Client(frontend=front, timeout=20) as plain:
            with pytest.raises(BrokerLostError):
                plain.execute(b"x")


def test_a_libzmq_without_curve_is_an_error_never_a_plain_connection(monkeypatch, keys):
    """zmq.has('curve') false (a libzmq built without it): every CURVE setting
    is refused at once, by the broker, the client and the keys command alike."""
    from pyramid_powerhose import Client
    monkeypatch.setattr(zmq, "has", lambda capability: capability != "curve")
    with pytest.raises(SettingsError, match="CURVE"):
        curve.require_curve()
    with pytest.raises(SettingsError):
        Client(frontend="tcp://127.0.0.1:1", curve_secret=keys.client.secret_file,
               curve_broker=keys.broker.public_file)


def test_ipc_endpoints_may_use_curve_too(procs, keys, run_dir):
    from pyramid_powerhose import Client
    front, back = f"ipc://{run_dir}/cf.sock", f"ipc://{run_dir}/cb.sock"
    broker = procs.start(command("powerhose-broker") + [
        "--frontend", front, "--backend", back, "--heartbeat", "0.2",
        "--curve-secret", keys.broker.secret_file, "--curve-allow", keys.allowed], "broker")
    procs.start(command("powerhose-worker") + [
        "tests.targets:echo", "--backend", back, "--heartbeat", "0.2",
        "--curve-secret", keys.worker.secret_file, "--curve-broker", keys.broker.public_file],
        "worker")
    with Client(frontend=front, curve_secret=keys.client.secret_file,
                curve_broker=keys.broker.public_file) as client:
        wait_for(lambda: client.ping(timeout=0.5) == broker.pid, what="the broker")
        wait_for(lambda: client.has_service(), what="the worker over CURVE on ipc")
        assert client.execute(b"ipc and curve") == b"ipc and curve"
    with Client(frontend=front, timeout=20) as plain:  # no key: refused on ipc too
        with pytest.raises(BrokerLostError):
            plain.execute(b"x")
