"""``m3i promote``: gate a new model version against its model's champion, roll back, list the versions.

    m3i promote [--model URI] [--metrics URI] [--dry-run] [--fail-on-reject] [--report FILE]
    m3i promote --to VERSION --reason TEXT [--name NAME] [--models URI]
    m3i promote --list [--name NAME] [--models URI]

One command per stage, as ``m3i shard --verify`` is a mode of ``m3i shard``: without ``--to`` or
``--list`` it gates the candidate (``--model``, the export ``m3i evaluate`` scored; by default the
model ``--metrics`` names) and moves the champion pointer when the candidate passes.

Exit status: 0 when the candidate was promoted or rejected (a rejection is a normal outcome,
recorded in the promotion log), unless ``--fail-on-reject`` or ``promote.fail_on_reject`` asks
for 1 on a rejection; 0 for a rollback and a listing; 1 when another promotion of the same model
won the race (the winner is named; nothing moved), the champion or the candidate is damaged, or
storage fails; 2 for bad input (a policy naming an unknown score, scores without what the policy
reads, a candidate that is not an export version), as every ``m3i`` command.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from m3i.cli_args import config_args, config_of

__all__ = ["add_promote_parser", "cmd_promote"]


def _model(args: argparse.Namespace, cfg) -> tuple[str, str]:
    """``(models root, model name)`` of ``--list`` / ``--to``: the flags, else ``export.out`` / ``export.name``."""
    from m3i.storage import open_store

    models = args.models or cfg.export.out
    name = args.name or cfg.export.name
    if name:
        return models, name
    names = sorted({o.key.split("/")[0] for o in open_store(models).list("") if o.key.endswith("/export.json")})
    if len(names) == 1:
        return models, names[0]
    raise ValueError(
        f"which model? give --name (or export.name); the models under {models} are {names}" if names
        else f"no exported model under {models} (export.out); give --models URI and --name NAME"
    )


def _print_result(r: Any, fail_on_reject: bool, report: str | None) -> int:
    """The gate's outcome: the verdict and its reasons, the pointer, the log entry, the mirrors."""
    c, d = r.candidate, r.decision
    against = f"champion {d.champion}" if d.champion else "no champion (only the floors apply)"
    verdict = "PROMOTE" if d.promote else "REJECT"
    print(f"gate of {c.name} {c.version} (step {c.step}) against {against}: {verdict}" + (" (dry run)" if r.dry_run else ""))
    for reason in d.reasons:
        print(f"  {reason}")
    if r.reevaluated:
        print(f"  champion re-evaluated on the candidate's eval set: {r.reevaluated}")
    if r.dry_run:
        print("dry run: nothing recorded, the pointer not moved")
    else:
        now = r.champion.ref.version if r.champion else "none"
        moved = "moved to" if r.promoted else "unchanged:"
        print(f"event #{r.event.seq} ({r.event.action}) recorded; champion {moved} {now}")
    if r.registered is not None:
        print(f"  model registry: {'mirrored' if r.registered else 'mirror failed (see warning)'}")
    if r.pushed is not None:
        print(f"  pushgateway: {'pushed' if r.pushed else 'push failed (see warning)'}")
    if report:
        if report == "-":
            print(r.report, end="")
        else:
            from pathlib import Path

            Path(report).write_text(r.report)
            print(f"report {report}")
    if not d.promote and fail_on_reject:
        print(f"m3i promote: {c.version} rejected (--fail-on-reject): {'; '.join(d.reasons)}", file=sys.stderr)
        return 1
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Gate a candidate (default), roll back (``--to``), or list a model's versions (``--list``)."""
    from m3i.promote import RunInfo, list_versions, promote, rollback

    gate_only = {"--model": args.model, "--metrics": args.metrics, "--dry-run": args.dry_run,
                 "--fail-on-reject": args.fail_on_reject, "--report": args.report}
    if args.list or args.to:
        mode = "--list" if args.list else "--to"
        given = [flag for flag, v in gate_only.items() if v]
        if given:
            raise ValueError(f"{', '.join(given)} gate a candidate; they do not go with {mode}")
        if args.reason and args.list:
            raise ValueError("--reason goes with --to (a rollback), not --list")
    elif args.name or args.models or args.reason:
        raise ValueError("--name, --models and --reason go with --to or --list; a candidate is named by --model <out>/<name>/<version>")
    cfg = config_of(args)
    if args.list:
        models, name = _model(args, cfg)
        print(list_versions(models, name).markdown(cfg.promote.primary), end="")
        return 0
    if args.to:
        if not args.reason:
            raise ValueError("--to needs --reason TEXT: a rollback is recorded with why")
        models, name = _model(args, cfg)
        r = rollback(models, name, args.to, args.reason, policy=cfg.promote)
        was = r.previous.ref.version if r.previous else "none"
        print(f"rolled {name} back to {r.champion.ref.version} (event #{r.event.seq}; the champion was {was}): {r.champion.reason}")
        if r.registered is not None:
            print(f"  model registry: {'mirrored' if r.registered else 'mirror failed (see warning)'}")
        if r.pushed is not None:
            print(f"  pushgateway: {'pushed' if r.pushed else 'push failed (see warning)'}")
        return 0
    from m3i.promote import read_evaluation

    metrics = args.metrics or cfg.evaluate.out
    evaluation = read_evaluation(metrics)
    candidate = args.model or evaluation.model
    if not candidate:
        raise ValueError(f"{evaluation.source or metrics} names no model; give --model <out>/<name>/<version>")
    r = promote(cfg, candidate, metrics, run=RunInfo(), dry_run=args.dry_run)
    return _print_result(r, args.fail_on_reject or cfg.promote.fail_on_reject, args.report)


def add_promote_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``m3i promote`` on ``sub`` (``--preset``/``--config``/``--set`` from :mod:`m3i.cli_args`)."""
    p = sub.add_parser(
        "promote", help="gate a new model version against its model's champion and move the pointer; roll back (--to); list (--list)",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--to", metavar="VERSION", help="roll back: make this exported version the champion again (needs --reason)")
    mode.add_argument("--list", action="store_true", help="list the model's versions with their scores, the champion marked")
    g = p.add_argument_group("gate a candidate (the default)")
    g.add_argument("--model", metavar="URI", help="the candidate export version, <out>/<name>/<version> (default: the model --metrics names)")
    g.add_argument("--metrics", metavar="URI", help="its metrics.json of m3i evaluate, or the folder holding it (default: evaluate.out)")
    g.add_argument("--dry-run", action="store_true", help="only decide: record nothing, move nothing")
    g.add_argument("--fail-on-reject", action="store_true", help="exit 1 when the candidate is rejected (also promote.fail_on_reject)")
    g.add_argument("--report", metavar="FILE", help="write the gate's Markdown report (candidate vs champion) here; '-' prints it")
    r = p.add_argument_group("--to and --list")
    r.add_argument("--reason", metavar="TEXT", help="why the rollback (recorded in the promotion log and the pointer)")
    r.add_argument("--name", help="the model (default: export.name, or the only model under --models)")
    r.add_argument("--models", metavar="URI", help="the export root holding the model (default: export.out)")
    p.set_defaults(func=cmd_promote)
    return p
