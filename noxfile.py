"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s mypy``.

The sessions run in the current environment (``pip install -e ".[dev]"`` first): torch and its
CUDA wheels are several GB, and a second copy per session buys nothing.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "mypy"]


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The whole test suite, slow end-to-end runs included (``-m "not slow"`` to skip them)."""
    session.run("python", "-m", "pytest", "--doctest-modules", "fedvlm", "tests", *session.posargs)


@nox.session(venv_backend="none")
def fast(session: nox.Session) -> None:
    """Unit tests only (no Ray simulation, no CLI runs)."""
    session.run("python", "-m", "pytest", "--doctest-modules", "fedvlm", "tests", "-m", "not slow", *session.posargs)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff."""
    session.run("ruff", "check", "fedvlm", "tests", "benchmarks", "noxfile.py")


@nox.session(venv_backend="none")
def mypy(session: nox.Session) -> None:
    """Static types of the package."""
    session.run("mypy", "fedvlm")
