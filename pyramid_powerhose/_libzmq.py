"""The libzmq our compiled modules call: the very copy pyzmq's backend uses.

Modules listed in setup.py's ``COMPILED`` are plain Python compiled by
Cython; those that call libzmq on pyzmq's sockets (``multipart``) are
linked without ``-lzmq``.  Two copies of libzmq must never touch one
socket, and pyzmq's wheels load their own, under a private name, with
RTLD_LOCAL: so those symbols are left undefined at build time and must be
found, when Python loads the module, in pyzmq's copy.

``install()``, called once by the package before anything imports
``multipart``, asks the dynamic linker which library pyzmq's ``_zmq``
resolves ``zmq_msg_recv`` from (no assumption about pyzmq's files) and
reopens that library with RTLD_GLOBAL.  It also puts a finder on
``sys.meta_path`` so that a compiled module that cannot be used here
(no libzmq found: pyzmq's cffi backend, a libzmq without exported
symbols; or its extension fails to load) is imported from its ``.py``
source instead, which behaves the same, more slowly.
"""

import ctypes
import importlib.machinery
import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)

PACKAGE = __name__.rpartition(".")[0]

# The library's path once promoted; None if it could not be.
path = None


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def address(symbol):
    """Where ``symbol`` is in the libzmq pyzmq's backend uses, or None."""
    try:
        from zmq.backend.cython import _zmq
    except ImportError:  # pyzmq's cffi backend
        return None
    try:
        backend = ctypes.CDLL(_zmq.__file__, mode=os.RTLD_NOW | os.RTLD_NOLOAD)
        # dlsym on a library's handle searches it, then what it depends on.
        return ctypes.cast(getattr(backend, symbol), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def promote():
    """Reopen pyzmq's libzmq with RTLD_GLOBAL; its path, or None."""
    where = address("zmq_msg_recv")
    if where is None:
        return None
    for library in (None, "libdl.so.2"):  # glibc before 2.34 kept dladdr in libdl
        try:
            dladdr = ctypes.CDLL(library).dladdr
            break
        except (OSError, AttributeError):
            continue
    else:
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not dladdr(where, ctypes.byref(info)) or not info.dli_fname:
        return None
    found = os.path.realpath(os.fsdecode(info.dli_fname))
    try:
        ctypes.CDLL(found, mode=os.RTLD_NOW | os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    except OSError:
        return None
    return found


class _Finder:
    """Imports the package's compiled modules as their ``.py`` source where
    the compiled ones cannot be used."""

    def find_spec(self, name, search_path, target=None):
        if not name.startswith(PACKAGE + ".") or search_path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, search_path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return None
        source = os.path.join(os.path.dirname(spec.origin), name.rpartition(".")[2] + ".py")
        if not os.path.exists(source):
            return None  # a native module with no Python twin (_nbroker)
        if path is None:
            return importlib.util.spec_from_file_location(name, source)
        spec.loader = _CompiledOrSource(name, spec.origin, source)
        return spec


class _CompiledOrSource(importlib.machinery.ExtensionFileLoader):
    """The compiled module, or its source if that fails to load (a symbol
    this libzmq lacks, a pyzmq whose Socket changed since the build)."""

    def __init__(self, name, compiled, source):
        super().__init__(name, compiled)
        self.source = source
        self.failed = False

    def create_module(self, spec):
        try:
            return super().create_module(spec)
        except ImportError as exc:
            self._fall_back(spec.name, exc)
            return None  # a plain module, for exec_module to run the source in

    def exec_module(self, module):
        if self.failed:
            return self._exec_source(module)
        try:
            super().exec_module(module)
        except Exception as exc:  # noqa: BLE001 -- whatever failed, the source still works
            self._fall_back(module.__name__, exc)
            spec = importlib.util.spec_from_file_location(module.__name__, self.source)
            fresh = importlib.util.module_from_spec(spec)
            sys.modules[module.__name__] = fresh  # what the import system returns
            self._exec_source(fresh)

    def _fall_back(self, name, exc):
        self.failed = True
        log.warning("%s: the compiled module failed to load (%s); running its Python source",
                    name, exc)

    def _exec_source(self, module):
        spec = importlib.util.spec_from_file_location(module.__name__, self.source)
        module.__file__, module.__spec__, module.__loader__ = self.source, spec, spec.loader
        spec.loader.exec_module(module)


def install():
    """Promote pyzmq's libzmq and put the finder in place; once."""
    global path
    if any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    path = promote()
    sys.meta_path.insert(0, _Finder())
