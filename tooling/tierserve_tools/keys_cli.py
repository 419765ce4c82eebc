"""`tierserve keys`: the API keys that the streaming REST API accepts as bearer tokens (``ApiAuth=keys``).

    tierserve keys [--table NAME | --stack-name STACK | --stack build/serve] create --caller NAME
        [--expires-in-days N] [--json]
    tierserve keys list [--json]
    tierserve keys revoke KEY_ID

Why: the ``openai`` SDK (and every LLM client) authenticates with ``Authorization: Bearer <api_key>``; a
tierserve key is that token, kept hashed in the stack's keys table and checked by the REST API's Lambda
authorizer (``tierserve.handlers.authorizer``). ``create`` prints the secret once (only its SHA-256 is
stored: a lost key cannot be shown again; revoke it and create another); ``list`` never shows a secret;
``revoke`` refuses the key from the moment the authorizer's cached answer for it expires
(the REST API caches an answer per Authorization header for 300 s).

The table is ``--table``, else ``KEYS_TABLE``, else the ``KeysTableName`` output of ``--stack-name``'s
CloudFormation stack. ``--stack DIR`` targets a running ``tierserve serve`` (its ``DIR/env.json``): its
moto_server, where the table is created on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tierserve import keys
from tierserve.errors import ConfigurationError
from tierserve_tools import stack_tables

#: The keys table of a local stack (`tierserve serve`), unless its env.json names one (KEYS_TABLE).
LOCAL_TABLE = "tierserve-keys"
#: The stack output that names the deployed table.
TABLE_OUTPUT = "KeysTableName"
#: template.yaml's KeysTable key schema: the key id (the first 16 hex digits of the secret's SHA-256).
KEY_SCHEMA = (("id", "HASH"),)


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser("keys", help="create, list and revoke the API keys of the streaming REST API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--table", help="the keys table's name (default: KEYS_TABLE)")
    where.add_argument("--stack-name", help="a deployed stack: its KeysTableName output names the table")
    where.add_argument("--stack", type=Path, metavar="DIR",
                       help="a running `tierserve serve` (its workdir, e.g. build/serve): a table on its moto_server")
    sub = p.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="make a key for a caller and print its secret (shown only this once)")
    create.add_argument("--caller", required=True,
                        help="who the key is for: usage and budgets are kept under this name")
    create.add_argument("--expires-in-days", type=float, metavar="N",
                        help="refuse the key N days from now (default: never expires)")
    create.add_argument("--json", action="store_true", help="one JSON document with the secret and the record")
    ls = sub.add_parser("list", help="every key: id, caller, state, dates (never a secret)")
    ls.add_argument("--json", action="store_true", help="one JSON document (stable keys) instead of the table")
    rev = sub.add_parser("revoke", help="refuse a key from now on (after the authorizer's cache expires)")
    rev.add_argument("key_id", help="the key's id, as `tierserve keys list` shows it")
    rev.add_argument("--json", action="store_true", help="the revoked key's record as JSON")
    p.set_defaults(func=run_cli)


def create_table(client: Any, name: str) -> None:
    """The keys table as template.yaml declares it (``id`` as the partition key, TTL on ``expires_at``), for
    local stacks and tests; an existing table is left as it is."""
    stack_tables.create_table(client, name, KEY_SCHEMA)


def stack_table(stack_name: str, cloudformation: Any = None) -> str:
    """The ``KeysTableName`` output of a deployed stack."""
    return stack_tables.stack_output(stack_name, TABLE_OUTPUT, "deploy the template with ApiAuth=keys (the keys "
                                     "table exists only then), or pass --table", cloudformation)


def open_store(args: argparse.Namespace) -> keys.KeyStore:
    if args.stack:
        from tierserve_tools.models_cli import load_stack

        load_stack(args.stack)  # boto3 now talks to the stack's moto_server
        env = json.loads((Path(args.stack) / "env.json").read_text())["RouterFunction"]
        from tierserve import aws

        client = aws.client("dynamodb")
        table = env.get("KEYS_TABLE") or LOCAL_TABLE
        create_table(client, table)
        return keys.KeyStore(table, client)
    table = args.table or os.environ.get("KEYS_TABLE") or (stack_table(args.stack_name) if args.stack_name else "")
    if not table:
        raise ConfigurationError("which keys table? pass --table NAME, --stack-name STACK (its KeysTableName "
                                 "output), --stack DIR (a local `tierserve serve`), or set KEYS_TABLE")
    return keys.KeyStore(table)


def run_cli(args: argparse.Namespace) -> int:
    store = open_store(args)
    command = args.keys_command
    if command == "create":
        days = args.expires_in_days
        secret, key = store.create(args.caller, expires_in_s=None if days is None else days * 86_400)
        if args.json:
            print(json.dumps({"key": secret, **key.to_json()}, indent=2, sort_keys=True))
        else:
            print(secret)
            print(f"key id {key.key_id} for caller {key.caller}"
                  + (f", expires at {key.expires_at} (epoch s)" if key.expires_at else "")
                  + ". The secret is shown only now: keep it (the openai SDK's api_key).", file=sys.stderr)
        return 0
    if command == "list":
        found = store.list()
        if args.json:
            print(json.dumps({"keys": [k.to_json() for k in found]}, indent=2, sort_keys=True))
            return 0
        print(f"{'KEY_ID':<16}  {'CALLER':<24}  {'STATE':<8}  {'CREATED':<20}  REVOKED / EXPIRES")
        for k in found:
            tail = k.revoked_at or (str(k.expires_at) if k.expires_at else "-")
            print(f"{k.key_id:<16}  {k.caller:<24}  {k.state():<8}  {k.created_at:<20}  {tail}")
        return 0
    key = store.revoke(args.key_id)
    if args.json:
        print(json.dumps(key.to_json(), indent=2, sort_keys=True))
    else:
        print(f"revoked {key.key_id} (caller {key.caller}) at {key.revoked_at}")
    return 0
