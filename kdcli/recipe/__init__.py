"""Recipes: the YAML schema, loading with `--set` overrides, and rendering."""

from kdcli.recipe.load import load_recipe, parse_set, validate_recipe
from kdcli.recipe.schema import (
    BUILTIN_DATA,
    BUILTIN_MODEL,
    DataConfig,
    LossConfig,
    Recipe,
    TeacherConfig,
    TrainConfig,
)
from kdcli.recipe.student import LayerChoice, LoraConfig, StudentConfig

__all__ = [
    "BUILTIN_DATA",
    "BUILTIN_MODEL",
    "DataConfig",
    "LayerChoice",
    "LoraConfig",
    "LossConfig",
    "Recipe",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "load_recipe",
    "parse_set",
    "validate_recipe",
]
