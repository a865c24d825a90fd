"""The `gateway` command (SPEC §8). The only module that calls sys.exit.

Exit codes: 0 ok, 2 bad usage or configuration, 1 runtime failure; a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.config import Config, ConfigError, default_config_path, load_config, placeholder_warnings
from gateway.errors import GatewayError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad arguments: exit 2."""


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if args.config else default_config_path())


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    for warning in placeholder_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.config or default_config_path()}: ok (public {cfg.server.public_url}, "
          f"upstream {cfg.upstream.url}, gitlab {cfg.gitlab.url})")
    from gateway.admin.policy_check import policy_warnings

    for warning in policy_warnings(cfg):
        print(f"warning: {warning}")
    if cfg.database.dsn:
        _check_group_names(cfg.database.dsn)
    return EXIT_OK


def _check_group_names(dsn: str) -> None:
    """Warn about existing group names the groups header cannot carry (SPEC §16), when the configured database
    answers within 2 seconds; the embedded server is not started for this (`gateway run` reports them)."""
    import asyncpg

    from gateway.db import migrate as db_migrate
    from gateway.services.groups import misnamed_groups

    async def check() -> list[tuple[str, str]]:
        conn = await asyncpg.connect(dsn, timeout=2)
        try:
            return [] if await db_migrate.pending(conn) else await misnamed_groups(conn)
        finally:
            await conn.close()

    try:
        misnamed = asyncio.run(check())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        print(f"note: group names in the database were not checked ({type(exc).__name__})")
        return
    for name, problem in misnamed:
        print(f"warning: group {name!r}: {problem}; rename it (gateway groups list shows its id)")


def cmd_migrate(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.db import migrate as db_migrate
    from gateway.db.server import resolve_dsn
    from gateway.server import connect

    cfg = _config(args)
    logs.setup(cfg.log.level, cfg.log.format)

    async def run() -> list[str]:
        conn = await connect(await resolve_dsn(cfg.database))
        try:
            return await db_migrate.migrate(conn)
        finally:
            await conn.close()

    applied = asyncio.run(run())
    print(f"applied: {', '.join(applied)}" if applied else "database schema is up to date")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from gateway import logs, loops, server

    cfg = _config(args)
    logs.setup(cfg.log.level, cfg.log.format)
    loops.run(server.serve(cfg, apply_migrations=not args.no_migrate), cfg.server.event_loop)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import demo

    if args.config:
        # The demo builds its own configuration; a -c that is silently ignored misleads (SPEC §8).
        problem = "does not exist" if not Path(args.config).exists() else "would be ignored"
        raise UsageError(f"demo: {args.config} {problem}: `gateway demo` runs with its own built-in "
                         "configuration; use `gateway run -c FILE` to run with yours")
    code: int = demo.main(args)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="GitLab sign-in gateway")
    parser.add_argument("-c", "--config", help="configuration file (default: $GATEWAY_CONFIG or ./gateway.yaml)")
    # Also accepted after the admin sub-commands (`gateway groups list --json`); set on either side it holds.
    parser.add_argument("--json", action="store_true", help="admin commands: print JSON (the admin API's shapes)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        # -c is accepted after the command too: `gateway check-config -c FILE`
        p.add_argument("-c", "--config", dest="config", default=argparse.SUPPRESS, help="configuration file")
        p.set_defaults(func=func)
        return p

    add("check-config", cmd_check_config, "validate the configuration and print every problem")
    add("migrate", cmd_migrate, "apply pending database migrations")
    run = add("run", cmd_run, "serve (applies pending migrations first)")
    run.add_argument("--no-migrate", action="store_true", help="do not apply migrations at start-up")
    demo = add("demo", cmd_demo, "run everything on this machine: embedded PostgreSQL, GitLab stand-in, whoami app")
    demo.add_argument("--port", type=int, default=4180, help="public port of the gateway (default 4180)")
    demo.add_argument("--state-dir", default=".gateway-demo", help="where the demo keeps its database")
    from gateway.admin import cli as admin_cli

    admin_cli.add_commands(sub, add)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as err:
        print(f"configuration problems ({len(err.problems)}):", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        code = EXIT_USAGE
    except UsageError as err:
        print(f"gateway: {err}", file=sys.stderr)
        code = EXIT_USAGE
    except GatewayError as err:
        # An operator's terminal, not a visitor's page: the cause helps (a refused connection, a timeout).
        print(f"gateway: {err.message}" + (f" ({err.cause})" if err.cause else ""), file=sys.stderr)
        code = EXIT_USAGE if err.status in (400, 404, 409, 422) else EXIT_FAILURE
    except KeyboardInterrupt:
        code = EXIT_OK
    sys.exit(code)


if __name__ == "__main__":
    main()
