"""Where the sockets live: the private default directory and ipc paths.

Default endpoints are ipc sockets in a per-user directory of mode 0700, so
no other user can connect to the broker or squat its path.
"""

import fcntl
import logging
import os
import stat
import tempfile

from .exc import DuplicateBrokerError, SettingsError, UnsafeDirectoryError

log = logging.getLogger(__name__)

IPC = "ipc://"


def runtime_dir() -> str:
    """The private directory for default sockets, created on first use."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        path = os.path.join(base, "powerhose")
    else:
        path = os.path.join(tempfile.gettempdir(), f"powerhose-{os.getuid()}")
    return private_dir(path, "; remove it or pass --frontend/--backend explicitly",
                       "; chmod 700 it")


def private_dir(path: str, not_ours="", shared="") -> str:
    """``path``, a directory only this user may use: created mode 0700 if it
    is missing; UnsafeDirectoryError if it is not a directory we own, or if
    it is accessible to others (``not_ours`` and ``shared`` end those
    messages).  The default endpoints' directory is one, and so is the
    directory of a worker's direct sockets."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise UnsafeDirectoryError(
            f"{path} is not a directory owned by uid {os.getuid()}{not_ours}")
    if info.st_mode & 0o077:
        raise UnsafeDirectoryError(f"{path} is accessible to other users (mode "
                                   f"{stat.S_IMODE(info.st_mode):o}){shared}")
    return path


def default_frontend() -> str:
    return IPC + os.path.join(runtime_dir(), "frontend.sock")


def default_backend() -> str:
    return IPC + os.path.join(runtime_dir(), "backend.sock")


def resolve(endpoint: str, name: str) -> str:
    """``endpoint``, or the default for ``name`` ('frontend' or 'backend') when empty.

    The private directory is looked at (and created) only here, when a
    default endpoint is about to be used.
    """
    if endpoint:
        return endpoint
    return default_frontend() if name == "frontend" else default_backend()


def resolve_all(endpoint, name: str) -> tuple:
    """Every endpoint of a setting that may list several (a str or a tuple), as a
    tuple; the default for ``name`` when it lists none."""
    if isinstance(endpoint, tuple):
        return endpoint
    return (resolve(endpoint, name),)


def single(endpoint, name: str, who: str) -> str:
    """``endpoint``, if it is one; SettingsError if it lists several, for ``who``
    (a broker, a cluster) binds exactly one."""
    if isinstance(endpoint, tuple):
        raise SettingsError(
            f"{name} lists {len(endpoint)} endpoints ({' '.join(endpoint)}), but {who} "
            "binds exactly one; run a broker per endpoint, and give the list to the "
            "clients (frontend) and workers (backend) instead")
    return endpoint


def ipc_path(endpoint: str):
    """The filesystem path of an ipc endpoint, or None for other transports."""
    if endpoint.startswith(IPC):
        return endpoint[len(IPC):]
    return None


def remove(path: str):
    """Remove a file we made beside our sockets (libzmq leaves an ipc
    socket's): gone already is fine, any other failure a warning."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def users_path(frontend: str):
    """The unix socket where processes sharing a spawned cluster count themselves.

    Beside the frontend's ipc socket (in its private directory); None for
    other transports, or where the path would be too long for a socket.
    """
    path = ipc_path(frontend)
    if path is None or len((path + ".users").encode()) > 107:
        return None
    return path + ".users"


def check(endpoint: str, name: str) -> str:
    """Reject endpoints libzmq would refuse with a cryptic error."""
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise ValueError(
            f"{name} must be a ZeroMQ endpoint such as ipc:///path/to.sock "
            f"or tcp://127.0.0.1:5555, got {endpoint!r}"
        )
    path = ipc_path(endpoint)
    if path is not None and len(path.encode()) > 107:
        raise ValueError(f"{name} ipc path is longer than 107 bytes: {path}")
    return endpoint


def lock(endpoint: str, name: str):
    """Take the lock file next to an ipc endpoint's socket: one broker per endpoint.

    Returns the open lock fd (held until closed or the process exits), or
    None for other transports, where bind() itself refuses a second
    listener.  The lock file holds the pid, for the DuplicateBrokerError
    a second broker prints.
    """
    path = ipc_path(endpoint)
    if path is None:
        return None
    fd = open_lock_file(path + ".lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise DuplicateBrokerError(
            f"a broker (pid {holder or '?'}) already serves the {name} "
            f"{endpoint}; stop it or choose another endpoint"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def open_lock_file(path: str) -> int:
    """Open (or create) a lock file we are about to truncate, refusing a planted one.

    In a shared directory another user could leave a symlink there to a
    file of ours (we would truncate it), or a fifo (we would block):
    O_NOFOLLOW refuses the link and the file must be a regular one.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UnsafeDirectoryError(
            f"cannot create {path}: {exc.strerror}; if it is a symlink or not a "
            "regular file, someone else put it there: remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeDirectoryError(f"the lock file {path} is not a regular file; "
                                   "someone else put it there: remove it")
    return fd
