"""A model or data set that is not there, without a network: a path-like spec is a missing path at once, and a Hub
id meets an unreachable Hub in one line within seconds, not after huggingface_hub's 5 retries per file (23 s of
backoff each, "Retrying in 8s" lines)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdcli.errors import KdError
from kdcli.hub import check_reachable, looks_like_path
from kdcli.models import resolve_model

REPO = Path(__file__).resolve().parent.parent
# Python and torch start in ~5 s here; one backoff of huggingface_hub sleeps 23 s.
TIME_BOUND_S = 15.0


def closed_port() -> int:
    """A localhost port nothing listens on: a connection to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def no_network_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a machine without the Hub: the endpoint refuses connections, offline mode is not set, the
    caches are empty."""
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in offline}
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_CACHE=str(tmp_path / "hf-cache"),
        KD_HOME=str(tmp_path / "kd-home"),
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
    )
    return env


def hub_recipe(path: Path, **sections: dict) -> str:
    recipe = {
        "name": "hub",
        "output_dir": str(path.parent / "out"),
        "teacher": {"model": "builtin:smollm2-135m-instruct"},
        "data": {"train": "builtin:starter", "eval": "builtin:starter"},
        "train": {"max_steps": 1},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["eval", "runs/nonexistent"], "TARGET: no such folder 'runs/nonexistent'"),
        (["eval", "kd-test-nobody/model"], "TARGET: the Hugging Face Hub (http://127.0.0.1:"),
        (["plan", "{recipe_hub_teacher}"], "teacher.model: the Hugging Face Hub (http://127.0.0.1:"),
        (["distill", "{recipe_hub_teacher}"], "teacher.model: the Hugging Face Hub (http://127.0.0.1:"),
        (["distill", "{recipe_hub_data}"], "data.train: the Hugging Face Hub (http://127.0.0.1:"),
    ],
    ids=["eval-mistyped-run", "eval-hub-id", "plan-hub-teacher", "distill-hub-teacher", "distill-hub-data"],
)
def test_no_network_is_one_line_within_seconds(tmp_path: Path, command: list[str], expected: str) -> None:
    (tmp_path / "runs").mkdir()  # `runs/nonexistent` is a mistyped run folder, not a Hub id
    recipes = {
        "{recipe_hub_teacher}": hub_recipe(tmp_path / "teacher.yaml", teacher={"model": "kd-test-nobody/model"}),
        "{recipe_hub_data}": hub_recipe(tmp_path / "data.yaml", data={"train": "kd-test-nobody/data"}),
    }
    args = [recipes.get(arg, arg) for arg in command]
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kdcli", *args],
        cwd=tmp_path,
        env=no_network_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - start
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Retrying" not in done.stderr, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr  # one line
    assert done.stderr.startswith(f"error: {expected}"), done.stderr
    assert seconds < TIME_BOUND_S, f"{seconds:.1f} s"
    if "Hub" in expected:
        assert "hf download kd-test-nobody/" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr


def test_a_spec_whose_first_part_is_a_folder_here_is_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("runs/nonexistent")
    (tmp_path / "runs").mkdir()
    assert looks_like_path("runs/nonexistent") and looks_like_path("./x") and looks_like_path("~/x")
    assert not looks_like_path("org/name") and not looks_like_path("name")
    with pytest.raises(KdError, match=r"^TARGET: no such folder 'runs/nonexistent'"):
        resolve_model("runs/nonexistent", field="TARGET")


@pytest.fixture()
def unreachable_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub (already imported, in offline mode for the suite) online, at an endpoint that refuses
    connections, with an empty cache; returns the cache."""
    from huggingface_hub import constants

    from kdcli import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    hub._unreachable_reason.cache_clear()
    yield tmp_path
    hub._unreachable_reason.cache_clear()


def test_the_fix_depends_on_the_local_cache(unreachable_hub: Path) -> None:
    with pytest.raises(KdError, match=r"download it first .*\(hf download org/model\)"):
        check_reachable("org/model", field="teacher.model")
    with pytest.raises(KdError, match=r"hf download org/data --repo-type dataset"):
        check_reachable("org/data", field="data.train", repo_type="dataset")
    snapshot = unreachable_hub / "models--org--model" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}", encoding="utf-8")
    # Cached: loaded from there at once, offline from now on, with a one-line warning.
    from huggingface_hub import constants

    from kdcli.errors import KdWarning

    with pytest.warns(KdWarning, match=r"cannot be reached .*; loading the model 'org/model' from the local cache"):
        check_reachable("org/model", field="teacher.model")
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_cached_model_loads_at_once_without_the_hub(tmp_path: Path, tiny_teacher: Path) -> None:
    """An air-gapped machine whose Hugging Face cache holds the model, HF_HUB_OFFLINE not set: kd plan reads it from
    the cache within seconds, with one warning line, instead of refusing or retrying."""
    env = no_network_env(tmp_path)
    repo = Path(env["HF_HUB_CACHE"]) / "models--org--tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in tiny_teacher.iterdir():
        (snapshot / item.name).symlink_to(item)
    recipe = hub_recipe(tmp_path / "cached.yaml", teacher={"model": "org/tiny"})
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kdcli", "plan", recipe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Retrying" not in done.stderr and "loading the model 'org/tiny' from the local cache" in done.stderr
    assert seconds < TIME_BOUND_S, f"{seconds:.1f} s"
