"""`kd compare --pool-seeds`: the training runs of one recipe that differ only in `seed` become one arm.

A study such as `kd distill --grid loss.divergence=fkl,akl --grid seed=0,1,2` asks whether a divergence beats
another, not whether one seed's run beats another seed's. An arm is shown as one column: its value is the mean over
its runs, its "seeds ±" is the spread over training seeds, and its intervals and p-values add the training seed's
variance to the prompts' (`stats.arm_bootstrap`).

An `ArmData` is a `RunData`, so the rest of `kd compare` reads it as it reads a run: its passes are its runs'
passes, labelled by training seed (`seed-0/seed-10`: training seed 0, sampling seed 10); `pass_key` gives the
sampling pass (`seed-10`) by which columns share passes, and `pass_groups` which passes belong to which run; its
training numbers are the means over its runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kdcli.compare.ranking import as_number
from kdcli.compare.runs import RunData
from kdcli.compare.setup_diff import IGNORED_KEYS, flatten
from kdcli.errors import KdError
from kdcli.runs import RunRecord

POOLED_KEY = "seed"  # the recipe key whose runs form one arm
_SEPARATOR = "/"  # between the training seed and the run's own pass label


@dataclass
class ArmData(RunData):
    members: list[RunData] = field(default_factory=list)
    # pooled pass label → (member, the member's own pass label)
    owners: dict[str, tuple[RunData, str]] = field(default_factory=dict, repr=False)

    def folders(self) -> list[RunData]:
        return list(self.members)

    def pass_rows(self, set_name: str, label: str) -> list[dict[str, Any]] | None:
        member, own = self.owners[label]
        return member.pass_rows(set_name, own)

    def judge_scores(self, set_name: str, label: str) -> dict[int, tuple[float, float]] | None:
        member, own = self.owners[label]
        return member.judge_scores(set_name, own)

    def pass_groups(self, passes: Sequence[str]) -> list[list[str]]:
        """`passes` split by the run they belong to (each group one training seed)."""
        groups: dict[int, list[str]] = {}
        for label in passes:
            groups.setdefault(id(self.owners[label][0]), []).append(label)
        return list(groups.values())

    def group_seeds(self, groups: Sequence[Sequence[str]]) -> list[Any]:
        return [training_seed(self.owners[group[0]][0]) for group in groups]

    def pass_key(self, label: str) -> str:
        return self.owners[label][1]

    def pass_file(self, set_name: str, label: str) -> str:
        member, own = self.owners[label]
        return member.pass_file(set_name, own)


def pool_seeds(runs: Sequence[RunData]) -> list[RunData]:
    """Runs grouped into arms by their recipe less `name`, `output_dir` and `seed`, in the order given.

    An arm of one run stays that run. A KdError when two runs of one arm share a seed (the same run twice, or a
    copy), since an arm's runs must be independent draws.
    """
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        # An eval folder (no recipe, no seed) is a column of its own: the teacher beside the arms, say.
        groups.setdefault(str(run.path) if run.eval_only else _identity(run), []).append(run)
    arms: list[RunData] = []
    for members in groups.values():
        if len(members) == 1:
            arms.append(members[0])
            continue
        seeds = [training_seed(run) for run in members]
        for seed in seeds:
            if seeds.count(seed) > 1:
                twins = ", ".join(str(run.path) for run in members if training_seed(run) == seed)
                raise KdError(
                    f"--pool-seeds: {twins} have the same recipe and seed {seed}, so they are not independent "
                    "training runs; drop all but one."
                )
        arms.append(_arm(members, seeds))
    labels = [arm.label for arm in arms]
    for label in labels:
        if labels.count(label) > 1:
            raise KdError(f"--pool-seeds: two arms would both be called {label}; give the runs distinct names.")
    return arms


def _identity(run: RunData) -> str:
    flat = flatten(run.recipe)
    kept = {k: v for k, v in flat.items() if k.split(".")[0] not in IGNORED_KEYS and k != POOLED_KEY}
    return json.dumps(kept, sort_keys=True, default=str)


def training_seed(run: RunData) -> Any:
    """A training run's seed: its recipe's, else its record's."""
    return run.recipe.get(POOLED_KEY, run.run.seed)


def arm_label(names: Sequence[str]) -> str:
    """One title for the runs' names: what they share, with the parts that differ in braces, e.g.
    rep-fkl-s0, rep-fkl-s1, rep-fkl-s2 → rep-fkl-s{0,1,2}."""
    prefix = _common_start(names)
    rest = [name[len(prefix) :] for name in names]
    suffix = _common_start([r[::-1] for r in rest])[::-1]
    middles = [r[: len(r) - len(suffix)] for r in rest]
    return prefix + "{" + ",".join(middles) + "}" + suffix


def _common_start(texts: Sequence[str]) -> str:
    shortest = min(texts, key=len)
    for i, char in enumerate(shortest):
        if any(text[i] != char for text in texts):
            return shortest[:i]
    return shortest


def _arm(members: list[RunData], seeds: list[Any]) -> ArmData:
    first = members[0]
    recipe = dict(first.recipe)
    recipe[POOLED_KEY] = list(seeds)
    arm = ArmData(
        label=arm_label([run.label for run in members]),
        path=first.path,
        recipe=recipe,
        run=_mean_record(members),
        steps=_mean_lines([run.steps for run in members]),
        evals=_mean_lines([run.evals for run in members]),
        results=None,
        members=list(members),
    )
    arm.results = {"sets": _pooled_sets(arm, seeds)}
    return arm


def _pooled_sets(arm: ArmData, seeds: list[Any]) -> dict[str, dict[str, Any]]:
    """The (set, mode) entries every run of the arm has, their passes relabelled by training seed."""
    from kdcli.compare.evalset import sampling_labels  # evalset reads arms through RunData: import at call time

    pooled: dict[str, dict[str, Any]] = {}
    names = [name for name in arm.members[0].sets() if all(name in run.sets() for run in arm.members)]
    for name in names:
        modes = [m for m in arm.members[0].sets()[name] if all(m in run.sets()[name] for run in arm.members)]
        for mode in modes:
            entries = [run.sets()[name][mode] for run in arm.members]
            labels: list[str] = []
            metrics: dict[str, dict[str, Any]] = {}
            for run, seed, entry in zip(arm.members, seeds, entries, strict=True):
                for own in sampling_labels(entry):
                    label = f"seed-{seed}{_SEPARATOR}{own}"
                    labels.append(label)
                    arm.owners[label] = (run, own)
                    for key, values in (entry.get("metrics") or {}).items():
                        value = ((values or {}).get("per_seed") or {}).get(own)
                        metrics.setdefault(key, {"per_seed": {}})["per_seed"][label] = value
            for values in metrics.values():
                numbers = [v for v in values["per_seed"].values() if as_number(v) is not None]
                values["mean"] = math.fsum(numbers) / len(numbers) if numbers else None
            sampling = sampling_labels(entries[0])
            pooled.setdefault(name, {})[mode] = {
                **entries[0],
                "passes": labels,
                "sampling_passes": sampling,
                "metrics": metrics,
            }
    return pooled


def _mean_record(members: list[RunData]) -> RunRecord:
    """The first run's record with its numbers the means over the arm's runs (what the training table shows)."""
    records = [run.run for run in members]

    def mean(values: list[Any]) -> float | None:
        numbers = [float(v) for v in values if as_number(v) is not None]
        return math.fsum(numbers) / len(numbers) if len(numbers) == len(values) and numbers else None

    def mean_dict(dicts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        if any(d is None for d in dicts):
            return None
        keys = [k for k in dicts[0] or {} if all(k in (d or {}) for d in dicts)]
        return {k: mean([(d or {})[k] for d in dicts]) for k in keys}

    numeric = ("steps", "tokens_per_s", "wall_seconds", "gen_tokens", "gen_seconds", "train_seconds")
    changes: dict[str, Any] = {key: mean([getattr(r, key) for r in records]) for key in numeric}
    changes["final"] = mean_dict([r.final for r in records]) or {}
    changes["eval_after"] = mean_dict([r.eval_after for r in records])
    changes["eval_before"] = mean_dict([r.eval_before for r in records])
    return replace(records[0], **changes)


def _mean_lines(lines_of: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """metrics.jsonl lines averaged over the runs, step by step, at the steps every run logged."""
    by_step = [{int(line["step"]): line for line in lines if "step" in line} for lines in lines_of]
    steps = sorted(set.intersection(*(set(s) for s in by_step))) if by_step else []
    out = []
    for step in steps:
        lines = [s[step] for s in by_step]
        keys = [k for k in lines[0] if all(as_number(line.get(k)) is not None for line in lines)]
        out.append({k: math.fsum(float(line[k]) for line in lines) / len(lines) for k in keys} | {"step": step})
    return out
