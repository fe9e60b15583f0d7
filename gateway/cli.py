"""The ``consent-gateway`` command: serve | demo | decide | label | convert | whatif."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, Settings, load_settings
from gateway.rules import RulesError

# Subcommand modules under gateway/commands, each with add_parser() and run().
COMMANDS = ("demo", "decide", "label", "convert", "whatif")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Config file, then environment, then ``--upstream``."""
    overrides: dict[str, Any] = {}
    if getattr(args, "upstream", None):
        overrides["upstream"] = {"url": args.upstream}
    return load_settings(args.config, os.environ, overrides)


def _serve(args: argparse.Namespace) -> int:
    from gateway.app import build_state, configure_logging, serve_until_signalled

    settings = settings_from_args(args)
    configure_logging()
    if settings.listen.workers > 1:
        from gateway.workers import supervise

        return supervise(settings)
    try:
        asyncio.run(serve_until_signalled(build_state(settings)))
    except OSError as exc:
        print(f"consent-gateway: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="consent-gateway", description="Consent-enforcing FHIR R4 gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="YAML configuration file")
    serve.add_argument("--upstream", help="FHIR base URL of the upstream (upstream.url)")
    serve.set_defaults(run=_serve)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"gateway.commands.{name}")
        except ModuleNotFoundError:
            continue
        module.add_parser(sub)
        sub.choices[name].set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"consent-gateway: config error: {exc}", file=sys.stderr)
        return 2
    except RulesError as exc:
        print(f"consent-gateway: config error: sensitivity.rules_dir: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``... | head``): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
