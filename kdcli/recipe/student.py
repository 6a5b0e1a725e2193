"""The recipe's `student` section: how the student is made (`init`), which teacher layers it keeps (`layers`) and
whether only LoRA adapters train (`lora`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from kdcli.recipe.section import Section


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank: each adapted weight W gains B·A with A r×in and B out×r.")
    alpha: float = Field(32.0, gt=0, description="LoRA scale numerator: the update is (alpha / r)·B·A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description=(
            "Names of the student's linear layers that get adapters (the last part of the module name, e.g. "
            "`q_proj`, `k_proj`, `o_proj`, `up_proj`); checked against the student before training."
        ),
    )

    @field_validator("target_modules")
    @classmethod
    def _targets_are_named(cls, targets: list[str]) -> list[str]:
        if not targets:
            raise ValueError("name at least one module, e.g. [q_proj, v_proj]")
        if len(set(targets)) != len(targets):
            raise ValueError("list each module once")
        return targets


class LayerChoice(Section):
    """`student.layers: {keep: N, by: loss}`: keep the N teacher layers that score highest on the teacher itself."""

    keep: int = Field(..., ge=1, description="How many of the teacher's layers the student keeps (fewer than all).")
    by: Literal["loss", "influence"] = Field(
        "loss",
        description=(
            "How a layer is scored, on the teacher before the student is built (docs/methods.md#layer-choice): `loss` "
            "(Minitron's depth score: the teacher's CE on the response tokens with that one layer skipped) or "
            "`influence` (ShortGPT's block influence, 1 - cos(h_in, h_out), averaged over response tokens)."
        ),
    )
    examples: int = Field(8, ge=1, description="The first N training examples the teacher is scored on.")
    indices: list[int] | None = Field(
        None,
        description=(
            "The kept layers, written by kd into the run folder's recipe.yaml once scored. Given, they are used as "
            "they are (nothing is scored), so a run repeats exactly."
        ),
    )

    @field_validator("indices")
    @classmethod
    def _indices_are_sorted_unique(cls, indices: list[int] | None) -> list[int] | None:
        return None if indices is None else _sorted_unique(indices)

    @model_validator(mode="after")
    def _indices_match_keep(self) -> LayerChoice:
        if self.indices is not None and len(self.indices) != self.keep:
            raise ValueError(f"indices: lists {len(self.indices)} layers but keep is {self.keep}")
        return self

    def unresolved(self) -> LayerChoice:
        """The choice as a recipe asks for it, without the indices kd resolved."""
        return self.model_copy(update={"indices": None})


def _sorted_unique(layers: list[int]) -> list[int]:
    if not layers:
        raise ValueError("give at least one layer index")
    if any(i < 0 for i in layers):
        raise ValueError("layer indices start at 0")
    if sorted(set(layers)) != layers:
        raise ValueError("list layer indices in increasing order, without repeats")
    return layers


def _layers_form(value: Any) -> str:
    """Which form of `student.layers` a value is, so that an error speaks of that form only (pydantic's tags
    carry brackets, which the recipe loader leaves out of the key it names)."""
    if isinstance(value, dict | LayerChoice):
        return "choice[keep, by]"
    return "list[int]" if isinstance(value, list) else "name[every-other, all]"


LayersSpec = Annotated[
    Annotated[Literal["every-other", "all"], Tag("name[every-other, all]")]
    | Annotated[list[int], Tag("list[int]")]
    | Annotated[LayerChoice, Tag("choice[keep, by]")],
    Discriminator(_layers_form),
]


class StudentConfig(Section):
    init: Literal["pretrained", "teacher", "random"] = Field(
        "teacher",
        description=(
            "`pretrained`: load `model` as it is. `teacher`: a layer-pruned copy of the teacher (see `layers`). "
            "`random`: fresh weights from the config of `model` (default: the teacher's) with `overrides`."
        ),
    )
    model: str | None = Field(
        None, description="Hugging Face id, local folder or builtin model. Required for `init: pretrained`."
    )
    layers: LayersSpec = Field(
        "every-other",
        description=(
            "With `init: teacher`: which teacher layers the student keeps. `{keep: N, by: loss}` scores every layer on "
            "the teacher and keeps the N that matter most (printed, and recorded in the run folder); `every-other` "
            "(layers 0, 2, 4, ...); `all`; or a list of layer indices."
        ),
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="With `init: random`: config fields to change, e.g. `{num_hidden_layers: 4, hidden_size: 256}`.",
    )
    lora: LoraConfig | None = Field(
        None,
        description=(
            "Train LoRA adapters (through `peft`) instead of every weight, on any `init`: e.g. "
            "`{r: 16, alpha: 32, target_modules: [q_proj, v_proj]}`. The run saves `student/` merged and `adapter/`."
        ),
    )

    @field_validator("layers")
    @classmethod
    def _layers_are_sorted_unique(cls, layers: Any) -> Any:
        return _sorted_unique(layers) if isinstance(layers, list) else layers

    @model_validator(mode="after")
    def _init_has_what_it_needs(self) -> StudentConfig:
        if self.init == "pretrained" and not self.model:
            raise ValueError("`init: pretrained` needs `student.model` (a Hugging Face id, folder or builtin)")
        if self.init != "random" and self.overrides:
            raise ValueError("`student.overrides` applies only with `init: random`")
        return self
