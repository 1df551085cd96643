"""Who is using the console, and whether it may start at all.

- No users configured: the console serves loopback only, and everyone who can
  reach it is the OS user running it (as on the CLI, where `--by` defaults to
  the OS user). It refuses to listen anywhere else.
- `MAKIMA_CONSOLE_USERS="alice:TOKEN,bob:TOKEN"`: HTTP basic auth, the name and
  that user's token; a decision's `by` is the signed-in name.
- `MAKIMA_CONSOLE_AUTH_HEADER=X-Forwarded-User`: a proxy in front has signed the
  user in and names them in that header (only safe when nothing but the proxy
  can reach the console).

The trust boundary (README): the console checks `approvers`, and so does the
workflow's validator, but anyone who can send updates to the Temporal
namespace can act on any directive; the console is a convenience, not a wall.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from makima.errors import SpecError


@dataclass(frozen=True)
class Access:
    users: dict[str, str] = field(default_factory=dict)  # name -> token
    header: str | None = None
    anyone_is: str | None = None  # open (loopback) mode: who every visitor is

    @property
    def open(self) -> bool:
        return self.anyone_is is not None


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_users(text: str) -> dict[str, str]:
    users: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, token = entry.partition(":")
        if not sep or not name.strip() or not token.strip():
            raise SpecError(f"MAKIMA_CONSOLE_USERS: {entry.split(':')[0]!r} is not "
                            "name:token (entries are separated by commas)")
        users[name.strip()] = token.strip()
    return users


def access_for(host: str, env: Mapping[str, str], os_user: str) -> Access:
    """The console's access rules on `host`; refuses (SpecError) to serve a
    non-loopback address without users or a proxy header."""
    users = parse_users(env.get("MAKIMA_CONSOLE_USERS", ""))
    header = env.get("MAKIMA_CONSOLE_AUTH_HEADER", "").strip() or None
    if users or header:
        return Access(users=users, header=header)
    if not is_loopback(host):
        raise SpecError(f"the console will not listen on {host} open to anyone: set "
                        "MAKIMA_CONSOLE_USERS=name:token[,name:token] or "
                        "MAKIMA_CONSOLE_AUTH_HEADER (a proxy's user header), or bind to "
                        "127.0.0.1")
    return Access(anyone_is=os_user)


def signed_in(access: Access, headers: Mapping[str, str]) -> str | None:
    """The user a request comes from, or None when it must sign in. `headers`
    has lower-case names."""
    if access.anyone_is is not None:
        return access.anyone_is
    if access.header:
        named = (headers.get(access.header.lower()) or "").strip()
        if named:
            return named
    credentials = headers.get("authorization", "")
    if access.users and credentials.lower().startswith("basic "):
        try:
            name, _, token = base64.b64decode(credentials[6:]).decode().partition(":")
        except ValueError:
            return None
        expected = access.users.get(name)
        if expected is not None and hmac.compare_digest(expected.encode(), token.encode()):
            return name
    return None
