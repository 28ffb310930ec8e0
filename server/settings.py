"""Server settings: the one source of defaults for `sparsedial serve`, the app factory and the env.

Every field reads from an environment variable `SPARSEDIAL_<FIELD>` (e.g. `SPARSEDIAL_PORT=9000`,
`SPARSEDIAL_ADMIN_TOKEN=...`); the CLI builds a `ServerSettings` from its options and never restates a default.
The engine's own settings (model, device, dtype, backend, max_running, max_waiting, allow_external_base) take
their default and description from `EngineConfig` (engine/options.py), where each is documented once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sparsedial.engine.options import Backend, DType, default_of, doc_of
from sparsedial.engine.tiers import looks_like_tier

from sparsedial.paths import default_model

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class ServerSettings(BaseSettings):
    """Settings of one sparsedial server process."""

    model_config = SettingsConfigDict(env_prefix="SPARSEDIAL_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to bind; loopback by default, 0.0.0.0 in containers.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 picks a free port).")
    model: Path = Field(default_factory=default_model, description=doc_of("model"))
    served_model_name: str | None = Field(None, description="Model id shown by /v1/models and expected in "
                                                            "requests; default: the engine's model name.")
    device: str = Field(default_of("device"), description=doc_of("device"))
    dtype: DType = Field(default_of("dtype"), description=doc_of("dtype"))
    backend: Backend = Field(default_of("backend"), description=doc_of("backend"))
    admin_token: SecretStr | None = Field(None, description="Bearer token for /admin/*; unset disables the "
                                                            "admin routes (403).")
    api_key: SecretStr | None = Field(None, description="Bearer token required on /generate, /v1/*, /tokenize and "
                                                        "/detokenize (as vLLM's --api-key); unset: open. /health, "
                                                        "/metrics and the playground stay open.")
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Browser origins allowed by CORS (e.g. "
                                                                         "http://localhost:3000, or *); "
                                                                         "comma-separated in the env. Empty: "
                                                                         "no CORS headers.")
    default_tier: str | None = Field(None, description="Initial default tier for `auto` requests; None keeps "
                                                       "the engine's own default.")
    max_waiting: int = Field(default_of("max_waiting"), ge=1, description=doc_of("max_waiting"))
    max_running: int = Field(default_of("max_batch"), ge=1, description=doc_of("max_batch") + " (the engine's "
                                                                                      "max_batch)")
    disconnect_poll_s: float = Field(0.1, gt=0, description="How often a non-streaming request checks whether "
                                                            "its client has gone (then it is cancelled).")
    log_level: str = Field("info", description="uvicorn log level: critical, error, warning, info, debug, trace.")
    allow_external_base: bool = Field(default_of("allow_external_base"), description=doc_of("allow_external_base"))

    # --- input limits: one request must not be able to slow down or starve the others ---
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="Largest request body accepted (bytes); "
                                                                "larger ones get 413 before being parsed.")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Most tokens in one prompt; None: the model's "
                                                                   "context (prompt + max_tokens must fit it "
                                                                   "either way).")
    max_stop_sequences: int = Field(16, ge=0, description="Most `stop` strings per request (OpenAI allows 4); "
                                                          "each is searched after every token.")
    max_stop_length: int = Field(256, ge=1, description="Longest `stop` string (characters).")
    max_n: int = Field(16, ge=1, description="Most choices (`n`) per request; each takes a KV slot.")
    max_logprobs: int = Field(20, ge=0, le=20, description="Most top alternatives (`logprobs`, "
                                                           "`top_logprobs`) per token.")

    @field_validator("default_tier", mode="before")
    @classmethod
    def _check_default_tier(cls, v: object) -> object:
        """Syntax only (whether the model serves it is known after loading): an empty value means unset, as
        SPARSEDIAL_DEFAULT_TIER= in a compose file."""
        if v is None or isinstance(v, str) and not v.strip():
            return None
        if not looks_like_tier(v):
            raise ValueError(f"default_tier must be dense, auto, N:M, <n>% or a fraction, got {v!r}")
        return v.strip()

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, v: str) -> str:
        if v.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {v!r}")
        return v.lower()

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: object) -> object:
        if isinstance(v, str):  # SPARSEDIAL_ALLOWED_ORIGINS=http://a,http://b, or a JSON list
            if v.strip().startswith("["):
                return json.loads(v)
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("api_key", "admin_token")
    @classmethod
    def _check_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value():
            return None  # SPARSEDIAL_ADMIN_TOKEN="" means "no token", i.e. admin disabled
        return v
