"""One rule for the default model (sparsedial.paths), used by the CLI and the server settings; and the source
tree importing without any install (scripts/source_env.sh)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedial import paths

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("engine", "server", "compress", "kernels", "clients", "models")

# Run first in a `python -I` child: drops the editable install's finders and path entries (its .pth has
# already run), so only the sys.path built here can provide sparsedial.
NO_EDITABLE = """\
import sys
assert "sparsedial" not in sys.modules, "sparsedial imported before the test code"
def _editable(x):
    return "__editable__" in (getattr(x, "__module__", "") or "") + repr(x)
sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not _editable(h)]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
"""

IMPORT_ALL = f"""\
import importlib, json
import sparsedial, sparsedial.paths
torch = "torch" in sys.modules
mods = {{n: importlib.import_module("sparsedial." + n).__file__ for n in {SUBPACKAGES!r}}}
print(json.dumps({{"torch": torch, "mods": mods, "default": str(sparsedial.paths.default_model()),
                  "finders": [repr(f) for f in sys.meta_path if _editable(f)]}}))
"""


def _run_isolated(path_entry: str, tmp_path: Path) -> dict:
    code = NO_EDITABLE + f"sys.path.insert(0, {path_entry!r})\n" + IMPORT_ALL
    r = subprocess.run([sys.executable, "-I", "-c", code], check=False, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check_source_tree(out: dict) -> None:
    assert out["finders"] == []
    assert out["torch"] is False  # `import sparsedial` and `sparsedial.paths` load no torch
    for name, file in out["mods"].items():
        assert file == str(ROOT / name / "__init__.py"), (name, file)
    assert out["default"] == str(ROOT / "models" / "stdlib-tiny-elastic")


def test_source_tree_imports_without_install(tmp_path):
    """The checkout's root on sys.path, nothing installed: each subpackage comes from its top-level folder."""
    _check_source_tree(_run_isolated(str(ROOT), tmp_path))


def test_source_env_script(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "source_env.sh")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=30, check=True)
    _check_source_tree(_run_isolated(r.stdout.strip(), tmp_path))


def test_default_model_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARSEDIAL_MODEL", raising=False)
    assert paths.embedded_models_dir() == (ROOT / "models").resolve()
    assert paths.default_model() == paths.embedded_models_dir() / "stdlib-tiny-elastic"
    monkeypatch.setenv("SPARSEDIAL_MODEL", str(tmp_path / "mine"))
    assert paths.default_model() == tmp_path / "mine"
    monkeypatch.setenv("SPARSEDIAL_MODEL", "")  # empty counts as unset
    assert paths.default_model().name == "stdlib-tiny-elastic"
    # an embedded elastic folder without elastic.json (not built): the dense model
    (tmp_path / "stdlib-tiny-elastic").mkdir()
    (tmp_path / "stdlib-tiny").mkdir()
    monkeypatch.setattr(paths, "embedded_models_dir", lambda: tmp_path)
    assert paths.default_model() == tmp_path / "stdlib-tiny"
    (tmp_path / "stdlib-tiny-elastic" / "elastic.json").write_text("{}")
    assert paths.default_model() == tmp_path / "stdlib-tiny-elastic"


@pytest.mark.parametrize("env", [None, "mine"])
def test_cli_and_settings_use_the_rule(monkeypatch, tmp_path, env):
    from sparsedial.server.settings import ServerSettings

    from sparsedial.cli import build_parser

    if env is None:
        monkeypatch.delenv("SPARSEDIAL_MODEL", raising=False)
        want = ROOT.resolve() / "models" / "stdlib-tiny-elastic"
    else:
        want = tmp_path / env
        monkeypatch.setenv("SPARSEDIAL_MODEL", str(want))
    assert paths.default_model() == want
    assert ServerSettings().model == want
    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt", "x"]).model == want
    assert parser.parse_args(["eval-ppl"]).model == want
    assert parser.parse_args(["serve"]).model is None  # serve leaves it to ServerSettings (above)
    with pytest.raises(SystemExit):  # compress still needs --model
        parser.parse_args(["compress", "--out", str(tmp_path / "o")])
