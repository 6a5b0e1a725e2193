"""Models: the built-in teacher, resolving/loading teachers and students, and the tokenizer compatibility check.

Importing this package is cheap: torch and transformers are imported only when a model is actually loaded, so
`kd --help` and recipe validation stay fast.
"""

from kdcli.models.builtin import (
    BUILTIN_MODELS,
    builtin_fingerprint,
    builtin_gguf_path,
    builtin_model_dir,
    ensure_pad_token,
    is_builtin,
    kd_home,
)
from kdcli.models.forward import logits_of
from kdcli.models.loading import (
    build_student,
    check_tokenizers,
    count_parameters,
    load_config,
    load_teacher,
    load_tokenizer,
    resolve_model,
    vocab_fingerprint,
)

__all__ = [
    "BUILTIN_MODELS",
    "build_student",
    "builtin_fingerprint",
    "builtin_gguf_path",
    "builtin_model_dir",
    "check_tokenizers",
    "count_parameters",
    "ensure_pad_token",
    "is_builtin",
    "kd_home",
    "load_config",
    "load_teacher",
    "load_tokenizer",
    "logits_of",
    "resolve_model",
    "vocab_fingerprint",
]
