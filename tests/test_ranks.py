"""Many processes, many machines, on CPU over gloo. A rank that dies (SIGKILL) or fails alone (a full disk on rank 1
only, between two of DeepSpeed's checkpoint barriers) ends the whole job within seconds, with one line naming the
rank and the cause; `--resume` continues with the uninterrupted run's losses, and under --grid the other runs go on.
Two torchrun "nodes" on this machine train and checkpoint as one node with two processes does, and that checkpoint
resumes on one node; nodes that read other data are refused in one line naming the node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from scale_helpers import REPO, full_disk_on_rank, run_kd, start_kd, step_losses, stop_tree, wait_for
from test_distill import tiny_recipe
from test_resume import FAST

from kdcli.engine.distributed import disagreement, free_port

TWO_RANKS = {**FAST, "train": {**FAST["train"], "grad_accum": 1}, "deepspeed": {"zero_stage": 2}}
JOB_ENDS_WITHIN = 60.0  # seconds from a rank's death until every process of the job has exited


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    """The uninterrupted run: `kd distill --nproc 2`, 12 steps, a checkpoint every 3."""
    tmp_path = tmp_path_factory.mktemp("one-node")
    result = run_kd(["distill", str(tiny_recipe(tmp_path, tiny_teacher, **TWO_RANKS)), "--nproc", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path / "runs" / "tiny"


def assert_same_losses(run_dir: Path, reference: Path) -> float:
    losses, expected = step_losses(run_dir), step_losses(reference)
    assert losses.keys() == expected.keys()
    deviation = max(abs(losses[step] - expected[step]) for step in expected)
    assert deviation < 1e-5, deviation
    return deviation


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def ranks_of(launcher: subprocess.Popen[str]) -> dict[int, psutil.Process]:
    ranks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        rank = child.environ().get("RANK")
        if rank is not None:
            ranks[int(rank)] = child
    return ranks


def test_a_killed_rank_ends_the_job_and_resume_is_exact(tmp_path: Path, tiny_teacher: Path, one_node: Path) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, **TWO_RANKS)
    run_dir = tmp_path / "runs" / "tiny"
    launcher = start_kd(["distill", str(recipe), "--nproc", "2"], tmp_path)
    try:
        wait_for(run_dir / "checkpoints" / "step-00000003" / "kd-state.json", launcher)
        ranks = ranks_of(launcher)
        assert sorted(ranks) == [0, 1]
        killed = time.monotonic()
        ranks[1].kill()
        _, stderr = launcher.communicate(timeout=JOB_ENDS_WITHIN)
        _, alive = psutil.wait_procs(
            list(ranks.values()), timeout=max(0.0, JOB_ENDS_WITHIN - (time.monotonic() - killed))
        )
        seconds = time.monotonic() - killed
    finally:
        stop_tree(launcher)
    assert not alive and seconds < JOB_ENDS_WITHIN, f"{alive} still running after {seconds:.1f} s"
    print(f"the job ended {seconds:.2f} s after rank 1 was killed")
    assert launcher.returncode == 128 + signal.SIGKILL
    line = one_error_line(stderr)
    assert "rank 1 of 2" in line and "killed by SIGKILL" in line, line
    assert f"`kd distill --resume {run_dir} --nproc 2`" in line, line
    assert not (run_dir / "run.json").exists(), "the run finished before it could be killed"

    # Resumed, then stopped by a Ctrl-C at the launcher (a terminal sends it to the foreground group): every rank
    # finishes its step and saves, and the run resumes from there.
    resume = ["distill", "--resume", str(run_dir), "--nproc", "2"]
    latest = max(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*"))
    resumed = start_kd(resume, tmp_path)
    try:
        wait_for(run_dir / "checkpoints" / f"step-{latest + 3:08d}" / "kd-state.json", resumed)
        os.killpg(resumed.pid, signal.SIGINT)
        _, stderr = resumed.communicate(timeout=120)
    finally:
        stop_tree(resumed)
    assert resumed.returncode == 130, stderr
    assert f"checkpoint saved. Resume with: kd distill --resume {run_dir} --nproc 2" in " ".join(stderr.split())

    result = run_kd(resume, tmp_path)
    assert result.returncode == 0, result.stderr
    assert_same_losses(run_dir, one_node)
    assert list(tmp_path.rglob(".*.lock")) == [], "the killed run's lock file outlived the run that took it over"


def test_a_rank_failing_alone_ends_its_run_and_the_grid_goes_on(
    tmp_path: Path, tiny_teacher: Path, one_node: Path
) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, **TWO_RANKS)
    recipe.write_text(recipe.read_text().replace("name: tiny", "name: tiny-s{seed}"))
    grid = ["distill", str(recipe), "--grid", "seed=0,1", "--nproc", "2"]
    failed, other = tmp_path / "runs" / "tiny-s0", tmp_path / "runs" / "tiny-s1"
    # Rank 1 of the first run cannot write its optimizer shard of the step-6 checkpoint: it fails inside DeepSpeed's
    # save_checkpoint while rank 0 waits in DeepSpeed's closing barrier, and never learns why, only that rank 1 left.
    env = full_disk_on_rank(tmp_path, 1, r"/tiny-s0/checkpoints/\.step-00000006\.tmp/deepspeed/zero_pp_rank_1")
    process = start_kd(grid, tmp_path, env=env)
    try:
        stdout, stderr = process.communicate(timeout=400)
    finally:
        stop_tree(process)
    assert process.returncode == 1, stderr
    line = " ".join(one_error_line(stderr).split())
    shard = failed / "checkpoints" / "step-00000006"
    assert line.startswith(f"error: rank 1 of 2: no space left on device writing {shard} (needs ~"), line
    assert f"resume with `kd distill --resume {failed} --nproc 2`" in line, line
    assert "failed (exit 2)" in stdout and (other / "run.json").is_file(), stdout
    assert sorted(p.name for p in (failed / "checkpoints").iterdir()) == ["step-00000003"], "no half-written one"

    again = run_kd(grid, tmp_path, timeout=400)
    assert again.returncode == 0, again.stderr
    assert json.loads((failed / "run.json").read_text())["resumed_from"] == 3
    assert_same_losses(failed, one_node)  # the seed-0 point is the reference recipe under another name
    assert list(tmp_path.rglob(".*.lock")) == []


def two_nodes(args: list[str], cwds: list[Path], timeout: float = 300) -> list[tuple[int, str, str]]:
    """`kd ARGS` as two torchrun "nodes" of one process each, with their rendezvous on this machine."""
    port = free_port()
    nodes = [
        start_kd(args, cwd, torchrun=["--nnodes=2", f"--node-rank={index}", "--nproc-per-node=1",
                                      "--master-addr=127.0.0.1", f"--master-port={port}"])
        for index, cwd in enumerate(cwds)
    ]  # fmt: skip
    try:
        return [(node.wait(timeout), *node.communicate()) for node in nodes]
    finally:
        for node in nodes:
            stop_tree(node)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    def walk(value: object, key: str) -> dict[str, torch.Tensor]:
        if isinstance(value, torch.Tensor):
            return {key: value}
        items = (
            value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
        )
        return {k: v for name, item in items for k, v in walk(item, f"{key}/{name}").items()}

    return walk(torch.load(path, map_location="cpu", weights_only=False), "")


def assert_same_checkpoint(ours: Path, theirs: Path) -> None:
    files = sorted(str(p.relative_to(ours)) for p in ours.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*") if p.is_file())
    for name in (f for f in files if f.endswith(".pt")):
        mine, other = tensors(ours / name), tensors(theirs / name)
        assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine), name
    state, other_state = (without_timings(json.loads((c / "kd-state.json").read_text())) for c in (ours, theirs))
    assert state == other_state


def without_timings(state: dict) -> dict:
    """A checkpoint's kd-state.json less the clocks, which no two runs share: the rest must be equal."""
    last_step = {k: v for k, v in state["last_step"].items() if k not in ("elapsed_s", "tokens_per_s", "gen_s")}
    clocks = ("train_seconds", "wall_seconds", "gen_seconds")
    return {**{k: v for k, v in state.items() if k not in clocks}, "last_step": last_step}


def test_two_nodes_train_like_one_and_their_checkpoint_resumes_on_one(
    tmp_path: Path, tiny_teacher: Path, one_node: Path
) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, **TWO_RANKS)
    for code, _, stderr in two_nodes(["distill", str(recipe)], [tmp_path, tmp_path]):
        assert code == 0, stderr
    run_dir = tmp_path / "runs" / "tiny"
    print(f"two nodes vs one node: largest loss difference {assert_same_losses(run_dir, one_node):.3g}")
    for name in ("step-00000009", "step-00000012"):
        assert_same_checkpoint(run_dir / "checkpoints" / name, one_node / "checkpoints" / name)

    # As if both nodes had died after step 9: one node with two processes takes the run over.
    shutil.rmtree(run_dir / "checkpoints" / "step-00000012")
    shutil.rmtree(run_dir / "student")
    (run_dir / "run.json").unlink()
    result = run_kd(["distill", "--resume", str(run_dir), "--nproc", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "run.json").read_text())["resumed_from"] == 9
    assert_same_losses(run_dir, one_node)


def test_nodes_that_read_other_data_are_refused_naming_the_node(tmp_path: Path, tiny_teacher: Path) -> None:
    # One recipe, data named relative to where each node runs: node 1's copy of train.jsonl is not node 0's.
    recipe = tiny_recipe(tmp_path, tiny_teacher, **{**TWO_RANKS, "data": {**TWO_RANKS["data"], "train": "train.jsonl"}})
    rows = (REPO / "kdcli" / "data" / "starter" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd, first in zip(cwds, (0, 1), strict=True):
        cwd.mkdir()
        (cwd / "train.jsonl").write_text("\n".join(rows[first : first + 30]) + "\n", encoding="utf-8")
    for code, _, stderr in two_nodes(["distill", str(recipe)], cwds, timeout=180):
        assert code != 0
        line = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(line) == 1, stderr
        assert "the nodes of this job disagree on data: node 1 (" in line[0] and "(rank 1) has " in line[0], line
        assert "give every node the same data files" in line[0]
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


def test_the_first_setting_that_differs_names_its_node() -> None:
    views = [{"node": f"node {i} (h)", "kd": "0.1.0", "recipe": "r" * 64, "data": "d" * 64} for i in range(3)]
    assert disagreement(views) is None
    views[2] = {**views[2], "kd": "0.2.0", "data": "e" * 64}
    assert disagreement(views) == (
        "the nodes of this job disagree on kd: node 2 (h) (rank 2) has 0.2.0, node 0 (h) (rank 0) has 0.1.0; "
        "install the same kd version on every node."
    )
    views[2]["kd"] = "0.1.0"
    assert "disagree on data: node 2 (h) (rank 2) has eeeeeeeeeeee…, node 0 (h)" in (disagreement(views) or "")


def test_the_rank_that_started_it_is_the_one_named() -> None:
    from kdcli.engine.failure import RankFailure, describe, first_cause, lost_peer
    from kdcli.errors import KdError

    gloo = RuntimeError("[third_party/gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    assert lost_peer(gloo)
    try:
        try:
            raise gloo
        except RuntimeError as err:
            raise OSError("while cleaning up") from err
    except OSError as chained:
        assert lost_peer(chained)  # a collective error anywhere in the chain
    assert not lost_peer(KdError("no space left on device writing x")) and not lost_peer(ValueError("gloo"))
    assert not lost_peer(RuntimeError("the request timed out"))

    def report(kind: str, at: float, message: str, code: int = 1) -> dict:
        return {"message": message, "kd": {"kind": kind, "exit_code": code, "at": at}}

    peer = RankFailure(0, 1, 10, report("lost peer", 1.0, "rank 0 of 2 lost contact with another rank (...)"))
    full = RankFailure(1, 2, 11, report("error", 2.0, "rank 1 of 2: no space left ...", 2))
    killed, stopped = RankFailure(1, -9, 11, seen_at=3.0), RankFailure(0, -15, 10, seen_at=2.0)
    assert first_cause([peer, full]) is full  # its own error, though reported after the peer lost it
    assert first_cause([stopped, killed]) is killed  # the agent's SIGTERM only followed the kill
    assert first_cause([peer, stopped]) is stopped
    assert describe(full, 2, "resume with X") == ("rank 1 of 2: no space left ...", 2)
    assert describe(killed, 2, "resume with X") == (
        "rank 1 of 2 (pid 11) was killed by SIGKILL (out of memory? see `dmesg`); every rank was stopped; "
        "resume with X.",
        137,
    )
    assert describe(peer, 2, "resume with X")[0].endswith("(...); every rank was stopped; resume with X.")
