"""Metadata lives in setup.cfg; this file only declares the compiled modules.

``COMPILED`` lists modules of the package written in plain Python that
Cython compiles in its pure-Python mode, as pyzmq compiles its backend
(their C declarations, if any, in a ``.pxd`` beside them).  Each is
optional: without Cython, pyzmq's ``.pxd`` files, libzmq's headers
(Debian: libzmq3-dev) or a C compiler, the build says so in one line and
the module runs as plain Python, which behaves the same, more slowly.
Those that call libzmq are linked without it: at run time they use the
copy pyzmq's sockets live in (``pyramid_powerhose/_libzmq.py``).
"""

import sys

from setuptools import Extension, setup

COMPILED = [
    "pyramid_powerhose/multipart.py",
    "pyramid_powerhose/protocol.py",
    "pyramid_powerhose/job.py",
    "pyramid_powerhose/broker_core.py",
    "pyramid_powerhose/readiness.py",
    "pyramid_powerhose/broker.py",
    "pyramid_powerhose/worker.py",
    "pyramid_powerhose/leases.py",
    "pyramid_powerhose/client.py",
    "pyramid_powerhose/tracing.py",
]


def warn(message):
    print(f"WARNING: {message}; running those modules as plain Python", file=sys.stderr)


def compiled_modules():
    try:
        import zmq
        from Cython.Build import cythonize
    except ImportError as exc:
        warn(f"not compiling {', '.join(COMPILED)}: {exc}")
        return []
    modules = [
        Extension(
            path[: -len(".py")].replace("/", "."),
            sources=[path],
            include_dirs=zmq.get_includes(),  # zmq_compat.h, for libzmq.pxd
            extra_compile_args=["-O2"],
        )
        for path in COMPILED
    ]
    try:
        modules = cythonize(modules, compiler_directives={"language_level": "3"}, quiet=True)
    except Exception as exc:  # noqa: BLE001 -- Cython's CompileError, a missing .pxd...
        warn(f"Cython could not translate {', '.join(COMPILED)}: {exc}")
        return []
    for module in modules:
        # A compiler error: one line of warning, no failure.  (Set here:
        # cythonize does not carry it over from the Extension it is given.)
        module.optional = True
    return modules


setup(
    ext_modules=[
        *compiled_modules(),
    ],
)
