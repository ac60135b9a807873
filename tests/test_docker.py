"""docker/: both images lint clean (hadolint, checkov) and keep the promises the rest of m3i
relies on: the pod policy's user and writable folders, the `m3i` entrypoint, the pins of
pyproject.toml and the Makefile, pinned base images, revision metadata and a small context.

No Docker engine runs here: the Dockerfiles are linted and parsed, never built
(docs/images.md says how to build and verify them).
"""

from __future__ import annotations

import json
import posixpath
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from m3i import __version__
from m3i.config.launch import LaunchConfig
from m3i.launch.torchx_app import train_env
from tests.k8s_tools import ROOT, checkov_failures, tool, tool_env

DOCKERFILES = {"train": ROOT / "docker" / "Dockerfile.train", "cpu": ROOT / "docker" / "Dockerfile"}
TRAIN_IMAGE = "ghcr.io/m3i-project/m3i-train"
PINNED = ("torch", "torchvision", "deepspeed", "timm")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
OCI_LABELS = ("source", "version", "revision", "licenses")

# checkov check id -> why it does not apply. None so far: HEALTHCHECK NONE satisfies CKV_DOCKER_2.
CHECKOV_SKIPS: dict[str, str] = {}


@dataclass(frozen=True)
class Instruction:
    line: int
    """1-based line the instruction starts on."""
    keyword: str
    """Upper-case instruction, e.g. ``RUN``."""
    args: str
    """Everything after the keyword, continuation lines joined with single spaces."""


def parse(path: Path) -> list[list[Instruction]]:
    """The instructions of a Dockerfile, one list per stage (anything before the first FROM
    goes with the first stage). Comment and blank lines are dropped, even inside a
    continuation, as Docker does."""
    stages: list[list[Instruction]] = [[]]
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not buf:
            start = n
        buf.append(line[:-1].strip() if line.endswith("\\") else line)
        if line.endswith("\\"):
            continue
        keyword, _, args = " ".join(buf).partition(" ")
        buf = []
        ins = Instruction(start, keyword.upper(), args.strip())
        if ins.keyword == "FROM" and stages[-1] and any(i.keyword == "FROM" for i in stages[-1]):
            stages.append([])
        stages[-1].append(ins)
    assert not buf, f"{path}: a continuation runs past the end of the file"
    return stages


def final_stage(name: str) -> list[Instruction]:
    return parse(DOCKERFILES[name])[-1]


def all_instructions(name: str) -> list[Instruction]:
    return [i for stage in parse(DOCKERFILES[name]) for i in stage]


def pins(text: str, package: str) -> list[str]:
    """Every ``package==VERSION`` in ``text`` (``torch`` does not match ``torchvision==``)."""
    return re.findall(rf"(?<![\w.-]){re.escape(package)}==([^\s\"'\\]+)", text)


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def pyproject_pins() -> dict[str, str]:
    out = {}
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", dep.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def makefile_torchx() -> list[str]:
    """The Makefile's TORCHX variable, continuation lines joined."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    m = re.search(r"^TORCHX\s*:?=\s*(.+)$", text, re.M)
    assert m, "the Makefile has no TORCHX variable"
    return m.group(1).split()


def _key_values(stage: list[Instruction], keyword: str, pattern: str) -> dict[str, str]:
    """``KEY=VALUE`` pairs of every ``keyword`` instruction of a stage, later ones win, quotes stripped."""
    out: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == keyword:
            for key, value in re.findall(pattern, ins.args):
                out[key] = value.strip('"')
    return out


def env_of(stage: list[Instruction]) -> dict[str, str]:
    return _key_values(stage, "ENV", r"([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|\S*)")


def labels_of(stage: list[Instruction]) -> dict[str, str]:
    return _key_values(stage, "LABEL", r"([\w.-]+)=(\"[^\"]*\"|\S+)")


def arg_defaults(stage: list[Instruction]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for ins in stage:
        if ins.keyword == "ARG":
            key, eq, value = ins.args.partition("=")
            out[key.strip()] = value.strip().strip('"') if eq else None
    return out


# ---------------------------------------------------------------- linters


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_clean(name, tmp_path):
    # An explicit config: a developer's own hadolint.yaml must not relax the check.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\n")
    proc = subprocess.run(
        [tool("hadolint"), "--config", str(config), "--no-color", str(DOCKERFILES[name])],
        cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    """The linter really lints: an unpinned base, recommends and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    proc = subprocess.run([tool("hadolint"), "--no-color", str(bad)], env=tool_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    for rule in ("DL3006", "DL3015", "DL3009", "DL3002"):
        assert rule in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_ignores_say_why(name):
    """Every inline ``# hadolint ignore=`` has a reason in the comment line above it."""
    lines = DOCKERFILES[name].read_text().splitlines()
    for n, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            above = lines[n - 1].strip() if n else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (
                f"{DOCKERFILES[name].name}:{n + 1} ignores a rule without a reason on the line above"
            )


def test_checkov_clean():
    targets = [arg for path in DOCKERFILES.values() for arg in ("-f", str(path.relative_to(ROOT)))]
    assert checkov_failures(targets, "dockerfile", CHECKOV_SKIPS) == []


# ---------------------------------------------------------------- what the pods rely on


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_final_user_is_the_pod_policy_uid(name):
    users = [i for i in final_stage(name) if i.keyword == "USER"]
    assert users, "the final stage sets no USER"
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1].args)
    assert m, f"USER {users[-1].args!r} is not numeric (runAsNonRoot can only verify a numeric UID)"
    uid, gid = int(m.group(1)), int(m.group(2) or m.group(1))
    assert uid != 0 and gid != 0
    assert uid == gid == LaunchConfig().run_as_user


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_entrypoint_is_the_cli(name):
    stage = final_stage(name)
    entry = [i for i in stage if i.keyword == "ENTRYPOINT"]
    cmd = [i for i in stage if i.keyword == "CMD"]
    assert entry and json.loads(entry[-1].args) == ["m3i"]
    assert cmd and json.loads(cmd[-1].args) == ["--help"]
    assert any(i.keyword == "HEALTHCHECK" and i.args.upper() == "NONE" for i in stage)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_writable_folders_match_the_launcher(name):
    """HOME and every cache point at /tmp or /cache, the pod's writable emptyDirs, with the
    same values the launcher sets on the training pods."""
    env = env_of(final_stage(name))
    launcher = train_env(LaunchConfig(scheduler="kubernetes"))
    keys = ["HOME", "TMPDIR", "XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR"]
    if name == "train":
        keys.append("TRITON_CACHE_DIR")
    for key in keys:
        assert env.get(key) == launcher[key], f"{key}={env.get(key)!r}, the launcher sets {launcher[key]!r}"
        assert env[key] == "/tmp" or env[key].startswith(("/tmp/", "/cache")), env[key]
    assert env["TORCH_EXTENSIONS_DIR"] == "/cache/torch_extensions"
    workdir = [i.args for i in final_stage(name) if i.keyword == "WORKDIR"]
    assert workdir and workdir[-1] in ("/tmp", "/cache")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_revision_and_labels(name):
    stage = final_stage(name)
    args, env, labels = arg_defaults(stage), env_of(stage), labels_of(stage)
    assert "M3I_CODE_REVISION" in args and env.get("M3I_CODE_REVISION") == "${M3I_CODE_REVISION}"
    assert args.get("M3I_VERSION") == pyproject()["project"]["version"] == __version__
    for key in OCI_LABELS:
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["org.opencontainers.image.licenses"] == pyproject()["project"]["license"]["text"] == "Apache-2.0"
    assert labels["org.opencontainers.image.version"] == "${M3I_VERSION}"
    assert labels["org.opencontainers.image.revision"] == "${M3I_CODE_REVISION}"
    # Every RUN after an ARG misses the cache when its value changes: revision ARGs come last.
    last_run = max(i.line for i in stage if i.keyword == "RUN")
    for ins in stage:
        if ins.keyword == "ARG" and ins.args.split("=")[0] in ("M3I_VERSION", "M3I_CODE_REVISION"):
            assert ins.line > last_run, f"ARG {ins.args} before a RUN busts the layer cache"


def test_launcher_default_image_is_this_release():
    assert LaunchConfig().image == f"{TRAIN_IMAGE}:{__version__}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_no_secrets(name):
    text = DOCKERFILES[name].read_text()
    for word in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PASSWORD", "--trusted-host"):
        assert word not in text, word
    for ins in all_instructions(name):
        if ins.keyword in ("ENV", "ARG"):
            assert not re.search(r"(SECRET|TOKEN|PASSWORD|_KEY)\b", ins.args, re.I), ins.args


# ---------------------------------------------------------------- pins


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_pins_match_pyproject(name):
    want = pyproject_pins()
    runs = " ".join(i.args for i in all_instructions(name) if i.keyword == "RUN")
    for package in PINNED:
        found = pins(runs, package)
        assert found, f"{package} is not pinned in {DOCKERFILES[name].name}"
        for version in found:
            public, _, local = version.partition("+")
            assert public == want[package], f"{package}=={version}, pyproject.toml pins {want[package]}"
            if package in ("torch", "torchvision"):
                # CPU image: PyTorch's CPU build; train image: PyPI's own (CUDA) build.
                assert local == ("cpu" if name == "cpu" else ""), f"{package}=={version} in the {name} image"


def test_the_cpu_image_installs_the_registry_extra_with_the_dependencies():
    """The pipeline's promote steps run in the CPU image: the Model Registry client must be in it.
    Runs the image's own requirements one-liner against pyproject.toml."""
    import sys

    runs = " ".join(i.args for i in all_instructions("cpu") if i.keyword == "RUN" and "m3i-requirements.txt" in i.args)
    m = re.search(r'python -c "([^"]*)"', runs)
    assert m, "the CPU image no longer writes its requirements from pyproject.toml"
    code = m.group(1).replace("/tmp/m3i-build/pyproject.toml", str(ROOT / "pyproject.toml"))
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    project = pyproject()["project"]
    assert listed == project["dependencies"] + project["optional-dependencies"]["registry"]
    assert any(d.startswith("model-registry==") for d in listed)


def test_cpu_torch_comes_from_the_cpu_index_alone():
    runs = [i.args for i in all_instructions("cpu") if i.keyword == "RUN"]
    torch_run = next(r for r in runs if pins(r, "torch"))
    assert f"--index-url {CPU_TORCH_INDEX}" in torch_run
    assert not any("--extra-index-url" in r for r in runs), "a second index lets a same-named package win from either"
    env = env_of(final_stage("cpu"))
    assert env.get("PIP_CONSTRAINT"), "later pip calls must be held to the CPU torch"
    train_runs = " ".join(i.args for i in all_instructions("train") if i.keyword == "RUN")
    assert "index-url" not in train_runs, "the train image takes torch's CUDA build from PyPI"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_torchx_pins_equal_the_makefile(name):
    runs = [i.args for i in all_instructions(name) if i.keyword == "RUN" and pins(i.args, "torchx")]
    assert len(runs) == 1, "torchx is installed in exactly one RUN"
    assert "--no-deps" in runs[0].split()
    found = re.findall(r"(?<![\w.-])[A-Za-z0-9_.-]+==[^\s\"'\\]+", runs[0])
    assert found == makefile_torchx()


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_pip_and_apt_hygiene(name):
    for ins in all_instructions(name):
        if ins.keyword != "RUN":
            continue
        for cmd in re.split(r"&&|;|\|\|", ins.args):
            words = cmd.split()
            if any(posixpath.basename(w) in ("pip", "pip3") for w in words[:3]) and "install" in words:
                assert "--no-cache-dir" in words, f"line {ins.line}: pip install without --no-cache-dir"
            if "apt-get" in words and "install" in words:
                assert "--no-install-recommends" in words, f"line {ins.line}"
        if "apt-get install" in ins.args:
            assert "rm -rf /var/lib/apt/lists/*" in ins.args, f"line {ins.line}: apt lists left in the layer"


# ---------------------------------------------------------------- base images


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_from_is_pinned(name):
    aliases: set[str] = set()
    for stage in parse(DOCKERFILES[name]):
        for ins in stage:
            if ins.keyword != "FROM":
                continue
            words = [w for w in ins.args.split() if not w.startswith("--platform")]
            image = words[0]
            if len(words) >= 3 and words[1].lower() == "as":
                aliases.add(words[2])
            if image in aliases or image == "scratch":
                continue
            repo, _, digest = image.partition("@")
            tag = repo.rsplit(":", 1)[1] if ":" in repo.rsplit("/", 1)[-1] else ""
            assert tag or digest.startswith("sha256:"), f"FROM {image} has neither a tag nor a digest"
            assert tag != "latest", f"FROM {image} uses the moving tag latest"
            assert "$" not in image, f"FROM {image}: a build argument makes the base unpinned"


def test_base_images_match_python_and_cuda():
    """The CPU base is a full CPython 3.11 tag on Debian; the train base declares the CUDA that
    the build asserts torch was built for."""
    requires = pyproject()["project"]["requires-python"]
    assert ">=3.11" in requires and "<3.12" in requires
    cpu_from = [i.args for i in final_stage("cpu") if i.keyword == "FROM"][-1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", cpu_from), cpu_from

    train = final_stage("train")
    train_from = [i.args for i in train if i.keyword == "FROM"][-1]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu(22\.04|24\.04)(@sha256:[0-9a-f]{64})?", train_from)
    assert m, train_from
    runs = " ".join(i.args for i in train if i.keyword == "RUN")
    asserted = re.search(r"torch\.version\.cuda == '(\d+)\.(\d+)'", runs)
    assert asserted, "the build checks the CUDA version of the torch wheel"
    assert asserted.groups() == m.group(1, 2)
    assert "python3.11" in runs and "-m venv /opt/venv" in runs


# ---------------------------------------------------------------- build context


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line of .dockerignore, as Docker reads them."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1].replace("[!", "[^"), end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(out)))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether ``path`` reaches the build context: the last rule matching it or a parent wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    ignored = False
    for negated, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negated
    return not ignored


def test_dockerignore_keeps_the_context_small():
    rules = dockerignore_rules()
    for path in (
        ".venv/bin/python", ".cache/tools/bin/checkov", ".git/HEAD", "m3i-data/raw/captions.jsonl",
        "tests/test_cli.py", "tests/data/crds/README.md", "bench/README.md", "docs/ablation_curves.png",
        "m3i.egg-info/PKG-INFO", "m3i/__pycache__/cli.cpython-311.pyc", "build/lib/m3i/cli.py",
        "Makefile", "helm/m3i/values.yaml", "manifests/base/kustomization.yaml",
    ):
        assert not in_context(path, rules), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "m3i/cli.py", "m3i/presets/default.yaml", "components/train.py"):
        assert in_context(path, rules), f"{path} is needed by the build but excluded"


def test_dockerignore_lets_the_whole_package_in():
    """Every file under the folders `pip install .` packages (m3i/, and any package-dir such as
    components/) reaches the context: modules and package data alike."""
    rules = dockerignore_rules()
    package_dirs = {"m3i", *pyproject().get("tool", {}).get("setuptools", {}).get("package-dir", {}).values()}
    for folder in sorted(package_dirs):
        files = [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, f"{folder}/ has no files"
        for p in files:
            rel = p.relative_to(ROOT).as_posix()
            assert in_context(rel, rules), rel
    readme = pyproject()["project"]["readme"]
    assert in_context(readme, rules) and in_context("pyproject.toml", rules)
