"""Server settings: the one source of defaults for `sparsedial serve`, the app factory and the env.

Every field reads from an environment variable `SPARSEDIAL_<FIELD>` (e.g. `SPARSEDIAL_PORT=9000`,
`SPARSEDIAL_ADMIN_TOKEN=...`); the CLI builds a `ServerSettings` from its options and never restates a default.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sparsedial.paths import default_model

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
TIER_SYNTAX = re.compile(r"dense|auto|\d+:\d+|\d+(\.\d+)?%|0?\.\d+|[01](\.0*)?")


class ServerSettings(BaseSettings):
    """Settings of one sparsedial server process."""

    model_config = SettingsConfigDict(env_prefix="SPARSEDIAL_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to bind; loopback by default, 0.0.0.0 in containers.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 picks a free port).")
    model: Path = Field(default_factory=default_model,
                        description="Model directory: an elastic checkpoint or a plain HF model directory. "
                                    "Default (sparsedial.paths.default_model): the embedded "
                                    "stdlib-tiny-elastic if built, else the embedded stdlib-tiny.")
    served_model_name: str | None = Field(None, description="Model id shown by /v1/models and expected in "
                                                            "requests; default: the engine's model name.")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (CUDA when available).")
    dtype: str = Field("auto", description="auto, float32, float16 or bfloat16 (auto: fp32 on CPU, bf16 on CUDA).")
    backend: str = Field("auto", description="Sparse backend: auto (triton on CUDA, else torch), torch or triton.")
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
    max_waiting: int | None = Field(None, ge=1, description="Waiting-queue limit before 429; None keeps the "
                                                            "engine's default.")
    max_running: int | None = Field(None, ge=1, description="Requests decoded at once (KV slots, the engine's "
                                                            "max_batch); None keeps the engine's default.")
    disconnect_poll_s: float = Field(0.1, gt=0, description="How often a non-streaming request checks whether "
                                                            "its client has gone (then it is cancelled).")
    log_level: str = Field("info", description="uvicorn log level: critical, error, warning, info, debug, trace.")
    allow_external_base: bool = Field(False, description="Let an elastic checkpoint's base weights lie outside "
                                                         "its parent folder (off: a checkpoint from elsewhere "
                                                         "cannot make the server read arbitrary files).")

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
        if not isinstance(v, str) or not TIER_SYNTAX.fullmatch(v.strip()):
            raise ValueError(f"default_tier must be dense, auto, N:M, <n>% or a fraction, got {v!r}")
        return v.strip()

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, v: str) -> str:
        if v.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {v!r}")
        return v.lower()

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, v: str) -> str:
        allowed = ("auto", "float32", "float16", "bfloat16")
        if v not in allowed:
            raise ValueError(f"dtype must be one of {', '.join(allowed)}, got {v!r}")
        return v

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, v: str) -> str:
        if v not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be auto, torch or triton, got {v!r}")
        return v

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
