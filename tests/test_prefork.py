"""Workers forked from a preloading launcher behave like workers started as new interpreters.

Every test runs ``gossip-sgp launch`` as a subprocess (a pytest process may run threads, and the
launcher forks only from a single-threaded process) twice: ``--preload ''`` starts each worker
with exec, ``--preload colorsys`` (a small module no interpreter imports at start-up) forks
them, and the same expectations hold for both. The training tests run the default preload
(torch) on every multi-process job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gossip_sgp import prefork
from tests.procs import alive

REPO = Path(__file__).resolve().parent.parent

STARTS = {"exec": "", "fork": "colorsys"}


def launcher(preload: str, nproc: int, *args: str) -> list[str]:
    """The command line of ``gossip-sgp launch --preload PRELOAD --nproc NPROC ARGS``."""
    return [
        sys.executable,
        "-m",
        "gossip_sgp.cli",
        "launch",
        "--preload",
        preload,
        "--nproc",
        str(nproc),
        *args,
    ]


def launch(
    tmp_path: Path, start: str, body: str, *args: str, nproc: int = 1, preload: str | None = None
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run(
        launcher(STARTS[start] if preload is None else preload, nproc, str(script), *args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def worker_lines(stream: str, rank: int = 0) -> list[str]:
    prefix = f"[rank {rank}] "
    return [line[len(prefix) :] for line in stream.splitlines() if line.startswith(prefix)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start", sorted(STARTS))
@pytest.mark.parametrize(
    ("body", "code", "in_stderr"),
    [
        ("import sys\nsys.exit(3)", 3, "rank 0 exited with code 3"),
        ("import sys\nsys.exit(259)", 3, "rank 0 exited with code 3"),  # exit(3) reports so
        ("import sys\nsys.exit(2**40)", 0, None),  # a C long truncated to its low byte
        ("import sys\nsys.exit(2**70)", 255, "rank 0 exited with code 255"),  # not a C long
        ("raise ValueError('boom')", 1, "ValueError: boom"),
        ("import sys\nsys.exit('bad input')", 1, "bad input"),
        ("raise KeyboardInterrupt", 128 + signal.SIGINT, "rank 0 was killed by SIGINT"),
        ("import sys\nsys.exit()", 0, None),
    ],
    ids=[
        "exit-3",
        "exit-259",
        "exit-2**40",
        "exit-2**70",
        "exception",
        "message",
        "interrupt",
        "none",
    ],
)
def test_exit_codes_match_the_interpreter(
    tmp_path: Path, start: str, body: str, code: int, in_stderr: str | None
) -> None:
    """An uncaught KeyboardInterrupt kills the interpreter by SIGINT after its traceback
    (the launcher says so); an exception exits 1 after its traceback; a SystemExit message
    is printed; an exit code is what C's exit() makes of it."""
    done = launch(tmp_path, start, body)
    assert done.returncode == code, done.stderr
    if in_stderr is not None:
        assert in_stderr in done.stderr
    if "KeyboardInterrupt" in body:
        assert "KeyboardInterrupt" in "\n".join(worker_lines(done.stderr))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start", sorted(STARTS))
def test_threads_are_joined_and_atexit_handlers_run_before_the_exit(
    tmp_path: Path, start: str
) -> None:
    body = """
    import atexit, threading, time
    atexit.register(lambda: print("atexit", flush=True))
    def late():
        time.sleep(0.3)
        print("thread done", flush=True)
    threading.Thread(target=late).start()
    print("main done", flush=True)
    """
    done = launch(tmp_path, start, body)
    assert done.returncode == 0, done.stderr
    assert worker_lines(done.stdout) == ["main done", "thread done", "atexit"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start", sorted(STARTS))
def test_a_worker_starts_as_python_script_would(tmp_path: Path, start: str) -> None:
    """argv, sys.path[0], __name__, stdin, its own session, its environment, its own random
    numbers (numpy's global generator would otherwise be the launcher's in every worker), and
    output buffered as ``python`` buffers it, all as with exec; and the start method is the
    one asked for."""
    body = """
    import json, os, random, sys
    import numpy
    print(json.dumps({
        "argv": sys.argv,
        "path0": sys.path[0],
        "name": __name__,
        "stdin": sys.stdin.read(),
        "session_leader": os.getsid(0) == os.getpid(),
        "rank": os.environ["RANK"],
        "unbuffered": os.environ.get("PYTHONUNBUFFERED"),
        "random": random.random(),
        "numpy": int(numpy.random.randint(2**31)),
        "preloaded": "colorsys" in sys.modules,
        "stdout_tty": sys.stdout.isatty(),
        "pid": os.getpid(),
    }))
    """
    preload = "colorsys,numpy" if start == "fork" else ""
    done = launch(tmp_path, start, body, "--flag", "x", nproc=2, preload=preload)
    assert done.returncode == 0, done.stderr
    reports = [json.loads(worker_lines(done.stdout, rank)[0]) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["argv"] == [str(tmp_path / "worker.py"), "--flag", "x"]
        assert report["path0"] == str(tmp_path.resolve())
        assert report["name"] == "__main__"
        assert report["stdin"] == ""
        assert report["session_leader"]
        assert report["rank"] == str(rank)
        assert report["unbuffered"] == "1"
        assert report["preloaded"] == (start == "fork")
        assert not report["stdout_tty"]
    how = "forked after importing colorsys, numpy" if start == "fork" else "each a new python"
    assert f"2 worker(s), pids {reports[0]['pid']}, {reports[1]['pid']} ({how})" in done.stderr
    assert reports[0]["random"] != reports[1]["random"]
    assert reports[0]["numpy"] != reports[1]["numpy"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start", sorted(STARTS))
def test_module_form_sets_argv_and_path_like_python_m(tmp_path: Path, start: str) -> None:
    package = tmp_path / "pkg_for_prefork"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "job.py").write_text(
        "import json, sys\n"
        "print(json.dumps([__name__, sys.argv, sys.path[0], 'colorsys' in sys.modules]))\n"
    )
    done = subprocess.run(
        launcher(STARTS[start], 1, "-m", "pkg_for_prefork.job", "a"),
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    name, argv, path0, preloaded = json.loads(worker_lines(done.stdout)[0])
    assert name == "__main__"
    assert argv == [str(package / "job.py"), "a"]
    assert path0 == str(tmp_path)
    assert preloaded == (start == "fork")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start", sorted(STARTS))
def test_workers_die_with_a_killed_launcher(tmp_path: Path, start: str) -> None:
    """PR_SET_PDEATHSIG: a launcher killed by SIGKILL leaves no worker behind."""
    script = tmp_path / "sleeper.py"
    script.write_text("import os, time\nprint('ready', os.getpid(), flush=True)\ntime.sleep(60)\n")
    process = subprocess.Popen(
        launcher(STARTS[start], 2, str(script)),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids: list[int] = []
    try:
        assert process.stdout is not None
        while len(pids) < 2:
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else "launcher ended"
            if "] ready " in line:
                pids.append(int(line.split()[-1]))
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(pid) for pid in pids):
            time.sleep(0.05)
        assert not any(alive(pid) for pid in pids)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_a_module_that_cannot_be_preloaded_falls_back_to_exec(tmp_path: Path) -> None:
    body = "import sys\nprint('colorsys' in sys.modules)"
    done = launch(tmp_path, "fork", body, preload="colorsys,no_such_module_for_prefork")
    assert done.returncode == 0, done.stderr
    assert "not preloading: cannot import no_such_module_for_prefork" in done.stderr
    assert worker_lines(done.stdout) == ["False"]  # a new interpreter, not a fork


@pytest.mark.timeout(120)
def test_torch_with_several_threads_per_worker_is_not_forked() -> None:
    """Importing torch with OMP_NUM_THREADS > 1 starts an OpenMP thread; forking then would
    leave the worker with a thread pool it cannot use. ``preload`` says so instead."""
    code = (
        "import os\nfrom gossip_sgp import prefork\n"
        "print(prefork.preload(['torch'], dict(os.environ, OMP_NUM_THREADS='2')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "started a thread" in done.stdout


def test_workers_python_settings_must_be_the_launchers(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a fresh interpreter reads at start-up must match, or the launcher does not fork."""
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    base = {k: v for k, v in os.environ.items()}
    assert prefork._interpreter_settings_differ({**base, "PYTHONUNBUFFERED": "1"}) is None
    why = prefork._interpreter_settings_differ({**base, "PYTHONHASHSEED": "0"})
    assert why is not None
    assert "PYTHONHASHSEED" in why
    monkeypatch.setenv("PYTHONPATH", "/nowhere/on/the/path")
    why = prefork._interpreter_settings_differ(dict(os.environ))
    assert why is not None
    assert "/nowhere/on/the/path" in why


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", ()), ("torch", ("torch",)), (" torch , torch._dynamo ,", ("torch", "torch._dynamo"))],
)
def test_parse_preload(text: str, expected: tuple[str, ...]) -> None:
    assert prefork.parse_preload(text) == expected


@pytest.mark.parametrize("text", ["torch;rm", "a..b", "1x", "torch/nn"])
def test_parse_preload_rejects_what_is_not_a_module_name(text: str) -> None:
    with pytest.raises(ValueError, match="not a module name"):
        prefork.parse_preload(text)


def test_a_failed_fork_leaves_no_pipe_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fork_worker`` makes two pipes before forking; when the fork fails (EAGAIN: too
    many processes) they are closed and the error reaches the launcher."""

    def refuse() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refuse)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(BlockingIOError):
        prefork.fork_worker(["x.py"], module=False, env={})
    assert set(os.listdir("/proc/self/fd")) == before
