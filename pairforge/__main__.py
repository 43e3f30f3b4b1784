"""``python -m pairforge``: the ``pairforge`` command."""

from pairforge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
