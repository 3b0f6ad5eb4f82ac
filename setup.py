"""Only the optional C helper lives here; everything else is in pyproject.toml.

The helper (streaming-store copies for large shared-memory outputs) is optional: without a C
compiler the install goes on and elasticpg copies with memmove instead.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("elasticpg.transport._streamcopy",
                             ["elasticpg/transport/_streamcopy.c"], optional=True)])
