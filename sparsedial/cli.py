"""The `sparsedial` command line."""

import sys


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("sparsedial: no subcommands yet")


if __name__ == "__main__":
    sys.exit(main())
