"""Users, roles and the per-service permission lists of the configuration."""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("user", "publisher", "administrator")
ANYONE = "*"          # a permission entry: also requests without a token
ROLE_PREFIX = "role:"  # a permission entry naming a role, e.g. "role:publisher"


@dataclass(frozen=True)
class User:
    """A configured user ([users.NAME] password_hash, role)."""

    name: str
    role: str
    password_hash: str


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: a signed-in user, or the holder of the shared static token."""

    name: str
    role: str
    shared: bool = False  # the static [server] token: every service, every job (as before users existed)

    @property
    def is_admin(self) -> bool:
        """Administrators see every job and may use the Administrator Directory."""
        return self.role == "administrator" and not self.shared

    @property
    def sees_all_jobs(self) -> bool:
        """Whether every job answers this principal (administrators and the shared token)."""
        return self.shared or self.role == "administrator"

    @property
    def client(self) -> str:
        """The job owner key: jobs submitted by a user carry `user:NAME`."""
        return "token" if self.shared else f"user:{self.name}"


def permitted(principal: Principal | None, entries: list[str] | None) -> bool:
    """Whether the principal may do what `entries` guards: None means any signed-in user;
    entries are user names, "role:NAME" or "*" (anyone, also without a token). Administrators
    and the shared token may always."""
    if principal is not None and (principal.shared or principal.role == "administrator"):
        return True
    if entries is None:
        return principal is not None
    if ANYONE in entries:
        return True
    if principal is None:
        return False
    return principal.name in entries or f"{ROLE_PREFIX}{principal.role}" in entries


def check_entries(entries: list[str], users: dict[str, User], where: str) -> list[str]:
    """Permission entries as written, or ValueError naming the unknown user or role."""
    for e in entries:
        if e == ANYONE:
            continue
        if e.startswith(ROLE_PREFIX):
            if e[len(ROLE_PREFIX):] not in ROLES:
                raise ValueError(f"{where}: {e!r} names no role (roles: {', '.join(ROLES)})")
        elif e not in users:
            raise ValueError(f"{where}: {e!r} is not a configured user (add [users.{e}] or write role:NAME)")
    return entries
