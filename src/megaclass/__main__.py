"""``python -m megaclass ...`` is the ``megaclass`` command."""

from megaclass.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
