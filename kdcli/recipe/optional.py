"""The recipe sections a run may leave out: DeepSpeed, the teacher cache's writer, teacher generation, on-policy
sampling, a teacher behind a server, a teacher of another tokenizer. Their defaults describe a run without them;
`schema.Recipe` holds one of each."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdcli.recipe.section import Section


class DeepSpeedConfig(Section):
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage: 0 (plain DDP), 1, 2 or 3 (shard the weights too).")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO 1-3).")
    offload_param: bool = Field(False, description="Keep weights in CPU memory (ZeRO-3 only).")
    bf16: bool | None = Field(None, description="bf16 weights and compute; default: follows `train.precision`.")
    gradient_clipping: float | None = Field(
        None, gt=0, description="Gradient clipping norm; default: `train.max_grad_norm`."
    )
    config: str | None = Field(
        None,
        description=(
            "Path to a raw DeepSpeed JSON config for everything else; keys kd sets must agree with it. "
            "Relative to the working directory, like `data.train`."
        ),
    )
    teacher_zero3: bool = Field(
        False,
        description="Shard the teacher over the processes with ZeRO-3 inference, for teachers too big for one device.",
    )

    @model_validator(mode="after")
    def _offload_param_needs_zero3(self) -> DeepSpeedConfig:
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("`offload_param: true` needs `zero_stage: 3`")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("`offload_optimizer: true` needs `zero_stage` 1, 2 or 3")
        return self


class CacheConfig(Section):
    top_k: int = Field(64, ge=1, description="`kd cache-teacher`: teacher log-probs kept per position.")
    logprob_dtype: Literal["fp16", "bf16"] = Field("fp16", description="Storage dtype of the top-K log-probs.")
    shard_tokens: int = Field(
        262144, ge=1, description="Tokens per cache shard (the unit of resume and of the integrity check)."
    )
    batch_size: int = Field(8, ge=1, description="Examples per teacher forward while caching.")


class GenerationConfig(Section):
    max_new_tokens: int = Field(256, ge=1, description="`data.responses: teacher`: tokens generated at most.")
    do_sample: bool = Field(True, description="Sample (true) or decode greedily (false).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1.0, description="Nucleus sampling mass; 1 disables it.")
    top_k: int = Field(0, ge=0, description="Sample from the K likeliest tokens; 0 disables it.")
    seed: int = Field(0, ge=0, description="Sampling seed (each batch is reseeded from it, so resume is exact).")
    batch_size: int = Field(8, ge=1, description="Prompts generated together.")


class OnPolicyConfig(Section):
    ratio: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description=(
            "λ: the chance that a micro-batch's responses are sampled from the current student (no gradient) and "
            "scored by the teacher online, instead of read from the data; 0: off (every batch as without this "
            "section), 1: every micro-batch. On a sampled micro-batch the divergence covers the generated tokens "
            "and CE is not applied: objective = kd_ratio x divergence there (see `docs/on-policy.md`)."
        ),
    )
    max_new_tokens: int = Field(128, ge=1, description="Tokens the student samples per prompt at most (EOS ends it).")
    temperature: float = Field(1.0, gt=0, description="The student's sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1.0, description="Nucleus sampling mass; 1 disables it.")
    top_k: int = Field(0, ge=0, description="Sample from the K likeliest tokens; 0 (or null) disables it.")
    schedule: Literal["constant", "adaptive"] = Field(
        "constant",
        description=(
            "`constant`: `ratio` throughout. `adaptive` (DistiLLM): starts at `ratio` and rises by `adaptive_step` "
            "(up to 1) after every `train.eval_every` eval whose loss is not below the previous eval's."
        ),
    )
    adaptive_step: float = Field(0.1, gt=0.0, le=1.0, description="`schedule: adaptive`: how much the ratio rises.")

    @field_validator("top_k", mode="before")
    @classmethod
    def _no_top_k(cls, top_k: Any) -> Any:
        return 0 if top_k is None else top_k

    @property
    def active(self) -> bool:
        """Whether any micro-batch can be sampled: a ratio above 0, or a schedule that may raise it."""
        return self.ratio > 0 or self.schedule == "adaptive"


class ServerConfig(Section):
    """`teacher.server`: the teacher behind vLLM (or any server of its OpenAI-compatible API with `prompt_logprobs`)."""

    url: str = Field(..., description="The server's OpenAI-compatible base URL, e.g. `http://localhost:8000/v1`.")
    model: str = Field(..., description="The served model's name (vLLM's `--served-model-name`, else its path).")
    top_k: int = Field(
        20,
        ge=1,
        description=(
            "Teacher log-probs per position, asked as `prompt_logprobs` (vLLM's `--max-logprobs` bounds it, 20 by "
            "default); also the K of `kd cache-teacher` with a server, unless `--top-k` says otherwise."
        ),
    )
    api_key_env: str | None = Field(
        None,
        description="The name of the environment variable holding the server's key, if it needs one (never the key).",
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight at most.")
    timeout: float = Field(120.0, gt=0, description="Seconds to wait for one answer.")
    retries: int = Field(
        5, ge=0, description="Retries of a request that met 429, a 5xx, a timeout or a refused connection (backoff)."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("give the server's base URL with its scheme, e.g. http://localhost:8000/v1")
        return url.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _names_a_variable(cls, name: str | None) -> str | None:
        if name is not None and not name.replace("_", "").isalnum():
            raise ValueError("name the environment variable holding the key (e.g. VLLM_API_KEY), not the key itself")
        return name


class CrossTokenizerConfig(Section):
    method: str = Field(
        ...,
        description=(
            "`uld` or `hybrid` (`kd losses` lists them): how a teacher and a student of different tokenizers are "
            "compared, at the positions that have read the same text (docs/methods.md, 'Across tokenizers')."
        ),
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of the method, e.g. `{top_k: 64}`; defaults in `kd losses`."
    )

    @field_validator("method")
    @classmethod
    def _method_exists(cls, method: str) -> str:
        from kdcli.losses import get_cross_tokenizer  # local: keeps schema import light

        get_cross_tokenizer(method)  # raises ValueError naming the valid choices
        return method

    @model_validator(mode="after")
    def _params_exist(self) -> CrossTokenizerConfig:
        from kdcli.losses import get_cross_tokenizer

        get_cross_tokenizer(self.method, **self.params)
        return self
