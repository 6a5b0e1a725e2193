"""The recipe schema: one YAML file describes a whole distillation run.

Every section forbids unknown keys, so a typo is an error with a suggestion rather than a silently ignored setting.
Field descriptions double as the reference documentation (`docs/recipes.md`). The sections a run may leave out are
in `optional`, the base of all of them in `section`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from kdcli.recipe.optional import (
    CacheConfig,
    CrossTokenizerConfig,
    DeepSpeedConfig,
    GenerationConfig,
    OnPolicyConfig,
    ServerConfig,
)
from kdcli.recipe.section import Section
from kdcli.recipe.student import LayerChoice, StudentConfig

BUILTIN_MODEL = "builtin:smollm2-135m-instruct"
BUILTIN_DATA = "builtin:starter"
REPORTERS = ("tensorboard", "wandb")  # `train.report_to`: the experiment loggers of `kdcli.loggers`


class TeacherConfig(Section):
    model: str = Field(
        BUILTIN_MODEL,
        description="Hugging Face id, local folder, or `builtin:smollm2-135m-instruct`.",
    )
    cache: str | None = Field(
        None,
        description=(
            "Folder written by `kd cache-teacher`: `kd distill` streams the teacher's top-K from it and never runs "
            "the teacher (see `docs/cache.md`)."
        ),
    )
    server: ServerConfig | None = Field(
        None,
        description=(
            "The teacher behind a vLLM (or OpenAI-compatible) server: `kd cache-teacher` and `kd distill` ask it for "
            "the top-K log-probs instead of loading the teacher; `model` then names its tokenizer and config "
            "(docs/served-teacher.md)."
        ),
    )


class DataFields(Section):
    prompt: str | None = Field(
        None, description="Column with the instruction. Auto-detected: `instruction`, `prompt`, `question`."
    )
    context: str | None = Field(None, description="Column with optional context. Auto-detected: `context`, `input`.")
    response: str | None = Field(
        None, description="Column with the answer. Auto-detected: `response`, `output`, `answer`, `completion`."
    )


class DataConfig(Section):
    train: str = Field(
        BUILTIN_DATA,
        description=(
            "JSONL, JSON, Parquet or CSV file; a Hugging Face dataset id (`id` or `id:split`); or `builtin:starter`."
        ),
    )
    eval: str | None = Field(
        BUILTIN_DATA, description="Held-out data, same forms as `train`. `builtin:starter` gives its eval split."
    )
    fields: DataFields = Field(
        default_factory=DataFields, description="Column names, when auto-detection is not enough."
    )
    template: str = Field(
        "chat",
        description=(
            "`chat` uses the tokenizer's chat template. Otherwise a string with `{prompt}` and optionally "
            '`{context}`, e.g. `"### Instruction:\\n{prompt}\\n\\n### Response:\\n"`.'
        ),
    )
    system_prompt: str | None = Field(None, description="System message for the chat template.")
    max_length: int = Field(256, ge=8, le=131072, description="Tokens per example, prompt plus response.")
    max_train_examples: int | None = Field(None, ge=1, description="Use only the first N training examples.")
    max_eval_examples: int | None = Field(None, ge=1, description="Use only the first N eval examples.")
    responses: Literal["dataset", "teacher"] = Field(
        "dataset",
        description=(
            "`dataset`: train on the data's responses. `teacher`: `kd cache-teacher` generates them with the teacher "
            "(sequence-level KD, settings in `generation`); the data then needs prompts only."
        ),
    )

    @field_validator("template")
    @classmethod
    def _template_names_prompt(cls, template: str) -> str:
        if template != "chat" and "{prompt}" not in template:
            raise ValueError("a template string must contain `{prompt}` (or use `chat`)")
        return template

    def spec(self, split: str) -> str | None:
        """The data spec of a split, `train` or `eval` (None where the recipe has no eval set)."""
        return self.train if split == "train" else self.eval

    def max_examples(self, split: str) -> int | None:
        return self.max_train_examples if split == "train" else self.max_eval_examples


class LossConfig(Section):
    divergence: str = Field("fkl", description="One of the divergences listed by `kd losses`.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword parameters of the divergence, e.g. `{mu: 0.5}` for akl."
    )
    kd_ratio: float = Field(0.5, ge=0.0, le=1.0, description="Objective = (1 - kd_ratio) * CE + kd_ratio * divergence.")
    scale_by_t2: bool = Field(
        True, description="Multiply the divergence by T^2 when `params.temperature` != 1 (Hinton)."
    )
    fused: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "Take CE and the divergence from the hidden states, projecting a chunk of rows at a time, so the "
            "[tokens, vocab] logits never exist whole (docs/fused-head.md): `auto` wherever the models allow it, "
            "`true` to require it, `false` for the plain path."
        ),
    )

    cross_tokenizer: CrossTokenizerConfig | None = Field(
        None,
        description=(
            "A student whose tokenizer differs from the teacher's: `{method: uld}` or `{method: hybrid}` replaces "
            "`divergence` (docs/methods.md, 'Across tokenizers'). Required when the two vocabularies differ."
        ),
    )

    @model_validator(mode="after")
    def _divergence_and_params_exist(self) -> LossConfig:
        from kdcli.losses import get_loss  # local: keeps schema import light

        get_loss(self.divergence, **self.params)  # raises ValueError naming the valid choices
        if self.cross_tokenizer is not None and (self.divergence != "fkl" or self.params):
            raise ValueError(
                "with cross_tokenizer the divergence is its method, and its parameters are cross_tokenizer.params; "
                "remove divergence and params"
            )
        return self

    def chosen(self) -> tuple[str, dict[str, Any]]:
        """The divergence the objective takes and its parameters: `cross_tokenizer`'s method when set."""
        if self.cross_tokenizer is not None:
            return self.cross_tokenizer.method, self.cross_tokenizer.params
        return self.divergence, self.params

    def build(self) -> Any:
        """The divergence of `chosen()`, its parameter defaults filled in from the registry."""
        from kdcli.losses import get_cross_tokenizer, get_loss

        name, params = self.chosen()
        return (get_cross_tokenizer if self.cross_tokenizer is not None else get_loss)(name, **params)


class TrainConfig(Section):
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps. Takes precedence over `epochs` when set.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (may be fractional).")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    group_by_length: bool = Field(
        True,
        description=(
            "Put examples of like length in the same batch (sorted within stretches of 16 optimizer steps of each "
            "epoch's seeded shuffle, the steps then shuffled): less compute spent on padding, every example still "
            "once per epoch, a step the same examples however it is split into micro-batches and processes. "
            "`false`: batches straight from the shuffle."
        ),
    )
    lr: float = Field(5e-5, gt=0, le=1.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables it.")
    activation_checkpointing: bool = Field(
        False,
        description=(
            "Keep only each student layer's input through the forward and recompute the layer during backward "
            "(Hugging Face gradient checkpointing, non-reentrant): the student's activations shrink to about one "
            "layer's, for about one more student forward per step. The losses are the same. `kd plan` counts it."
        ),
    )
    optimizer_states: Literal["fp32", "bf16"] = Field(
        "fp32",
        description=(
            "What AdamW stores its two moment estimates in: `fp32`, or `bf16` (4 of AdamW's 8 bytes per trained "
            "parameter saved; written back with stochastic rounding, so that the second moment still decays). The "
            "update is computed in fp32 either way. Plain PyTorch only: under `deepspeed:` ZeRO keeps its own."
        ),
    )
    device: str = Field(
        "auto",
        description=(
            "Where the student, the teacher and generation run: `auto` (the first GPU where CUDA is available, else "
            "the CPU), `cpu`, `cuda` or `cuda:N`. Under a launcher each process takes its own GPU. run.json records "
            "the device used."
        ),
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        validate_default=True,  # so that the default `auto` is resolved too
        description=(
            "`bf16`: teacher in bf16, student in fp32 master weights under bf16 autocast, saved in bf16. `auto` picks "
            "bf16 where it is native on `train.device` (a GPU, or a CPU with AVX512-BF16/AMX) and fp32 elsewhere, "
            "where emulated bf16 is about 5x slower. The run folder's recipe.yaml records the choice."
        ),
    )
    log_every: int = Field(1, ge=1, description="Write a `metrics.jsonl` line every N steps.")
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate every N steps; the eval set is always scored before and after training."
    )
    eval_batch_size: int = Field(8, ge=1, description="Examples per eval batch.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; default: all cores.")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description=(
            "Examples per optimizer step over all processes. When set, kd checks it equals "
            "`batch_size` x `grad_accum` x world size before launch."
        ),
    )
    save_every: int | None = Field(
        None, ge=1, description="Write a resumable checkpoint (model, optimizer, RNG, data position) every N steps."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep only the newest N checkpoints in `checkpoints/`.")
    report_to: list[str] = Field(
        default_factory=list,
        description=(
            "Experiment loggers fed what `metrics.jsonl` gets (`train/loss`, `eval/loss`, ...): `tensorboard` "
            "(`<run>/tensorboard/`) and/or `wandb` (offline unless `WANDB_MODE` is set; `<run>/wandb/`). Each needs "
            "its extra: `pip install 'kdcli[tensorboard]'`. A single name may be given as a string."
        ),
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_loggers(cls, report_to: Any) -> Any:
        names = [report_to] if isinstance(report_to, str) else [] if report_to is None else report_to
        if not isinstance(names, list):
            return names  # pydantic names the type
        for name in names:
            if name not in REPORTERS:
                raise ValueError(f"{name!r} is not a logger; use {', '.join(REPORTERS)}")
        return list(dict.fromkeys(names))

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        from kdcli.hardware import DEVICE_CHOICES, is_device_spec

        if not is_device_spec(device):
            raise ValueError(f"'{device}' is not a device; use {DEVICE_CHOICES}")
        return device.strip()

    @field_validator("precision")
    @classmethod
    def _resolve_auto_precision(cls, precision: str, info: ValidationInfo) -> str:
        from kdcli.hardware import resolve_precision  # local: reads /proc/cpuinfo and torch.cuda only when needed

        # `auto` asks about the device this recipe trains on: a CPU run on a GPU machine is not a GPU run.
        return resolve_precision(precision, str(info.data.get("device", "auto")))

    def logs_step(self, step: int, total_steps: int) -> bool:
        """Whether `step` is recorded (`metrics.jsonl` and the loggers): every `log_every` steps, and the last."""
        return step % self.log_every == 0 or step == total_steps


NAME_PLACEHOLDERS = ("divergence", "seed")  # short names; any other key is written as its path, `{loss.kd_ratio}`
NAME_ALIASES = {"divergence": "loss.divergence"}  # a short placeholder and the recipe key it stands for
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class Recipe(Section):
    name: str = Field(
        ...,
        description=(
            "Run name: the run folder is `<output_dir>/<name>/`. May use `{divergence}`, `{seed}` and any other "
            "key by its path, e.g. `quickstart-{divergence}-{loss.kd_ratio}` (what `kd distill --grid` needs)."
        ),
    )
    # At most 2^32 - 1: the batch order seeds torch with seed x 1_000_003 + epoch, which must fit in 64 bits.
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for weights, data order and dropout.")
    output_dir: str = Field("runs", description="Runs are written to `<output_dir>/<name>/`.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    deepspeed: DeepSpeedConfig | None = Field(
        None, description="Train on DeepSpeed ZeRO (see `docs/scale-out.md`); absent: plain PyTorch."
    )

    @field_validator("on_policy")
    @classmethod
    def _on_policy_fits_the_recipe(cls, on_policy: OnPolicyConfig, info: ValidationInfo) -> OnPolicyConfig:
        """Cross-field checks (the sections above are validated by now; one that failed is skipped)."""
        if not on_policy.active:
            return on_policy
        what = f"ratio {on_policy.ratio:g}" if on_policy.schedule == "constant" else "schedule: adaptive"
        teacher, loss, train, data = (info.data.get(key) for key in ("teacher", "loss", "train", "data"))
        if teacher is not None and teacher.cache:
            raise ValueError(
                f"on_policy.ratio > 0 ({what}) needs the teacher online to score the student's samples, and "
                "teacher.cache only holds targets for the data's responses; drop teacher.cache or set "
                "on_policy.ratio: 0"
            )
        if loss is not None and loss.cross_tokenizer is not None:
            raise ValueError(
                f"on_policy.ratio > 0 ({what}) with loss.cross_tokenizer: the student's samples would need the "
                "teacher's tokenization and alignment, which kd does not build yet; set on_policy.ratio: 0"
            )
        if loss is not None and loss.kd_ratio == 0:
            raise ValueError(
                "sampled micro-batches train the divergence only (CE needs the data's responses), and loss.kd_ratio "
                "is 0; raise loss.kd_ratio or set on_policy.ratio: 0"
            )
        no_evals = (train is not None and not train.eval_every) or (data is not None and not data.eval)
        if on_policy.schedule == "adaptive" and no_evals:
            raise ValueError("schedule: adaptive follows the eval loss; set train.eval_every and data.eval")
        return on_policy

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_keeps_its_own_states(
        cls, deepspeed: DeepSpeedConfig | None, info: ValidationInfo
    ) -> DeepSpeedConfig | None:
        train = info.data.get("train")
        if deepspeed is not None and train is not None and train.optimizer_states != "fp32":
            raise ValueError(
                f"train.optimizer_states: {train.optimizer_states} is kd's own AdamW, and under deepspeed: ZeRO "
                "builds and keeps the optimizer states itself; drop one of them"
            )
        return deepspeed

    @field_validator("loss")
    @classmethod
    def _served_teacher_at_temperature_one(cls, loss: LossConfig, info: ValidationInfo) -> LossConfig:
        teacher = info.data.get("teacher")
        temperature = float(loss.chosen()[1].get("temperature", 1.0))
        if teacher is not None and teacher.server is not None and temperature != 1.0:
            raise ValueError(
                f"params.temperature {temperature:g} needs the teacher's distribution at that temperature, and a "
                "served teacher's prompt log-probs are at temperature 1 (vLLM applies a request's temperature to "
                "sampling only), with a tail kd cannot rescale; use temperature 1 with teacher.server, or a local "
                "teacher"
            )
        return loss

    @model_validator(mode="after")
    def _resolve_name(self) -> Recipe:
        name = PLACEHOLDER.sub(lambda m: str(self._key_value(m.group(1))), self.name)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(
                f"name {self.name!r} must resolve to letters, digits, '.', '_' and '-' "
                f"(placeholders: {', '.join('{' + k + '}' for k in NAME_PLACEHOLDERS)})"
            )
        if name != self.name:
            object.__setattr__(self, "name", name)
        return self

    def unresolved(self) -> Recipe:
        """The recipe as a user wrote it: without the kept layers kd filled into `student.layers` after scoring
        (a grid point and its finished run are the same recipe)."""
        layers = self.student.layers
        if not isinstance(layers, LayerChoice) or layers.indices is None:
            return self
        copy = self.model_copy(deep=True)
        copy.student.layers = layers.unresolved()
        return copy

    def _key_value(self, key: str) -> Any:
        """The value of a name placeholder: a recipe key by its dotted path (or a short alias)."""
        node: Any = self
        for part in NAME_ALIASES.get(key, key).split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, BaseModel) and part in type(node).model_fields:
                node = getattr(node, part)
            else:
                raise ValueError(
                    f"name {self.name!r}: {{{key}}} is not a recipe key (use {{divergence}}, {{seed}} or a key's "
                    "path such as {loss.kd_ratio})"
                )
        return node
