"""The wheels as a user gets them: what the main wheel carries, a wheel install that serves from /tmp, and the
client distribution working without torch (against that server).

Both wheels are built once per module from a hard-linked copy of the checkout (so nothing is written into the
tree and stale build/ or *.egg-info folders cannot leak in), with the venv's setuptools (no build isolation:
no network needed). The copy includes the git-ignored folders under models/ (plus a decoy one) to prove the
wheel leaves them out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import httpx
import pytest

import sparsedial

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ("stdlib-tiny", "stdlib-tiny-elastic")
# never copied into the build tree: VCS, environments, caches, build outputs
SKIP = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
        "runs", "data", ".whl", ".carry"}
# the server's dependencies must not be needed by the client distribution
HEAVY = ("torch", "transformers", "fastapi", "starlette", "uvicorn", "numpy", "safetensors", "sparsedial")


def _link_tree(src: Path, dst: Path) -> None:
    """Copy src to dst with hard links where possible (same file system), keeping symlinks as links."""
    def copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, symlinks=True, copy_function=copy,
                    ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])


def _pip(*args: str, cwd: Path | None = None) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    r = subprocess.run([sys.executable, "-m", "pip", *args], check=False, cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"pip {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def _build(project: Path, out: Path) -> Path:
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", str(project), "-w", str(out))
    (wheel,) = out.glob("*.whl")
    return wheel


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that points at the checkout or picks a model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARSEDIAL_", "PYTHON"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="module")
def wheel(work) -> Path:
    src = work / "src"
    _link_tree(ROOT, src)
    # decoys: a git-ignored model folder and a loose file, as `make smollm2` or a user would leave them
    (src / "models" / "not-embedded").mkdir()
    (src / "models" / "not-embedded" / "model.safetensors").write_bytes(b"\0" * 1024)
    (src / "models" / "notes.txt").write_text("not package data\n")
    return _build(src, work / "wheel")


@pytest.fixture(scope="module")
def client_wheel(work) -> Path:
    src = work / "client-src"
    src.mkdir()
    for name in ("dist-client", "clients"):  # the distribution's links point at its siblings
        shutil.copytree(ROOT / name, src / name, symlinks=True,
                        ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
    shutil.copy2(ROOT / "LICENSE", src / "LICENSE")
    return _build(src / "dist-client", work / "client-wheel")


@pytest.fixture(scope="module")
def target(work, wheel) -> Path:
    t = work / "site"
    _pip("install", "--no-deps", "--no-compile", "-q", "--target", str(t), str(wheel))
    return t


@pytest.fixture(scope="module")
def server(work, target):
    """`python -m sparsedial.cli serve` from the wheel install, cwd in /tmp, PYTHONPATH = the target only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cwd = work / "cwd"
    cwd.mkdir()
    log = (work / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "sparsedial.cli", "serve", "--host", "127.0.0.1", "--port",
                             str(port), "--device", "cpu", "--log-level", "warning"], cwd=cwd,
                            env=_clean_env(PYTHONPATH=str(target)), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                r = httpx.get(url + "/health", timeout=2)
                if r.status_code == 200 and r.json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"/health not ok after 120 s:\n{log.read()[-3000:]}")
            time.sleep(0.25)
        log.seek(0)
        yield url, r.json(), log.read()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _names(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        return z.namelist()


def test_wheel_carries_the_embedded_models_and_nothing_ignored(wheel):
    names = _names(wheel)
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"sparsedial", "sparsedial-0.1.0.dist-info"}, tops  # no tests/, benchmarks/, models/ ...
    for folder in EMBEDDED:  # every file of both folders, at sibling paths (elastic.json: ../stdlib-tiny/)
        files = [p for p in (ROOT / "models" / folder).iterdir() if p.is_file()]
        want = {f"sparsedial/models/{folder}/{p.name}" for p in files}
        assert want and want <= set(names), sorted(want - set(names))
    models = [n for n in names if n.startswith("sparsedial/models/")]
    assert all(n == "sparsedial/models/__init__.py" or n.split("/")[2] in EMBEDDED for n in models), models
    assert not [n for n in names if "smollm2" in n or "not-embedded" in n or "notes.txt" in n]
    with zipfile.ZipFile(wheel) as z:
        size = sum(i.file_size for i in z.infolist() if i.filename.startswith("sparsedial/models/"))
        elastic = json.loads(z.read("sparsedial/models/stdlib-tiny-elastic/elastic.json"))
    assert 35e6 < size < 50e6, size  # about 42 MB
    assert elastic["base_weights"] == "../stdlib-tiny/model.safetensors"


def test_wheel_has_code_markers_and_license(wheel):
    names = set(_names(wheel))
    for f in ("sparsedial/__init__.py", "sparsedial/paths.py", "sparsedial/cli.py",
              "sparsedial/engine/runner.py", "sparsedial/server/app.py", "sparsedial/clients/_client.py",
              "sparsedial/kernels/__init__.py", "sparsedial/kernels/cpu/ext.cpp", "sparsedial/kernels/cpu/impl.h",
              "sparsedial/compress/__init__.py", "sparsedial/server/playground/index.html",
              "sparsedial/py.typed", "sparsedial/clients/py.typed"):
        assert f in names, f
    assert "sparsedial-0.1.0.dist-info/licenses/LICENSE" in names
    with zipfile.ZipFile(wheel) as z:
        meta = z.read("sparsedial-0.1.0.dist-info/METADATA").decode()
        license_text = z.read("sparsedial-0.1.0.dist-info/licenses/LICENSE").decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and "the sparsedial authors" in license_text


def test_installed_wheel_finds_its_own_models_without_torch(work, target):
    """From the target alone: the package, its subpackages and default_model() all live inside it."""
    code = (
        "import json, sys\n"
        "import sparsedial, sparsedial.paths as p\n"
        "torch_before = 'torch' in sys.modules\n"
        "d = p.default_model()\n"
        "import sparsedial.engine, sparsedial.server, sparsedial.models\n"
        "mods = (sparsedial, sparsedial.engine, sparsedial.server, sparsedial.models)\n"
        "print(json.dumps({'torch': torch_before, 'default': str(d),\n"
        "  'models': str(p.embedded_models_dir()),\n"
        "  'files': [m.__file__ for m in mods],\n"
        "  'path': list(sparsedial.__path__)}))\n")
    (work / "cwd-import").mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, "-c", code], check=False, cwd=work / "cwd-import",
                       capture_output=True, text=True, env=_clean_env(PYTHONPATH=str(target)), timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    t = str(target.resolve())
    assert out["torch"] is False  # import sparsedial / sparsedial.paths stay free of torch
    assert out["default"] == f"{t}/sparsedial/models/stdlib-tiny-elastic"
    assert out["models"] == f"{t}/sparsedial/models"
    assert all(f.startswith(t + "/") for f in out["files"]), out["files"]
    assert out["path"] == [f"{t}/sparsedial"]  # no source-tree extension in an install


def test_wheel_install_serves_from_tmp(server, target):
    url, health, log = server
    assert health["model"] == "stdlib-tiny-elastic" and "dense" in health["tiers"]
    assert f"serving {target.resolve()}/sparsedial/models/stdlib-tiny-elastic" in log
    r = httpx.post(url + "/generate", json={"prompt": "def ", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["text"], str) and body["text"] and body["usage"]["completion_tokens"] >= 1


def _closure(requires: list[str]) -> set[str]:
    """Installed distributions needed by `requires` (markers other than extras are taken as true)."""
    seen: set[str] = set()
    todo = [r for r in requires if "extra ==" not in r]
    while todo:
        name = re.match(r"[A-Za-z0-9._-]+", todo.pop()).group(0).lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # e.g. exceptiongroup on Python >= 3.11: not needed
        seen.add(name)
        todo += [r for r in dist.requires or () if "extra ==" not in r]
    return seen


def _top_level(name: str) -> set[str]:
    dist = metadata.distribution(name)
    tops = set()
    for f in dist.files or ():
        head = f.parts[0]
        if head.endswith((".dist-info", ".data", ".pth")) or head in ("..", "__pycache__"):
            continue
        tops.add(head)
    return tops


def test_client_distribution_builds_with_only_httpx_and_pydantic(client_wheel, wheel):
    names = _names(client_wheel)
    assert {n.split("/", 1)[0] for n in names} == {"sparsedial_client", "sparsedial_client-0.1.0.dist-info"}
    assert {"sparsedial_client/__init__.py", "sparsedial_client/_client.py", "sparsedial_client/types.py",
            "sparsedial_client/py.typed", "sparsedial_client-0.1.0.dist-info/licenses/LICENSE"} <= set(names)
    with zipfile.ZipFile(client_wheel) as z:
        meta = z.read("sparsedial_client-0.1.0.dist-info/METADATA").decode()
    requires = sorted(re.match(r"[\w.-]+", line.split(":", 1)[1].strip()).group(0)
                      for line in meta.splitlines() if line.startswith("Requires-Dist:"))
    assert requires == ["httpx", "pydantic"], requires
    # no file owned by both distributions: installing or uninstalling one never touches the other
    assert not set(_names(wheel)) & set(names)


def test_versions_agree():
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    client = tomllib.loads((ROOT / "dist-client" / "pyproject.toml").read_text())["project"]["version"]
    assert main == client == sparsedial.__version__


def test_client_works_without_torch(work, client_wheel, server):
    """The client wheel installed alone next to httpx, pydantic and their dependencies (linked from this
    venv), with no site-packages: torch and the server stack are not even importable. It talks to the wheel's
    server."""
    t = work / "client-site"
    _pip("install", "--no-deps", "--no-compile", "-q", "--target", str(t), str(client_wheel))
    deps = work / "client-deps"
    deps.mkdir()
    for dist in _closure(["httpx", "pydantic"]):
        for top in _top_level(dist):
            src = Path(metadata.distribution(dist).locate_file(top))
            if src.exists() and not (deps / top).exists():
                (deps / top).symlink_to(src)
    assert {"httpx", "pydantic", "pydantic_core", "anyio"} <= {p.name for p in deps.iterdir()}
    url = server[0]
    code = (
        "import importlib.util, json, sys\n"
        f"blocked = [m for m in {HEAVY!r} if importlib.util.find_spec(m) is not None]\n"
        "import sparsedial_client\n"
        "from sparsedial_client import SparseDial\n"
        "from sparsedial_client.types import GenerateResponse\n"
        "with SparseDial(base_url=sys.argv[1]) as c:\n"
        "    r = c.generate(prompt='def ', max_tokens=3)\n"
        "assert isinstance(r, GenerateResponse)\n"
        "print(json.dumps({'blocked': blocked, 'file': sparsedial_client.__file__, 'text': r.text,\n"
        f"                  'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))\n")
    r = subprocess.run([sys.executable, "-S", "-P", "-c", code, url], check=False, cwd=work,
                       capture_output=True, text=True, timeout=60,
                       env=_clean_env(PYTHONPATH=f"{t}{os.pathsep}{deps}"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["blocked"] == [] and out["loaded"] == []
    assert out["file"].startswith(str(t)) and out["text"]
