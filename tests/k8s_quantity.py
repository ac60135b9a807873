"""A regular expression for "a Kubernetes memory quantity of at most N bytes", built from N.

JSON schema has no arithmetic, so the Helm chart bounds ``launch.memory`` and
``launch.shmSize`` with a pattern: the mantissa, per unit suffix, at most N / unit (leading
zeros and a decimal fraction allowed, as :func:`m3i.config.launch.quantity_bytes` reads
them). The chart's values.schema.json holds the output of :func:`quantity_at_most` for
``N = 2**50`` (1Pi, m3i launch's bound), and tests/test_faults_helm.py checks both that it is
this output and that it agrees with ``quantity_bytes`` on the boundaries.
"""

from __future__ import annotations

from fractions import Fraction

__all__ = ["UNITS", "quantity_at_most"]

UNITS = {"": 1, "k": 10**3, "Ki": 2**10, "M": 10**6, "Mi": 2**20, "G": 10**9, "Gi": 2**30, "T": 10**12,
         "Ti": 2**40, "P": 10**15, "Pi": 2**50, "E": 10**18, "Ei": 2**60}
"""The suffixes of m3i.config.launch._QUANTITY and their multipliers."""


def _int_at_most(n: int) -> str:
    """Digits without leading zeros (or ``0``) of a value at most ``n`` (``n >= 0``)."""
    s = str(n)
    alts = [] if len(s) == 1 else ["[0-9]"] if len(s) == 2 else [f"[1-9][0-9]{{0,{len(s) - 2}}}", "[0-9]"]
    for i, d in enumerate(s):
        lo, hi = (1 if i == 0 and len(s) > 1 else 0), int(d) - 1
        if hi >= lo:
            rest = len(s) - i - 1
            tail = "" if rest == 0 else "[0-9]" if rest == 1 else f"[0-9]{{{rest}}}"
            alts.append(s[:i] + (str(lo) if hi == lo else f"[{lo}-{hi}]") + tail)
    alts.append(s)
    return "(" + "|".join(alts) + ")"


def _fraction_at_most(f: str) -> str:
    """Digits ``d`` after a decimal point with ``0.d <= 0.f``."""
    alts = [f[:i] for i in range(1, len(f))]
    for i, d in enumerate(f):
        if d != "0":
            alts.append(f[:i] + ("0" if d == "1" else f"[0-{int(d) - 1}]") + "[0-9]*")
    alts.append(f + "0*")
    return "(" + "|".join(alts) + ")"


def _mantissa_at_most(limit: Fraction) -> str:
    whole = limit.numerator // limit.denominator
    rest = limit - whole
    alts = [f"0*{_int_at_most(whole - 1)}(\\.[0-9]+)?"] if whole >= 1 else []
    if rest == 0:
        alts.append(f"0*{whole}(\\.0+)?")
    else:
        digits = ""
        while rest:  # every limit here is N / 10**k or N / 2**k: a finite decimal
            rest *= 10
            digits += str(rest.numerator // rest.denominator)
            rest -= rest.numerator // rest.denominator
        alts.append(f"0*{whole}(\\.{_fraction_at_most(digits)})?")
    return "|".join(alts)


def quantity_at_most(max_bytes: int) -> str:
    """An anchored pattern (Python ``re`` and Go RE2 alike) for quantities of at most ``max_bytes`` bytes."""
    return "^(" + "|".join(f"({_mantissa_at_most(Fraction(max_bytes, mult))}){unit}" for unit, mult in UNITS.items()) + ")$"
