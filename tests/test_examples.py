"""The example a user copies, and the digits trainer's data loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gossip_sgp.digits import digits, load_digits_split, parse_args
from tests.procs import Jobs


@pytest.mark.timeout(60)
def test_digits_are_scikit_learns_digits() -> None:
    """Same pixels and labels as ``sklearn.datasets.load_digits`` (which the example reads
    around, to save every worker 1.6 CPU-seconds of imports)."""
    from sklearn.datasets import load_digits

    expected = load_digits()
    images, labels = digits()
    np.testing.assert_array_equal(images, expected.data)
    np.testing.assert_array_equal(labels, expected.target)
    x_train, y_train, x_test, y_test = load_digits_split()
    assert x_train.shape == (1438, 1, 8, 8)
    assert x_test.shape == (359, 1, 8, 8)
    assert float(x_train.max()) == 1.0
    assert float(x_train.min()) == 0.0
    assert sorted(set(y_test.tolist())) == list(range(10))
    assert len(y_train) + len(y_test) == 1797


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--min-step-ms", "-1"], "--min-step-ms must be in 0..60000"),
        (["--min-step-ms", "1e9"], "--min-step-ms must be in 0..60000"),
        (["--straggler", "3"], "--straggler must be RANK:FACTOR"),
        (["--staleness", "soon"], "--staleness must be an integer"),
        (["--emulate-compute", "-1"], "--emulate-compute must be in 0..60000"),
        (["--outer-overlap"], "--outer, --outer-overlap and --fragments go with --local-steps H"),
        (["--fragments", "2"], "--outer, --outer-overlap and --fragments go with --local-steps H"),
        (["--local-steps", "4", "--fragments", "5"], "--fragments must be in 1..H"),
    ],
)
def test_the_digits_trainer_refuses_bad_arguments_with_a_clear_error(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_the_digits_trainer_pads_steps_only_when_asked() -> None:
    assert parse_args([]).min_step_ms == 0.0
    assert parse_args(["--min-step-ms", "20"]).min_step_ms == 20.0


@pytest.mark.timeout(120)
def test_emulated_compute_sleeps_instead_of_computing_and_local_steps_overlap(
    jobs: Jobs,
) -> None:
    """``--emulate-compute 30``: every timed step takes the 30 ms sleep (the forward and
    backward pass it replaces took about 1 ms at this width); with ``--local-steps 4
    --outer-overlap`` every worker lands one outer step per 4 steps."""
    out = jobs.run(
        "launch", "--nproc", "2", "-m", "gossip_sgp.digits", "--model", "mlp",
        "--width", "64", "--epochs", "1", "--quiet", "--json", "--emulate-compute", "30",
        "--local-steps", "4", "--outer-overlap", "--eval-every", "0",
        timeout=100,
    )  # fmt: skip
    summary = json.loads(out.strip().splitlines()[-1].removeprefix("[rank 0] "))
    assert summary["emulate_compute_ms"] == 30.0
    assert summary["outer_overlap"] is True
    assert summary["iteration_seconds"]["min"] >= 0.03, summary["iteration_seconds"]
    for worker in summary["per_worker"]:
        assert worker["outer_steps"] == worker["steps"] // 4, worker


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE = EXAMPLES / "train_digits.py"
CHARLM = EXAMPLES / "train_charlm.py"


@pytest.mark.parametrize("example", [EXAMPLE, CHARLM], ids=lambda p: p.name)
def test_the_example_uses_the_public_api_only(example: Path) -> None:
    """A script a user copies imports from ``gossip_sgp`` only what ``gossip_sgp.__all__``
    exports (no private module, no harness) and stays short."""
    import ast

    import gossip_sgp

    tree = ast.parse(example.read_text())
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gossip_sgp"):
            assert node.module == "gossip_sgp", f"imports from {node.module}"
            used += [alias.name for alias in node.names]
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("gossip_sgp") for a in node.names)
    assert used, "the example does not use gossip_sgp"
    assert set(used) <= set(gossip_sgp.__all__), set(used) - set(gossip_sgp.__all__)
    assert len(example.read_text().splitlines()) < 200


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("staleness", ["0", "none"])
def test_the_example_trains_four_workers_to_one_model(jobs: Jobs, staleness: str) -> None:
    """As the README runs it: four workers agree and classify the held-out digits.

    ``consensus()`` stops once the largest change of a model in one round is at most its
    ``tol`` (1e-6); the models are then the same up to rounding, which usually, not always,
    leaves them bit-identical (a CI run printed 3.3e-08: the workers sum the same shares in
    different orders)."""
    out = jobs.run("launch", "--nproc", "4", str(EXAMPLE), "--staleness", staleness, timeout=150)
    finals = [line for line in out.splitlines() if "] test accuracy " in line]
    assert len(finals) == 4, out[-3000:]
    accuracies = {float(line.split("test accuracy ")[1].split()[0]) for line in finals}
    assert len(accuracies) == 1, finals  # consensus(): one model
    assert min(accuracies) >= 0.9, finals
    disagreements = [float(line.split("differ by ")[1].rstrip(")")) for line in finals]
    assert max(disagreements) <= 1e-6, finals


@pytest.mark.timeout(60)
def test_the_language_model_example_shards_its_windows_as_asked() -> None:
    """``--shards interleaved`` (the default) gives worker r the windows starting at bytes
    r, r + n, r + 2n, ... of the whole text (DistributedSampler's split, unshuffled: no two
    workers share a start); ``contiguous`` draws exactly what the example drew before the
    option existed, each worker inside its own n-th of the text."""
    import argparse
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("train_charlm", CHARLM)
    assert spec is not None
    assert spec.loader is not None
    charlm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(charlm)
    # a short text and many draws: every start a worker may draw is drawn
    length, n, context, draws = 301, 3, 8, 20_000
    args = argparse.Namespace(context=context, batch_size=draws, shards="interleaved")
    taken: list[set[int]] = []
    for rank in range(n):
        starts = charlm.window_starts(args, length, rank, n, torch.Generator().manual_seed(rank))
        # every start of this rank's residue whose window fits, but the last one
        expected = set(range(rank, length - context - 1 - n + 1, n))
        assert set(starts.tolist()) == expected, rank
        assert int(starts.max()) + context + 1 <= length  # every window fits in the text
        taken.append(expected)
    assert sum(len(t) for t in taken) == len(set().union(*taken)) > 0.95 * length - context
    args = argparse.Namespace(context=context, batch_size=draws, shards="contiguous")
    part = length // n
    for rank in range(n):
        starts = charlm.window_starts(args, length, rank, n, torch.Generator().manual_seed(rank))
        before = torch.randint(
            0, part - context - 1, (draws,), generator=torch.Generator().manual_seed(rank)
        )
        assert torch.equal(starts, rank * part + before), rank
        assert set(starts.tolist()) == set(range(rank * part, (rank + 1) * part - context - 1))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("algorithm", ["local-steps", "streamed", "allreduce"])
def test_the_language_model_example_learns_and_local_steps_send_little(
    jobs: Jobs, algorithm: str
) -> None:
    """``examples/train_charlm.py``, shortened: four workers learn the bytes of the standard
    library's source (a byte costs ln 256 = 5.55 nats untrained), end with one model, and
    with an average every 20 steps send a fraction of a model per step (``streamed``: a
    quarter of it every 5 steps, ``StreamingSGP``)."""
    args = ["--steps", "80", "--text-mb", "0.5", "--local-steps", "20", "--eval-every", "40"]
    if algorithm == "allreduce":
        args += ["--algorithm", "allreduce"]
    if algorithm == "streamed":
        args += ["--fragments", "4"]
    if algorithm == "local-steps":
        args += ["--shards", "contiguous"]  # the other runs take the default, interleaved
    out = jobs.run("launch", "--nproc", "4", str(CHARLM), *args, timeout=200)
    finals = [line for line in out.splitlines() if "validation loss" in line]
    assert len(finals) == 4, out[-3000:]
    # --eval-every 40: rank 0's held-out loss and bytes so far, at steps 40 and 80
    evals = [line.split("[rank 0] ")[1] for line in out.splitlines() if "held-out loss" in line]
    assert [e.split(":")[0] for e in evals] == ["at step 40", "at step 80"], evals
    mbs = [float(e.split(": ")[1].split()[0]) for e in evals]
    assert 0 < mbs[0] < mbs[1], evals
    losses = {float(line.split("validation loss ")[1].split()[0]) for line in finals}
    assert len(losses) == 1, finals  # one model
    assert losses.pop() < 3.5, finals
    if algorithm != "allreduce":
        sent = [float(line.split("sent ")[1].split()[0]) for line in finals]
        model_mb = 0.55  # CharLM's float32 parameters at the default size, in MB
        # the start (4 rounds), 4 outer steps of 2 rounds and consensus(): about 20 models
        assert max(sent) < 30 * model_mb, finals
