"""Start workers by forking a launcher that has imported their heavy modules once ("preload").

Most of a short job's start on a small machine is every worker importing torch: about 1.3
CPU-seconds for ``import torch`` and 0.9 more for ``torch._dynamo``, which ``torch.optim``
imports on the first ``step()``. ``gossip-sgp launch --preload torch,torch._dynamo`` (the
default) imports them once in the launcher and forks each worker from it, the way gunicorn's
``--preload`` does: the workers share those pages copy-on-write and start training at once.

A forked worker is set up like ``python SCRIPT ARGS`` (or ``python -m MODULE ARGS``): its own
session, the worker's environment, stdin from /dev/null, stdout and stderr to the launcher's
pipes, default signal handlers, ``sys.argv`` and ``sys.path[0]`` as the interpreter sets them,
the exit code as the interpreter computes it (a ``SystemExit`` code, 1 after an uncaught
exception, death by SIGINT after an uncaught ``KeyboardInterrupt``), non-daemon threads joined
and ``atexit`` handlers run before it exits. Two differences remain, both as in
``multiprocessing``'s fork start method: the interpreter is not finalized (a file object still
open and unflushed when the script ends loses its buffer; close files or use ``with``), and
modules the launcher imported were imported under the workers' shared environment, not each
worker's own (rank-specific variables are not seen at import time).

The launcher forks only when it is safe: on Linux, from a process with a single thread (a
thread holding a lock at the fork would leave the lock held forever in the child), and when
the workers' ``PYTHON*`` variables (read once, at an interpreter's start) are the
launcher's. Importing torch with ``OMP_NUM_THREADS`` > 1 starts an OpenMP thread, so a
launcher whose workers get more than one thread each starts them with ``exec`` instead, as
it does when a preload module cannot be imported.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import io
import os
import runpy
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, NoReturn

__all__ = ["DEFAULT_PRELOAD", "ForkedProcess", "fork_worker", "parse_preload", "preload"]

DEFAULT_PRELOAD = ("torch", "torch._dynamo")
"""What ``gossip-sgp launch`` imports before forking workers, unless told otherwise."""


def parse_preload(text: str) -> tuple[str, ...]:
    """``"torch,numpy"`` -> ``("torch", "numpy")``; ``""`` -> ``()``; ValueError on a bad name."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in names:
        if not all(piece.isidentifier() for piece in name.split(".")):
            raise ValueError(f"not a module name: {name!r}")
    return names


def single_threaded() -> bool:
    """Whether this process runs one thread only, native threads included (Linux)."""
    if threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def preload(modules: Sequence[str], env: Mapping[str, str]) -> str | None:
    """Import ``modules`` under ``env``; None when workers can be forked, else the reason not.

    ``env`` is what every worker's environment shares (variables read at import time, such as
    ``OMP_NUM_THREADS``, then hold as they would in a worker of its own). The launcher's
    environment is restored afterwards.
    """
    if not modules:
        return "nothing to preload"
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return "forking workers is supported on Linux only"
    if not single_threaded():
        return "the launcher runs more than one thread"
    differs = _interpreter_settings_differ(env)
    if differs is not None:
        return differs
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        for name in modules:
            importlib.import_module(name)
    except Exception as exc:  # any failure: the workers import it themselves and report it
        return f"cannot import {name}: {type(exc).__name__}: {exc}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if not single_threaded():
        return "importing them started a thread (OMP_NUM_THREADS > 1?)"
    # Objects made so far live as long as the launcher: keep the collector from touching
    # (and so copying) their pages in every worker.
    gc.freeze()
    return None


def _interpreter_settings_differ(env: Mapping[str, str]) -> str | None:
    """Why a forked worker would not start as ``python`` would under ``env``, or None.

    The interpreter reads its ``PYTHON*`` variables once, at start-up: a worker forked from the
    launcher has the launcher's. ``PYTHONUNBUFFERED`` is the exception (the worker's streams are
    made anew).
    """
    for key in sorted(set(env) | set(os.environ)):
        ignored = not key.startswith("PYTHON") or key == "PYTHONUNBUFFERED"
        if not ignored and env.get(key) != os.environ.get(key):
            return f"the workers' {key} differs from the launcher's"
    on_path = {os.path.abspath(entry) for entry in sys.path if entry}
    for entry in env.get("PYTHONPATH", "").split(os.pathsep):
        if entry and os.path.abspath(entry) not in on_path:
            return f"PYTHONPATH entry {entry} is not on the launcher's sys.path"
    return None


class ForkedProcess:
    """The part of :class:`subprocess.Popen` the launcher uses, for a forked worker."""

    def __init__(self, pid: int, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code once the worker has exited (-N: killed by signal N), else None."""
        if self.returncode is None:
            self._reap(os.WNOHANG)
        return self.returncode

    def wait(self) -> int:
        """Wait for the worker to exit; its exit code."""
        while self.returncode is None:
            self._reap(0)
        return self.returncode

    def _reap(self, flags: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped elsewhere (a SIGCHLD handler set to SIG_IGN)
            self.returncode = 0 if self.returncode is None else self.returncode
            return
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)


def fork_worker(
    argv: Sequence[str],
    *,
    module: bool,
    env: Mapping[str, str],
    close: Sequence[int] = (),
    preexec: Callable[[], None] | None = None,
) -> ForkedProcess:
    """Fork a worker running ``python SCRIPT ARGS`` (``module``: ``python -m MODULE ARGS``).

    ``argv`` is ``[script or module, *args]``. Its stdout and stderr are pipes (the returned
    process's ``stdout`` / ``stderr``), its stdin /dev/null. ``close``
    lists descriptors of the launcher the worker must not hold (other workers' pipes: a worker
    holding one would keep it open past that worker's exit). ``preexec`` runs in the worker
    first, like ``Popen``'s ``preexec_fn``.
    """
    pipes = (os.pipe(), os.pipe())
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    try:
        pid = os.fork()
    except OSError:
        for fd in (*pipes[0], *pipes[1]):
            os.close(fd)
        raise
    if pid == 0:  # the worker; never returns
        _worker(argv, module, env, pipes, close, preexec)
    (out_r, out_w), (err_r, err_w) = pipes
    os.close(out_w)
    os.close(err_w)
    return ForkedProcess(pid, os.fdopen(out_r, "rb"), os.fdopen(err_r, "rb"))


def _worker(
    argv: Sequence[str],
    module: bool,
    env: Mapping[str, str],
    pipes: tuple[tuple[int, int], tuple[int, int]],
    close: Sequence[int],
    preexec: Callable[[], None] | None,
) -> NoReturn:
    code = 1
    try:
        os.setsid()
        if preexec is not None:
            preexec()
        for fd in close:
            with contextlib.suppress(OSError):
                os.close(fd)
        _redirect(pipes)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(env)
        _reopen_std_streams(unbuffered=bool(env.get("PYTHONUNBUFFERED")))
        _reseed()
        code = _run(argv, module)
    except BaseException:  # the set-up failed: say why, exit 1
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        # Nothing may unwind past here: the caller's frames are the launcher's.
        with contextlib.suppress(BaseException):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(BaseException):
                    stream.flush()
        os._exit(code)


def _redirect(pipes: tuple[tuple[int, int], tuple[int, int]]) -> None:
    (out_r, out_w), (err_r, err_w) = pipes
    devnull = os.open(os.devnull, os.O_RDONLY)
    for source, target in ((devnull, 0), (out_w, 1), (err_w, 2)):
        os.dup2(source, target)  # inheritable: the worker's own children share its stdio
    for fd in (devnull, out_r, out_w, err_r, err_w):
        os.close(fd)


def _reopen_std_streams(*, unbuffered: bool) -> None:
    """New ``sys.std*`` on descriptors 0-2, buffered as a new interpreter would buffer them."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    streams = {
        "stdin": io.TextIOWrapper(
            io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding=encoding
        ),
        "stdout": _writer(1, encoding, "strict", unbuffered, line=False),
        "stderr": _writer(2, encoding, "backslashreplace", unbuffered, line=True),
    }
    for name, stream in streams.items():
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _writer(
    fd: int, encoding: str, errors: str, unbuffered: bool, *, line: bool
) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    buffer: io.RawIOBase | io.BufferedWriter = raw if unbuffered else io.BufferedWriter(raw)
    return io.TextIOWrapper(
        buffer,  # type: ignore[arg-type]
        encoding=encoding,
        errors=errors,
        line_buffering=line or os.isatty(fd),
        write_through=unbuffered,
    )


def _reseed() -> None:
    """Workers must not share the launcher's random state (``random`` reseeds itself)."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        with contextlib.suppress(Exception):
            numpy_random.seed()


def _run(argv: Sequence[str], module: bool) -> int:
    """Run the script as ``__main__`` and exit the way the interpreter would; the exit code."""
    name, args = argv[0], list(argv[1:])
    interrupted = False
    code = 0
    try:
        if module:
            sys.argv = ["-m", *args]  # run_module puts the module's file in argv[0]
            sys.path[0] = os.getcwd()
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [name, *args]
            sys.path[0] = os.path.dirname(os.path.realpath(name))
            runpy.run_path(name, run_name="__main__")
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        interrupted = True
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    with _interruptible():
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()  # join non-daemon threads, as the interpreter does at exit
    with _interruptible():
        atexit._run_exitfuncs()
    if interrupted:  # the interpreter's way: die of SIGINT, so the parent sees why
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 128 + signal.SIGINT
    return code


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    with contextlib.suppress(KeyboardInterrupt):
        yield


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):  # a C long, as exit() gets it; 255 for one that is not
        return code & 0xFF if -(2**63) <= code < 2**63 else 255
    with contextlib.suppress(BaseException):
        print(code, file=sys.stderr)
    return 1
