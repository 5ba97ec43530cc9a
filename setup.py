"""Builds the native core (src/shmchannel/_native.c: atomics and futex only).

Everything else is declared in pyproject.toml. A machine without a C compiler gets one
clear error naming what to install, instead of a compiler traceback; users of the wheels
(cibuildwheel, pyproject.toml) need no compiler at all.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildNative(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # setuptools/distutils raise their own errors for a missing compiler
            raise SystemExit(
                "shmchannel: building the native core (src/shmchannel/_native.c) failed: "
                f"{exc}\nInstall a C compiler and the Python headers (Debian/Ubuntu: apt install gcc "
                "python3-dev; Fedora: dnf install gcc python3-devel), or install a shmchannel wheel."
            ) from exc


setup(
    ext_modules=[
        Extension(
            "shmchannel._native",
            ["src/shmchannel/_native.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        )
    ],
    cmdclass={"build_ext": BuildNative},
)
