"""``python -m lcfed``: see :mod:`lcfed.ops.cli`."""

from lcfed.ops.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
