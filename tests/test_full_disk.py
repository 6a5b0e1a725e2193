"""A full disk loses nothing: a checkpoint, the student, a cache shard, an eval pass or a judge-cache line that cannot
be written ends the command with one `error:` line naming the path and the space, keeps everything finished before
it, and the same command (or `kd distill --resume`) finishes once space is freed, as if nothing had happened.

`FullDisk` makes the kernel refuse the writes: files whose path matches are opened for real, then their descriptor
is pointed at /dev/full, where every write fails with ENOSPC. A last test fills a real small tmpfs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_openai import FakeOpenAI, Reply
from safetensors.torch import load_file
from scale_helpers import step_losses
from test_cache import cache_recipe
from test_distill import tiny_recipe
from typer.testing import CliRunner

from kdcli.cache import format as fmt
from kdcli.cli import app

runner = CliRunner()

# 6 steps, a checkpoint every 2, only the newest kept: the failed write must not cost the one before it.
FAST = {
    "data": {"max_train_examples": 16, "max_eval_examples": 4, "max_length": 64},
    "train": {"max_steps": 6, "batch_size": 4, "save_every": 2, "keep_checkpoints": 1, "threads": 1},
}


class FullDisk:
    """Writes to files whose absolute path matches `pattern` fail with ENOSPC, after the first `after` such files.

    Every way kd and its libraries open a file for writing is covered: `os.open` (mkstemp, raw appends), `open` and
    `os.fdopen`, and `torch.save` / safetensors' `save_file` given a path (their C++/Rust writers are sent through
    `open`). `on_full` runs when the first write is refused, to look at the disk as it is at that moment."""

    def __init__(self, pattern: str, after: int = 0, on_full: Callable[[], None] | None = None) -> None:
        self.pattern, self.after, self.on_full = re.compile(pattern), after, on_full
        self.refused: list[str] = []
        self._seen = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FullDisk:
        import builtins
        import io

        import transformers.modeling_utils

        real_os_open, real_open, real_save = os.open, io.open, torch.save
        real_save_file = transformers.modeling_utils.safe_save_file

        def os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            fd = real_os_open(path, flags, mode, dir_fd=dir_fd)
            if flags & (os.O_WRONLY | os.O_RDWR):
                self._maybe_fill(os.path.abspath(os.fspath(path)), fd)
            return fd

        def io_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+"):
                name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
                self._maybe_fill(os.path.abspath(name), handle.fileno())
            return handle

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(f, str | os.PathLike):
                with io_open(f, "wb") as handle:
                    return real_save(obj, handle, *args, **kwargs)
            return real_save(obj, f, *args, **kwargs)

        def save_file(tensors: dict[str, torch.Tensor], filename: Any, metadata: Any = None) -> None:
            if self.pattern.search(os.path.abspath(os.fspath(filename))):
                from safetensors.torch import save as to_bytes

                with io_open(filename, "wb") as handle:
                    handle.write(to_bytes(tensors, metadata=metadata))
                return
            real_save_file(tensors, filename, metadata=metadata)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(io, "open", io_open)
        monkeypatch.setattr(builtins, "open", io_open)
        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
        return self

    def free(self) -> None:
        """Space freed: nothing is refused from now on."""
        self.pattern = re.compile(r"(?!)")

    def _maybe_fill(self, path: str, fd: int) -> None:
        if not self.pattern.search(path):
            return
        self._seen += 1
        if self._seen <= self.after:
            return
        if not self.refused and self.on_full:
            self.on_full()
        self.refused.append(path)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)


@pytest.fixture()
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FullDisk]]:
    with monkeypatch.context() as patch:
        yield lambda pattern, **kw: FullDisk(pattern, **kw).install(patch)


def assert_one_error_line(output: str, path: Path, then: str) -> str:
    """One `error:` line naming `path`, the space needed and free, and how to carry on; no traceback."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    line = " ".join(output[output.index("error:") :].split())  # rich wraps long lines; read it as one
    assert f"no space left on device writing {path} (needs ~" in line, line
    assert re.search(r"needs ~[\d.]+ (?:[KMGT]iB|B), [\d.]+ (?:[KMGT]iB|B) free\)", line), line
    assert then in line, line
    return line


def tree_hashes(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    """The uninterrupted run."""
    tmp_path = tmp_path_factory.mktemp("reference")
    result = runner.invoke(app, ["distill", str(tiny_recipe(tmp_path, tiny_teacher, **FAST))])
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "tiny"


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    assert step_losses(run_dir) == step_losses(reference)  # bit for bit, step by step
    ours, theirs = student_weights(run_dir), student_weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# --- kd distill -------------------------------------------------------------------------------------------------


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_and_resumes(
    tmp_path: Path, tiny_teacher: Path, reference: Path, full_disk: Callable[..., FullDisk]
) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, **FAST)
    run_dir = tmp_path / "runs" / "tiny"
    first = run_dir / "checkpoints" / "step-00000002"
    before: dict[str, str] = {}
    disk = full_disk(r"/checkpoints/\.step-00000004\.tmp/", on_full=lambda: before.update(tree_hashes(first)))

    result = runner.invoke(app, ["distill", str(recipe)])
    assert disk.refused, "the checkpoint was never written"
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.output, run_dir / "checkpoints" / "step-00000004", f"kd distill --resume {run_dir}")
    assert sorted(p.name for p in first.parent.iterdir()) == ["step-00000002"], "no half-written checkpoint is left"
    assert before and tree_hashes(first) == before, "the previous checkpoint is untouched"
    assert not (run_dir / "run.json").exists() and not (run_dir / "student").exists()

    disk.free()
    result = runner.invoke(app, ["distill", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "run.json").read_text())["resumed_from"] == 2
    assert_same_as_reference(run_dir, reference)
    assert sorted(p.name for p in first.parent.iterdir()) == ["step-00000006"]


def test_a_full_disk_saving_the_student_keeps_the_last_checkpoint_and_resumes(
    tmp_path: Path, tiny_teacher: Path, reference: Path, full_disk: Callable[..., FullDisk]
) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, **FAST)
    run_dir = tmp_path / "runs" / "tiny"
    disk = full_disk(r"/\.student\.tmp/model\.safetensors$")

    result = runner.invoke(app, ["distill", str(recipe)])
    assert disk.refused and result.exit_code == 2, result.output
    assert_one_error_line(result.output, run_dir / "student", f"kd distill --resume {run_dir}")
    assert not (run_dir / ".student.tmp").exists() and not (run_dir / "student").exists()
    assert (run_dir / "checkpoints" / "step-00000006" / "kd-state.json").is_file()

    disk.free()
    result = runner.invoke(app, ["distill", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert_same_as_reference(run_dir, reference)


def test_a_full_disk_before_any_checkpoint_says_to_start_again(
    tmp_path: Path, tiny_teacher: Path, full_disk: Callable[..., FullDisk]
) -> None:
    recipe = tiny_recipe(tmp_path, tiny_teacher, **FAST)
    run_dir = tmp_path / "runs" / "tiny"
    full_disk(r"/runs/tiny/metrics\.jsonl$")

    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.output, run_dir / "metrics.jsonl", "run the recipe again with --overwrite")
    assert (run_dir / "metrics.jsonl").read_bytes() == b"", "no torn line"


# --- kd cache-teacher -------------------------------------------------------------------------------------------


def test_a_full_disk_at_a_shard_keeps_the_finished_ones_and_the_rerun_completes(
    tmp_path: Path, tiny_teacher: Path, full_disk: Callable[..., FullDisk]
) -> None:
    recipe = cache_recipe(tmp_path, tiny_teacher)
    reference, out = tmp_path / "reference", tmp_path / "cache"
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(reference)])
    assert result.exit_code == 0, result.output
    wanted = json.loads((reference / fmt.MANIFEST).read_text())["splits"]["train"]["shards"]
    assert len(wanted) > 2

    disk = full_disk(r"/cache/train/\.shard-00002\.safetensors\.")
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out)])
    assert disk.refused and result.exit_code == 2, result.output
    assert_one_error_line(result.output, out / "train" / fmt.shard_name(2), "run the same command again")
    listed = json.loads((out / fmt.MANIFEST).read_text())["splits"]["train"]["shards"]
    assert listed == wanted[:2], "the finished shards stay listed"
    assert sorted(p.name for p in (out / "train").iterdir()) == [fmt.shard_name(0), fmt.shard_name(1)]
    for shard in listed:
        assert fmt.sha256_file(out / "train" / shard["file"]) == shard["sha256"]

    disk.free()
    result = runner.invoke(app, ["cache-teacher", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "resuming after 2 complete shard(s)" in result.output
    assert json.loads((out / fmt.MANIFEST).read_text())["splits"]["train"]["shards"] == wanted


# --- kd eval ----------------------------------------------------------------------------------------------------


def eval_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval", str(model), "--out", str(out), "--max-examples", "4", "--seeds", "1,2", "--batch-size", "2",
        "--max-new-tokens", "4", "--precision", "fp32", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("after", [0, 1], ids=["first-batch", "second-batch"])
def test_a_full_disk_during_an_eval_pass_keeps_what_finished(
    tmp_path: Path, tiny_teacher: Path, full_disk: Callable[..., FullDisk], after: int
) -> None:
    reference, out = tmp_path / "reference", tmp_path / "eval"
    assert runner.invoke(app, eval_args(tiny_teacher, reference)).exit_code == 0

    disk = full_disk(r"/eval/starter/seed-2\.jsonl\.partial$", after=after)
    result = runner.invoke(app, eval_args(tiny_teacher, out))
    assert disk.refused and result.exit_code == 2, result.output
    assert_one_error_line(result.output, out / "starter" / "seed-2.jsonl.partial", "run the same command again")
    seed1 = out / "starter" / "seed-1.jsonl"
    assert seed1.read_bytes() == (reference / "starter" / "seed-1.jsonl").read_bytes(), "the finished pass stays"
    partial = (out / "starter" / "seed-2.jsonl.partial").read_text().splitlines()
    assert len(partial) == 2 * after, "whole batches only"

    disk.free()
    result = runner.invoke(app, eval_args(tiny_teacher, out))
    assert result.exit_code == 0, result.output
    assert "seed-1: reused" in result.output
    for name in ("seed-1.jsonl", "seed-2.jsonl"):
        assert (out / "starter" / name).read_bytes() == (reference / "starter" / name).read_bytes()
    generation = json.loads((out / "starter" / "generation.json").read_text())
    assert generation["passes"]["seed-2"]["resumed_examples"] == 2 * after
    ours, theirs = (json.loads((d / "results.json").read_text())["sets"]["starter"] for d in (out, reference))
    assert ours["sampling"]["metrics"] == theirs["sampling"]["metrics"]


def test_a_full_disk_writing_the_judge_cache_keeps_the_replies_before(
    tmp_path: Path, tiny_teacher: Path, full_disk: Callable[..., FullDisk], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    out = tmp_path / "eval"
    cache = out / "judge-cache.jsonl"
    with FakeOpenAI([Reply("8 7")]) as server:
        args = eval_args(tiny_teacher, out, "--judge", "gpt4", "--judge-url", server.url, "--judge-concurrency", "1")
        disk = full_disk(r"/eval/judge-cache\.jsonl$", after=2)
        result = runner.invoke(app, args)
        assert disk.refused and result.exit_code == 2, result.output
        assert_one_error_line(result.output, cache, "run the same command again")
        assert len(cache.read_text().splitlines()) == 2, "the replies before are kept, whole"
        first = len(server.requests)  # the refused third, and maybe a fourth already in flight
        assert first in (3, 4)

        disk.free()
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        # 4 examples × 2 seeds × 2 orders; only the replies that could not be stored are asked again.
        assert len(server.requests) == first + 4 * 2 * 2 - 2
    entry = json.loads((out / "results.json").read_text())["sets"]["starter"]["sampling"]
    assert entry["judge"]["failed_verdicts"] == 0 and len(cache.read_text().splitlines()) == 16


# --- kd compare --plot -------------------------------------------------------------------------------------------


def test_a_full_disk_writing_the_plot_leaves_no_file(tmp_path: Path, full_disk: Callable[..., FullDisk]) -> None:
    from compare_fixtures import make_run

    runs = [make_run(tmp_path, "fkl"), make_run(tmp_path, "akl", divergence="akl")]
    out = tmp_path / "compare.png"
    disk = full_disk(r"/\.compare\.png\.")
    result = runner.invoke(app, ["compare", *map(str, runs), "--plot", str(out), "--resamples", "200"])
    assert disk.refused and result.exit_code == 2, result.output
    assert_one_error_line(result.output, out, "run the same command again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["akl", "fkl"], "no plot, whole or partial"

    disk.free()
    result = runner.invoke(app, ["compare", *map(str, runs), "--plot", str(out), "--resamples", "200"])
    assert result.exit_code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", result.output


# --- a real full disk -------------------------------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """A tmpfs of a given size (root only; skipped where mounting is not permitted), resizable in place."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted: list[bool] = []

    def sized(size: int) -> Path:
        options = f"{'remount,' if mounted else ''}size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
        if done.returncode != 0:
            if not mounted:
                pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
            raise AssertionError(done.stderr.decode())
        mounted.append(True)
        return mount

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    yield sized
    if mounted:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_at_a_checkpoint(
    tiny_teacher: Path, reference: Path, small_disk: Callable[[int], Path]
) -> None:
    checkpoint = sum(p.stat().st_size for p in (reference / "checkpoints" / "step-00000006").iterdir())
    # Room for the recipe, the metrics and one checkpoint, not for a second beside it.
    disk = small_disk(int(checkpoint * 1.5) + (64 << 10))
    recipe = tiny_recipe(disk, tiny_teacher, **FAST)
    run_dir = disk / "runs" / "tiny"

    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.output, run_dir / "checkpoints" / "step-00000004", f"kd distill --resume {run_dir}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002"]
    kept = tree_hashes(run_dir / "checkpoints" / "step-00000002")
    assert "kd-state.json" in kept

    # Resumed before anything is freed, on a disk now filled to the last byte: refused as cleanly, nothing lost.
    filler = disk / "filler"
    with pytest.raises(OSError, match="No space left"), filler.open("wb") as handle:
        while True:
            handle.write(b"\0" * (16 << 10))
            handle.flush()
    result = runner.invoke(app, ["distill", "--resume", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.output, run_dir / "metrics.jsonl", f"kd distill --resume {run_dir}")
    assert tree_hashes(run_dir / "checkpoints" / "step-00000002") == kept

    filler.unlink()
    small_disk(4 * checkpoint + (8 << 20))  # space freed
    result = runner.invoke(app, ["distill", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert_same_as_reference(run_dir, reference)


def test_disk_errors_translates_only_write_failures(tmp_path: Path) -> None:
    from kdcli.durable import DiskFull, disk_errors

    target = tmp_path / "out.bin"
    denied = r"could not write .*out\.bin: Permission denied \(needs ~1\.95 KiB, .* free\)\. Fix that, then run"
    with pytest.raises(DiskFull, match=denied), disk_errors(target, 2000):
        raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(ValueError), disk_errors(target, 10):
        raise ValueError("not a write failure: passes through")
