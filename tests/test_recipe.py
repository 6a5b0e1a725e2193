"""Recipe validation: one test per kind of bad input, plus --set and the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdcli.errors import KdError
from kdcli.recipe import load_recipe, parse_set

REPO = Path(__file__).resolve().parent.parent
DIVERGENCES = ["fkl", "rkl", "akl", "atkd", "skl", "srkl", "js", "tvd"]


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(KdError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


def test_defaults_fill_in(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "name: demo\n"))
    assert recipe.teacher.model == "builtin:smollm2-135m-instruct"
    assert recipe.student.init == "teacher" and recipe.student.layers == "every-other"
    assert recipe.loss.divergence == "fkl" and recipe.loss.kd_ratio == 0.5
    assert recipe.train.epochs == 1.0 and recipe.train.max_steps is None


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\nloss:\n  divergnce: rkl\n"))
    assert message.startswith(f"{tmp_path / 'r.yaml'}: loss.divergnce: unknown key")
    assert "Did you mean 'divergence'?" in message


def test_unknown_top_level_key_lists_valid_keys(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\nzzz: 1\n"))
    assert "zzz: unknown key" in message and "teacher" in message


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\ntrain:\n  max_steps: ten\n"))
    assert "train.max_steps" in message and "'ten'" in message


def test_out_of_range(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\nloss:\n  kd_ratio: 1.5\n"))
    assert "loss.kd_ratio" in message and "less than or equal to 1" in message


def test_invalid_yaml_gives_line_and_column(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\ntrain:\n  lr: [1, 2\n  epochs: 1\n"))
    assert "invalid YAML at line" in message and "column" in message


def test_missing_file(tmp_path: Path) -> None:
    message = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml: no such file" in message


def test_missing_name(tmp_path: Path) -> None:
    assert "name: required" in error_of(write(tmp_path, "seed: 1\n"))


def test_not_a_mapping(tmp_path: Path) -> None:
    assert "a recipe is a YAML mapping" in error_of(write(tmp_path, "- a\n- b\n"))


def test_unknown_divergence_lists_choices(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\nloss:\n  divergence: akll\n"))
    assert "loss" in message and "akl" in message


def test_unknown_divergence_parameter(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\nloss:\n  divergence: fkl\n  params: {mu: 0.5}\n"))
    assert "mu" in message and "temperature" in message


def test_student_needs_model_for_pretrained(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\nstudent:\n  init: pretrained\n"))
    assert "student" in message and "student.model" in message


def test_layers_must_be_increasing(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\nstudent:\n  layers: [3, 1]\n"))
    assert "student.layers" in message


def test_section_level_errors_do_not_dump_the_section(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\nstudent:\n  init: teacher\n  overrides: {hidden_size: 64}\n"))
    assert message.endswith("student: `student.overrides` applies only with `init: random`.")


def test_template_must_name_prompt(tmp_path: Path) -> None:
    assert "{prompt}" in error_of(write(tmp_path, "name: x\ndata:\n  template: 'Q: {question}'\n"))


def test_name_placeholders(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, "name: run-{divergence}-s{seed}\nseed: 3\nloss: {divergence: rkl}\n"))
    assert recipe.name == "run-rkl-s3"
    assert "must resolve to letters" in error_of(write(tmp_path, "name: 'bad name'\n"))


def test_set_overrides_any_field(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\n")
    recipe = load_recipe(
        path,
        ["train.max_steps=10", "loss.divergence=rkl", "student.layers=[0, 2]", "loss.params.temperature=2.0"],
    )
    assert recipe.train.max_steps == 10 and recipe.train.epochs == 1.0
    assert recipe.loss.divergence == "rkl" and recipe.loss.params == {"temperature": 2.0}
    assert recipe.student.layers == [0, 2]


def test_an_error_in_a_set_value_names_the_set_not_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ntrain: {max_steps: 5}\n")
    message = error_of(path, ["train.max_steps=three"])
    assert message.startswith("--set train.max_steps=three: train.max_steps: ") and str(path) not in message
    assert error_of(path, ["loss.divergnce=rkl"]) == (
        "--set loss.divergnce=rkl: loss.divergnce: unknown key. Did you mean 'divergence'?"
    )
    assert error_of(path, ["train={lr: x}"]).startswith("--set train={lr: x}: train.lr: ")
    # What the file holds is still the file's: the --set is not blamed for a key it did not give.
    assert error_of(write(tmp_path, "name: x\ntrain: {max_steps: three}\n"), ["train.lr=0.1"]).startswith(
        f"{tmp_path / 'r.yaml'}: train.max_steps: "
    )


@pytest.mark.parametrize("bad", ["train.max_steps", "=3", "train..lr=1", ".lr=1"])
def test_malformed_set(bad: str) -> None:
    with pytest.raises(KdError, match=r"expected key\.path=value"):
        parse_set(bad)


def test_set_into_a_value_is_refused(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\n"), ["name.first=1"])
    assert "'name' is a value, not a section" in message


def test_set_unknown_key_is_caught(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "name: x\n"), ["train.max_stesp=3"])
    assert "train.max_stesp: unknown key" in message and "max_steps" in message


def test_shipped_recipes_validate() -> None:
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        load_recipe(path)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_recipe_per_divergence_differs_only_in_loss(divergence: str) -> None:
    base = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    other = yaml.safe_load((REPO / "recipes" / f"{divergence}.yaml").read_text())
    assert {k: v for k, v in base.items() if k != "loss"} == {k: v for k, v in other.items() if k != "loss"}
    assert load_recipe(REPO / "recipes" / f"{divergence}.yaml").loss.divergence == divergence


def test_precision_auto_follows_native_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` is resolved once, at load time, so the run folder's recipe.yaml records what ran."""
    import kdcli.hardware as hardware
    from kdcli.recipe import Recipe

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(hardware, "native_bf16", lambda device_type="auto", native=native: native)
        assert Recipe(name="r").train.precision == expected
        assert Recipe(name="r", train={"precision": "bf16"}).train.precision == "bf16"
        assert Recipe(name="r", train={"precision": "fp32"}).train.precision == "fp32"


def test_cpu_flags_decide_native_bf16(tmp_path: Path) -> None:
    from kdcli.hardware import NATIVE_BF16_CPU_FLAGS
    from kdcli.host import cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n", encoding="utf-8")
    assert NATIVE_BF16_CPU_FLAGS & cpu_flags(info) == {"avx512_bf16"}
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n", encoding="utf-8")
    assert not NATIVE_BF16_CPU_FLAGS & cpu_flags(info)
    assert cpu_flags(tmp_path / "missing") == frozenset()
