"""``python -m megaclass ...`` is the ``megaclass`` command."""

from megaclass.cli import run

if __name__ == "__main__":
    run()
