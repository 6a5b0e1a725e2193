"""Models: the built-in teacher, resolving/loading teachers and students, the tokenizer compatibility check, the
one forward pass (`logits_of`) and the one generation service (`generate`, and `generate_file` for resumable
passes on disk) that eval, sequence-level KD and on-policy training share.

Importing this package is cheap: torch and transformers are imported only when a model is actually loaded, so
`kd --help` and recipe validation stay fast.
"""

from kdcli.models.builtin import (
    BUILTIN_MODELS,
    builtin_fingerprint,
    builtin_gguf_path,
    builtin_model_dir,
    builtin_spec,
    converted_builtin_dir,
    ensure_pad_token,
    is_builtin,
    kd_home,
)
from kdcli.models.forward import FUSED_HEAD_MODEL_TYPES, FusedHead, fused_head, logits_of, projected_logits_of
from kdcli.models.generation import (
    Generation,
    GenerationPlan,
    GenerationSettings,
    Prompt,
    encode_prompts,
    eval_mode,
    generate,
    generate_batch,
    plan_generation,
)
from kdcli.models.loading import (
    ConfigReader,
    build_student,
    check_tokenizers,
    count_parameters,
    load_config,
    load_model,
    load_teacher,
    load_tokenizer,
    parameters_of,
    resolve_model,
    student_config,
    student_tokenizer,
    vocab_fingerprint,
    weights_fingerprint,
)
from kdcli.models.lora import (
    apply_lora,
    check_targets,
    count_trainable,
    is_lora,
    merged_state_dict,
    save_adapter,
    trainable_for,
)
from kdcli.models.passes import generate_file, partial_file, read_generations
from kdcli.models.vocab import shared_vocabulary, token_bytes

__all__ = [
    "BUILTIN_MODELS",
    "FUSED_HEAD_MODEL_TYPES",
    "ConfigReader",
    "FusedHead",
    "Generation",
    "GenerationPlan",
    "GenerationSettings",
    "Prompt",
    "apply_lora",
    "build_student",
    "builtin_fingerprint",
    "builtin_gguf_path",
    "builtin_model_dir",
    "builtin_spec",
    "check_targets",
    "check_tokenizers",
    "converted_builtin_dir",
    "count_parameters",
    "count_trainable",
    "encode_prompts",
    "ensure_pad_token",
    "eval_mode",
    "fused_head",
    "generate",
    "generate_batch",
    "generate_file",
    "is_builtin",
    "is_lora",
    "kd_home",
    "load_config",
    "load_model",
    "load_teacher",
    "load_tokenizer",
    "logits_of",
    "merged_state_dict",
    "parameters_of",
    "partial_file",
    "plan_generation",
    "projected_logits_of",
    "read_generations",
    "resolve_model",
    "save_adapter",
    "shared_vocabulary",
    "student_config",
    "student_tokenizer",
    "token_bytes",
    "trainable_for",
    "vocab_fingerprint",
    "weights_fingerprint",
]
