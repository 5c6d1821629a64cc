# C declarations for tracing.py when Cython compiles it (pure-Python mode):
# the client asks inject for every job, most often to learn there is no
# span; compiled, that question is a C call instead of a bytecode frame.

cpdef dict inject(dict headers)
