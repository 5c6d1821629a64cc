# C declarations for worker.py when Cython compiles it (pure-Python mode):
# only what the loop calls in C; the classes stay Python classes.

from cpython.exc cimport PyErr_CheckSignals
