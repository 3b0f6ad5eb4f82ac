"""Only the optional C helpers live here; everything else is in pyproject.toml.

The helpers (streaming-store copies for large shared-memory outputs; combine's one-pass fold
and dispatch's one-pass fp8 quantisation) are optional: without a C compiler the install goes on
and elasticpg copies with memmove, folds and quantises with torch ops instead (the same results,
bit for bit).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("elasticpg.transport._streamcopy",
                             ["elasticpg/transport/_streamcopy.c"], optional=True),
                   # no fused multiply-adds: the fold must round as the torch fallback does
                   Extension("elasticpg.ep._fold", ["elasticpg/ep/_fold.c"], optional=True,
                             extra_compile_args=["-O3", "-ffp-contract=off"])])
