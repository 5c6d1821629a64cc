"""The protocol module on plain lists of bytes: no sockets."""

import pytest

from pyramid_powerhose import protocol as p
from pyramid_powerhose.exc import ProtocolError
from pyramid_powerhose.job import Job, new_job
from pyramid_powerhose.protocol import Reply, Request


def test_client_request_round_trips_through_the_broker_parser():
    req = Request(b"svc", b"7", b"data", 1500, {"a": "1", "é": "ü"})
    msg = p.parse_frontend([b"client-addr", *p.client_request(req)])
    assert msg.extended and msg.address == b"client-addr"
    assert msg.request == req


def test_plain_mdp_request_is_recognised_and_multi_frame_body_joined():
    msg = p.parse_frontend([b"addr", b"", p.MDP_CLIENT, b"echo", b"ab", b"cd"])
    assert not msg.extended
    assert msg.request.data == b"abcd" and msg.body == [b"ab", b"cd"]


@pytest.mark.parametrize("frames", [
    [b"addr"],
    [b"addr", b"", p.MDP_CLIENT, b"echo"],  # no body
    [b"addr", b"x", p.MDP_CLIENT, b"echo", b"body"],  # no empty delimiter
    [b"addr", b"", b"MDPC02", b"echo", b"body"],  # unknown header
    [b"addr", b"", p.MDP_CLIENT, b"", b"body"],  # empty service
    [b"addr", b"", p.MDP_CLIENT, b"s" * 256, b"body"],  # service too long
    [b"addr", b"", p.EXT_CLIENT, b"echo", b"1", b"100"],  # no data
    [b"addr", b"", p.EXT_CLIENT, b"echo", b"1", b"-5", b"d"],  # bad ttl
    [b"addr", b"", p.EXT_CLIENT, b"echo", b"", b"5", b"d"],  # empty job id
    [b"addr", b"", p.EXT_CLIENT, b"echo", b"1", b"5", b"d", b"key"],  # odd headers
    [b"addr", b"", p.EXT_CLIENT, b"echo", b"1", b"5", b"d", b"\xff", b"v"],  # not UTF-8
])
def test_malformed_frontend_messages_raise_protocol_error(frames):
    with pytest.raises(ProtocolError):
        p.parse_frontend(frames)


def test_worker_ready_plain_and_extended():
    plain = p.parse_backend([b"w", b"", p.MDP_WORKER, p.READY, b"echo"])
    ext = p.parse_backend([b"w", *p.worker_ready(b"echo")])
    assert (plain.service, plain.extended) == (b"echo", False)
    assert (ext.service, ext.extended) == (b"echo", True)


@pytest.mark.parametrize("frames", [
    [b"w", b"", p.MDP_WORKER],
    [b"w", b"", b"MDPW02", p.READY, b"echo"],
    [b"w", b"", p.MDP_WORKER, b"\x09"],
    [b"w", b"", p.MDP_WORKER, p.READY],
    [b"w", b"", p.MDP_WORKER, p.REPLY, b"client"],
    [b"w", b"", p.MDP_WORKER, p.REPLY, b"client", b"not-empty", b"body"],
    [b"w", b"", p.MDP_WORKER, p.HEARTBEAT, b"extra"],
])
def test_malformed_backend_messages_raise_protocol_error(frames):
    with pytest.raises(ProtocolError):
        p.parse_backend(frames)


def test_request_to_extended_and_plain_workers():
    req = Request(b"svc", b"id9", b"payload", 250, {"k": "v"})
    ext = p.backend_request(b"w", b"client", req, True)
    assert ext == [b"w", b"", p.MDP_WORKER, p.REQUEST, b"client", b"",
                   b"id9", b"250", b"payload", b"k", b"v"]
    plain = p.backend_request(b"w", b"client", req, False)
    assert plain == [b"w", b"", p.MDP_WORKER, p.REQUEST, b"client", b"", b"payload"]
    cmd = p.parse_broker_command(ext[1:])
    assert cmd.client == b"client" and cmd.request.headers == {"k": "v"}
    assert (cmd.request.job_id, cmd.request.ttl_ms, cmd.request.data) == (b"id9", 250, b"payload")


def test_error_reply_round_trip_keeps_type_and_traceback():
    reply = Reply.error(b"3", p.ERR_EXECUTION, "ValueError: no", "ValueError", "Traceback...")
    frames = p.worker_reply(b"client", reply)
    msg = p.parse_backend([b"w", *frames])
    assert p.parse_worker_reply(msg) == reply


def test_plain_client_sees_errors_as_a_readable_body():
    msg = p.parse_frontend([b"addr", b"", p.MDP_CLIENT, b"svc", b"x"])
    frames = p.frontend_reply(msg, Reply.error(b"", p.ERR_NO_WORKER, "no worker"))
    assert frames == [b"addr", b"", p.MDP_CLIENT, b"svc", b"ERR", b"NoWorkerError", b"no worker"]


def test_extended_client_gets_plain_worker_reply_as_one_result():
    msg = p.parse_frontend([b"addr", *p.client_request(Request(b"svc", b"5", b"x"))])
    frames = p.frontend_plain_reply(msg, [b"ab", b"c"])
    reply = p.parse_client_reply(frames[1:])
    assert (reply.job_id, reply.ok, reply.data) == (b"5", True, b"abc")


def test_headers_must_be_str_to_str():
    with pytest.raises(TypeError):
        p.encode_headers({"k": 1})


def test_ready_credit_is_negotiated():
    assert p.parse_backend([b"w", *p.worker_ready(b"svc")]).credit == 1
    assert p.parse_backend([b"w", *p.worker_ready(b"svc", 2)]).credit == 2
    for bad in (b"0", b"65", b"x", b""):
        with pytest.raises(ProtocolError):
            p.parse_backend([b"w", b"", p.MDP_WORKER, p.READY, b"svc", p.EXT_TOKEN, bad])
    with pytest.raises(ProtocolError):
        p.parse_backend([b"w", b"", p.MDP_WORKER, p.READY, b"svc", b"other/1"])


def test_every_error_code_names_the_exception_a_client_raises():
    from pyramid_powerhose import exc
    for code in (p.ERR_EXECUTION, p.ERR_TIMEOUT, p.ERR_NO_WORKER, p.ERR_WORKER_LOST,
                 p.ERR_TOO_LARGE, p.ERR_BAD_REQUEST):
        error = exc.from_reply(Reply.error(b"1", code, "message"))
        assert type(error).__name__ == code
    assert type(exc.from_reply(Reply.error(b"1", "Unknown", "m"))) is exc.PowerhoseError


def test_info_carries_the_workers_pid_and_host():
    msg = p.parse_backend([b"w", *p.worker_info(b"77@host")])
    assert (msg.command, msg.about) == (p.INFO, b"77@host")
    with pytest.raises(p.ProtocolError):
        p.parse_backend([b"w", *p.worker_info(b"x" * 256)])
    with pytest.raises(p.ProtocolError):
        p.parse_backend([b"w", b"", p.MDP_WORKER, p.INFO])


def test_a_client_that_asks_gets_the_worker_as_one_last_frame():
    asked = Request(b"svc", b"5", b"x", 0, {p.WORKER_HEADER: "1", "k": "v"})
    frames = p.client_request(asked)
    assert frames == [b"", p.EXT_CLIENT, b"svc", b"5", b"0", b"x",
                      b"powerhose.worker", b"1", b"k", b"v"]
    msg = p.parse_frontend([b"addr", *frames])
    # The broker's question, not the job's: the worker never sees the header.
    assert msg.wants_worker and msg.request.headers == {"k": "v"}
    assert p.backend_request(b"w", b"addr", msg.request, True)[6:] == [
        b"5", b"0", b"x", b"k", b"v"]
    ok = p.frontend_worker_reply(msg, [b"5", p.STATUS_OK, b"result"], b"77@host")
    assert ok == [b"addr", b"", p.EXT_CLIENT, b"svc", b"5", b"OK", b"result", b"77@host"]
    assert p.parse_client_reply(ok[1:]) == Reply(b"5", True, b"result", worker="77@host")
    err = Reply.error(b"5", p.ERR_EXECUTION, "boom", "ValueError", "tb")
    failed = p.frontend_worker_reply(msg, [b"5", *err.body()], b"77@host")
    assert failed[4:] == [b"5", b"ERR", b"ExecutionError", b"boom", b"ValueError", b"tb",
                          b"77@host"]
    assert p.parse_client_reply(failed[1:]) == Reply(
        b"5", False, b"", p.ERR_EXECUTION, "boom", "ValueError", "tb", "77@host")
    # Errors of the broker's own, and plain workers' replies, say it too
    # (empty when no worker ran the job or the worker did not say who it is).
    no_worker = p.frontend_reply(msg, Reply.error(b"5", p.ERR_NO_WORKER, "none"))
    assert no_worker[4:] == [b"5", b"ERR", b"NoWorkerError", b"none", b"", b"", b""]
    assert p.parse_client_reply(no_worker[1:]).worker == ""
    plain = p.frontend_plain_reply(msg, [b"ab", b"c"], b"")
    assert plain[4:] == [b"5", b"OK", b"abc", b""]


def test_a_client_that_does_not_ask_gets_replies_as_before():
    msg = p.parse_frontend([b"addr", *p.client_request(Request(b"svc", b"5", b"x", 0,
                                                                {"k": "v"}))])
    assert not msg.wants_worker and msg.request.headers == {"k": "v"}
    ok = p.frontend_worker_reply(msg, [b"5", p.STATUS_OK, b"result"], b"77@host")
    assert ok == [b"addr", b"", p.EXT_CLIENT, b"svc", b"5", b"OK", b"result"]
    assert p.parse_client_reply(ok[1:]) == Reply(b"5", True, b"result")  # worker None
    err = p.frontend_reply(msg, Reply.error(b"5", p.ERR_NO_WORKER, "none"), b"77@host")
    assert err[4:] == [b"5", b"ERR", b"NoWorkerError", b"none", b"", b""]
    assert p.parse_client_reply(err[1:]).worker is None
    # A plain MDP client never sees it, asked or not (it cannot send headers).
    plain = p.parse_frontend([b"addr", b"", p.MDP_CLIENT, b"svc", b"x"])
    assert p.frontend_worker_reply(plain, [b"", p.STATUS_OK, b"r"], b"77@host") == [
        b"addr", b"", p.MDP_CLIENT, b"svc", b"r"]


# -- the direct path ----------------------------------------------------------------


def test_direct_and_lease_commands_round_trip_between_worker_and_broker():
    msg = p.parse_backend([b"w", *p.worker_direct(b"ipc:///run/ph/direct/1-ab.sock")])
    assert (msg.command, msg.endpoint) == (p.DIRECT, b"ipc:///run/ph/direct/1-ab.sock")
    assert p.parse_backend([b"w", *p.worker_lease(42, 0)]).epoch == 42
    ended = p.parse_backend([b"w", *p.worker_lease(0, 3)])
    assert (ended.command, ended.epoch, ended.held) == (p.LEASE, 0, 3)
    to_worker = p.backend_lease(b"w", 7)
    assert to_worker[0] == b"w"
    assert p.parse_broker_command(to_worker[1:]) == p.BrokerCommand(p.LEASE, epoch=7)
    assert p.parse_broker_command(p.backend_lease(b"w", 0)[1:]).epoch == 0


def test_counts_round_trip_with_their_buckets_and_outcomes():
    counts = p.DirectCounts()
    counts.add(0.00005)  # first bucket
    counts.add(0.003)  # 0.005 bucket
    counts.add(100.0, p.ERR_EXECUTION)  # above every bound
    counts.add(-1, p.ERR_TIMEOUT)  # never started: no run time
    assert counts.jobs() == 4
    back = p.parse_backend([b"w", *p.worker_counts(p.FREE, counts)])
    assert back.command == p.FREE
    got = back.counts
    assert got.done == 2 and got.outcomes == {p.ERR_EXECUTION: 1, p.ERR_TIMEOUT: 1}
    assert got.buckets[0] == 1 and got.buckets[p.BUCKETS.index(0.005)] == 1
    assert got.buckets[-1] == 1 and sum(got.buckets) == 3
    assert got.run_sum == pytest.approx(100.00305)
    assert p.parse_backend([b"w", *p.worker_counts(p.REPORT, p.DirectCounts())]).counts == \
        p.DirectCounts()


@pytest.mark.parametrize("body", [
    [p.DIRECT, b"tcp://127.0.0.1:5"],  # direct endpoints are ipc only
    [p.DIRECT],
    [p.DIRECT, b"ipc://" + b"x" * 250],
    [p.LEASE, b"1"],  # no held count
    [p.LEASE, b"x", b"0"],
    [p.LEASE, b"9" * 19, b"0"],  # past a C long long
    [p.FREE, b"1", b"0"],  # no buckets
    [p.FREE, b"1", b"0", b"1,2"],  # too few buckets
    [p.REPORT, b"1", b"0", b",".join([b"0"] * 19), b"ExecutionError"],  # code without count
    [p.REPORT, b"1", b"0", b",".join([b"0"] * 19), b"\xff", b"1"],
])
def test_malformed_direct_worker_commands_raise_protocol_error(body):
    with pytest.raises(ProtocolError):
        p.parse_backend([b"w", b"", p.MDP_WORKER, *body])


def test_lease_control_between_a_client_process_and_the_broker():
    wanted = [b"ctl", *p.lease_wanted(b"svc", 3)]
    assert p.is_lease_control(wanted) and not p.is_lease_control(
        [b"c", *p.client_request(Request(b"svc", b"1", b"d"))])
    assert p.parse_lease_control(wanted) == p.LeaseControl(b"ctl", p.LEASE_WANTED, b"svc", 3)
    assert p.parse_lease_control([b"ctl", *p.lease_return(b"svc", 9)]).epoch == 9
    assert p.parse_lease_control([b"ctl", *p.lease_heartbeat()]).command == \
        p.LEASE_HEARTBEAT
    grant = p.lease_grant(b"ctl", b"svc", 9, b"ipc:///d/w.sock", 2, b"12@host", 1000)
    assert grant[0] == b"ctl"
    assert p.parse_lease_notice(grant[1:]) == p.LeaseNotice(
        p.LEASE_GRANT, b"svc", 9, b"ipc:///d/w.sock", 2, about=b"12@host",
        max_job_size=1000)
    revoke = p.parse_lease_notice(p.lease_revoke(b"ctl", b"svc", 9, p.REVOKE_LOST)[1:])
    assert (revoke.command, revoke.epoch, revoke.reason) == (p.LEASE_REVOKE, 9, b"lost")
    busy = p.lease_busy(b"ctl", b"svc")
    assert busy[0] == b"ctl"
    assert p.parse_lease_notice(busy[1:]) == p.LeaseNotice(p.LEASE_BUSY, b"svc", 0)


@pytest.mark.parametrize("frames", [
    [b"ctl", b"", p.EXT_LEASE, b"LEASE", b"svc"],  # no count
    [b"ctl", b"", p.EXT_LEASE, b"LEASE", b"", b"1"],  # no service
    [b"ctl", b"", p.EXT_LEASE, b"RETURN", b"svc", b"-1"],
    [b"ctl", b"", p.EXT_LEASE, b"HEARTBEAT", b"x"],
    [b"ctl", b"", p.EXT_LEASE, b"GIVE", b"svc", b"1"],
    [b"ctl", b"x", p.EXT_LEASE, b"HEARTBEAT"],
])
def test_malformed_lease_control_raises_protocol_error(frames):
    with pytest.raises(ProtocolError):
        p.parse_lease_control(frames)


@pytest.mark.parametrize("frames", [
    [b"", p.EXT_LEASE, p.LEASE_GRANT, b"svc", b"1", b"tcp://h:1", b"1", b"", b"9"],
    [b"", p.EXT_LEASE, p.LEASE_GRANT, b"svc", b"1", b"ipc:///w", b"0", b"", b"9"],
    [b"", p.EXT_LEASE, p.LEASE_GRANT, b"svc", b"1", b"ipc:///w", b"65", b"", b"9"],
    [b"", p.EXT_LEASE, p.LEASE_GRANT, b"svc", b"1", b"ipc:///w", b"1", b""],  # no size
    [b"", p.EXT_LEASE, p.LEASE_GRANT, b"svc", b"1", b"ipc:///w", b"1", b"h" * 256, b"9"],
    [b"", p.EXT_LEASE, p.LEASE_GRANT, b"svc", b"1", b"ipc:///w", b"1", b"", b"big"],
    [b"", p.EXT_LEASE, p.LEASE_REVOKE, b"svc", b"1"],
    [b"", p.EXT_CLIENT, p.LEASE_REVOKE, b"svc", b"1", b"lost"],
    [b"", p.EXT_LEASE, p.LEASE_BUSY, b"svc", b"1"],  # BUSY takes a service only
    [b"", p.EXT_LEASE, p.LEASE_BUSY],
    [b"", p.EXT_LEASE, p.LEASE_GRANT, b"svc"],
])
def test_malformed_lease_notices_raise_protocol_error(frames):
    with pytest.raises(ProtocolError):
        p.parse_lease_notice(frames)


def test_a_direct_job_and_its_answers_round_trip_between_client_and_worker():
    req = Request(b"", b"id:with:colons", b"data", 0, {"k": "v"})
    frames = p.direct_request(5, 123456789, req)
    assert len(frames) == 5  # delimiter, packed head, data, one header pair
    job = p.parse_direct_request([b"client", *frames])
    assert (job.address, job.epoch, job.deadline_ns) == (b"client", 5, 123456789)
    assert job.request == req
    ok = p.direct_reply(b"client", Reply(req.job_id, True, b"result"))
    assert ok[0] == b"client"
    assert p.parse_direct_reply(ok[1:]) == Reply(req.job_id, True, b"result")
    error = Reply.error(req.job_id, p.ERR_EXECUTION, "boom", "ValueError", "tb")
    assert p.parse_direct_reply(p.direct_reply(b"c", error)[1:]) == error
    refused = p.parse_direct_reply(p.direct_not_run(b"c", req.job_id, p.NOT_RUN_LEASE)[1:])
    assert (refused.ok, refused.code, refused.message) == (False, p.ERR_NOT_RUN, "lease")


@pytest.mark.parametrize("epoch, deadline_ns, job_id", [
    (0, 0, b"1"),
    (1, 9, b"a"),
    (10, 100, b"ff"),
    (2**63 - 1, 2**63 - 1, b"x" * p.MAX_JOB_ID_LENGTH),  # the widest head there is
    (7, 1_733_000_000_123_456_789, b"id:with:colons"),
])
def test_a_direct_jobs_head_is_epoch_deadline_and_job_id_in_decimal(epoch, deadline_ns, job_id):
    frames = p.direct_request(epoch, deadline_ns, Request(b"", job_id, b"data"))
    assert frames == [b"", b"%d:%d:%s" % (epoch, deadline_ns, job_id), b"data"]


@pytest.mark.parametrize("epoch, deadline_ns, job_id", [
    (0, 0, b"1"),
    (1, 9, b"a"),
    (10**18 - 1, 10**18 - 1, b"x" * p.MAX_JOB_ID_LENGTH),  # 18 digits each, the most read
    (7, 733_000_000_123_456_789, b"id:with:colons"),
])
def test_the_worker_reads_back_the_head_the_client_wrote(epoch, deadline_ns, job_id):
    frames = p.direct_request(epoch, deadline_ns, Request(b"", job_id, b"data"))
    job = p.parse_direct_request([b"client", *frames])
    assert (job.epoch, job.deadline_ns, job.request.job_id) == (epoch, deadline_ns, job_id)


def test_the_per_job_constructors_make_what_the_classes_make():
    assert p.new_request(b"svc", b"7", b"d", 12, {"k": "v"}) == Request(b"svc", b"7", b"d", 12,
                                                                       {"k": "v"})
    made = p.ok_reply(b"7", b"r")
    assert made == Reply(b"7", True, b"r")
    assert made.worker is None and made.body() == [p.STATUS_OK, b"r"]
    # The replies' shortcut for OK writes what body() would.
    assert p.worker_reply(b"c", made) == [b"", p.MDP_WORKER, p.REPLY, b"c", b"", b"7",
                                          *made.body()]
    assert p.direct_reply(b"c", made) == [b"c", b"", b"7", *made.body()]
    # The broker's per-job messages: a PHC01 request, a worker's REPLY.
    req = Request(b"svc", b"7", b"d", 12, {"k": "v"})
    assert p.parse_frontend([b"a", *p.client_request(req)]) == p.ClientMessage(
        b"a", True, req, [], False)
    body = [b"7", p.STATUS_OK, b"r"]
    assert p.parse_backend([b"w", b"", p.MDP_WORKER, p.REPLY, b"c", b"", *body]) == (
        p.WorkerMessage(b"w", p.REPLY, b"", False, 1, b"c", body))
    job = new_job(b"d", {"k": "v"}, b"7", 1.5, "svc")
    expected = Job(b"d", {"k": "v"}, b"7", 1.5, "svc")
    assert [getattr(job, f) for f in Job.__slots__] == [getattr(expected, f)
                                                         for f in Job.__slots__]


@pytest.mark.parametrize("frames", [
    [b"c", b"", b"5:0:1"],  # no data
    [b"c", b"x", b"5:0:1", b"d"],  # no delimiter
    [b"c", b"", b"5:1", b"d"],  # no job id part
    [b"c", b"", b"5:0:", b"d"],  # empty job id
    [b"c", b"", b"-5:0:1", b"d"],
    [b"c", b"", b":0:1", b"d"],  # empty epoch
    [b"c", b"", b"5::1", b"d"],  # empty deadline
    [b"c", b"", b"5 :0:1", b"d"],
    [b"c", b"", b"1234567890123456789:0:1", b"d"],  # 19 digits: beyond what is read
    [b"c", b"", b"5:\xd9:1", b"d"],
    [b"c", b"", b"", b"d"],
    [b"c", b"", b"5:soon:1", b"d"],
    [b"c", b"", b"5:0:1", b"d", b"odd"],
])
def test_malformed_direct_jobs_raise_protocol_error(frames):
    with pytest.raises(ProtocolError):
        p.parse_direct_request(frames)


def test_malformed_direct_replies_raise_protocol_error():
    with pytest.raises(ProtocolError):
        p.parse_direct_reply([b"", b"1", p.STATUS_NOT_RUN])
    with pytest.raises(ProtocolError):
        p.parse_direct_reply([b"x", b"1", p.STATUS_OK, b"r"])
    with pytest.raises(ProtocolError):
        p.parse_direct_reply([b"", b"1", b"MAYBE", b"r"])
