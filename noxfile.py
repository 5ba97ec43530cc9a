"""The version matrix (`make test-matrix`): the suite on every Python we declare, with the
newest dependencies, and once with the oldest we declare (issue 12).

    .venv/bin/python -m nox            # all sessions; Pythons not found are skipped
    .venv/bin/python -m nox -s oldest  # one session

Without torch and Ray: `make test` covers them, on one interpreter, with everything. The
tests that need them skip themselves here (with the reason), and `-m "not ray"` leaves out
the ones that start a Ray cluster.

Interpreters are looked up on PATH (``python3.12``...), then among pyenv's versions, which
are not on PATH by default: a pyenv shim answers ``python3.12`` with an error unless that
version is selected, so each version's own binary is linked into .nox/pythons, put first
on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

#: Every Python the package declares (pyproject.toml: requires-python, classifiers).
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
OLDEST_PYTHON = PYTHONS[0]
#: The oldest releases pyproject.toml admits, tested together on the oldest Python.
OLDEST = ["numpy==1.23.5", "pandas==1.5.3", "pyarrow==12.0.1", "polars==1.0.0", "rich==13.0.0"]
EXTRAS = ".[pandas,arrow,polars,cli,test]"
PYTEST = ["-m", "pytest", "-m", "not ray", "-p", "no:cacheprovider"]

nox.options.sessions = ["tests", "oldest"]
nox.options.error_on_missing_interpreters = False  # a Python not found is skipped, and said so
nox.options.reuse_existing_virtualenvs = True


def _pyenv_pythons() -> None:
    """Link the pyenv versions' interpreters into a directory put first on PATH."""
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return
    try:
        root = Path(subprocess.run([pyenv, "root"], capture_output=True, text=True, check=True, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return
    links = Path(__file__).parent / ".nox" / "pythons"
    links.mkdir(parents=True, exist_ok=True)
    for version in PYTHONS:
        found = sorted(root.glob(f"versions/{version}.*/bin/python{version}"))
        link = links / f"python{version}"
        if found and not link.exists():
            link.symlink_to(found[-1])
    os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"


_pyenv_pythons()


def _suite(session: nox.Session, *pins: str) -> None:
    session.install(EXTRAS, *pins)
    # A reused virtualenv already has this version of the package: take the working tree's.
    session.install("--no-deps", "--force-reinstall", ".")
    session.run("python", "-c", "import sys, numpy, pandas, pyarrow, polars; print('Python', sys.version.split()[0], "
                "'numpy', numpy.__version__, 'pandas', pandas.__version__, 'pyarrow', pyarrow.__version__, "
                "'polars', polars.__version__)")
    session.run("python", *PYTEST, *session.posargs)


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The suite with the newest releases the declared ranges admit."""
    _suite(session)


@nox.session(python=OLDEST_PYTHON)
def oldest(session: nox.Session) -> None:
    """The suite with the oldest declared releases, on the oldest declared Python."""
    _suite(session, *OLDEST)
