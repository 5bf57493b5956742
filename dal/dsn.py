"""Connection strings: :class:`DSN` (databases) and :class:`DSNText` (Redis).

Both keep their secrets out of every ``str``/``repr``/log line (the password and
any query argument whose name says it holds a secret: :func:`is_secret_argument`),
and a DSN's query arguments are checked per backend when it is built: what dal
passes to the driver as options, what goes to the server as settings, and what
is refused (a :class:`~dal.errors.ConfigError` naming ``<field>?<argument>``).
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import quote_plus, unquote_plus, urlsplit

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from dal.errors import ConfigError

Backend = Literal["postgresql", "mysql", "sqlite"]

# URL drivername -> backend. A bare dialect name picks dal's driver for it.
_SCHEMES: dict[str, Backend] = {
    "postgresql+asyncpg": "postgresql",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "mysql+aiomysql": "mysql",
    "mysql": "mysql",
    "mariadb+aiomysql": "mysql",
    "mariadb": "mysql",
    "sqlite+aiosqlite": "sqlite",
    "sqlite": "sqlite",
}


def is_secret_argument(name: str) -> bool:
    """Whether a DSN query argument carries a secret (its value is never shown)."""
    low = name.lower()
    return low == "passfile" or any(word in low for word in ("password", "secret", "token"))


# PostgreSQL query arguments handed to asyncpg as connection options (never as
# server settings): TLS (asyncpg builds the SSLContext from them), credentials,
# and server selection. See dal.backends.postgres.
PG_TLS_ARGUMENTS = frozenset({
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword", "sslcrl",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "sslnegotiation",
})  # fmt: skip
PG_CONNECT_ARGUMENTS = PG_TLS_ARGUMENTS | {"ssl", "password", "passfile", "target_session_attrs", "krbsrvname", "gsslib"}
# libpq connection parameters that are no server settings and that dal's
# PostgreSQL connect does not implement: refused rather than sent to the server
# as settings it would reject (or, for a secret, receive in clear).
_PG_REFUSED = frozenset({
    "host", "hostaddr", "port", "dbname", "database", "user", "connect_timeout", "client_encoding",
    "fallback_application_name", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
    "tcp_user_timeout", "replication", "gssencmode", "requiressl", "sslcompression", "sslsni", "sslcertmode",
    "requirepeer", "require_auth", "channel_binding", "gssdelegation", "load_balance_hosts", "service",
    "servicefile",
})  # fmt: skip
_PG_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_PG_TARGET_SESSION_ATTRS = ("any", "primary", "standby", "read-write", "read-only", "prefer-standby")
# A plain server setting name (a GUC, or a custom ``prefix.name`` one); ``options``
# and ``application_name`` are startup parameters of this form too.
_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
# MySQL/MariaDB: dal escapes values client-side, which is safe only in utf8mb4 and
# with backslash escapes on (dal.backends.mysql); no argument may change either.
MYSQL_CHARSET = "utf8mb4"
MYSQL_ARGUMENTS = frozenset({"charset", "password"})


def _check_query(url: URL, backend: Backend, field_name: str) -> None:
    """Refuse the query arguments dal cannot pass on as what they are (see :class:`DSN`)."""
    if url.password is not None and "password" in url.query:
        raise ConfigError(f"{field_name}?password", "the password is given twice (userinfo and ?password=)")
    for name, value in url.query.items():
        where = f"{field_name}?{name}"
        if not isinstance(value, str):
            raise ConfigError(where, "given more than once")
        if "\x00" in value:
            raise ConfigError(where, "contains a NUL character")
        if backend == "mysql":
            if name not in MYSQL_ARGUMENTS:
                raise ConfigError(
                    where,
                    f"unsupported query argument for MySQL/MariaDB; dal takes only {sorted(MYSQL_ARGUMENTS)} "
                    "(it sets the charset, sql_mode and session itself, so that no value can change a statement)",
                )
            if name == "charset" and value.lower() != MYSQL_CHARSET:
                raise ConfigError(
                    where,
                    f"charset {value!r} is not supported: dal escapes values client-side, which is "
                    f"safe only in {MYSQL_CHARSET} (the default)",
                )
        elif backend == "postgresql":
            if name in PG_CONNECT_ARGUMENTS:
                if name in ("ssl", "sslmode") and value not in _PG_SSLMODES:
                    raise ConfigError(where, f"expected one of {list(_PG_SSLMODES)}, got {value!r}")
                if name == "target_session_attrs" and value not in _PG_TARGET_SESSION_ATTRS:
                    raise ConfigError(where, f"expected one of {list(_PG_TARGET_SESSION_ATTRS)}, got {value!r}")
                continue
            if name in _PG_REFUSED:
                raise ConfigError(where, "libpq connection parameter not supported by dal")
            if is_secret_argument(name):
                raise ConfigError(where, "unsupported secret-bearing argument (it would reach the server as a setting)")
            if not _GUC_NAME.match(name):
                raise ConfigError(where, "neither a connection option dal knows nor a server setting name")
    if backend == "postgresql" and "ssl" in url.query and "sslmode" in url.query:
        raise ConfigError(f"{field_name}?ssl", "give one of ssl and sslmode")


class DSN:
    """A database URL whose secrets never leak through ``str``/``repr``.

    The password of the userinfo and every secret-bearing query argument
    (:func:`is_secret_argument`: ``password``, ``sslpassword``, ``passfile``,
    any name containing "password", "secret" or "token") show as ``***``.
    Query arguments are checked per backend when the DSN is built; a problem is
    a :class:`~dal.errors.ConfigError` naming ``<field>?<argument>``:

    - MySQL/MariaDB: only ``charset=utf8mb4`` and ``password``;
    - PostgreSQL: the connection options of :data:`PG_CONNECT_ARGUMENTS`, which go
      to asyncpg as options, and plain server setting names (``application_name``,
      ``options``, ``search_path``, ...), which go to the server as settings; libpq
      parameters dal does not implement and unknown secret-bearing names are refused;
    - SQLite: not checked (dal reads none).

    A password may be given once: in the userinfo or as ``?password=``.
    """

    __slots__ = ("backend", "url")

    def __init__(self, value: str | URL, *, field_name: str = "dsn") -> None:
        try:
            url = make_url(value)
        except (ArgumentError, ValueError, TypeError):
            # The raw text may hold a password: do not echo it.
            raise ConfigError(field_name, "not a valid database URL") from None
        backend = _SCHEMES.get(url.drivername)
        if backend is None:
            raise ConfigError(
                field_name,
                f"unknown scheme {url.drivername!r}; expected one of "
                "postgresql+asyncpg, mysql+aiomysql, mariadb+aiomysql, sqlite+aiosqlite",
            )
        _check_query(url, backend, field_name)
        self.url: URL = url
        self.backend: Backend = backend

    @property
    def password(self) -> str | None:
        """The password, from the userinfo or the ``password`` query argument."""
        query_pw = self.url.query.get("password")
        if self.url.password is not None:
            return self.url.password
        return query_pw if isinstance(query_pw, str) else None

    @property
    def masked(self) -> str:
        """The URL with its password and secret query arguments replaced by ``***``."""
        url = self.url
        base = url.set(query={}).render_as_string(hide_password=True)
        if not url.query:
            return base
        pieces = []
        for name in sorted(url.query):
            values = url.query[name]
            for value in (values,) if isinstance(values, str) else values:
                shown = "***" if is_secret_argument(name) else quote_plus(value)
                pieces.append(f"{quote_plus(name)}={shown}")
        return f"{base}?{'&'.join(pieces)}"

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"DSN({self.masked!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DSN) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


class DSNText:
    """A Redis URL whose password never leaks through ``str``/``repr``.

    Parsed the way redis-py parses it (``urllib.parse``: the password is
    everything between the first ``:`` of the userinfo and the *last* ``@``),
    so the masked form hides exactly what the client sends; a ``password``
    query argument (which redis-py also accepts), and any other whose name says it
    holds a secret (``ssl_password``, ``token``...), is masked too.
    """

    __slots__ = ("url",)

    def __init__(self, url: str, *, field_name: str = "cache.redis") -> None:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad or out-of-range port
        except (ValueError, TypeError, AttributeError):
            raise ConfigError(field_name, "not a valid Redis URL") from None
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix") or (scheme != "unix" and not parts.hostname):
            raise ConfigError(field_name, "expected redis://, rediss:// or unix:// URL")
        if scheme == "unix" and not parts.path:
            raise ConfigError(field_name, "a unix:// URL needs the socket path")
        self.url = url

    @property
    def masked(self) -> str:
        parts = urlsplit(self.url)
        userinfo, at, hostport = parts.netloc.rpartition("@")
        netloc = parts.netloc
        if at:
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}:***@{hostport}" if colon else f"{user}@{hostport}"
        query = "&".join(
            (piece.partition("=")[0] + "=***")
            if is_secret_argument(unquote_plus(piece.partition("=")[0]))
            else piece
            for piece in parts.query.split("&")
        ) if parts.query else ""
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"DSNText({self.masked!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DSNText) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)
