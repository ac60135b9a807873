"""``m3i pipeline ...``: compile, upload, run and schedule ``m3i-pretrain``; or run it here.

    m3i pipeline compile   [--out FILE]
    m3i pipeline upload    [--package FILE] [--version NAME]
    m3i pipeline run       [--param KEY=VALUE ...] [--params JSON] [--experiment m3i] [--run-name NAME] [--service-account SA]
    m3i pipeline schedule  --cron "0 3 * * 0" [--name NAME] [--param KEY=VALUE ...] [--max-concurrency 1]
    m3i pipeline run-local [--workdir m3i-data/pipeline] [--steps N] [--start-from-champion] [--fail-on-reject]
                           [--labelled DIR ...] [--set section.key=value ...]
    m3i pipeline params                                   # the pipeline's parameters and defaults

upload/run/schedule read the endpoint and auth from KFP_HOST, KFP_NAMESPACE, KFP_TOKEN,
KFP_CA_BUNDLE (see m3i/pipeline/kfp_client.py).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from m3i.cli_args import given_inputs, overrides_arg, shard_input_args

__all__ = ["add_pipeline_parser"]


def cmd_compile(args: argparse.Namespace) -> int:
    from m3i.pipeline.build import SOURCE_PIPELINE, compile_pipeline, pipeline_sha256

    out = compile_pipeline(args.out or SOURCE_PIPELINE)
    print(f"compiled m3i-pretrain to {out} (sha256 {pipeline_sha256(out)[:16]})")
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from m3i.pipeline.kfp_client import connect, upload

    r = upload(connect(), args.package, args.version)
    what = "uploaded" if r.created else "already there:"
    print(f"{what} m3i-pretrain version {r.version_name} (pipeline {r.pipeline_id}, version {r.version_id})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from m3i.pipeline.kfp_client import check_params, connect, parse_params, parse_params_json, start_run

    params = check_params({**parse_params_json(args.params), **parse_params(args.param)})
    r = start_run(connect(), params, experiment=args.experiment, run_name=args.run_name, service_account=args.service_account)
    print(f"started run {r['run_id']} of m3i-pretrain {r['version']} in experiment {args.experiment}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from m3i.pipeline.kfp_client import check_params, connect, parse_params, parse_params_json, schedule

    params = check_params({**parse_params_json(args.params), **parse_params(args.param)})
    r = schedule(
        connect(), args.cron, name=args.name, experiment=args.experiment, params=params,
        service_account=args.service_account, max_concurrency=args.max_concurrency,
    )
    replaced = f", replacing {len(r['replaced'])}" if r["replaced"] else ""
    print(f"recurring run {args.name} ({r['recurring_run_id']}): cron '{r['cron']}', latest version, max concurrency {args.max_concurrency}{replaced}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from m3i.pipeline.kfp_client import pipeline_parameters

    for name, default in sorted(pipeline_parameters(args.package).items()):
        print(f"  {name:20s} {json.dumps(default)}")
    return 0


def cmd_run_local(args: argparse.Namespace) -> int:
    from m3i.pipeline.local import run_local

    arguments: dict[str, Any] = {}
    if args.steps:
        arguments["steps"] = args.steps
    if args.eval_fraction is not None:
        arguments["eval_fraction"] = args.eval_fraction
    for flag in ("start_from_champion", "fail_on_reject"):
        if getattr(args, flag):
            arguments[flag] = True
    sources = given_inputs(args)
    data = "your data" if sources else "demo data"
    print(f"m3i-pretrain on this machine (kfp.local): {data} -> shard -> train -> export -> evaluate -> gate, under {args.workdir}")
    r = run_local(args.workdir, arguments=arguments, overrides=args.overrides, run_name=args.run_name, sources=sources)
    print(f"pipeline run {r.run_name} finished in {r.seconds:.0f}s")
    data = r.manifests.get("shard/dataset", {})
    run = r.manifests.get("train/checkpoint", {})
    model = r.manifests.get("export/model", {})
    if data:
        print(f"  data set   {data['uri']}: {data['samples']} samples, splits " + ", ".join(f"{k} {v['samples']}" for k, v in sorted(data["splits"].items())))
    if run:
        loss = " ".join(f"{k}={v:.4f}" for k, v in run["last_parts"].items() if k.startswith("loss"))
        print(f"  training   {run['steps']} steps on {run['world_size']} processes in {run['train_seconds']:.0f}s; {loss}")
        print(f"             checkpoint {run['checkpoint']}")
    if model:
        print(f"  model      {model['uri']} ({model['architecture']}, timm {model.get('timm_architecture', '?')}, sha256 {model['sha256'][:16]})")
    evaluation = r.manifests.get("evaluate/results", {}).get("metrics")
    if evaluation:
        from m3i.evaluate.report import score_lines

        print(f"  scores     on {evaluation['counts']['eval']} held-out images:")
        for line in score_lines(evaluation, top5=False):
            print(f"             {line}")
    _print_promotion(r)
    print("  artifacts (kfp.local):")
    for key, path in sorted(r.artifacts.items()):
        print(f"    {key:20s} {path}")
    return 0


def _print_promotion(r: Any) -> None:
    """Where training started, the gate's decision and its reasons, and what was recorded."""
    start = r.manifests.get("champion/start", {})
    if start.get("init_from"):
        print(f"  start      from the champion {start['champion']} ({start['init_from']})")
    p = r.promotion
    if not p:
        return
    against = f"the champion {p['champion']}" if p.get("champion") else "no champion"
    print(f"  gate       {p['decision'].upper()} {p['candidate'].rstrip('/').rsplit('/', 1)[-1]} against {against}:")
    for reason in p["reasons"]:
        print(f"             {reason}")
    event = p.get("event")
    if event:
        moved = "moved to" if event["moved"] else "unchanged:"
        print(f"  champion   {moved} {event['champion'] or 'none'} (event #{event['seq']}, {event['decision']})")
    if "gate/report" in r.artifacts:
        print(f"             report {r.artifacts['gate/report']}")


def add_pipeline_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("pipeline", help="the Kubeflow pipeline m3i-pretrain: compile, upload, run, schedule, run-local")
    ps = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    c = ps.add_parser("compile", help="compile the pipeline to KFP IR YAML (default: the packaged m3i/pipeline/m3i-pretrain.yaml)")
    c.add_argument("--out", metavar="FILE")
    c.set_defaults(func=cmd_compile)

    c = ps.add_parser("upload", help="upload a new pipeline version to KFP (KFP_HOST)")
    c.add_argument("--package", metavar="FILE", help="compiled pipeline (default: the packaged one)")
    c.add_argument("--version", metavar="NAME", help="version name (default: <m3i version>-<code revision>)")
    c.set_defaults(func=cmd_upload)

    def run_args(c: argparse.ArgumentParser) -> None:
        c.add_argument("--param", action="append", metavar="KEY=VALUE", help="pipeline argument, JSON values allowed (repeatable)")
        c.add_argument("--params", metavar="JSON", default="", help="pipeline arguments as one JSON object; --param entries win")
        c.add_argument("--experiment", default="m3i", help="KFP experiment (default: %(default)s)")
        c.add_argument("--service-account", metavar="SA", help="Kubernetes ServiceAccount of the run's pods (e.g. m3i-pipeline)")

    c = ps.add_parser("run", help="start a run of the newest pipeline version")
    run_args(c)
    c.add_argument("--run-name", metavar="NAME")
    c.set_defaults(func=cmd_run)

    c = ps.add_parser("schedule", help="create or replace a recurring run (always the newest version)")
    run_args(c)
    c.add_argument("--cron", required=True, help="crontab (5 fields) or KFP cron (6, seconds first)")
    c.add_argument("--name", default="m3i-pretrain-scheduled", help="recurring run name (default: %(default)s)")
    c.add_argument("--max-concurrency", type=int, default=1)
    c.set_defaults(func=cmd_schedule)

    c = ps.add_parser("params", help="list the pipeline's parameters and defaults")
    c.add_argument("--package", metavar="FILE")
    c.set_defaults(func=cmd_params)

    c = ps.add_parser("run-local", help="run the whole pipeline here with kfp.local, on your data (as m3i shard takes it) or the demo's")
    c.add_argument("--workdir", default="m3i-data/pipeline", help="where everything goes (default: %(default)s)")
    c.add_argument("--steps", type=int, default=0, help="training steps (default: the demo preset's)")
    c.add_argument("--run-name", default="", help="runs/<name>, evals/<name> (default: a fresh local-<UTC time>); reusing one resumes its training")
    c.add_argument("--start-from-champion", action="store_true", help="train from the model's champion (the pipeline's start_from_champion)")
    c.add_argument("--fail-on-reject", action="store_true", help="fail (exit 1) when the gate rejects the new model (fail_on_reject)")
    # the inputs of `m3i shard`; with none of them the demo data is written under --workdir and used
    shard_input_args(c, eval_fraction_help="the pipeline's eval_fraction")
    overrides_arg(c)
    c.set_defaults(func=cmd_run_local)
    return p
