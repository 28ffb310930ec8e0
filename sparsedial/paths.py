"""Where sparsedial's files are: the embedded models and the default model, one rule for every command.

`default_model()` is what `serve`, `generate` and `eval-ppl` use without `--model` (and the engine's default):
the directory in env SPARSEDIAL_MODEL when set, else the embedded elastic model when its elastic.json is
there, else the embedded dense model. The embedded models are found through the `sparsedial.models` package,
so this works from a source tree and from a wheel installed anywhere. No torch here: `import sparsedial.paths`
stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

DENSE_MODEL = "stdlib-tiny"
ELASTIC_MODEL = "stdlib-tiny-elastic"


def embedded_models_dir() -> Path:
    """The folder holding the embedded models (models/ in a checkout, sparsedial/models/ when installed)."""
    import sparsedial.models

    return Path(sparsedial.models.__file__).resolve().parent


def default_model() -> Path:
    """SPARSEDIAL_MODEL if set, else the embedded elastic model if built, else the embedded dense model."""
    env = os.environ.get("SPARSEDIAL_MODEL")
    if env:
        return Path(env)
    models = embedded_models_dir()
    elastic = models / ELASTIC_MODEL
    return elastic if (elastic / "elastic.json").is_file() else models / DENSE_MODEL
