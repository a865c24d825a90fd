"""The SPEC §12 key `provisioning.automatic`: a read_api token, root GitLab groups, an interval, create_groups.

Kept beside config.py (which calls `parse_automatic` for the key and `check_automatic` once the whole tree is
read) so that the shared loader stays small. Off unless the key is set; the token (or `token_file`) is a
secret: it is never echoed in a problem, never in a repr, never logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.config import _Problems

_KEYS = ("token", "token_file", "groups", "interval", "create_groups")
DEFAULT_INTERVAL = 3600.0


@dataclass(frozen=True, slots=True)
class AutomaticConfig:
    """`provisioning.automatic` (SPEC §12)."""

    token: str = field(default="", repr=False)
    groups: tuple[str, ...] = ()
    interval: float = DEFAULT_INTERVAL
    create_groups: bool = True


def parse_automatic(v: Any, path: str, p: _Problems) -> AutomaticConfig | None:
    """The mapping under `provisioning.automatic`; null means off."""
    from gateway.config import _bool, _duration, _group_paths, _unknown_key

    if v is None:
        return None
    if not isinstance(v, dict):
        p.add(path, "must be a mapping with token, groups, interval and create_groups (or null for off)")
        return None
    for key in v:
        if key not in _KEYS:
            p.add(f"{path}.{key}", _unknown_key(str(key), list(_KEYS)))
    token = _token(v, path, p)
    groups: tuple[str, ...] | None = None
    if "groups" not in v:
        p.add(f"{path}.groups", "is required: the root GitLab groups whose subtree is provisioned")
    else:
        groups = _group_paths(v["groups"], f"{path}.groups", p)
        if groups is not None and not groups:
            p.add(f"{path}.groups", "must name at least one root GitLab group")
    interval = _duration(v["interval"], f"{path}.interval", p) if "interval" in v else DEFAULT_INTERVAL
    create = _bool(v["create_groups"], f"{path}.create_groups", p) if "create_groups" in v else True
    if token is None or groups is None or interval is None or create is None:
        return None
    return AutomaticConfig(token=token, groups=groups, interval=interval, create_groups=create)


def _token(v: dict[str, Any], path: str, p: _Problems) -> str | None:
    if "token" in v and "token_file" in v:
        p.add(f"{path}.token_file", "set either token or token_file, not both")
        return None
    if "token_file" in v:
        name = v["token_file"]
        try:
            lines = [s.strip() for s in Path(str(name)).read_text(encoding="utf-8").splitlines() if s.strip()]
        except OSError as exc:
            p.add(f"{path}.token_file", f"cannot read {name}: {exc.strerror}")
            return None
        if not lines:
            p.add(f"{path}.token_file", f"{name} is empty: it must hold a GitLab access token with read_api")
            return None
        return lines[0]
    token = v.get("token")
    if p.reported(f"{path}.token"):  # an unset ${VAR}: already said
        return None
    if not isinstance(token, str) or not token.strip():
        # Never echo the value: it is a secret.
        p.add(f"{path}.token", "is required: a GitLab group access token or personal access token with read_api "
              "(or token_file)")
        return None
    return token.strip()


def check_automatic(automatic: AutomaticConfig | None, allowed_groups: tuple[str, ...], p: _Problems) -> None:
    """SPEC §12: with allowed_groups set, every root group must lie inside one of them (case-sensitive)."""
    if automatic is None or not allowed_groups:
        return
    for i, group in enumerate(automatic.groups):
        if not any(group == a or group.startswith(a + "/") for a in allowed_groups):
            p.add(f"provisioning.automatic.groups[{i}]",
                  f"{group!r} is not inside provisioning.allowed_groups ({', '.join(allowed_groups)}): its members "
                  "could not sign in; add it there or choose a group inside them")
