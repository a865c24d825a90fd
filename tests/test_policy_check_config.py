"""`gateway check-config` on SPEC §13 keys, as a subprocess: unreachable and overlapping rules and unknown
group names are warnings (exit 0) naming the rule's key path; bad regexes and unknown keys are errors (exit 2)."""

from __future__ import annotations

from test_cli_basic import gateway

POLICY = {"policy": [
    {"match": {"path": "^/admin/"}, "allowed_groups": ["sre", "ghosts"]},
    {"match": {"path": "^/admin/", "methods": ["POST"]}, "allowed_users": ["alice"]},
    {"match": {"path": "^/team/", "methods": ["GET", "POST"]}, "allowed_groups": ["sre"]},
    {"match": {"path": "^/team/", "methods": ["POST", "PUT"]}, "allowed_users": ["bob"]},
    {"match": {"path": "^/"}},
    {"match": {"path": "^/late$"}, "public": True},
]}


async def test_rules_are_reviewed_with_key_paths(write_config, db):
    await db.execute("INSERT INTO groups (name) VALUES ('sre')")
    code, out, err = await gateway("check-config", "-c", str(write_config(**POLICY)))
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: policy[1]: unreachable: policy[0] already decides every request it matches",
        "warning: policy[3]: overlaps policy[2], which decides the requests both match",
        "warning: policy[5]: unreachable: policy[4] before it matches every request",
        "warning: policy[0].allowed_groups: no local group named 'ghosts' (yet): nobody passes through it until "
        "an administrator creates it",
    ], out


async def test_without_a_database_group_names_are_not_checked(write_config):
    path = write_config(**POLICY, database={"dsn": "postgresql://u:p@127.0.0.1:9/none"})
    code, out, err = await gateway("check-config", "-c", str(path))
    assert code == 0, err
    assert "warning: policy: group names not checked: the database did not answer" in out
    assert "Traceback" not in out + err


async def test_bad_rules_are_errors_with_key_paths(write_config):
    path = write_config(policy=[{"match": {"path": "^/(unclosed"}, "alowed_groups": ["sre"]}],
                        upstreams=[{"match": {"hots": "a.example.com"}, "url": "http://127.0.0.1:1"}])
    code, out, err = await gateway("check-config", "-c", str(path))
    assert code == 2 and out == ""
    assert "policy[0].match.path: '^/(unclosed' is not a valid regular expression" in err
    assert "policy[0].alowed_groups: unknown key (did you mean allowed_groups?)" in err
    assert "upstreams[0].match.hots: unknown key (did you mean host?)" in err
    assert "Traceback" not in err
