"""The `streamkeep` command: serve, migrate, gc."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict

from app import __version__
from app.config import Settings
from app.migrate import SchemaNotAtHead, downgrade, upgrade


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamkeep", description=__doc__)
    parser.add_argument("--version", action="version", version=f"streamkeep {__version__}")
    parser.add_argument(
        "--database-url",
        help="overrides STREAMKEEP_DATABASE_URL (default: an SQLite file streamkeep.db)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="overrides STREAMKEEP_HOST (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="overrides STREAMKEEP_PORT (default 4437)")
    serve.add_argument(
        "--auto-migrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="migrate the database at start-up (default: on for SQLite, off for Postgres)",
    )

    migrate = commands.add_parser("migrate", help="upgrade the database schema to the head")
    migrate.add_argument("--revision", default="head", help="upgrade to this revision")
    migrate.add_argument("--downgrade", metavar="REV", help="downgrade to REV instead (base: all)")

    commands.add_parser("gc", help="end abandoned streams and delete expired ones, once")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(_parser().parse_args(argv))
    except (SchemaNotAtHead, ValueError) as exc:
        print(f"streamkeep: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    settings = Settings.from_env(database_url=args.database_url)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if args.command == "serve":
        return _serve(
            settings.with_overrides(host=args.host, port=args.port, auto_migrate=args.auto_migrate)
        )
    if args.command == "migrate":
        if args.downgrade:
            asyncio.run(downgrade(settings.database_url, args.downgrade))
        else:
            asyncio.run(upgrade(settings.database_url, args.revision))
        return 0
    if args.command == "gc":
        return asyncio.run(_gc(settings))
    raise AssertionError(args.command)


def _serve(settings: Settings) -> int:
    import uvicorn

    from app.server import create_app, prepare_schema

    # Check before uvicorn starts, so that a bad schema is one clear line, not a traceback.
    asyncio.run(prepare_schema(settings))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    return 0


async def _gc(settings: Settings) -> int:
    from app.migrate import check_at_head
    from app.server import build_manager

    await check_at_head(settings.database_url)
    manager = build_manager(settings)
    try:
        report = await manager.sweep()
    finally:
        await manager.close()
    print(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
