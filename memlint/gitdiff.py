"""``memlint check --diff BASE``: the files changed since a git ref, for CI gates and pre-push hooks.

Changed means: in ``git diff --name-only BASE...HEAD`` (what the branch changed since it left
BASE, as a pull request shows it), or changed in the work tree or the index since HEAD, or
new and untracked (not ignored). Deleted files are left out: there is nothing to lint.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from memlint.errors import UsageError


def _git(args: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UsageError("--diff needs git, and git is not installed", hint="install git or drop --diff") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"`git {' '.join(args)}` did not finish within 60 s") from None
    if done.returncode != 0:
        raise _GitFailed(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return done.stdout


class _GitFailed(Exception):
    pass


def repository_root(start: Path) -> Path:
    try:
        return Path(_git(["rev-parse", "--show-toplevel"], start).strip())
    except _GitFailed:
        raise UsageError(f"--diff: {start} is not inside a git repository",
                         hint="run memlint inside the repository, or drop --diff") from None


def changed_files(base: str, start: Path) -> set[Path]:
    """Resolved paths of the files changed since ``base`` (see the module docstring)."""
    start = start if start.is_dir() else start.parent
    top = repository_root(start)
    try:
        _git(["rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"], top)
    except _GitFailed:
        raise UsageError(f"--diff {base}: no such commit, branch or tag in {top}",
                         hint="fetch it first (in GitHub Actions: actions/checkout with fetch-depth: 0), "
                              "or name an existing ref such as origin/main") from None
    names: list[str] = []
    try:
        names += _git(["diff", "--name-only", "-z", "--no-renames", "--diff-filter=d", f"{base}...HEAD"], top).split("\0")
        names += _git(["diff", "--name-only", "-z", "--no-renames", "--diff-filter=d", "HEAD"], top).split("\0")
        names += _git(["ls-files", "--others", "--exclude-standard", "-z"], top).split("\0")
    except _GitFailed as exc:
        raise UsageError(f"--diff {base}: git failed: {exc}") from None
    return {(top / name).resolve() for name in names if name}
