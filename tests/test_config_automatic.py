"""`provisioning.automatic` (SPEC §12): off unless set, token or token_file (never echoed), root groups inside
allowed_groups, interval and create_groups defaults; every problem names its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, build_config

# gitlab.url defaults to gitlab.com: these are not open configurations on purpose (SPEC §16).
OPEN_OK: dict[str, Any] = {"allow_any_gitlab_user": True}
BASE: dict[str, Any] = {"gitlab": {"client_id": "a", "client_secret": "b"},
                        "session": {"secrets": ["A" * 43 + "="]}, "provisioning": OPEN_OK}


def load(automatic: Any, **provisioning: Any) -> Any:
    return build_config({**BASE, "provisioning": {**OPEN_OK, "automatic": automatic, **provisioning}}, env={})


def problems(automatic: Any, **provisioning: Any) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load(automatic, **provisioning)
    return err.value.problems


def test_off_unless_set_and_defaults() -> None:
    assert build_config(BASE, env={}).provisioning.automatic is None
    assert load(None).provisioning.automatic is None
    auto = load({"token": "glpat-secret-value", "groups": ["acme"]}).provisioning.automatic
    assert (auto.groups, auto.interval, auto.create_groups) == (("acme",), 3600.0, True)
    assert "glpat-secret-value" not in repr(auto)


def test_token_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("glpat-from-file\n")
    auto = load({"token_file": str(secret), "groups": ["acme"], "interval": "5m", "create_groups": False}
                ).provisioning.automatic
    assert (auto.token, auto.interval, auto.create_groups) == ("glpat-from-file", 300.0, False)
    assert problems({"token": "x", "token_file": str(secret), "groups": ["a"]}) == [
        "provisioning.automatic.token_file: set either token or token_file, not both"]


def test_bad_values_name_their_keys_and_never_echo_the_token() -> None:
    found = problems({"token": "", "groups": [], "interval": "soon", "create_groups": "yes", "gruops": 1})
    assert found == [
        "provisioning.automatic.gruops: unknown key (did you mean groups?)",
        "provisioning.automatic.token: is required: a GitLab group access token or personal access token with "
        "read_api (or token_file)",
        "provisioning.automatic.groups: must name at least one root GitLab group",
        "provisioning.automatic.interval: must be a positive duration like 30s, 5m or 8h",
        "provisioning.automatic.create_groups: must be true or false",
    ]
    assert problems("yes")[0].startswith("provisioning.automatic: must be a mapping")


def test_root_groups_must_lie_inside_allowed_groups() -> None:
    assert problems({"token": "t", "groups": ["acme", "acme-corp", "other/x"]}, allowed_groups=["acme", "other"]) == [
        "provisioning.automatic.groups[1]: 'acme-corp' is not inside provisioning.allowed_groups (acme, other): "
        "its members could not sign in; add it there or choose a group inside them"]
    assert load({"token": "t", "groups": ["acme/platform"]}, allowed_groups=["acme"]).provisioning.automatic
