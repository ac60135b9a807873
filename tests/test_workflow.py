"""The scheduled-retraining workflow (.github/workflows/retrain.yml): triggers, pins, secrets, commands."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from m3i.cli import build_parser
from m3i.pipeline.kfp_client import check_params, parse_params_json

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "retrain.yml"


@pytest.fixture(scope="module")
def wf() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _steps(wf: dict) -> list[dict]:
    return wf["jobs"]["retrain"]["steps"]


def test_triggers_cron_and_on_demand(wf):
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as true
    (cron,) = on["schedule"]
    fields = cron["cron"].split()
    assert len(fields) == 5, "GitHub cron has 5 fields"
    assert "workflow_dispatch" in on
    assert wf["concurrency"]["cancel-in-progress"] is False  # never cancel an upload half way


def test_least_privilege_and_pinned_actions(wf):
    assert wf["permissions"] == {"contents": "read"}
    for step in _steps(wf):
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), f"{step['uses']} is not pinned to a commit"
    checkout = next(s for s in _steps(wf) if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False


def test_secrets_only_by_name_and_never_in_scripts(wf):
    env = wf["jobs"]["retrain"]["env"]
    assert env["KFP_HOST"] == "${{ secrets.KFP_HOST }}" and env["KFP_TOKEN"] == "${{ secrets.KFP_TOKEN }}"
    for step in _steps(wf):
        # Expressions in a script are pasted in before the shell parses it (script injection):
        # every value reaches the scripts through env instead.
        assert "${{" not in step.get("run", ""), step.get("name")
    text = WORKFLOW.read_text()
    assert not re.search(r"(?i)(aws_secret|password|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{12,}", text)


def _run_lines(wf: dict) -> list[str]:
    lines = []
    for step in _steps(wf):
        lines += [ln.strip() for ln in step.get("run", "").splitlines() if ln.strip().startswith("m3i ")]
    return lines


def test_every_m3i_command_parses(wf):
    lines = _run_lines(wf)
    assert any(" compile " in f" {ln} " for ln in lines)
    assert "m3i pipeline upload" in lines
    assert any(ln.startswith("m3i pipeline run ") for ln in lines)
    env = {"RUNNER_TEMP": "/tmp", "params": "{}"}
    for ln in lines:
        tokens = shlex.split(re.sub(r"\$\{M3I_SERVICE_ACCOUNT:\+[^}]*\}", "", ln))
        expanded = [re.sub(r"\$(\w+)", lambda m: env[m.group(1)], t) for t in tokens]
        args = build_parser().parse_args(expanded[1:])
        assert args.command == "pipeline"


def test_run_step_merges_params_and_calls_m3i(wf, tmp_path):
    """Execute the run step's script with a recording stand-in for m3i."""
    step = next(s for s in _steps(wf) if "m3i pipeline run" in s.get("run", ""))
    fake = tmp_path / "bin" / "m3i"
    fake.parent.mkdir()
    record = tmp_path / "args"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
        "M3I_PIPELINE_PARAMS": '{"storage_uri": "s3://m3i", "steps": 5}',
        "DISPATCH_PARAMS": '{"steps": 7}',
        "M3I_SERVICE_ACCOUNT": "m3i-pipeline",
    }
    subprocess.run(["bash", "-e", "-c", step["run"]], check=True, env=env, timeout=60)
    args = record.read_text().splitlines()
    assert args[:4] == ["pipeline", "run", "--experiment", "m3i-scheduled"]
    params = parse_params_json(args[args.index("--params") + 1])
    assert params == {"storage_uri": "s3://m3i", "steps": 7}
    check_params(params)
    assert args[-2:] == ["--service-account", "m3i-pipeline"]
    env["M3I_SERVICE_ACCOUNT"] = ""
    env["M3I_PIPELINE_PARAMS"] = ""
    env["DISPATCH_PARAMS"] = ""
    subprocess.run(["bash", "-e", "-c", step["run"]], check=True, env=env, timeout=60)
    args = record.read_text().splitlines()
    assert "--service-account" not in args and parse_params_json(args[args.index("--params") + 1]) == {}


def test_install_step_needs_no_torch(tmp_path):
    """The workflow installs m3i without its dependencies: compile, upload and run must not import torch."""
    code = (
        "import sys\n"
        "for m in ('torch', 'torchvision', 'deepspeed', 'timm', 'webdataset', 'torchx'): sys.modules[m] = None\n"
        "from m3i.cli import main\n"
        "sys.exit(main(['pipeline', 'compile', '--out', sys.argv[1]]))\n"
    )
    out = tmp_path / "m3i-pretrain.yaml"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=ROOT, timeout=120)
    assert out.read_bytes() == (ROOT / "m3i" / "pipeline" / "m3i-pretrain.yaml").read_bytes()
