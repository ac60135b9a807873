"""Experiments run from a checkout of this repository, beside the ``m3i`` package and not installed with it.

Each one is a folder run as a module from the repository root, e.g. ``python -m experiments.ablation``.
An experiment may import anything in ``m3i``; nothing in ``m3i`` imports an experiment.
"""
