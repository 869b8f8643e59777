"""Which table engines a restore may create: CREATE statements from a backup are hostile.

A CREATE statement runs on the target server with the restore's privileges: an
``ENGINE = URL(...)``, ``File``, ``MySQL``, ``Distributed`` or ``Kafka`` table, or a
view selecting from ``remote()``/``url()``/``file()``, reads or sends data across the
network or the file system (exfiltration, SSRF). Only engines that keep data on the
server itself are allowed by default: the MergeTree family (Replicated* included), the
Log family, Memory, Null, Merge/Buffer/Set/Join (local tables only), views and
materialized views (whose inner ENGINE is checked like a table's; a TO table is an
object of its own). Anything else needs its name in the request's ``allow_engines``
(``--allow-engine``); the plan lists the exceptions used. Engines and table functions
are found on the token stream (``clickhouse_sql.tokenize``: quoted identifiers,
strings and comments cannot hide or fake them), before anything is created.
"""

from __future__ import annotations

import re
from typing import Any

from strongroom.engines.clickhouse.sql import Token, parse_create, tokenize
from strongroom.errors import InvalidInput

MERGE_TREE = frozenset(
    f"{kind}MergeTree"
    for kind in (
        "",
        "Replacing",
        "Summing",
        "Aggregating",
        "Collapsing",
        "VersionedCollapsing",
        "Graphite",
    )
)
LOCAL_ENGINES = frozenset(
    {"Log", "TinyLog", "StripeLog", "Memory", "Null", "Merge", "Buffer", "Set", "Join"}
)
VIEW_ENGINES = frozenset({"View", "MaterializedView", "LiveView"})
DATABASE_ENGINES = frozenset({"Ordinary", "Atomic", "Lazy", "Memory"})
# table functions that reach outside the server (lower case)
REMOTE_FUNCTIONS = frozenset(
    {
        "remote", "remotesecure", "cluster", "clusterallreplicas", "url", "urlcluster", "file",
        "filecluster", "mysql", "postgresql", "jdbc", "odbc", "hdfs", "hdfscluster", "s3",
        "s3cluster", "gcs", "cosn", "oss", "azureblobstorage", "azureblobstoragecluster",
        "mongodb", "sqlite", "redis", "executable", "input", "hive", "deltalake", "hudi",
        "iceberg", "dictionary", "view_remote",
    }
)  # fmt: skip
_ENGINE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def check_allow_list(names: list[str]) -> list[str]:
    """The request's ``allow_engines``: engine or table-function names, nothing else."""
    for name in names:
        if not isinstance(name, str) or not _ENGINE_NAME.match(name):
            raise InvalidInput(f"allow_engines: {str(name)[:40]!r} is not an engine name")
    return names


def allowed_by_default(engine: str) -> bool:
    base = engine.removeprefix("Replicated")
    return base in MERGE_TREE or engine in LOCAL_ENGINES or engine in VIEW_ENGINES


def engines_in(stmt: str) -> list[str]:
    """The ``ENGINE [=] Name`` clauses at the statement's top level (a materialized view's
    inner engine included), and the table functions of REMOTE_FUNCTIONS it calls."""
    tokens = tokenize(stmt)
    found: list[str] = []
    engine_tokens: set[int] = set()  # an engine's own name is not a table function
    depth = 0
    for i, tok in enumerate(tokens):
        if tok.kind == "punct" and tok.text == "(":
            depth += 1
        elif tok.kind == "punct" and tok.text == ")":
            depth -= 1
        elif tok.kind == "ident" and tok.text.upper() == "ENGINE" and depth == 0:
            engine = _engine_clause(tokens, i)
            if engine is not None:
                found.append(engine.value)
                engine_tokens.add(engine.start)
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if (
            tok.kind in ("ident", "qident")
            and tok.value.lower() in REMOTE_FUNCTIONS
            and tok.start not in engine_tokens
            and nxt is not None
            and nxt.text == "("
        ):
            found.append(f"{tok.value.lower()}()")
    return found


def _engine_clause(tokens: list[Token], i: int) -> Token | None:
    """The engine named by the ENGINE word at ``i``, or None where ``engine`` is a column
    (``ORDER BY engine``, ``x + engine``): ``ENGINE = Name`` or ``ENGINE Name`` after a
    name or ``)``."""
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    if nxt is not None and nxt.text == "=":
        name = tokens[i + 2] if i + 2 < len(tokens) else None
        if name is None or name.kind not in ("ident", "qident"):
            raise InvalidInput("CREATE statement has an ENGINE clause without an engine name")
        return name
    prev = tokens[i - 1] if i else None
    if (
        prev is None
        or prev.text.upper() in ("BY", "KEY")
        or (prev.kind == "punct" and prev.text != ")")
    ):
        return None
    if nxt is not None and nxt.kind in ("ident", "qident"):
        return nxt
    return None


def object_engines(create: str) -> list[str]:
    """Every engine and remote table function one CREATE statement would use."""
    head = parse_create(create)
    named = engines_in(create)
    if head.kind == "VIEW":
        return ["View", *named]
    if head.kind == "MATERIALIZED VIEW":
        return ["MaterializedView", *named]
    if head.kind == "DICTIONARY":
        return ["Dictionary", *named]
    if head.kind == "DATABASE":
        return named or ["Ordinary"]
    if not [n for n in named if not n.endswith("()")]:
        return ["<no engine named>", *named]
    return named


def check_objects(
    docs: dict[str, dict[str, Any]], objects: list[dict[str, Any]], allow: list[str]
) -> dict[str, Any]:
    """Refuse (InvalidInput, before anything is created) the selected objects whose DDL
    uses an engine outside the default list and ``allow``; returns the plan's summary."""
    allowed = {a.lower() for a in check_allow_list(allow)}
    used: set[str] = set()
    refused: list[str] = []

    def judge(where: str, create: str | None, database: bool = False) -> None:
        if not create:
            return
        for engine in object_engines(create):
            plain = engine.removesuffix("()")
            ok = (plain in DATABASE_ENGINES) if database else allowed_by_default(engine)
            if ok and not engine.endswith("()"):
                continue
            if plain.lower() in allowed:
                used.add(plain)
            else:
                refused.append(f"{where}: {engine}")

    for db in {o["database"] for o in objects} | set(docs):
        if db in docs:
            judge(f"database {db}", docs[db].get("create_database"), database=True)
    for obj in objects:
        doc = docs[obj["database"]]["objects"][obj["name"]]
        where = f"{obj['database']}.{obj['name']}"
        judge(where, doc.get("create"))
        judge(f"{where} (inner table)", doc.get("inner_create"))
    if refused:
        raise InvalidInput(
            "the backup's DDL uses engines or table functions a restore does not create by "
            f"default: {'; '.join(sorted(refused)[:10])}. Nothing was created. If you trust "
            "this backup, name them with --allow-engine (allow_engines=[...])"
        )
    return {"allowed_exceptions": sorted(used), "requested": sorted(allow)}
