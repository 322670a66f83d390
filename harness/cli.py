"""The `arena` command line.

    arena list [--json]                   every registered plugin
    arena run CONFIG [--out DIR] [--set KEY=VALUE ...] [--dry-run]
              [--executor local|ray] [--address auto|HOST:PORT]
    arena report DIR                      rebuild summary.json and the report from the ledger
    arena compare DIR... --out OUT        overlay several runs in one report
    arena train METHOD CONFIG             train a defense's weights (ESD, SafeRedir)
    arena shapes train|eval               the embedded shapes world

Bad input (an invalid config, an unknown plugin, an impossible pairing) prints one line
and exits with status 2; nothing already written is lost.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.config import ConfigError, load_config
from harness.registry import KINDS, registry

log = logging.getLogger("harness")


class UsageError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from harness.ledger import LedgerMismatchError
    from harness.prompts.base import PromptSet
    from harness.registry import UnknownPluginError
    from harness.runner import PlanError

    errors: list[type[BaseException]] = [
        UsageError,
        ConfigError,
        PlanError,
        UnknownPluginError,
        LedgerMismatchError,
        FileNotFoundError,
    ]
    prompt_error = getattr(importlib.import_module(PromptSet.__module__), "PromptSetError", None)
    if prompt_error is not None:
        errors.append(prompt_error)
    return tuple(errors)


def command_list(args: argparse.Namespace) -> int:
    rows = [info for kind in KINDS for info in registry(kind).info()]
    if args.json:
        payload = {kind: [] for kind in KINDS}
        for info in rows:
            payload[info.kind].append(
                {"name": info.name, "target": info.target, "distribution": info.distribution}
            )
        print(json.dumps(payload, indent=2))
        return 0
    for kind in KINDS:
        print(f"{kind}:")
        for info in registry(kind).info():
            source = f"  [{info.distribution}]" if info.distribution else ""
            print(f"  {info.name:28s} {info.target}{source}")
    return 0


def command_run(args: argparse.Namespace) -> int:
    from harness.runner import Runner

    # The executor flags are overrides, so the ledger's config records where the run ran.
    overrides = list(args.set)
    if args.executor is not None:
        overrides.append(f"runner.executor={args.executor}")
    if args.address is not None:
        overrides.append(f"runner.ray.address={json.dumps(args.address)}")
    config = load_config(args.config, overrides)
    if args.address is not None and config.runner.executor != "ray":
        raise UsageError("--address applies to the Ray executor; add --executor ray")
    out_dir = Path(args.out or config.output or Path("runs") / config.name)
    runner = Runner(config, out_dir, progress=not args.no_progress)
    if args.dry_run:
        plan = runner.plan()
        print(f"config {config.name!r}: {len(plan['cells'])} cells, {plan['images']} images")
        hours = plan["estimated_gpu_hours"]
        print(f"  estimated GPU time: {hours:.3g} h (an estimate from per-pass costs)")
        for concept, count in plan["cases"].items():
            print(f"  concept {concept}: {count} cases")
        for cell in plan["cells"]:
            print("  cell " + " / ".join(cell))
        return 0
    runner.run()
    print(f"results in {out_dir}: summary.json, summary.md, report/report.html")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from harness.report import write_outputs

    directory = Path(args.dir)
    if not (directory / "ledger.sqlite").is_file():
        raise UsageError(f"no ledger.sqlite in {directory}: not a run directory")
    summary = write_outputs(directory)
    print(f"rebuilt summary ({len(summary['cells'])} cells) and report in {directory}")
    return 0


def command_compare(args: argparse.Namespace) -> int:
    from harness.report.compare import check_reproduction, compare_runs, load_summary

    combined = compare_runs([Path(d) for d in args.dirs], Path(args.out))
    print(f"compared {len(args.dirs)} runs ({len(combined['cells'])} cells) into {args.out}")
    if not args.check:
        return 0

    reference = load_summary(Path(args.dirs[0]))
    failed = 0
    for other in args.dirs[1:]:
        findings = check_reproduction(reference, load_summary(Path(other)))
        bad = [finding for finding in findings if not finding["ok"]]
        unchecked = sum(finding.get("identical_images") is None for finding in findings)
        print(f"{other} against {args.dirs[0]}: {len(findings) - len(bad)} of {len(findings)} "
              f"cells reproduced; images compared in {len(findings) - unchecked}")
        for finding in bad:
            print(f"  NOT REPRODUCED {finding['cell']}: {finding['problem']}")
        failed += len(bad)
    return 1 if failed else 0


def command_train(args: argparse.Namespace) -> int:
    trainer = registry("trainers").get(args.method)()
    written = trainer.run(Path(args.config), args.set, Path(args.out) if args.out else None)
    print(f"trained {args.method}: {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arena", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("list", help="list registered plugins")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=command_list)

    run = commands.add_parser("run", help="run a benchmark config")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--out", help="output directory (default: the config's output or runs/NAME)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value; KEY+=VALUE appends to a list (repeatable)",
    )
    run.add_argument(
        "--executor",
        choices=("local", "ray"),
        help="where the work runs: this process, or Ray actors (default: runner.executor)",
    )
    run.add_argument(
        "--address",
        help="Ray cluster to join: auto (the cluster on this machine) or HEAD_HOST:PORT;"
        " default: start a local Ray instance",
    )
    run.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(handler=command_run)

    report = commands.add_parser("report", help="rebuild summary.json and the report")
    report.add_argument("dir", help="run directory holding ledger.sqlite")
    report.set_defaults(handler=command_report)

    compare = commands.add_parser("compare", help="overlay several runs in one report")
    compare.add_argument("dirs", nargs="+", help="run directories holding summary.json")
    compare.add_argument("--out", required=True, help="output directory for the comparison")
    compare.add_argument(
        "--check", action="store_true",
        help="exit 1 unless every later run reproduces the first (ASR inside the other's "
        "95%% interval, identical images)",
    )
    compare.set_defaults(handler=command_compare)

    train = commands.add_parser("train", help="train a defense (ESD, SafeRedir, ...)")
    train.add_argument("method", help="trainer name, see `arena list`")
    train.add_argument("config", help="the trainer's YAML config")
    train.add_argument("--out", help="output file or folder (default: from the config)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    train.set_defaults(handler=command_train)

    _add_optional_commands(commands)
    return parser


def _add_optional_commands(commands: argparse._SubParsersAction) -> None:
    """Sub-commands that live beside their subsystems (the shapes world, trainers)."""
    for module_name in ("harness.shapes.cli",):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and module_name.startswith(error.name):
                continue
            raise
        module.add_parser(commands)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except _user_errors() as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"arena: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("arena: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
