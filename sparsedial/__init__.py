"""sparsedial: serve one elastic sparse LLM at many sparsity tiers."""

from pathlib import Path as _Path

__version__ = "0.1.0"


def _source_tree_root() -> _Path | None:
    """The repository root when this package runs from a source checkout, else None.

    In the checkout the subpackages are top-level folders (engine/, server/, compress/, kernels/, clients/,
    models/) next to this sparsedial/ folder; a wheel or an editable install puts them (or a finder for them)
    under sparsedial/ itself. The checks keep an unrelated `engine` package in site-packages from counting.
    """
    here = _Path(__file__).resolve().parent
    root = here.parent
    if (here / "engine").is_dir() or not (root / "pyproject.toml").is_file():
        return None
    if all((root / d / "__init__.py").is_file() for d in ("engine", "server", "clients")):
        return root
    return None


_root = _source_tree_root()
if _root is not None and str(_root) not in __path__:
    # `import sparsedial.engine` etc. from a source tree with only its root on sys.path (no install): the
    # folders become subpackages; harmless next to an editable install, which maps the same folders.
    __path__.append(str(_root))
del _root
