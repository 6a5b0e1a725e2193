"""`kd compare`: runs side by side — the recipe keys that differ, training numbers, eval metrics with 95 % intervals
over prompts (a prompt-level bootstrap, the seeds as repeated measures) and the spread over seeds, deltas against a
baseline with paired bootstrap p-values over prompts, an optional head-to-head judge, and a PNG of the curves.

    from kdcli.compare import compare_runs, load_runs, to_markdown
    runs = load_runs([Path("runs/quickstart-fkl"), Path("runs/quickstart-akl")])
    comparison = compare_runs(runs)             # the first run is the baseline
    print(to_markdown(comparison))

Layout: `runs` (reading run folders), `setup_diff`, `stats` (prompt bootstrap, t interval), `core` (the comparison
as data, and the training rows), `evalset` (one evaluation set across runs: shared passes and prompts, the bootstrap
cells), `ranking` (better directions, best runs), `render` (rich, Markdown, JSON, CSV), `plot` (matplotlib,
lazily), `head_to_head` (the pairwise judge).
"""

from kdcli.compare.core import Comparison, HeadToHead, ValueRow, compare_runs
from kdcli.compare.evalset import MetricCell, MetricRow, SetComparison
from kdcli.compare.export import FORMATS, render_text, to_csv, to_json
from kdcli.compare.render import print_table, rich_view, sparkline, to_markdown
from kdcli.compare.runs import RunData, load_run, load_runs
from kdcli.compare.setup_diff import SetupRow, flatten, setup_diff
from kdcli.compare.stats import PromptBootstrap, arm_bootstrap, paired_bootstrap, prompt_bootstrap
from kdcli.compare.student_t import MeanCI, mean_ci, t_quantile

__all__ = [
    "FORMATS",
    "Comparison",
    "HeadToHead",
    "MeanCI",
    "MetricCell",
    "MetricRow",
    "PromptBootstrap",
    "RunData",
    "SetComparison",
    "SetupRow",
    "ValueRow",
    "arm_bootstrap",
    "compare_runs",
    "flatten",
    "load_run",
    "load_runs",
    "mean_ci",
    "paired_bootstrap",
    "print_table",
    "prompt_bootstrap",
    "render_text",
    "rich_view",
    "setup_diff",
    "sparkline",
    "t_quantile",
    "to_csv",
    "to_json",
    "to_markdown",
]
