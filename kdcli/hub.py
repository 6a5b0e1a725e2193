"""The Hugging Face Hub as kd meets it: whether a spec is a path or a Hub id, offline mode, and whether the Hub can
be reached at all.

huggingface_hub retries a request that fails to connect 5 times with backoff (1 + 2 + 4 + 8 + 8 s, printing
"Retrying in 8s" each time), and does so for every file a load asks for, also for a model in the local cache whose
optional files (adapter_config.json, ...) are absent; no setting turns that off except HF_HUB_OFFLINE. A model or
data set thus took 25 to 50 s to fail without a network. kd asks the Hub once, without retries, before a Hub id is
loaded, and where no answer comes says so in one line.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Literal

from kdcli.errors import KdError, KdWarning

RepoType = Literal["model", "dataset"]

# Seconds to wait for the Hub's first answer: a refused connection or an unknown host fails at once; this bounds a
# network that drops packets.
PROBE_TIMEOUT_S = 5.0
_TRUE = {"1", "on", "yes", "true"}


def looks_like_path(spec: str) -> bool:
    """Whether `spec` names a path rather than a Hub id: it starts with `.`, `/` or `~`, holds a backslash, or its
    first part is a folder that exists here (`runs/nonexistent` where `runs/` is a folder)."""
    if spec.startswith((".", "/", "~")) or "\\" in spec:
        return True
    first, slash, _ = spec.partition("/")
    return bool(slash and first and Path(first).is_dir())


def is_offline(repo_type: RepoType = "model") -> bool:
    """huggingface_hub is in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, as it read them at import); for
    data sets HF_DATASETS_OFFLINE counts too."""
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        return True
    return repo_type == "dataset" and os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in _TRUE


@functools.cache
def _unreachable_reason(endpoint: str) -> str | None:
    """Why the Hub at `endpoint` gives no answer, or None when it answers (any HTTP status counts as an answer).
    One request per process and endpoint, without retries."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as err:  # httpx, requests and OS errors alike: no answer
        return (str(err).strip().splitlines() or [type(err).__name__])[0]
    return None


def _in_local_cache(repo_id: str, repo_type: RepoType) -> bool:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def check_reachable(repo_id: str, *, field: str, repo_type: RepoType = "model") -> None:
    """Refuse in one line, within seconds, to load `repo_id` from a Hub that cannot be reached (offline mode aside:
    then only the local cache is read, which fails fast by itself)."""
    if is_offline(repo_type):
        return
    from huggingface_hub import constants

    reason = _unreachable_reason(constants.ENDPOINT)
    if reason is None:
        return
    what = "data set" if repo_type == "dataset" else "model"
    if _in_local_cache(repo_id, repo_type):
        # What an air-gapped cluster with a filled cache expects: the copy it has, at once, and a word about it.
        go_offline()
        warnings.warn(
            f"{field}: the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({reason}); loading the {what} "
            f"'{repo_id}' from the local cache (set HF_HUB_OFFLINE=1 to skip this check).",
            KdWarning,
            stacklevel=2,
        )
        return
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    raise KdError(
        f"{field}: the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached to load the {what} '{repo_id}' "
        f"({reason}); download it first where the Hub is reachable (hf download {repo_id}{flag}) and set "
        "HF_HUB_OFFLINE=1 here, or give a local path."
    )


def go_offline() -> None:
    """Offline mode for the rest of this process, as HF_HUB_OFFLINE=1 would have set it at start: huggingface_hub
    and transformers read `constants.HF_HUB_OFFLINE`, `datasets` its own copy."""
    import sys

    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
