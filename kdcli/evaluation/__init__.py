"""`kd eval`: generate with a distilled student (or any model), score ROUGE-L, exact match, length and
distinct-n over several sampling seeds, and optionally have an LLM judge compare answers with the references.

    from kdcli.evaluation import EvalOptions, run_eval
    results = run_eval(EvalOptions("runs/quickstart-fkl", seeds=[10, 20], max_new_tokens=64))
    results["sets"]["starter"]["sampling"]["metrics"]["rougeL"]   # {"mean": ..., "std": ..., "per_seed": {...}}

Layout: `targets` (what TARGET means), `sets` (eval data with the training template), `generate` (a set's
passes, written by the models layer's generation service `kdcli.models.generate_file`), `metrics`, `judge/`
(prompt, parser, cache, client, protocol), `results` (the eval folder), `runner` (the whole command), `render`
(rich output for the CLI).
"""

from kdcli.evaluation.generate import generate_pass, pass_label
from kdcli.evaluation.judge import JudgeClient, JudgeSettings, ReplyCache, parse_verdict
from kdcli.evaluation.metrics import aggregate, distinct_n, exact_match, rouge_l, score_pass
from kdcli.evaluation.observer import EvalObserver, SilentEvalObserver
from kdcli.evaluation.runner import DEFAULT_SEEDS, JUDGES, EvalOptions, run_eval
from kdcli.evaluation.sets import EvalItem, EvalSet, load_eval_set, set_name
from kdcli.evaluation.targets import Target, expand_targets, resolve_target
from kdcli.models import GenerationSettings  # the settings of an eval pass are generation's own

__all__ = [
    "DEFAULT_SEEDS",
    "JUDGES",
    "EvalItem",
    "EvalObserver",
    "EvalOptions",
    "EvalSet",
    "GenerationSettings",
    "JudgeClient",
    "JudgeSettings",
    "ReplyCache",
    "SilentEvalObserver",
    "Target",
    "aggregate",
    "distinct_n",
    "exact_match",
    "expand_targets",
    "generate_pass",
    "load_eval_set",
    "parse_verdict",
    "pass_label",
    "resolve_target",
    "rouge_l",
    "run_eval",
    "score_pass",
    "set_name",
]
