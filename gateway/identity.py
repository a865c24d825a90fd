"""Who is making the request: a signed-in `Identity`, or `ANONYMOUS` (handlers never see None)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Final, Literal, Protocol

from multidict import MultiMapping


class Sender(Protocol):
    """What tells who sent a request: its headers and its direct peer's address. An aiohttp request, or the
    proxied path's own request (web/fast_lane.py)."""

    @property
    def headers(self) -> MultiMapping[str]: ...

    @property
    def remote(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Identity:
    """A signed-in user as the proxy reports them: login, email and the names of their local groups."""

    is_authenticated: ClassVar[Literal[True]] = True

    user_id: int
    login: str
    email: str
    groups: tuple[str, ...]
    gitlab_id: int | None = None  # the assertion's `sub` (SPEC §13)
    sid_hash: str = ""  # the assertion's `sid`: a hash of the session id, set by the session cache
    via_token: bool = False  # SPEC §14: authenticated by a bearer token (its header never goes upstream)
    # Precomputed once per session-cache entry: the proxy sends it on every request (SPEC §4).
    groups_csv: str = field(init=False, repr=False, compare=False)
    # SPEC §11: past this Unix time GitLab has not confirmed the user's access for too long (None: no limit).
    sync_deadline: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.groups))
        object.__setattr__(self, "groups", ordered)
        object.__setattr__(self, "groups_csv", ",".join(ordered))


class Anonymous:
    """Stands in for a visitor with no valid session; use the `ANONYMOUS` singleton."""

    __slots__ = ()
    is_authenticated: ClassVar[Literal[False]] = False

    def __repr__(self) -> str:
        return "ANONYMOUS"


ANONYMOUS: Final = Anonymous()
