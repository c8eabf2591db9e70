"""Start gossip workers: N on this machine (``launch``) or one of a multi-machine job (``run``).

    gossip-sgp launch --nproc 4 -m gossip_sgp.digits --epochs 5
    gossip-sgp launch --nproc 4 -m gossip_sgp.digits
    gossip-sgp run --config peers.toml --rank 0 -m gossip_sgp.digits

Workers learn their job from environment variables (read by
:meth:`gossip_sgp.config.GossipConfig.from_env`) plus torchrun's ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``, so a script can also
open a torch.distributed group (an AllReduce baseline, say).

Signals. Each worker runs in its own session (process group), so a Ctrl-C in the terminal
reaches only the launcher, which then sends exactly one SIGINT to every worker's process group:
a worker sharing the launcher's group would get the terminal's SIGINT and the forwarded one,
and the second KeyboardInterrupt would cut its clean shutdown short. SIGINT, SIGTERM and SIGHUP
to the launcher all become SIGINT for the workers, because every Python program turns SIGINT
into an orderly unwinding (KeyboardInterrupt). Workers still alive ``grace`` seconds later get
SIGTERM, and ``grace`` seconds after that SIGKILL; a second signal to the launcher skips the
current wait. On Linux every worker also asks the kernel for SIGKILL when the launcher dies
(``PR_SET_PDEATHSIG``), so even a SIGKILLed launcher leaves no orphans behind. Workers of
``launch`` read stdin from /dev/null (N processes cannot share a terminal); the single worker of
``run`` keeps the launcher's stdin.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, TextIO

from gossip_sgp import prefork
from gossip_sgp.config import (
    ENV_CONFIG,
    ENV_METRICS_HOST,
    ENV_METRICS_PORT,
    ENV_PEERS,
    ENV_RANK,
    ENV_TIMEOUT,
    ENV_TRANSPORT,
    GossipConfig,
    address_family,
    find_free_ports,
    format_peer_list,
)
from gossip_sgp.errors import ConfigError

__all__ = ["find_free_ports", "launch", "run"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_POLL_SECONDS = 0.05
_MAX_LINE_BYTES = 1 << 16
_PUMP_JOIN_SECONDS = 5.0
_PR_SET_PDEATHSIG = 1
_MASTER_PORT_OFFSET = 1000


def launch(
    script_or_module_argv: Sequence[str],
    nproc: int,
    *,
    module: bool = False,
    metrics_port: int = 0,
    metrics_host: str = "127.0.0.1",
    host: str = "127.0.0.1",
    transport: str = "zmq",
    timeout: float | None = None,
    extra_env: Mapping[str, str] | None = None,
    grace: float = 10.0,
    keep_going: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    preload: Sequence[str] = (),
) -> int:
    """Run ``nproc`` workers of one gossip job on this machine and return the exit code.

    ``script_or_module_argv`` is ``[script, *args]``, or ``["-m", module, *args]`` (the same as
    ``module=True`` with ``[module, *args]``); each worker runs it under ``sys.executable``.
    Workers gossip over free ports of ``host`` (loopback by default); with ``metrics_port``
    > 0, rank r serves Prometheus metrics on ``http://metrics_host:(metrics_port + r)/metrics``
    (loopback by default; the addresses are printed to ``stderr``). ``extra_env`` adds variables
    to the workers' environment (the launcher's own ``GOSSIP_SGP_*`` and torchrun ones win).
    Worker output lines go to ``stdout`` / ``stderr`` (default: the launcher's) prefixed
    with ``[rank R] ``.

    Returns 0 when every worker exits 0; else the first failing worker's code (128 + N for a
    worker killed by signal N), after stopping the others; or 128 + N when the launcher got
    signal N (130 for Ctrl-C). With ``keep_going`` a failing worker does not stop the
    others (SGP goes on without a dead worker, see docs/reliability.md): the launcher waits
    for all of them and returns the first failing worker's code. Raises
    :class:`ConfigError` before starting anything when the arguments are invalid. Call it
    from the main thread: only there can it catch signals.

    ``preload`` names modules (``("torch", "torch._dynamo")`` from the CLI) to import once in
    this process and fork the workers from it instead of starting a new interpreter each
    (:mod:`gossip_sgp.prefork`: when forking is unsafe, as from a process with threads, the
    workers start as usual).

        launch(["-m", "gossip_sgp.digits", "--epochs", "5"], 4)
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    command = _worker_command(script_or_module_argv, module=module)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"nproc must be an integer >= 1, got {nproc!r}")
    _check_grace(grace)
    metrics_ports = _metrics_ports(metrics_port, nproc, metrics_host)
    extra = {**(extra_env or {}), ENV_METRICS_HOST: metrics_host}
    envs = _launch_envs(nproc, host, transport, timeout, metrics_ports, extra)
    shown = f"[{metrics_host}]" if ":" in metrics_host else metrics_host
    for rank, port in enumerate(metrics_ports):
        if port:
            print(f"gossip-sgp launch: rank {rank} metrics http://{shown}:{port}/metrics", file=err)
    err.flush()
    forking = False
    if preload:
        shared = {k: v for k, v in envs[0].items() if all(e.get(k) == v for e in envs)}
        why_not = prefork.preload(preload, shared)
        forking = why_not is None
        if why_not is not None and why_not.startswith("cannot import"):
            print(f"gossip-sgp launch: not preloading: {why_not}", file=err)
    lock = threading.Lock()
    pumps: list[threading.Thread] = []
    with _Supervisor("gossip-sgp launch", grace, err, keep_going=keep_going) as supervisor:
        for rank, env in enumerate(envs):
            if supervisor.stopping:
                break
            if forking:
                supervisor.fork(rank, command, env)
            else:
                supervisor.start(rank, command, env, capture=True)
        how = f"forked after importing {', '.join(preload)}" if forking else "each a new python"
        pids = ", ".join(str(worker.process.pid) for worker in supervisor.workers)
        supervisor.say(f"{len(supervisor.workers)} worker(s), pids {pids} ({how})")
        for worker in supervisor.workers:
            prefix = f"[rank {worker.rank}] "
            for pipe, sink in ((worker.process.stdout, out), (worker.process.stderr, err)):
                assert pipe is not None
                pumps.append(_start_pump(pipe, prefix, sink, lock))
        code = supervisor.wait()
    deadline = time.monotonic() + _PUMP_JOIN_SECONDS
    for pump in pumps:
        pump.join(max(0.0, deadline - time.monotonic()))
    return code


def run(
    config_path: str | os.PathLike[str],
    rank: int,
    script_or_module_argv: Sequence[str],
    *,
    module: bool = False,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    grace: float = 10.0,
    stderr: TextIO | None = None,
) -> int:
    """Run worker ``rank`` of the multi-machine job in the peer list ``config_path``.

    The peer list is validated first (errors raise :class:`ConfigError` before the script
    starts). The worker gets ``GOSSIP_SGP_CONFIG`` (absolute path) and ``GOSSIP_SGP_RANK``,
    ``metrics_port`` (0: off; None: as in the peer list) as ``GOSSIP_SGP_METRICS_PORT``,
    ``metrics_host`` (None: the peer list's ``metrics_host``) as ``GOSSIP_SGP_METRICS_HOST``, and
    torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK=0``, ``LOCAL_WORLD_SIZE=1``. Unless set
    already, ``MASTER_ADDR`` is rank 0's host and ``MASTER_PORT`` rank 0's gossip port + 1000
    (- 1000 above 64535). It shares the launcher's stdin, stdout and stderr. Returns the
    worker's exit code (128 + N when it was killed by signal N).
    """
    err = sys.stderr if stderr is None else stderr
    command = _worker_command(script_or_module_argv, module=module)
    _check_grace(grace)
    env = dict(os.environ)
    env.update(extra_env or {})
    env.update({ENV_CONFIG: os.path.abspath(config_path), ENV_RANK: str(rank)})
    if metrics_port is not None:
        env[ENV_METRICS_PORT] = str(metrics_port)
    if metrics_host is not None:
        env[ENV_METRICS_HOST] = metrics_host
    config = GossipConfig.from_env(env)
    master = config.peers[0]
    env.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(config.world_size),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
        }
    )
    env.setdefault("MASTER_ADDR", master.host)
    port = master.port + _MASTER_PORT_OFFSET
    env.setdefault("MASTER_PORT", str(port if port <= 65535 else master.port - _MASTER_PORT_OFFSET))
    with _Supervisor("gossip-sgp run", grace, err) as supervisor:
        worker = supervisor.start(rank, command, env, capture=False)
        supervisor.wait()
    assert worker.code is not None
    return worker.code


def _launch_envs(
    nproc: int,
    host: str,
    transport: str,
    timeout: float | None,
    metrics_ports: list[int],
    extra_env: Mapping[str, str] | None,
) -> list[dict[str, str]]:
    """Each local worker's environment, checked as the worker will read it."""
    ports = find_free_ports(host, nproc + 1, exclude=[p for p in metrics_ports if p])
    master_port = ports.pop()
    envs = []
    for rank in range(nproc):
        env = _inherited_env(extra_env, nproc)
        env.update(
            {
                ENV_PEERS: format_peer_list([(host, port) for port in ports]),
                ENV_RANK: str(rank),
                ENV_TRANSPORT: transport,
                ENV_METRICS_PORT: str(metrics_ports[rank]),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": host,
                "MASTER_PORT": str(master_port),
            }
        )
        if timeout is not None:
            env[ENV_TIMEOUT] = str(timeout)
        GossipConfig.from_env(env)  # fail here, before any worker starts
        envs.append(env)
    return envs


def _metrics_ports(base: int, nproc: int, host: str = "127.0.0.1") -> list[int]:
    """Rank r's metrics port (``base + r``, or 0 for off), checked to be free on ``host``."""
    if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base <= 65535:
        raise ConfigError(f"metrics port must be in 0..65535 (0: off), got {base!r}")
    if base == 0:
        return [0] * nproc
    if base + nproc - 1 > 65535:
        raise ConfigError(
            f"metrics ports {base}..{base + nproc - 1} for {nproc} workers exceed 65535"
        )
    ports = [base + rank for rank in range(nproc)]
    family = address_family(host)
    for port in ports:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ConfigError(
                    f"metrics port {port} on {host} is not free ({exc.strerror or exc}); "
                    "choose another --metrics-port"
                ) from None
    return ports


def _worker_command(argv: Sequence[str], *, module: bool) -> list[str]:
    args = list(argv)
    if args and args[0] == "-m":
        module = True
        args = args[1:]
    if not args or not args[0]:
        raise ConfigError("no script to run: give SCRIPT [ARGS...] or -m MODULE [ARGS...]")
    if module:
        return [sys.executable, "-m", *args]
    if not os.path.isfile(args[0]):
        raise ConfigError(f"script not found: {args[0]} (use -m to run a module)")
    return [sys.executable, *args]


def _check_grace(grace: float) -> None:
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
        raise ConfigError(f"grace must be a number of seconds >= 0, got {grace!r}")


def _inherited_env(extra_env: Mapping[str, str] | None, nproc: int) -> dict[str, str]:
    """The launcher's environment without its ``GOSSIP_SGP_*``, plus ``extra_env``.

    The launcher's own variables describe some other job (a stale ``GOSSIP_SGP_CONFIG`` would
    even take precedence over ``GOSSIP_SGP_PEERS``), so they are dropped. Like torchrun, N
    workers share the cores: ``OMP_NUM_THREADS`` defaults to cores / N.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOSSIP_SGP_")}
    env.update(extra_env or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def _shell_code(returncode: int) -> int:
    """A Popen return code as a shell reports it: 128 + N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGKILL the child when the launcher dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    # Runs in the child between fork and exec: keep it trivial (no imports, no locks).
    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


_Handler = Callable[[int, types.FrameType | None], object] | int | None


class _Worker:
    def __init__(self, rank: int, process: subprocess.Popen[bytes] | prefork.ForkedProcess) -> None:
        self.rank = rank
        self.process = process
        self.code: int | None = None
        """Exit code as a shell reports it, once the worker has exited and been reaped."""


class _Supervisor:
    """Starts workers, forwards stop signals to them, stops them all when one fails.

    Used as a context manager: entering installs the signal handlers (main thread only),
    leaving kills and reaps whatever still runs (also on errors) and restores the handlers.
    """

    def __init__(self, name: str, grace: float, err: TextIO, *, keep_going: bool = False) -> None:
        self.name = name
        self.grace = float(grace)
        self.keep_going = keep_going
        self.err = err
        self.workers: list[_Worker] = []
        self._signals: list[int] = []  # appended by the handler; list.append takes no lock
        self._saved: dict[int, _Handler] = {}
        self._preexec = _parent_death_signal()

    @property
    def stopping(self) -> bool:
        """Whether a stop signal has arrived."""
        return bool(self._signals)

    def __enter__(self) -> _Supervisor:
        if threading.current_thread() is threading.main_thread():
            for signum in _STOP_SIGNALS:
                self._saved[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        try:
            for worker in self.workers:
                if worker.process.poll() is None:
                    self._signal(worker, signal.SIGKILL)
                worker.process.wait()
        finally:
            for signum, handler in self._saved.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        self._signals.append(signum)

    def start(
        self, rank: int, command: list[str], env: dict[str, str], *, capture: bool
    ) -> _Worker:
        """Start one worker in a session of its own."""
        pipe = subprocess.PIPE if capture else None
        try:
            process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL if capture else None,
                stdout=pipe,
                stderr=pipe,
                start_new_session=True,
                preexec_fn=self._preexec,
            )
        except OSError as exc:
            raise ConfigError(f"cannot start {command[0]}: {exc.strerror or exc}") from None
        worker = _Worker(rank, process)
        self.workers.append(worker)
        return worker

    def fork(self, rank: int, command: list[str], env: dict[str, str]) -> _Worker:
        """Fork one worker from this process (:mod:`gossip_sgp.prefork`), its output piped."""
        module = command[1] == "-m"
        argv = command[2:] if module else command[1:]
        held = [
            pipe.fileno()
            for worker in self.workers
            for pipe in (worker.process.stdout, worker.process.stderr)
            if pipe is not None and not pipe.closed
        ]
        try:
            process = prefork.fork_worker(
                argv, module=module, env=env, close=held, preexec=self._preexec
            )
        except OSError as exc:
            raise ConfigError(f"cannot fork a worker: {exc.strerror or exc}") from None
        worker = _Worker(rank, process)
        self.workers.append(worker)
        return worker

    def wait(self) -> int:
        """Wait for every worker to exit; return the job's exit code (see :func:`launch`)."""
        code: int | None = None
        ladder: list[signal.Signals] = []  # signals still to send, one per grace period
        escalating = False  # whether the next one follows an earlier signal of the ladder
        next_step = 0.0
        while True:
            for worker in self.workers:
                if worker.code is not None:
                    continue
                returncode = worker.process.poll()
                if returncode is None:
                    continue
                worker.code = _shell_code(returncode)
                if worker.code != 0 and self.keep_going and not self._signals:
                    code = worker.code if code is None else code
                    self._report_failure(worker, returncode)
                elif worker.code != 0 and code is None:
                    code = worker.code
                    self._report_failure(worker, returncode)
                    ladder, next_step = [signal.SIGTERM, signal.SIGKILL], 0.0
                    escalating = False
            while self._signals:
                signum = self._signals.pop(0)
                if code is None:
                    code = 128 + signum
                    self.say(
                        f"got {_signal_name(signum)}; stopping the workers with SIGINT "
                        f"(SIGTERM after {self.grace:g} s; send it again to hurry)"
                    )
                    ladder = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
                    escalating = False
                next_step = 0.0
            if all(worker.code is not None for worker in self.workers):
                return 0 if code is None else code
            if ladder and time.monotonic() >= next_step:
                step = ladder.pop(0)
                alive = [w for w in self.workers if w.process.poll() is None]
                if escalating and alive:
                    ranks = ", ".join(str(w.rank) for w in alive)
                    self.say(f"sending {step.name} to rank(s) {ranks}")
                escalating = True
                for worker in alive:
                    self._signal(worker, step)
                next_step = time.monotonic() + self.grace
            time.sleep(_POLL_SECONDS)

    def _report_failure(self, worker: _Worker, returncode: int) -> None:
        how = (
            f"was killed by {_signal_name(-returncode)}"
            if returncode < 0
            else f"exited with code {returncode}"
        )
        others = sum(1 for w in self.workers if w.code is None)
        rest = f"; stopping the other {others} worker(s)" if others else ""
        if self.keep_going and others:
            rest = f"; the other {others} worker(s) go on (--keep-going)"
        self.say(f"rank {worker.rank} {how}{rest}")

    def _signal(self, worker: _Worker, signum: signal.Signals) -> None:
        # The worker is unreaped here (a zombie at worst), so its process group id cannot
        # have been reused; the group also holds the worker's own children.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.process.pid, signum)

    def say(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            print(f"{self.name}: {text}", file=self.err, flush=True)


def _start_pump(
    pipe: IO[bytes], prefix: str, out: TextIO, lock: threading.Lock
) -> threading.Thread:
    thread = threading.Thread(
        target=_pump, args=(pipe, prefix, out, lock), name=f"pump {prefix.strip()}", daemon=True
    )
    thread.start()
    return thread


def _pump(pipe: IO[bytes], prefix: str, out: TextIO, lock: threading.Lock) -> None:
    """Copy ``pipe`` to ``out`` line by line, each line prefixed; drain even if ``out`` breaks."""
    writable = True
    with pipe:
        for raw in _lines(pipe):
            if not writable:
                continue
            text = raw.decode("utf-8", errors="backslashreplace")
            text = text.removesuffix("\n").removesuffix("\r")
            line = f"{prefix}{text}\n"
            with lock:
                try:
                    _write(out, line)
                except (OSError, ValueError):
                    writable = False


def _lines(pipe: IO[bytes]) -> Iterator[bytes]:
    while True:
        raw = pipe.readline(_MAX_LINE_BYTES)
        if not raw:
            return
        yield raw


def _write(out: TextIO, line: str) -> None:
    try:
        out.write(line)
    except UnicodeEncodeError:
        encoding = out.encoding or "ascii"
        out.write(line.encode(encoding, errors="backslashreplace").decode(encoding))
    out.flush()
