"""Access policy (SPEC §13): rule kinds, first match wins, routes.* read as rules placed first, paths not in
normal form, and the check-config review. Pure: no database, no server."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.access.policy import Policy, compile_rules, readings, review
from gateway.access.routes import normalized_path
from gateway.config_access import PolicyRuleConfig
from gateway.identity import Identity

ALICE = Identity(1, "alice", "alice@example.com", ("gateway-users", "acme/platform/sre", "sre"))
BOB = Identity(2, "bob", "bob@example.com", ("gateway-users",))


def rule(where: str, **kw: object) -> PolicyRuleConfig:
    return PolicyRuleConfig(where=where, **kw)  # type: ignore[arg-type]


GUARDED = Policy(compile_rules(policy=[rule("policy[0]", path="^/admin(/|$)", allowed_groups=("sre",))]))
POLICY = Policy(compile_rules(
    public=["^/healthz$"], api=["^/api/"],
    policy=[
        rule("policy[0]", path="^/admin/", methods=("POST", "DELETE"), allowed_groups=("acme/platform/sre",)),
        rule("policy[1]", host="grafana.example.com", path="^/api/", allowed_users=("alice",)),
        rule("policy[2]", host=".docs.example.com", allowed_groups=("writers", "acme/platform/sre"),
             allowed_users=("carol",)),
        rule("policy[3]", path="^/status$", public=True),
        rule("policy[4]", path="^/api/admin"),
        rule("policy[5]", path="^/api/admin", allowed_groups=("never",)),
    ]))


@pytest.mark.parametrize(("method", "host", "path", "who", "outcome", "rule"), [
    # public rules: anyone, with or without a session
    ("GET", "tool.example.com", "/healthz", None, "allow", "routes.public[0]"),
    ("GET", None, "/status?x=1", None, "allow", "policy[3]"),
    ("GET", None, "/status", BOB, "allow", "policy[3]"),
    # groups + methods
    ("POST", None, "/admin/users", ALICE, "allow", "policy[0]"),
    ("POST", None, "/admin/users", BOB, "forbidden", "policy[0]"),
    ("GET", None, "/admin/users", BOB, "allow", None),  # method not listed: the default decides
    ("DELETE", None, "/admin/x", None, "sign_in", None),
    # users + host
    ("GET", "grafana.example.com", "/api/dashboards", ALICE, "allow", "policy[1]"),
    ("GET", "grafana.example.com", "/api/dashboards", BOB, "forbidden", "policy[1]"),
    ("GET", "other.example.com", "/api/dashboards", BOB, "allow", None),
    # domain rule: the apex and subdomains
    ("GET", "docs.example.com", "/", ALICE, "allow", "policy[2]"),
    ("GET", "a.docs.example.com", "/", BOB, "forbidden", "policy[2]"),
    ("GET", "xdocs.example.com", "/", BOB, "allow", None),
    # routes.api decides nothing: the rule after it still applies (and its first match wins over policy[5])
    ("GET", None, "/api/admin/x", BOB, "allow", "policy[4]"),
    ("GET", None, "/other", None, "sign_in", None),
])
def test_each_rule_kind(method, host, path, who, outcome, rule):
    d = POLICY.decide(method, host, path, who)
    assert (d.outcome, d.rule) == (outcome, rule)


def test_forbidden_names_what_would_pass():
    d = POLICY.decide("GET", "docs.example.com", "/page", BOB)
    assert d.outcome == "forbidden" and d.groups == ("acme/platform/sre", "writers") and d.users
    d = POLICY.decide("GET", "grafana.example.com", "/api/x", BOB)
    assert d.groups == () and d.users


def test_routes_api_only_changes_how_anonymous_requests_are_refused():
    assert POLICY.decide("GET", None, "/api/x", None).api is True
    assert POLICY.decide("GET", None, "/web/x", None).api is False


def test_no_rules_means_signed_in():
    empty = Policy(())
    assert empty.decide("GET", None, "/x", None).outcome == "sign_in"
    assert empty.decide("GET", None, "/x", BOB).outcome == "allow"


@pytest.mark.parametrize("path", [
    "/admin/./users", "/admin//users", "/x/../admin/users", "/%61dmin/users", "/admin%2Fusers",
    "/admin\\users", "/admin;x/users", "/x/..;/admin/users", "/%2561dmin/users",
])
def test_a_path_not_in_normal_form_cannot_dodge_a_rule(path):
    assert POLICY.decide("POST", None, path, BOB).outcome == "forbidden"
    assert POLICY.decide("POST", None, path, ALICE).outcome == "allow"


@pytest.mark.parametrize("path", ["/healthz/.", "//healthz", "/status/../status", "/%68ealthz%2F"])
def test_a_path_not_in_normal_form_never_matches_a_public_rule(path):
    assert POLICY.decide("GET", None, path, None).outcome == "sign_in"


def test_unknown_path_must_pass_every_rule_that_could_apply():
    assert POLICY.decide("POST", None, None, BOB).outcome == "forbidden"
    assert POLICY.decide("GET", "grafana.example.com", None, ALICE).rule == "policy[5]"  # nobody passes it
    assert GUARDED.decide("GET", None, None, ALICE).outcome == "allow"
    assert POLICY.decide("GET", None, None, None).outcome == "sign_in"


PUBLIC_EVERYTHING = Policy(compile_rules(public=["^/"], policy=[rule("policy[0]", path=".", public=True)]))
_path_chars = st.sampled_from([*"abc/.%2fF5Cc\\;", "%2e", "%2F", "%5c", "%25", "..", "//", "%00"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_path_chars, max_size=12).map(lambda parts: "/" + "".join(parts)))
def test_property_a_path_not_in_normal_form_never_matches_a_public_rule(path):
    decision = PUBLIC_EVERYTHING.decide("GET", None, path, None)
    assert (decision.outcome == "allow") == (normalized_path(path) is not None)



@settings(max_examples=400, deadline=None)
@given(st.lists(_path_chars, max_size=10).map(lambda parts: "/" + "".join(parts)))
def test_property_every_reading_that_reaches_admin_is_guarded(tail):
    # Whatever a server makes of the path, if one reading lands under /admin, bob (not in sre) is refused.
    path = "/admin" + tail if tail.startswith("/") else tail
    lands = any(r == "/admin" or r.startswith("/admin/") for r in readings(path)) or (
        (normalized_path(path) or "").startswith("/admin"))
    if lands:
        assert GUARDED.decide("GET", None, path, BOB).outcome == "forbidden"


def test_review_reports_unreachable_and_overlapping_rules_and_unknown_groups():
    rules = compile_rules(public=["^/healthz$"], policy=[
        rule("policy[0]", path="^/admin/", allowed_groups=("sre",)),
        rule("policy[1]", path="^/admin/", methods=("POST",), allowed_groups=("ops",)),
        rule("policy[2]", host="a.example.com", allowed_users=("alice",)),
        rule("policy[3]", host="a.example.com", path="^/x", public=True),
        rule("policy[4]"),
        rule("policy[5]", path="^/late", allowed_groups=("sre",)),
    ])
    found = review(rules, known_groups=["sre"])
    assert any(f.startswith("policy[1]: unreachable: policy[0]") for f in found), found
    assert any(f.startswith("policy[3]: unreachable: policy[2]") for f in found), found
    assert any(f.startswith("policy[5]: unreachable: policy[4] before it matches every request") for f in found)
    assert any(f.startswith("policy[1].allowed_groups: no local group named 'ops'") for f in found), found
    assert not any(f.startswith(("policy[0]", "policy[2]:", "policy[4]", "routes")) for f in found), found


def test_review_of_overlap():
    rules = compile_rules(policy=[
        rule("policy[0]", path="^/a", methods=("GET", "POST"), allowed_groups=("x",)),
        rule("policy[1]", path="^/a", methods=("POST", "PUT"), allowed_groups=("y",)),
        rule("policy[2]", path="^/b", allowed_groups=("y",)),
    ])
    assert review(rules) == ["policy[1]: overlaps policy[0], which decides the requests both match"]


def test_unknown_method_cannot_borrow_a_public_rule_for_another_method():
    policy = Policy(compile_rules(policy=[rule("policy[0]", path="^/x", methods=("GET",), public=True),
                                          rule("policy[1]", path="^/x", allowed_groups=("sre",))]))
    assert policy.decide(None, None, "/x", BOB).outcome == "forbidden"
    assert policy.decide(None, None, "/x", None).outcome == "sign_in"
    assert policy.decide(None, None, "/x", ALICE).outcome == "allow"
    assert policy.decide("GET", None, "/x", None).outcome == "allow"
