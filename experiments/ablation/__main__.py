"""``python -m experiments.ablation``: see :mod:`experiments.ablation` and ``--help``."""

from experiments.ablation.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
