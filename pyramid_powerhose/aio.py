"""The client for asyncio: ``await AsyncClient(...).execute(data)``.

Same jobs, errors, timeouts and several-broker behaviour as
:class:`~pyramid_powerhose.Client`, on ``zmq.asyncio``: one DEALER socket
per broker, shared by every coroutine of the event loop, and a reader task
that hands each reply to the coroutine waiting for its job id.  A reply for
a job nobody waits for any more (timed out, cancelled) is dropped.  A
broker whose connection drops fails the jobs it holds with
``BrokerLostError`` at once (``retries`` resends them, for idempotent jobs);
one that has not answered within ``CONNECT_TIMEOUT`` of a job's sending
fails it too.  Cancelling the awaiting task abandons the job as a timeout
does: the job may still run, its result is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import zmq
import zmq.asyncio
import zmq.utils.monitor

from . import curve, endpoints, exc, protocol, tracing
from .client import (CONNECT_TIMEOUT, _result, ask_worker, check_job, check_service,
                     choose, client_settings, note_reply)
from .protocol import Request

_MONITORED = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


def _itself(broker):
    """For :func:`~pyramid_powerhose.client.choose`: here the items are the brokers."""
    return broker


class _Broker:
    """One broker: its socket, the jobs waiting on it, whether it is up."""

    def __init__(self, client, frontend):
        self.frontend = frontend
        self.socket = client._context.socket(zmq.DEALER)
        self.socket.linger = 0
        secure = client._curve is not None
        if secure:
            curve.connect_with(self.socket, *client._curve)
        self.up_event = zmq.EVENT_HANDSHAKE_SUCCEEDED if secure else zmq.EVENT_CONNECTED
        self.monitor = self.socket.get_monitor_socket(_MONITORED)
        self.socket.connect(frontend)
        self.up = False
        self.lost = False  # its connection dropped, and none since
        self.waiting = {}  # job id -> Future of its Reply
        self.tasks = [asyncio.ensure_future(self._read()),
                      asyncio.ensure_future(self._watch())]

    async def _read(self):
        while True:
            frames = await self.socket.recv_multipart()
            try:
                reply = protocol.parse_client_reply(frames)
            except exc.ProtocolError:
                continue
            future = self.waiting.pop(reply.job_id, None)
            if future is not None and not future.done():
                future.set_result(reply)

    async def _watch(self):
        while True:
            event = zmq.utils.monitor.parse_monitor_message(
                await self.monitor.recv_multipart())["event"]
            if event == self.up_event:
                self.up, self.lost = True, False
            elif event == zmq.EVENT_DISCONNECTED:
                self.up, self.lost = False, True
                self.fail_all(f"the connection to the broker at {self.frontend} dropped "
                              "while the job was in flight")

    def fail_all(self, message):
        waiting, self.waiting = self.waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(exc.BrokerLostError(message))

    def close(self):
        for task in self.tasks:
            task.cancel()
        self.fail_all(f"the client of {self.frontend} was closed")
        self.socket.disable_monitor()
        self.monitor.close(0)
        self.socket.close(0)


class AsyncClient:
    """Runs jobs on a powerhose cluster from asyncio code.

    Create and use it inside one running event loop; ``async with`` closes it.
    """

    def __init__(self, frontend=None, timeout=None, service=None, max_job_size=None,
                 settings=None, curve_secret=None, curve_broker=None, retries=None):
        self.settings = client_settings(settings, frontend, timeout, service, max_job_size,
                                        curve_secret, curve_broker, retries)
        self.timeout = self.settings.timeout
        self.service = self.settings.service
        self._curve = curve.client_keys(self.settings)
        self._context = zmq.asyncio.Context()
        self._brokers = None
        self._ids = itertools.count(1)
        self._turn = itertools.count()

    @property
    def frontends(self) -> tuple:
        return tuple(b.frontend for b in self._all())

    def _all(self):
        if self._brokers is None:
            self._brokers = [_Broker(self, f) for f in
                             endpoints.resolve_all(self.settings.frontend, "frontend")]
        return self._brokers

    def _choose(self, avoid=()):
        return choose(self._all(), avoid, next(self._turn), _itself)

    async def execute(self, data, timeout=None, headers=None, service=None,
                      retries=None) -> bytes:
        """Run one job and return its result (bytes); errors as Client.execute's."""
        data, headers, timeout = check_job(self.settings, data, headers, timeout)
        name = check_service(service or self.service)
        headers = ask_worker(tracing.inject(headers))  # asks who runs it, in collect_replies()
        retries = self.settings.retries if retries is None else retries
        deadline = time.monotonic() + timeout
        lost = []
        while True:
            broker = self._choose(lost)
            try:
                return _result(await self._run(broker, name, data, headers, deadline, timeout))
            except exc.BrokerLostError:
                lost.append(broker)
                if retries <= 0 or time.monotonic() >= deadline:
                    raise
                retries -= 1

    async def _run(self, broker, service, data, headers, deadline, timeout):
        job_id = b"%x" % next(self._ids)
        ttl = max(1, int((deadline - time.monotonic()) * 1000))
        future = asyncio.get_running_loop().create_future()
        broker.waiting[job_id] = future
        try:
            await broker.socket.send_multipart(protocol.client_request(
                Request(service, job_id, data, ttl, headers)))
            sent = time.monotonic()
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise exc.TimeoutError(
                        f"job {job_id.decode()} on {service.decode()!r} got no result within "
                        f"{timeout}s from the broker at {broker.frontend}")
                try:
                    reply = await asyncio.wait_for(asyncio.shield(future),
                                                   min(remaining, CONNECT_TIMEOUT))
                except asyncio.TimeoutError:
                    if not broker.up and time.monotonic() - sent >= CONNECT_TIMEOUT:
                        raise exc.BrokerLostError(
                            f"no broker accepted a connection at {broker.frontend} within "
                            f"{CONNECT_TIMEOUT}s; is powerhose-broker running?") from None
                    continue
                if reply.worker is not None:  # asked for (collect_replies())
                    note_reply(reply)
                return reply
        finally:
            broker.waiting.pop(job_id, None)  # timed out or cancelled: a late reply is dropped
            if not future.done():
                future.cancel()

    async def map(self, iterable, timeout=None, headers=None, service=None) -> list:
        """Many jobs at once, results in order; the first failure (in input order) raises."""
        results = await asyncio.gather(*(self.execute(data, timeout, headers, service)
                                         for data in iterable), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def _mmi(self, service, body=b"", timeout=1.0):
        deadline = time.monotonic() + timeout
        return _result(await self._run(self._choose(), service, body, {}, deadline, timeout))

    async def ping(self, timeout=1.0):
        """The broker's pid, or None if none answers within ``timeout``."""
        try:
            return int(await self._mmi(protocol.MMI_PING, timeout=timeout))
        except (exc.TimeoutError, exc.BrokerLostError):
            return None

    async def stats(self, timeout=1.0) -> dict:
        return json.loads(await self._mmi(protocol.MMI_STATS, timeout=timeout))

    def close(self):
        for broker in self._brokers or ():
            broker.close()
        self._brokers = None
        self._context.destroy(linger=0)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *_):
        self.close()
