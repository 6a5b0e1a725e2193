"""`kd plan`: exact parameter counts from configs, ZeRO arithmetic, logits naive vs chunked, fit flags, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.plan import Settings, build_plan, count_params, model_shape, plan_recipe
from kdcli.plan.configs import BUILTIN_CONFIGS, ModelShape, student_config
from kdcli.plan.memory import (
    chunk_rows,
    deepspeed_estimate,
    logits_memory,
    plain_states,
    student_activations,
    zero_states,
)
from kdcli.recipe import load_recipe, validate_recipe
from kdcli.sizes import parse_size

GiB = 2**30


def _llama(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    base.update(kw)
    return LlamaConfig(**base)


def _numel(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # real modules, no memory: the count is what from_config would allocate
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tie_word_embeddings": False},
        {"num_key_value_heads": 4},
        {"num_key_value_heads": 1, "head_dim": 32},
        {"attention_bias": True, "mlp_bias": True},
    ],
)
def test_param_count_equals_instantiated_llama(kw: dict) -> None:
    config = _llama(**kw)
    assert count_params(config)[0] == _numel(config)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_param_count_other_closed_form_families(model_type: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        model_type, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
    )  # fmt: skip
    assert count_params(config)[0] == _numel(config)


def test_param_count_falls_back_to_meta_for_other_architectures() -> None:
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    assert count_params(config)[0] == _numel(config)


def test_builtin_teacher_count_without_weights() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(**{k: v for k, v in BUILTIN_CONFIGS["smollm2-135m-instruct"].items() if k != "model_type"})
    # 134,515,008 = the element count of the tensors in the GGUF file (tied: no separate output matrix).
    assert count_params(config)[0] == _numel(config) == 134_515_008


def test_student_config_layer_pruned_and_random(tiny_teacher: Path) -> None:
    from transformers import AutoConfig

    teacher = AutoConfig.from_pretrained(tiny_teacher)
    raw = {"name": "x", "teacher": {"model": str(tiny_teacher)}}
    pruned = student_config(validate_recipe({**raw, "student": {"init": "teacher", "layers": [0, 3]}}), teacher)
    assert pruned.num_hidden_layers == 2
    rnd = validate_recipe({**raw, "student": {"init": "random", "overrides": {"num_hidden_layers": 1}}})
    assert student_config(rnd, teacher).num_hidden_layers == 1


def test_zero_stage_arithmetic_by_hand() -> None:
    psi, n, big = 1_000_000, 4, 10_000
    # bf16: 2 (weights) + 2 (grads) + 16 (fp32 master 4, Adam 8, fp32 grads 4) bytes per parameter.
    s0 = zero_states(psi, 0, n)
    assert (s0.params, s0.grads, s0.optimizer) == (2 * psi, 2 * psi, 16 * psi)
    s1 = zero_states(psi, 1, n)
    assert (s1.params, s1.grads, s1.optimizer) == (2 * psi, 2 * psi, 4 * psi)
    s2 = zero_states(psi, 2, n)
    assert (s2.params, s2.grads, s2.optimizer) == (2 * psi, psi // 2, 4 * psi)
    s3 = zero_states(psi, 3, n, largest_layer=big)
    assert (s3.params, s3.grads, s3.optimizer) == (psi // 2 + 2 * big, psi // 2 + 2 * big, 4 * psi)
    off = zero_states(psi, 3, n, offload_optimizer=True, offload_param=True, largest_layer=big)
    assert (off.params, off.optimizer, off.host) == (2 * big, 0, 4 * psi + psi // 2)
    fp32 = zero_states(psi, 1, 2, bf16=False)
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * psi, 4 * psi, 4 * psi)
    # One rank: ours equals DeepSpeed's estimate_zero2_model_states_mem_needs (4Ψ + 16Ψ/N).
    assert zero_states(psi, 2, 1).device == deepspeed_estimate(psi, 2, 1) == 20 * psi
    # ZeRO-3: DeepSpeed's 18Ψ/N + 4L; ours also counts the 16-bit gradient partition (2Ψ/N).
    assert zero_states(psi, 3, n, largest_layer=big).device == deepspeed_estimate(psi, 3, n, big) + 2 * psi // n
    # kd's plain engine: fp32 weights + bf16 autocast copy, fp32 grads, Adam.
    assert plain_states(psi, "bf16").device == (4 + 2 + 4 + 8) * psi
    assert plain_states(psi, "fp32").device == 16 * psi


def test_logits_chunked_vs_naive() -> None:
    s = Settings(batch_size=8, seq_len=256, precision="bf16", divergence="fkl", kd_ratio=0.5, device="cpu")
    v = 49152
    lg = logits_memory(v, s)
    n = 8 * 256
    assert lg.student == lg.grad == lg.teacher == 2 * n * v
    assert lg.ce == 8 * n * v
    assert lg.naive == 5 * 4 * n * v
    rows = (128 * 2**20) // (v * 4 * 8)
    assert lg.chunk_rows == rows == chunk_rows(n, v, "fkl", "cpu", False, None)
    assert lg.chunked == rows * v * 4 * 8 <= 128 * 2**20
    assert lg.total_naive - lg.total_chunked == lg.naive - lg.chunked
    # The same chunk size as the real loss object picks.
    import torch

    from kdcli.losses import get_loss

    assert get_loss("fkl").chunk_rows(n, v, torch.device("cpu"), torch.float32, False) == rows
    assert get_loss("tvd").chunk_rows(n, v, torch.device("cpu"), torch.float32, False) == chunk_rows(
        n, v, "tvd", "cpu", False, None
    )
    # kd_ratio 1: no cross-entropy; 0: no divergence workspace.
    assert logits_memory(v, Settings(batch_size=8, seq_len=256, kd_ratio=1.0)).ce == 0
    assert logits_memory(v, Settings(batch_size=8, seq_len=256, kd_ratio=0.0)).naive == 0


def test_fused_head_logits_part() -> None:
    """The fused head holds one chunk (with the fused work), a block of projected logits, ∂/∂h and the student head's
    bf16 copy; DeepSpeed rows,
    `loss.fused: false` and a model type kd does not fuse keep the plain figures."""
    import dataclasses

    import torch

    from kdcli.losses import get_loss, sizing

    n, v, d = 8 * 1024, 49152, 576
    llama = ModelShape(v, d, 1536, 15, 9, 3, 64, True, 81_000_000, v * d, model_type="llama")
    s = Settings(batch_size=8, seq_len=1024, precision="bf16", divergence="fkl", kd_ratio=0.5, device="cpu")
    plan = build_plan(llama, llama, s)
    lg = plan.rows[0].logits
    rows = sizing.chunk_rows(n, v, "fkl", device_type="cpu", sparse=False, chunk_size=None, fused=True)
    assert rows == get_loss("fkl").chunk_rows(n, v, torch.device("cpu"), torch.float32, False, fused=True)
    block = sizing.fused_block_rows(n, rows)
    assert block == sizing.FUSED_BLOCK_ROWS  # B·T = 8 blocks of 1,024
    assert lg.fused == rows * v * 4 * (8 + 1) + block * v * 2 * 2 + n * d * 4 + d * v * 2
    assert lg.total_chunked == lg.fused <= 0.1 * (lg.common + lg.chunked)
    assert all(r.logits.fused is None for r in plan.rows[1:])  # ZeRO rows: the student trains under DeepSpeed
    assert plan.rows[0].total < plan.rows[1].total
    assert build_plan(llama, llama, dataclasses.replace(s, fused=False)).rows[0].logits.fused is None
    gpt2 = dataclasses.replace(llama, model_type="gpt2")
    assert build_plan(gpt2, gpt2, s).rows[0].logits.fused is None
    # A teacher kd cannot fuse keeps its whole logits beside the fused student.
    mixed = build_plan(gpt2, llama, s).rows[0].logits
    assert mixed.fused == lg.fused - block * v * 2 + n * v * 2  # a block of the student's projected logits only
    # fp32: no 16-bit copy of the output weight, fp32 projected logits.
    fp32 = build_plan(llama, llama, dataclasses.replace(s, precision="fp32")).rows[0].logits
    assert fp32.fused == rows * v * 4 * 9 + block * v * 4 * 2 + n * d * 4


def test_cache_replaces_teacher_logits() -> None:
    shape = ModelShape(512, 64, 128, 2, 4, 2, 16, True, 100_000, 32_768)
    s = Settings(batch_size=2, seq_len=10, cache_k=8, grad_accum=3)
    plan = build_plan(shape, shape, s)
    row = plan.rows[0]
    assert row.teacher.cached and row.teacher.weights == 0 and row.logits.teacher == 0
    assert row.teacher.cache_io == 2 * 10 * 3 * (8 * 4 + 10)


@pytest.mark.parametrize("mode", ["autocast", "fp32"])
def test_activation_formula_matches_saved_tensors(mode: str) -> None:
    """The per-layer coefficients against what autograd actually saves in a small Llama (weights excluded)."""
    import torch
    from transformers import LlamaForCausalLM

    config = _llama(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6,
                    num_key_value_heads=3, vocab_size=128)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        is_weight_cast = t.dim() == 2 and tuple(t.shape) in shapes and t.dtype == torch.bfloat16
        if st.data_ptr() not in params and not is_weight_cast:
            saved[st.data_ptr()] = st.nbytes()
        return t

    b, t = 2, 50
    ids = torch.randint(0, 128, (b, t))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), ctx:
        logits = model(input_ids=ids).logits
    saved.pop(logits.untyped_storage().data_ptr(), None)
    measured = sum(saved.values())
    planned = student_activations(model_shape(config), b * t, mode)
    assert abs(planned - measured) / measured < 0.15


def test_fit_flags() -> None:
    shape = ModelShape(1000, 64, 128, 2, 4, 2, 16, True, 10_000_000, 64_000)
    small = build_plan(shape, shape, Settings(batch_size=1, seq_len=8, world_size=4, device_memory=GiB))
    assert all(small.fits(r.total) for r in small.rows)
    tiny_limit = build_plan(shape, shape, Settings(batch_size=1, seq_len=8, world_size=4, device_memory=100_000_000))
    fits = [tiny_limit.fits(r.total) for r in tiny_limit.rows]
    assert fits[0] is False and fits[-1] is True  # 18 B/param on one process no; ZeRO-3 over 4 yes
    assert build_plan(shape, shape, Settings(batch_size=1, seq_len=8)).fits(1) is None


def test_parse_size() -> None:
    assert parse_size("80GiB") == 80 * GiB
    assert parse_size("24 GB") == 24 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1024") == 1024
    with pytest.raises(ValueError):
        parse_size("lots")


def _recipe(tmp_path: Path, teacher: Path, **extra) -> Path:
    raw = {"name": "p", "teacher": {"model": str(teacher)}, "data": {"max_length": 64}, **extra}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_plan_recipe_counts_match_real_models(tiny_teacher: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(_recipe(tmp_path, tiny_teacher))
    plan = plan_recipe(recipe, world_size=2, device="cpu", memory=GiB)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert plan.teacher.params == sum(p.numel() for p in teacher.parameters())
    assert plan.student.layers == 2 and [r.stage for r in plan.rows] == [None, 0, 1, 2, 3]


def test_cli_plan_prints_table(tiny_teacher: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["plan", str(_recipe(tmp_path, tiny_teacher)), "--nproc", "4", "--device-memory", "80GiB"]
    )
    assert result.exit_code == 0, result.output
    for text in ("ZeRO-0 ×4", "ZeRO-3 ×4", "kd 1-proc", "loss workspace, naive", "✓"):
        assert text in result.output
    tight = CliRunner().invoke(app, ["plan", str(_recipe(tmp_path, tiny_teacher)), "--device-memory", "1MiB"])
    assert tight.exit_code == 0 and "✗" in tight.output and "Too big" in tight.output


def test_plan_recipe_with_teacher_cache(tiny_teacher: Path, tmp_path: Path) -> None:
    recipe = load_recipe(_recipe(tmp_path, tiny_teacher), ["teacher.cache=some/cache", "cache.top_k=16"])
    plan = plan_recipe(recipe, world_size=1, device="cpu", memory=GiB)
    assert plan.settings.cache_k == 16
    assert all(r.teacher.cached and r.logits.teacher == 0 for r in plan.rows)


@pytest.mark.parametrize(
    "args",
    [
        ["plan", "missing.yaml"],
        ["plan", "{recipe}", "--device-memory", "lots"],
        ["plan", "{recipe}", "--set", "student.layers=[99]"],
    ],
)
def test_cli_plan_bad_input_is_one_line_exit_2(tiny_teacher: Path, tmp_path: Path, args: list[str]) -> None:
    recipe = str(_recipe(tmp_path, tiny_teacher))
    result = CliRunner().invoke(app, [a.replace("{recipe}", recipe) for a in args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")


def test_planning_imports_no_torch() -> None:
    """`kd plan`'s formulas share the losses' chunk sizing (kdcli.losses.sizing) without loading torch."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = "import sys, kdcli.plan, kdcli.plan.memory; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
