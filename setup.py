"""Builds the XLA:CPU kernel; the project's metadata is in pyproject.toml."""

import os

from setuptools import Extension, setup


def _xla_ffi_include_dir() -> str:
  # The XLA FFI headers ship with jaxlib (jax.ffi.include_dir() points here).
  import jaxlib

  return os.path.join(os.path.dirname(jaxlib.__file__), "include")


setup(
    ext_modules=[
        Extension(
            # A Python module whose handlers() are registered as XLA FFI targets.
            "optax_amsgrad.cpu._amsgrad_cpu",
            sources=["optax_amsgrad/cpu/csrc/amsgrad_cpu.cc"],
            depends=["optax_amsgrad/cpu/csrc/coefficients.def",
                     "optax_amsgrad/cpu/csrc/blockwise.h"],
            include_dirs=[_xla_ffi_include_dir()],
            language="c++",
            extra_compile_args=[
                "-std=c++17",
                "-O3",
                # Every operation rounded as written, as in the Python source.
                "-ffp-contract=off",
                # sqrt of a negative is NaN either way; without errno it
                # vectorizes.
                "-fno-math-errno",
                "-fvisibility=hidden",
            ],
            # Without a C++ compiler the package installs and runs on the
            # XLA path alone.
            optional=True,
        )
    ]
)
