"""ClickHouse SQL text: quoting, a small lexer, CREATE-statement rewriting, fingerprints.

Names from the server or the operator are only ever put into SQL through
``quote_ident`` / ``quote_string`` (backquotes or single quotes, with backslash
and quote escaped), never pasted. The lexer understands just enough of
ClickHouse's syntax (quoted identifiers, string literals, comments, brackets)
to rename the object a stored CREATE statement defines, to rewrite references
to a renamed database, and to check that a statement is well-formed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from strongroom.errors import InvalidInput

_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_.]*(?:[eE][+-]?[0-9]+)?")
_TYPE_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*")
_NESTED_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\s*[(,)]")
_ESCAPES = {"b": "\b", "f": "\f", "r": "\r", "n": "\n", "t": "\t", "0": "\0", "a": "\a", "v": "\v"}


def quote_ident(name: str) -> str:
    """Backquote an identifier; backslash and backquote are escaped."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_string(value: str) -> str:
    """A single-quoted string literal; backslash and quote are escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def qualified(database: str, table: str) -> str:
    return f"{quote_ident(database)}.{quote_ident(table)}"


@dataclass(frozen=True)
class Token:
    kind: str  # ident, qident, string, number, punct, word
    text: str  # raw source text
    start: int
    end: int
    value: str  # decoded identifier / string value, or the text


def _unescape(body: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt == "x" and _HEX2.fullmatch(body[i + 2 : i + 4]):
                out.append(chr(int(body[i + 2 : i + 4], 16)))
                i += 4
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _quoted_end(text: str, start: int, quote: str) -> int:
    """Index just past the closing quote of a quoted token starting at ``start``."""
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == quote:
            if i + 1 < len(text) and text[i + 1] == quote:  # doubled quote
                i += 2
                continue
            return i + 1
        i += 1
    raise InvalidInput(f"unterminated {quote}-quoted text at offset {start}")


def tokenize(text: str) -> list[Token]:
    """Tokens of ``text`` (whitespace and comments dropped). Raises InvalidInput if malformed."""
    tokens: list[Token] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise InvalidInput(f"unterminated comment at offset {i}")
            i = j + 2
        elif ch in "`\"'":
            end = _quoted_end(text, i, ch)
            raw = text[i:end]
            body = _unescape(raw[1:-1].replace(ch + ch, "\\" + ch))
            kind = "string" if ch == "'" else "qident"
            tokens.append(Token(kind, raw, i, end, body))
            i = end
        elif ch.isalpha() or ch == "_":
            m = _BARE.match(text, i)
            assert m is not None
            tokens.append(Token("ident", m.group(), i, m.end(), m.group()))
            i = m.end()
        elif ch.isdigit():
            m = _NUMBER.match(text, i)
            assert m is not None
            tokens.append(Token("number", m.group(), i, m.end(), m.group()))
            i = m.end()
        elif ch.isalnum():  # unicode letters are allowed in bare identifiers too
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            tokens.append(Token("ident", text[i:j], i, j, text[i:j]))
            i = j
        else:
            two = text[i : i + 2]
            if two in ("<=", ">=", "!=", "<>", "==", "||", "->", "::"):
                tokens.append(Token("punct", two, i, i + 2, two))
                i += 2
            else:
                tokens.append(Token("punct", ch, i, i + 1, ch))
                i += 1
    return tokens


def _is_name(tok: Token) -> bool:
    return tok.kind in ("ident", "qident")


def _upper(tok: Token) -> str:
    return tok.text.upper() if tok.kind == "ident" else ""


@dataclass(frozen=True)
class CreateHead:
    """What a CREATE statement defines and where its name ends."""

    kind: str  # DATABASE, TABLE, VIEW, MATERIALIZED VIEW, DICTIONARY
    database: str | None
    name: str
    start: int  # offset of the (possibly qualified) name
    end: int  # offset just past the name
    body_tokens: list[Token]


def parse_create(stmt: str) -> CreateHead:
    """Parse ``CREATE [TEMPORARY] {DATABASE|TABLE|VIEW|MATERIALIZED VIEW|DICTIONARY}
    [IF NOT EXISTS] [db.]name ...`` and check the rest is lexically sound."""
    tokens = tokenize(stmt)
    words = [_upper(t) for t in tokens]
    if not tokens or words[0] not in ("CREATE", "ATTACH"):
        raise InvalidInput("not a CREATE statement")
    i = 1
    if i < len(words) and words[i] == "TEMPORARY":
        i += 1
    if i + 1 < len(words) and words[i] == "MATERIALIZED" and words[i + 1] == "VIEW":
        kind, i = "MATERIALIZED VIEW", i + 2
    elif i < len(words) and words[i] in ("DATABASE", "TABLE", "VIEW", "DICTIONARY"):
        kind, i = words[i], i + 1
    else:
        raise InvalidInput("CREATE statement defines no DATABASE, TABLE or VIEW")
    if words[i : i + 3] == ["IF", "NOT", "EXISTS"]:
        i += 3
    if i >= len(tokens) or not _is_name(tokens[i]):
        raise InvalidInput("CREATE statement has no object name")
    first = tokens[i]
    database: str | None = None
    name = first.value
    end = first.end
    if (
        kind != "DATABASE"
        and i + 2 < len(tokens)
        and tokens[i + 1].text == "."
        and _is_name(tokens[i + 2])
    ):
        database, name, end = first.value, tokens[i + 2].value, tokens[i + 2].end
        i += 3
    else:
        i += 1
    depth = 0
    for tok in tokens[i:]:
        if tok.text in "([":
            depth += 1
        elif tok.text in ")]":
            depth -= 1
            if depth < 0:
                raise InvalidInput("unbalanced brackets in CREATE statement")
    if depth:
        raise InvalidInput("unbalanced brackets in CREATE statement")
    return CreateHead(kind, database, name, first.start, end, tokens[i:])


def rewrite_create(
    stmt: str, *, database: str, name: str, rename_databases: dict[str, str] | None = None
) -> str:
    """The statement with its object renamed to ``database.name`` and, in the rest of the
    statement, every ``old_db.`` qualifier in ``rename_databases`` replaced (and a
    dictionary's ``SOURCE(CLICKHOUSE(... DB 'old_db'))``)."""
    head = parse_create(stmt)
    new_head = quote_ident(name) if head.kind == "DATABASE" else qualified(database, name)
    parts = [stmt[: head.start], new_head]
    pos = head.end
    renames = rename_databases or {}
    toks = head.body_tokens
    engine_db = _engine_database_arg(toks) if renames else None
    for idx, tok in enumerate(toks):
        if idx == engine_db and tok.value in renames:
            # Distributed(cluster, 'db', ...) / Buffer('db', ...): the table the engine
            # reads or flushes to is in the renamed database
            parts.append(stmt[pos : tok.start])
            new = renames[tok.value]
            parts.append(quote_string(new) if tok.kind == "string" else quote_ident(new))
            pos = tok.end
        elif (
            head.kind == "DICTIONARY"
            and tok.kind == "string"
            and tok.value in renames
            and idx
            and _upper(toks[idx - 1]) == "DB"
        ):  # SOURCE(CLICKHOUSE(... DB 'old_db')): the dictionary reads the renamed database
            parts.append(stmt[pos : tok.start])
            parts.append(quote_string(renames[tok.value]))
            pos = tok.end
        elif (
            renames
            and _is_name(tok)
            and tok.value in renames
            and idx + 1 < len(toks)
            and toks[idx + 1].text == "."
            and (idx == 0 or toks[idx - 1].text != ".")
        ):
            parts.append(stmt[pos : tok.start])
            parts.append(quote_ident(renames[tok.value]))
            pos = tok.end
    parts.append(stmt[pos:])
    return "".join(parts)


# engines whose arguments name a database, and that argument's position
_ENGINE_DATABASE_ARG = {"Distributed": 1, "Buffer": 0}


def _engine_database_arg(toks: list[Token]) -> int | None:
    """Index of the token naming the database in ``ENGINE = Distributed(...)`` or
    ``Buffer(...)`` (top level of the statement), or None."""
    depth = 0
    for idx, tok in enumerate(toks[:-3]):
        if tok.text in "([":
            depth += 1
        elif tok.text in ")]":
            depth -= 1
        elif depth == 0 and _upper(tok) == "ENGINE" and toks[idx + 1].text == "=":
            engine, opening = toks[idx + 2], toks[idx + 3]
            position = _ENGINE_DATABASE_ARG.get(engine.value)
            if position is None or opening.text != "(":
                return None
            arg, inner = 0, 0
            for j in range(idx + 4, len(toks)):
                t = toks[j]
                if t.text in "([":
                    inner += 1
                elif t.text in ")]":
                    if inner == 0:
                        return None
                    inner -= 1
                elif t.text == "," and inner == 0:
                    arg += 1
                elif inner == 0 and arg == position and t.kind in ("string", "ident", "qident"):
                    return j
    return None


def references(stmt: str, default_database: str) -> set[tuple[str, str]]:
    """(database, name) pairs a statement's body names as ``db.name`` (or ``TO name``)."""
    head = parse_create(stmt)
    toks = head.body_tokens
    found: set[tuple[str, str]] = set()
    for idx in range(len(toks) - 2):
        a, dot, b = toks[idx], toks[idx + 1], toks[idx + 2]
        if _is_name(a) and dot.text == "." and _is_name(b):
            found.add((a.value, b.value))
    for idx in range(len(toks) - 1):
        if _upper(toks[idx]) in ("FROM", "JOIN", "TO") and _is_name(toks[idx + 1]):
            if idx + 2 < len(toks) and toks[idx + 2].text == ".":
                continue
            found.add((default_database, toks[idx + 1].value))
    return found


def normalized(stmt: str) -> str:
    """The statement's tokens with identifiers and strings decoded and re-quoted:
    two statements that differ only in layout and quoting compare equal."""
    out = []
    for tok in tokenize(stmt):
        if tok.kind in ("ident", "qident"):
            out.append("`" + quote_ident(tok.value)[1:])
        elif tok.kind == "string":
            out.append(quote_string(tok.value))
        else:
            out.append(tok.text)
    return " ".join(out)


# --- types -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TypeNode:
    name: str
    args: tuple[TypeNode | str, ...] = ()

    def __str__(self) -> str:
        if not self.args:
            return self.name
        return f"{self.name}({', '.join(str(a) for a in self.args)})"


def parse_type(text: str) -> TypeNode:
    """Parse a ClickHouse type name such as ``Array(Nullable(Decimal(18, 4)))``."""
    node, pos = _parse_type(text.strip(), 0)
    if pos != len(text.strip()):
        raise InvalidInput(f"cannot parse type {text[:80]!r}")
    return node


def _parse_type(text: str, pos: int) -> tuple[TypeNode, int]:
    m = _TYPE_NAME.match(text, pos)
    if not m:
        raise InvalidInput(f"cannot parse type {text[:80]!r}")
    name, pos = m.group(1), m.end()
    if pos >= len(text) or text[pos] != "(":
        return TypeNode(name), pos
    pos += 1
    args: list[TypeNode | str] = []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == ")":
            return TypeNode(name, tuple(args)), pos + 1
        # an argument: a nested type, or raw text (numbers, 'enum' = 1, function names)
        raw_start = pos
        nested = _NESTED_TYPE.match(text, pos)
        if nested and name not in ("Enum8", "Enum16", "AggregateFunction", "DateTime"):
            sub, pos = _parse_type(text, pos)
            args.append(sub)
        else:
            depth = 0
            while pos < len(text):
                ch = text[pos]
                if ch == "'":
                    pos = _quoted_end(text, pos, "'")
                    continue
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    if depth == 0:
                        break
                    depth -= 1
                elif ch == "," and depth == 0:
                    break
                pos += 1
            args.append(text[raw_start:pos].strip())
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == ")":
            continue
        else:
            raise InvalidInput(f"cannot parse type {text[:80]!r}")


_HASHABLE = {
    "UInt8", "UInt16", "UInt32", "UInt64", "Int8", "Int16", "Int32", "Int64",
    "Float32", "Float64", "String", "FixedString", "Date", "DateTime", "Enum8", "Enum16",
}  # fmt: skip


def _directly_hashable(node: TypeNode) -> bool:
    if node.name in _HASHABLE:
        return True
    if node.name in ("Array", "Tuple", "LowCardinality"):
        return all(isinstance(a, TypeNode) and _directly_hashable(a) for a in node.args)
    return False


def hash_args(expr: str, type_text: str, *, finalize_aggregates: bool = True) -> list[str]:
    """Arguments for ``cityHash64(...)`` that hash one column of the given type exactly.

    An aggregate state's bytes depend on its history (a ``uniq`` state re-serialized after
    a restore lists its hash set in another order), so states are hashed by their
    ``finalizeAggregation`` value; ``finalize_aggregates=False`` is the older rule
    (``toString`` of the state) that manifests without ``fingerprint_aggregates`` used.

    cityHash64 returns NULL for a NULL argument (and then ``sum`` would skip the row), and
    rejects Decimal, UUID and aggregate states: those go through ``isNull`` /
    ``assumeNotNull`` and ``toString``.
    """
    node = parse_type(type_text)
    if node.name == "AggregateFunction" and finalize_aggregates:
        return [f"toString(finalizeAggregation({expr}))"]
    if node.name == "LowCardinality" and node.args and isinstance(node.args[0], TypeNode):
        node = node.args[0]
    if node.name == "Nullable" and node.args and isinstance(node.args[0], TypeNode):
        inner = f"assumeNotNull({expr})"
        return [f"isNull({expr})", *hash_args(inner, str(node.args[0]))]
    if _directly_hashable(node):
        return [expr]
    return [f"toString({expr})"]


def fingerprint_expr(columns: list[tuple[str, str]], *, finalize_aggregates: bool = True) -> str:
    """``sum(cityHash64(...))`` over all columns: an order-independent content hash."""
    args: list[str] = []
    for name, type_text in columns:
        args += hash_args(quote_ident(name), type_text, finalize_aggregates=finalize_aggregates)
    if not args:
        return "toUInt64(0)"
    return f"sum(cityHash64({', '.join(args)}))"


def strip_low_cardinality(type_text: str) -> str:
    """The type as it travels in Native with ``low_cardinality_allow_in_native_format=0``."""
    return str(_strip_lc(parse_type(type_text)))


def _strip_lc(node: TypeNode) -> TypeNode:
    if node.name == "LowCardinality" and node.args and isinstance(node.args[0], TypeNode):
        return _strip_lc(node.args[0])
    return TypeNode(
        node.name, tuple(_strip_lc(a) if isinstance(a, TypeNode) else a for a in node.args)
    )
