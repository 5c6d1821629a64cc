"""CURVE keys and who may connect: the broker's allow-list and exposure rule.

Keys are files in :mod:`zmq.auth`'s format: ``NAME.key`` holds a public
key, ``NAME.key_secret`` the pair (``powerhose keys`` writes them, mode
0600).  The broker accepts a CURVE peer only if its public key is in a
``.key`` file of its allow-list directory; the directory is read again when
it changes, so a key added or removed takes effect within seconds, without
a restart.  The broker answers libzmq's ZAP requests (RFC 27) with
:meth:`AllowList.answer`; the frames are built by :mod:`.protocol`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat

import zmq
import zmq.auth
from zmq.utils import z85

from . import protocol
from .exc import ProtocolError, SettingsError

log = logging.getLogger("pyramid_powerhose.broker")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks (RFC 27)
ZAP_DOMAIN = b"powerhose"
RELOAD_INTERVAL = 1.0  # seconds between looks at the allow-list directory


def require_curve():
    """A libzmq without CURVE must be an error, never a plain connection."""
    if not zmq.has("curve"):
        raise SettingsError(
            f"this libzmq ({zmq.zmq_version()}) was built without CURVE, so it cannot "
            "encrypt or authenticate; install a pyzmq whose libzmq has it (PyPI's wheels do)")


def load_pair(path: str, setting: str = "curve_secret") -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file only its owner can read."""
    try:
        info = os.stat(path)
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{setting}: cannot read a key pair from {path}: {exc}") from None
    if secret is None:
        raise SettingsError(f"{setting}: {path} holds no secret key (a .key_secret file "
                            "from 'powerhose keys' does)")
    if info.st_mode & 0o077:
        raise SettingsError(f"{setting}: {path} can be read by other users (mode "
                            f"{stat.S_IMODE(info.st_mode):o}); chmod 600 it")
    return public, secret


def load_public(path: str, setting: str = "curve_broker") -> bytes:
    """The public key of a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{setting}: cannot read a public key from {path}: {exc}") from None
    return public


def serve(sock, pair):
    """Make ``sock`` (before it binds) a CURVE server whose peers ZAP vets."""
    public, secret = pair
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN


def connect_with(sock, pair, broker_public):
    """Make ``sock`` (before it connects) a CURVE client of the broker ``broker_public``."""
    public, secret = pair
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = broker_public


def client_keys(settings):
    """(own pair, broker's public key) for a client's or a worker's sockets,
    or None without ``curve_secret``."""
    if not settings.curve_secret:
        return None
    require_curve()
    if not settings.curve_broker:
        raise SettingsError("curve_secret needs curve_broker: the broker's public key "
                            "(its .key file), so that this process talks to that broker only")
    return load_pair(settings.curve_secret), load_public(settings.curve_broker)


# -- who may connect -------------------------------------------------------------------------


class AllowList:
    """The public keys of the ``.key`` files in ``directory``, kept current."""

    def __init__(self, directory: str, now: float):
        if not os.path.isdir(directory):
            raise SettingsError(f"curve_allow: {directory} is not a directory")
        self.directory = directory
        self.keys: frozenset[bytes] = frozenset()  # raw, 32 bytes each
        self._seen = None
        self._next_look = now
        self.refresh(now)

    def refresh(self, now: float):
        """Read the directory again if a file in it changed (at most once a
        RELOAD_INTERVAL)."""
        if now < self._next_look:
            return
        self._next_look = now + RELOAD_INTERVAL
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(".key"))
            seen = tuple((n, os.stat(os.path.join(self.directory, n)).st_mtime_ns)
                         for n in names)
        except OSError as exc:
            log.warning("cannot read the allow-list %s: %s; keeping %d keys",
                        self.directory, exc, len(self.keys))
            return
        if seen == self._seen:
            return
        keys = set()
        for name in names:
            try:
                public = load_public(os.path.join(self.directory, name), "curve_allow")
                keys.add(z85.decode(public))  # ZAP carries the 32 bytes
            except SettingsError as exc:
                log.warning("%s", exc)
        if self._seen is not None:
            log.info("allow-list %s: %d keys (was %d)", self.directory, len(keys),
                     len(self.keys))
        self._seen = seen
        self.keys = frozenset(keys)

    def answer(self, frames) -> list[bytes]:
        """The ZAP reply to one request: 200 for an allowed CURVE key, else
        400; a refused peer is logged with its address and key."""
        try:
            request = protocol.parse_zap_request(frames)
        except ProtocolError as exc:
            log.warning("refused a malformed ZAP request: %s", exc)
            return protocol.zap_reply(frames[1] if len(frames) > 1 else b"", False)
        if request.mechanism == b"CURVE" and request.key in self.keys:
            return protocol.zap_reply(request.request_id, True, z85.encode(request.key))
        shown = z85.encode(request.key).decode() if request.key else "none"
        log.warning("refused a %s connection from %s (key %s): not in the allow-list %s",
                    request.mechanism.decode("ascii", "replace"),
                    request.address.decode("ascii", "replace"), shown, self.directory)
        return protocol.zap_reply(request.request_id, False)


# -- the exposure rule -----------------------------------------------------------------------


def is_loopback(endpoint: str) -> bool:
    """Whether a tcp endpoint binds only a loopback address (other transports: True)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # *, an interface name, a host name: reachable from elsewhere
        return False


def check_exposure(settings):
    """A broker reachable from other hosts must authenticate them, unless told
    otherwise (``insecure``): fail closed."""
    if settings.curve_secret or settings.insecure:
        return
    for name in ("frontend", "backend"):
        endpoint = getattr(settings, name)
        if not is_loopback(endpoint):
            raise SettingsError(
                f"the {name} {endpoint} can be reached from other hosts, and anyone who "
                "reaches it could submit jobs or take them; give curve_secret and "
                "curve_allow (--curve-secret, --curve-allow) so that only allowed keys "
                "connect, or insecure (--insecure) if the network itself is trusted")
