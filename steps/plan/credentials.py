"""Credentials in the URIs a matrix names: hidden in everything the tool writes or prints, handed
only to the client that uses them. Standard library only (planning and reports import it).

Why the credentials leave the URI where the matrix is first read (the schema's validator of
`track.mlflow.tracking_uri`, `take_credentials`), not where each file is written: the parsed
matrix is stored as it is (Metaflow's Config artifact), copied into every cell, its `cell.yaml`,
the provenance, the tracker's parameters; a URI that is redacted once is redacted in all of
them, and no writer can forget it. The user and password go into this process's environment as
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, MLflow's own variables, which its client
sends as the same basic auth: Metaflow's local tasks and the launcher's trainers inherit the
environment, so the secret is never in a file, an argument or an artifact, and the client is
given the URI without credentials (`client_uri`), so MLflow's own lines ("View run at") carry
none either. Remote cells get the variables by name (SageMaker's `remote.env`, Metaflow's
secrets on Kubernetes and Batch). Free text the tool prints or relays (library output,
exception messages) goes through `redact`.
"""

from __future__ import annotations

import os
import re
from typing import Any

HIDDEN = "***"
USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"

# scheme://userinfo@ : userinfo holds no '/', '?', '#', '@' or space (RFC 3986 percent-encodes them).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s'\"<>]+)@")


def _hidden(match: re.Match) -> str:
    """`user:password` keeps the user; a lone `token` (GitHub-style, or a user name: the two look
    alike) is hidden whole."""
    user, colon, _ = match["userinfo"].partition(":")
    return f"{match['scheme']}{user}:{HIDDEN}@" if colon else f"{match['scheme']}{HIDDEN}@"


def redact(text: str) -> str:
    """Every URI's credentials in `text` replaced by ***: `http://user:***@host:5000/`,
    `https://:***@host`, `https://***@host`. Idempotent."""
    return _USERINFO.sub(_hidden, text) if "@" in text else text


def redact_tree(data: Any) -> Any:
    """`redact` on every string of nested dicts, lists and tuples."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, dict):
        return {k: redact_tree(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return type(data)(redact_tree(v) for v in data)
    return data


def _split(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without userinfo, user, password); user and password None where it has none."""
    match = _USERINFO.match(uri)
    if match is None:
        return uri, None, None
    user, colon, password = match["userinfo"].partition(":")
    return match["scheme"] + uri[match.end():], user, (password if colon else None)


def take_credentials(uri: str) -> str:
    """A tracking URI as the matrix keeps it: its user and password moved into MLflow's
    variables of this process, `user:***@` left in their place. MLflow's variables carry a user
    and a password, both non-empty: a URI with a token alone, or an empty user, is refused
    (ValueError) rather than sent without its credentials."""
    _, user, password = _split(uri)
    if user is None or password == HIDDEN:
        return uri
    if not user or not password:
        raise ValueError("credentials in a tracking URI need a user and a password (http://user:password@host); "
                         f"or leave them out of the URI and set {USER_ENV} and {PASSWORD_ENV} "
                         "(MLFLOW_TRACKING_TOKEN for a bearer token)")
    os.environ[USER_ENV], os.environ[PASSWORD_ENV] = user, password
    return redact(uri)


class MissingCredentials(ValueError):
    """A redacted URI whose password this process was not given."""


def client_uri(uri: str) -> str:
    """The URI the MLflow client is given: without userinfo, its credentials in MLflow's
    variables (`take_credentials`). A redacted URI whose password this process was not given
    fails here, with what to set, rather than with the server's 401."""
    bare, user, _ = _split(take_credentials(uri))
    if user is not None and not os.environ.get(PASSWORD_ENV):
        raise MissingCredentials(f"{redact(uri)!r} carried a password, which is kept out of everything written, "
                                 f"and this process was not given it: set {USER_ENV} and {PASSWORD_ENV} where it "
                                 "runs (docs/remote.md#secrets)")
    return bare


def named_environment(names: list[str]) -> dict[str, str]:
    """The values of the variables a matrix names (`remote.env`) in this process, for a remote
    cell's job: the one way a value of this environment reaches a job (unset ones: none)."""
    return {name: os.environ[name] for name in names if name in os.environ}


def unset_names(names: list[str]) -> list[str]:
    """The names of `names` this process's environment does not set."""
    return [name for name in names if name not in os.environ]
