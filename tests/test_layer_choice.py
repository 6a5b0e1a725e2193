"""`student.layers: {keep: N, by: loss|influence}`: the scores against independent computations, the kept layers,
what the run folder records, the scores reused by a second run, and the one-line refusals before any weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_llama
from test_distill import runner, tiny_recipe

from kdcli.cli import app
from kdcli.data import Collator, build_examples, read_split
from kdcli.grid import state_of
from kdcli.hardware import Runtime
from kdcli.models import load_teacher, load_tokenizer
from kdcli.models.layers import decoder_layers, pruned_copy
from kdcli.models.pruning import LayerScores, influence_scores, layer_scores, loss_scores
from kdcli.recipe import load_recipe
from kdcli.recipe.schema import TeacherConfig
from kdcli.runs import RunFolder

FP32 = Runtime(torch.device("cpu"), "fp32")


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("six"), layers=6, seed=3)


@pytest.fixture(scope="module")
def scored(six_layers: Path) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """The six-layer teacher and two padded batches of starter examples (response positions labelled)."""
    recipe = load_recipe_for(six_layers)
    tokenizer = load_tokenizer(str(six_layers))
    examples = build_examples(read_split(recipe.data, "train"), tokenizer, recipe.data, "train", "data.train")
    collate = Collator(tokenizer.pad_token_id)
    batches = [collate(examples[0:5]), collate(examples[5:9])]
    return load_teacher(TeacherConfig(model=str(six_layers)), torch.float32), batches


def load_recipe_for(teacher: Path) -> object:
    path = Path(teacher) / "recipe-for-tests.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "teacher": {"model": str(teacher)}, "data": {"max_length": 96}}))
    return load_recipe(path)


def test_influence_matches_hidden_states_of_the_whole_model(scored: tuple) -> None:
    model, batches = scored
    scores, positions = influence_scores(model, batches, FP32)
    # Independently: the model's own hidden states, with the final norm made the identity so that the last entry
    # is the last layer's raw output rather than its normed one.
    n_layers = len(decoder_layers(model))
    totals, count = torch.zeros(n_layers, dtype=torch.float64), 0
    norm = model.model.norm
    model.model.norm = torch.nn.Identity()
    try:
        with torch.no_grad():
            for batch in batches:
                out = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
                )
                mask = batch["labels"] != -100
                count += int(mask.sum())
                for i in range(n_layers):
                    h_in, h_out = out.hidden_states[i].double(), out.hidden_states[i + 1].double()
                    cos = (h_in * h_out).sum(-1) / (h_in.norm(dim=-1) * h_out.norm(dim=-1))
                    totals[i] += (1 - cos)[mask].sum()
    finally:
        model.model.norm = norm
    assert positions == count > 0
    assert scores == pytest.approx((totals / count).tolist(), abs=1e-9)


def test_loss_score_is_the_ce_of_the_model_built_without_that_layer(scored: tuple) -> None:
    model, batches = scored
    scores, positions = loss_scores(model, batches, FP32)

    def mean_ce(net: torch.nn.Module) -> float:
        total = 0.0
        with torch.no_grad():
            for batch in batches:
                logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                total += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="sum"
                    )
                )
        return total / positions

    whole = mean_ce(model)
    n_layers = len(decoder_layers(model))
    expected = []
    for skip in range(n_layers):
        pruned = pruned_copy(model, [i for i in range(n_layers) if i != skip], torch.float32).eval()
        expected.append(mean_ce(pruned) - whole)
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == n_layers  # a random model still tells its layers apart
    # The layers' own forwards are back: the model computes what it did before scoring.
    assert mean_ce(model) == pytest.approx(whole, abs=1e-9)


def test_the_kept_layers_are_the_top_n_in_model_order() -> None:
    scores = LayerScores("loss", [0.5, 2.0, 0.1, 2.0, 0.7, -0.2], 8, 100, 1.0, "float32")
    assert scores.top(1) == [1]  # a tie goes to the lower index
    assert scores.top(2) == [1, 3]
    assert scores.top(4) == [0, 1, 3, 4]
    ranked = sorted(range(6), key=lambda i: scores.scores[i], reverse=True)
    assert scores.top(3) == sorted(ranked[:3])


def choice_recipe(tmp_path: Path, teacher: Path, name: str = "tiny", **layers: object) -> Path:
    return tiny_recipe(
        tmp_path,
        teacher,
        name=name,
        student={"init": "teacher", "layers": {"keep": 3, "by": "loss", **layers}},
        train={"max_steps": 2},
    )


def test_a_run_records_the_chosen_layers_and_a_second_run_reuses_the_scores(
    tmp_path: Path, six_layers: Path, kd_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = runner.invoke(app, ["distill", str(choice_recipe(tmp_path, six_layers))])
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "tiny"
    record = json.loads((run / "run.json").read_text())["student_layers"]
    saved = yaml.safe_load((run / "recipe.yaml").read_text())["student"]["layers"]
    scores = LayerScores(**{k: record[k] for k in ("by", "scores", "examples", "positions", "seconds", "dtype")})
    assert record["indices"] == saved["indices"] == scores.top(3) and len(record["scores"]) == 6
    assert saved["keep"] == 3 and saved["by"] == "loss" and record["reused"] is False
    assert "Keeping 3 of 6 layers (*): " + str(record["indices"]) in " ".join(first.output.split())

    # The student grew from those teacher layers: after two steps each is still nearest the one it was cut from.
    from safetensors.torch import load_file

    student = load_file(run / "student" / "model.safetensors")
    teacher = load_file(six_layers / "model.safetensors")
    key = "model.layers.{}.mlp.up_proj.weight"
    for new, old in enumerate(record["indices"]):
        distances = [float((student[key.format(new)] - teacher[key.format(i)]).norm()) for i in range(6)]
        assert distances.index(min(distances)) == old

    # A second run on the same teacher and data reads the scores instead of computing them.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored again")

    monkeypatch.setattr("kdcli.models.pruning.loss_scores", refuse)
    second = runner.invoke(app, ["distill", str(choice_recipe(tmp_path / "b", six_layers, name="again"))])
    assert second.exit_code == 0, second.output
    again = json.loads((tmp_path / "b" / "runs" / "again" / "run.json").read_text())["student_layers"]
    assert again["reused"] is True and again["indices"] == record["indices"] and again["scores"] == record["scores"]
    assert "read from an earlier run" in " ".join(second.output.split())

    # A grid point is its finished run, though the run's recipe.yaml has the indices filled in.
    point = load_recipe(choice_recipe(tmp_path, six_layers))
    assert state_of(RunFolder(run), point) == "finished"
    # The run folder's recipe repeats the run exactly: its indices are used, nothing is scored.
    repeat = runner.invoke(app, ["distill", str(run / "recipe.yaml"), "--set", "name=repeat"])
    assert repeat.exit_code == 0, repeat.output
    assert "Layer scores" not in repeat.output
    assert yaml.safe_load((tmp_path / "runs" / "repeat" / "recipe.yaml").read_text())["student"]["layers"] == saved


def test_other_data_is_scored_again(tmp_path: Path, six_layers: Path, kd_home: Path) -> None:
    one = runner.invoke(app, ["distill", str(choice_recipe(tmp_path, six_layers, examples=4))])
    two = runner.invoke(app, ["distill", str(choice_recipe(tmp_path / "b", six_layers, examples=6))])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    records = [
        json.loads((p / "runs" / "tiny" / "run.json").read_text())["student_layers"] for p in (tmp_path, tmp_path / "b")
    ]
    assert [r["examples"] for r in records] == [4, 6] and not records[1]["reused"]
    assert len(list((kd_home / "layer-scores").glob("*.json"))) == 2


def test_influence_choice_from_a_teacher_cache_matches_the_online_one(
    tmp_path: Path, six_layers: Path, kd_home: Path
) -> None:
    online = tiny_recipe(
        tmp_path, six_layers, student={"layers": {"keep": 2, "by": "influence"}}, train={"max_steps": 2}
    )
    result = runner.invoke(app, ["distill", str(online)])
    assert result.exit_code == 0, result.output
    cache = tmp_path / "cache"
    written = runner.invoke(app, ["cache-teacher", str(online), "--out", str(cache), "--split", "all"])
    assert written.exit_code == 0, written.output
    raw = yaml.safe_load(online.read_text())
    raw["name"], raw["teacher"]["cache"] = "cached", str(cache)
    cached = tmp_path / "cached.yaml"
    cached.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["distill", str(cached)])
    assert result.exit_code == 0, result.output
    read = [
        json.loads(p.read_text())["student_layers"]
        for p in (tmp_path / "runs" / "tiny" / "run.json", tmp_path / "runs" / "cached" / "run.json")
    ]
    assert read[0]["indices"] == read[1]["indices"] and read[1]["reused"]  # the same tokens, teacher and dtype


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({"keep": 0, "by": "loss"}, "student.layers.keep: Input should be greater than or equal to 1 (got 0)."),
        ({"keep": 3, "by": "magic"}, "student.layers.by: Input should be 'loss' or 'influence' (got 'magic')."),
        ({"keep": 6, "by": "loss"}, "student.layers.keep: 6 keeps every layer of the teacher's 6; keep 1 to 5"),
        ({"keep": 9}, "student.layers.keep: 9 keeps every layer of the teacher's 6"),
        ({"keep": 2, "indices": [1, 7]}, "student.layers.indices: index 7 is out of range; the teacher has 6 layers"),
        ({"keep": 2, "indices": [1]}, "student.layers: indices: lists 1 layers but keep is 2."),
        ({"keep": 2, "examples": 0}, "student.layers.examples: Input should be greater than or equal to 1"),
    ],
)
def test_bad_values_are_one_line_before_any_weight_is_read(
    tmp_path: Path, six_layers: Path, kd_home: Path, monkeypatch: pytest.MonkeyPatch, layers: dict, message: str
) -> None:
    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were read")

    monkeypatch.setattr("kdcli.engine.setup.load_teacher", no_weights)
    monkeypatch.setattr("kdcli.models.loading.load_model", no_weights)
    recipe = tiny_recipe(tmp_path, six_layers, student={"layers": layers})
    for command in (["distill", str(recipe)], ["plan", str(recipe)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], result.output


def test_recipe_check_and_plan_read_no_weights(
    tmp_path: Path, six_layers: Path, kd_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were read")

    monkeypatch.setattr("kdcli.models.loading.load_model", no_weights)
    recipe = tiny_recipe(tmp_path, six_layers, student={"layers": {"keep": 4, "by": "influence"}})
    checked = runner.invoke(app, ["recipe", "check", str(recipe)])
    assert checked.exit_code == 0, checked.output
    planned = runner.invoke(app, ["plan", str(recipe)])
    assert planned.exit_code == 0, planned.output
    assert "student 0.2M params (4 layers" in " ".join(planned.output.split())


def test_direct_scores_equal_stored_ones(scored: tuple, six_layers: Path, kd_home: Path) -> None:
    model, batches = scored
    examples = [
        {"input_ids": ids[mask.bool()].tolist(), "labels": []}
        for ids, mask in zip(batches[0]["input_ids"], batches[0]["attention_mask"], strict=True)
    ]
    # Unshifted labels for the collator: the response is everything after the first half.
    for example in examples:
        ids = example["input_ids"]
        example["labels"] = [-100] * (len(ids) // 2) + ids[len(ids) // 2 :]
    first = layer_scores(model, str(six_layers), examples, Collator(0), "influence", FP32)
    second = layer_scores(model, str(six_layers), examples, Collator(0), "influence", FP32)
    assert not first.reused and second.reused and first.scores == second.scores


@pytest.mark.parametrize("by", ["influence", "loss"])
def test_scores_do_not_depend_on_the_batching(scored: tuple, six_layers: Path, tmp_path: Path, by: str) -> None:
    """Examples are scored shortest first, two at a time (less padding): the same scores as in one batch."""
    model, batches = scored
    pairs = [zip(batch["input_ids"], batch["attention_mask"], strict=True) for batch in batches]
    rows = [ids[mask.bool()] for pair in pairs for ids, mask in pair]
    examples = [{"input_ids": ids[: 30 + 7 * i].tolist(), "labels": []} for i, ids in enumerate(rows)]
    for example in examples:
        ids = example["input_ids"]
        example["labels"] = [-100] * (len(ids) // 2) + ids[len(ids) // 2 :]
    assert len({len(e["input_ids"]) for e in examples}) > 2  # lengths differ: the batchings pad differently
    scores = {}
    for size in (2, len(examples)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("KD_HOME", str(tmp_path / f"home-{size}"))  # no stored scores: each computes
            scores[size] = layer_scores(model, str(six_layers), examples, Collator(0), by, FP32, batch_size=size)
    assert not scores[2].reused and not scores[len(examples)].reused
    assert scores[2].positions == scores[len(examples)].positions
    # A loss score is a difference of two float32 mean CEs of about 10 nats: 1e-5 is their rounding, not a change.
    assert scores[2].scores == pytest.approx(scores[len(examples)].scores, rel=1e-5, abs=1e-5)


def test_zero2_two_processes_keep_the_layers_one_process_keeps(tmp_path: Path, six_layers: Path, kd_home: Path) -> None:
    from scale_helpers import run_kd, step_losses
    from test_resume import FAST
    from test_scale import TWO_PROCESSES

    layers = {"layers": {"keep": 3, "by": "influence"}}
    single = {**FAST, "train": {**FAST["train"], "save_every": None}, "student": layers}
    result = runner.invoke(app, ["distill", str(tiny_recipe(tmp_path / "one", six_layers, **single))])
    assert result.exit_code == 0, result.output
    # Scored afresh by rank 0 of the two processes (its own home), and handed to rank 1.
    fresh = {"KD_HOME": str(tmp_path / "other-home")}
    recipe = tiny_recipe(tmp_path / "two", six_layers, **TWO_PROCESSES, student=layers, deepspeed={"zero_stage": 2})
    done = run_kd(["distill", str(recipe), "--nproc", "2"], tmp_path, env=fresh)
    assert done.returncode == 0, done.stderr
    runs = [tmp_path / part / "runs" / "tiny" for part in ("one", "two")]
    chosen = [json.loads((run / "run.json").read_text())["student_layers"] for run in runs]
    assert chosen[0]["indices"] == chosen[1]["indices"] and not chosen[1]["reused"]
    losses, expected = step_losses(runs[1]), step_losses(runs[0])
    assert max(abs(losses[step] - expected[step]) for step in expected) < 1e-5


def test_a_lora_student_on_chosen_layers(tmp_path: Path, six_layers: Path, kd_home: Path) -> None:
    recipe = tiny_recipe(
        tmp_path,
        six_layers,
        student={"layers": {"keep": 2, "by": "influence"}, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
        train={"max_steps": 2},
    )
    result = runner.invoke(app, ["distill", str(recipe)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    record = json.loads((run / "run.json").read_text())
    assert len(record["student_layers"]["indices"]) == 2
    assert record["parameters"]["student_trainable"] < record["parameters"]["student"]
    config = json.loads((run / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
