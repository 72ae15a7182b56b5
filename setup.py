"""The one build step pyproject.toml cannot say: the optional C extension meshdns._udpbatch.

``optional=True``: where it cannot be compiled (no gcc, no Python headers) the install goes on
without it and meshdns runs its pure-Python packet path (meshdns/packets.py says which is used).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("meshdns._udpbatch", ["meshdns/_udpbatch.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                                 "-Wno-missing-field-initializers"])])
