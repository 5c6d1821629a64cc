"""Metadata lives in setup.cfg; this file only declares the native modules.

The broker's message loop is also written in C++ (``native/broker.cpp``,
the ``pyramid_powerhose._nbroker`` module) against the system libzmq
(Debian: libzmq3-dev).  It is optional: without a C++ compiler or libzmq's
headers the build skips it and ``powerhose-broker`` runs the Python loop
(``pyramid_powerhose/broker.py``), which behaves the same, more slowly.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pyramid_powerhose._nbroker",
            sources=["native/broker.cpp"],
            libraries=["zmq"],
            language="c++",
            extra_compile_args=["-std=c++17", "-O2", "-Wall", "-Wextra"],
            optional=True,
        ),
        # Multipart send/receive on pyzmq's own sockets with one GIL hold
        # per message; finds libzmq in pyzmq's backend at run time, so it
        # links no libzmq of its own (pyramid_powerhose/multipart.py).
        Extension(
            "pyramid_powerhose._nmultipart",
            sources=["native/multipart.cpp"],
            language="c++",
            extra_compile_args=["-std=c++17", "-O2", "-Wall", "-Wextra"],
            optional=True,
        ),
    ],
)
