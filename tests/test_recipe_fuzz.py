"""A seeded fuzz of recipes and `--set` values through the public CLI: mutations of the shipped recipes either
validate (`kd recipe check` exits 0) or give exactly one `error:` line with exit 2; never a traceback, never another
exit code. The recipes that validate also go through `kd plan`, which reads model configs but no weights.

Reproduce or widen a run with KD_FUZZ_SEED and KD_FUZZ_CASES. The last tests keep, as plain examples, what the fuzz
found: the crashes and the errors that spanned several lines or named no key.
"""

from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kdcli.cli import app

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SEED = int(os.environ.get("KD_FUZZ_SEED", "20240614"))
CASES = int(os.environ.get("KD_FUZZ_CASES", "300"))
PLANNED = 40  # of the recipes that validate, how many `kd plan` also reads (0.2 s each)

runner = CliRunner()

# Values a recipe key should never choke on: wrong types, out of range, not finite, huge, empty, unicode.
BAD_VALUES: list[Any] = [
    "abc", "", " ", "ünïcödé ✓ 🚀", "\u200b", "x" * 500, "{prompt}", "cuda:99", "1e-4", "10",
    None, True, False, 0, -1, -1.5, 0.5, 10**30, -(10**30), 2**64, 1e308, float("inf"), float("-inf"), float("nan"),
    [], [1, 2], [None], [[1]], {}, {"a": 1}, {"nested": {"deeper": [1]}},
]  # fmt: skip
# The same as `--set` text, which is parsed as YAML, plus text that is not valid YAML.
BAD_TEXT = [
    "abc", "''", "null", "~", "-1", "0", "1.5", "1e400", ".nan", ".inf", "-.inf", "true", "0x10", "2024-01-01",
    "99999999999999999999999", "[1, 2]", "[0, 2, 1]", "[-1]", "[1.5]", "{}", "{a: 1}", "{mu: abc}",
    "{temperature: 0}", "ünï", "!!binary aGVsbG8=", "[unclosed", "'unclosed", "{a: 1", "*alias", "&a [*a]",
    "a: b: c", "- 1", "!!python/object/apply:os.system ['true']", "[" * 400,
]  # fmt: skip
SECTIONS = ["name", "seed", "output_dir", "teacher", "student", "data", "loss", "train", "cache", "generation"]


@dataclass
class Case:
    text: str
    sets: list[str] = field(default_factory=list)
    kind: str = ""

    def describe(self) -> str:
        return f"[{self.kind}] sets={self.sets!r} recipe={self.text[:300]!r}"


def leaf_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = []
    if isinstance(node, dict):
        for key, value in node.items():
            paths.append((*prefix, key))
            paths.extend(leaf_paths(value, (*prefix, key)))
    return paths


def misspell(rng: random.Random, word: str) -> str:
    chars = list(word)
    i = rng.randrange(len(chars)) if chars else 0
    op = rng.choice(["swap", "drop", "double", "upper", "insert"])
    if op == "swap" and len(chars) > 1:
        j = min(i + 1, len(chars) - 1)
        chars[i], chars[j] = chars[j], chars[i]
    elif op == "drop" and chars:
        del chars[i]
    elif op == "double" and chars:
        chars.insert(i, chars[i])
    elif op == "upper":
        return word.upper()
    else:
        chars.insert(i, rng.choice("xzq_-. "))
    return "".join(chars) or "k"


def mutate(rng: random.Random, recipe: dict[str, Any]) -> dict[str, Any]:
    """Drop, misspell or retype keys, replace sections, add unknown ones: one to three edits."""
    doc = copy.deepcopy(recipe)
    for _ in range(rng.choice([1, 1, 2, 3])):
        paths = leaf_paths(doc)
        if not paths:
            break
        path = rng.choice(paths)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = rng.choice(["drop", "misspell", "value", "value", "value", "section", "unknown"])
        if op == "drop":
            del parent[key]
        elif op == "misspell":
            parent[misspell(rng, str(key))] = parent.pop(key)
        elif op == "value":
            parent[key] = copy.deepcopy(rng.choice(BAD_VALUES))
        elif op == "section":
            doc[rng.choice([*SECTIONS, "deepspeed", "trian", "Train", "losses", "bogus"])] = copy.deepcopy(
                rng.choice([{"x": 1}, [1], "s", None, 3, {"zero_stage": 9}])
            )
        else:
            parent[rng.choice(["bogus", "lr ", "", "1", "__class__", "model.name"])] = copy.deepcopy(
                rng.choice(BAD_VALUES)
            )
    return doc


def bad_syntax(rng: random.Random, text: str) -> str:
    lines = text.splitlines()
    i = rng.randrange(len(lines))
    op = rng.choice(["tab", "bracket", "quote", "indent", "colon", "toplist", "topscalar", "empty", "control",
                     "deep", "bom", "alias", "tag", "duplicate"])  # fmt: skip
    if op == "tab":
        lines[i] = "\t" + lines[i]
    elif op == "bracket":
        lines[i] += " [1, 2"
    elif op == "quote":
        lines[i] += ' "open'
    elif op == "indent":
        lines[i] = "   " + lines[i]
    elif op == "colon":
        lines[i] += ": :"
    elif op == "toplist":
        return "- " + "\n- ".join(lines[:3]) + "\n"
    elif op == "topscalar":
        return rng.choice(["42\n", "just text\n", "3.5\n", "true\n", "null\n", "[]\n"])
    elif op == "empty":
        return rng.choice(["", "\n", "# only a comment\n", "---\n", "---\n---\n"])
    elif op == "control":
        return "name: x\x00\n" if rng.random() < 0.5 else "name: \x07bell\n"
    elif op == "deep":
        return "name: x\ntrain: " + "[" * rng.choice([100, 2000]) + "\n"
    elif op == "bom":
        return "\ufeff" + text
    elif op == "alias":
        return text + "\nextra: *nowhere\n"
    elif op == "tag":
        return text + "\nseed: !!python/object/apply:os.system ['true']\n"
    else:
        return text + "\n" + lines[i] + "\n"
    return "\n".join(lines) + "\n"


def random_set(rng: random.Random, recipe: dict[str, Any]) -> str:
    keys = [".".join(map(str, path)) for path in leaf_paths(recipe)]
    value = rng.choice(BAD_TEXT)
    op = rng.choice(["key", "key", "key", "missing", "through", "no-equals", "no-key", "dots", "section", "unicode"])
    if op == "key":
        return f"{rng.choice(keys)}={value}"
    if op == "missing":
        return f"{rng.choice(['nope', 'train.nope', 'loss.params.zzz', 'deepspeed.zero_stage', 'a.b.c'])}={value}"
    if op == "through":  # a dotted path through a scalar
        return (
            f"{rng.choice(['seed', 'name', 'train.lr', 'data.train', 'student.layers'])}.{rng.choice(['a', 'b.c'])}=1"
        )
    if op == "no-equals":
        return rng.choice(["train.lr", "train.lr:3", "", "name", "train.max_steps 10"])
    if op == "no-key":
        return f"={value}"
    if op == "dots":
        return rng.choice(["train..lr=1", ".lr=1", "train.=1", "train.lr.=1", " . =1"])
    if op == "section":
        return f"{rng.choice(['train', 'loss', 'data', 'student', 'deepspeed'])}={value}"
    return f"{rng.choice(['tråin.lr', 'train.lr' + chr(0x200B), 'ß', 'train. lr'])}={value}"


def cases(seed: int, count: int) -> list[Case]:
    rng = random.Random(seed)
    texts = {path.name: path.read_text(encoding="utf-8") for path in RECIPES}
    parsed = {name: yaml.safe_load(text) for name, text in texts.items()}
    out = []
    for _ in range(count):
        name = rng.choice(sorted(texts))
        kind = rng.choice(["mutate", "mutate", "syntax", "set", "set"])
        if kind == "mutate":
            case = Case(yaml.safe_dump(mutate(rng, parsed[name]), allow_unicode=True, sort_keys=False), kind=kind)
            if rng.random() < 0.3:
                case.sets.append(random_set(rng, parsed[name]))
        elif kind == "syntax":
            case = Case(bad_syntax(rng, texts[name]), kind=kind)
        else:
            case = Case(texts[name], [random_set(rng, parsed[name]) for _ in range(rng.choice([1, 1, 2, 3]))], kind)
        out.append(case)
    return out


def problem(result: Any, source: str) -> str | None:
    """What is wrong with how kd answered, or None: exit 0, or exit 2 with one `error:` line naming where."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"raised {type(result.exception).__name__}: {result.exception}"
    if "Traceback" in result.output:
        return "printed a traceback"
    if result.exit_code == 0:
        return None
    lines = [line for line in result.output.splitlines() if line.strip()]
    if result.exit_code != 2:
        return f"exit code {result.exit_code}: {result.output[-300:]!r}"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"not one error line: {result.output[-500:]!r}"
    if source not in lines[0] and "--set" not in lines[0] and ":" not in lines[0].removeprefix("error: "):
        return f"names neither the file, the --set nor a key: {lines[0]!r}"
    return None


def test_fuzzed_recipes_validate_or_give_one_error_line(tmp_path: Path) -> None:
    failures: list[str] = []
    valid: list[tuple[Path, list[str]]] = []
    for n, case in enumerate(cases(SEED, CASES)):
        path = tmp_path / f"fuzz-{n}.yaml"
        path.write_text(case.text, encoding="utf-8")
        args = ["recipe", "check", str(path), *[arg for item in case.sets for arg in ("--set", item)]]
        result = runner.invoke(app, args)
        wrong = problem(result, str(path))
        if wrong:
            failures.append(f"kd recipe check: {wrong}\n    {case.describe()}")
        elif result.exit_code == 0:
            assert result.output.startswith("✓"), result.output
            valid.append((path, case.sets))
    assert not failures, f"{len(failures)} of {CASES} (seed {SEED}):\n" + "\n".join(failures[:10])
    # Some mutations are harmless (a dropped key with a default): the valid ones are planned too.
    assert valid, "the fuzz produced no valid recipe: it tests only refusals"
    for path, sets in valid[:PLANNED]:
        args = ["plan", str(path), *[a for item in sets for a in ("--set", item)], "--device", "cpu"]
        result = runner.invoke(app, [*args, "--device-memory", "80GiB"])
        wrong = problem(result, str(path))
        assert not wrong, f"kd plan: {wrong}\n    recipe={path.read_text()[:300]!r} sets={sets!r}"


# --- what the fuzz found ------------------------------------------------------------------------------------------


def check(tmp_path: Path, text: str, *sets: str) -> Any:
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return runner.invoke(app, ["recipe", "check", str(path), *[a for item in sets for a in ("--set", item)]])


def one_error(result: Any) -> str:
    assert result.exit_code == 2 and problem(result, "r.yaml") is None, result.output
    return result.output.strip()


@pytest.mark.parametrize(
    ("text", "sets"),
    [("name: x\ntrain: " + "[" * 2000 + "\n", []), ("name: x\n", ["train.lr=" + "[" * 2000])],
    ids=["file", "set"],
)
def test_yaml_nested_too_deeply_is_one_line(tmp_path: Path, text: str, sets: list[str]) -> None:
    # Was a RecursionError traceback from PyYAML.
    line = one_error(check(tmp_path, text, *sets))
    assert "nested too deeply" in line and len(line) < 300


def test_invalid_yaml_in_set_is_one_line(tmp_path: Path) -> None:
    # PyYAML's message spans four lines with a caret drawing; the error now gives the position instead.
    line = one_error(check(tmp_path, "name: x\n", "train=[[[["))
    assert line.startswith("error: --set 'train=[[[['") and "line 1, column 5" in line


def test_control_character_is_one_line(tmp_path: Path) -> None:
    line = one_error(check(tmp_path, "name: x\x00\n"))
    assert "r.yaml: invalid YAML" in line and "#x0000" in line


@pytest.mark.parametrize(
    "item",
    ["train.epochs=.inf", "train.weight_decay=.inf", "train.max_grad_norm=.inf", "generation.temperature=.inf",
     "deepspeed.gradient_clipping=.inf", "train.betas=[.nan, 0.999]", "train.lr=.nan"],
)  # fmt: skip
def test_floats_must_be_finite(tmp_path: Path, item: str) -> None:
    # inf epochs, decay or temperature validated, and failed only once training began.
    line = one_error(check(tmp_path, "name: x\n", item))
    assert item.partition("=")[0] in line and "finite number" in line


def test_seed_must_fit_torch(tmp_path: Path) -> None:
    # A seed over ~1.8e13 validated, then overflowed torch's generator in the batch order (seed x 1_000_003).
    assert "seed: Input should be less than or equal to 4294967295" in one_error(
        check(tmp_path, "name: x\nseed: 99999999999999999999\n")
    )


def test_union_errors_name_the_key_and_the_value(tmp_path: Path) -> None:
    # Was `student.layers.literal['every-other','all']: ...` without the value.
    line = one_error(check(tmp_path, "name: x\n", "student.layers=abc"))
    assert "student.layers: Input should be 'every-other' or 'all' (got 'abc')" in line


def test_short_tuple_says_so(tmp_path: Path) -> None:
    # Was `train.betas.1: required; add it to the recipe.`
    assert "train.betas: too few items (got [0.9])" in one_error(check(tmp_path, "name: x\n", "train.betas=[0.9]"))


def test_unknown_key_of_an_optional_section_lists_its_keys(tmp_path: Path) -> None:
    # Was `deepspeed.bogus: unknown key. Valid keys: .`
    line = one_error(check(tmp_path, "name: x\n", "deepspeed.bogus=1"))
    assert "deepspeed.bogus: unknown key. Valid keys: zero_stage" in line


def test_odd_keys_are_quoted(tmp_path: Path) -> None:
    line = one_error(check(tmp_path, "name: x\ntrain:\n  'lr ': 1\n"))
    assert "train.'lr ': unknown key" in line


def test_set_into_a_null_section(tmp_path: Path) -> None:
    # `deepspeed: null` is the section turned off; --set deepspeed.KEY turns it on instead of refusing.
    result = check(tmp_path, "name: x\ndeepspeed: null\n", "deepspeed.zero_stage=2")
    assert result.exit_code == 0, result.output


def test_long_values_are_shortened(tmp_path: Path) -> None:
    line = one_error(check(tmp_path, "name: x\n", "student.init=" + "x" * 5000))
    assert "…" in line and len(line) < 400
