"""The plan of an automatic provisioning run (SPEC §12): pure functions from what GitLab listed and what the
database holds to what must change. No I/O: a dry run prints exactly the plan a real run then applies.

Rules (SPEC §5, §11, §12, §16):
- Groups: a local group bound to a GitLab group id follows that group's full path (renamed; if another local
  group holds the new name, the name stays and the conflict is reported). Else an unbound local group named
  like the path is bound. Else, with `create_groups`, a local group is created, bound. The default group is
  never touched.
- Users: found by GitLab id; else a local user with the same login and no GitLab id is linked; a local user
  with the same login and ANOTHER GitLab id is not merged (a conflict in the plan and the audit event). New
  active members are created (`provisioned_by = gitlab`). Login and name follow GitLab; email only when GitLab
  shows it.
- Memberships: a member of a group is a member of all its descendants (direct members of each subtree group,
  access level >= Guest, state `active`). Memberships of subtree groups that GitLab does not give are removed
  when their source is `sync`, or `manual` unless `keep_manual_memberships`.
- Sessions: users with live sessions whom the subtree governs (provisioned by a run, listed in it, or holding
  a sync membership of a subtree group) lose them when they are no longer an active member of the subtree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.db.automatic import Governed, LocalGroup, Member
from gateway.db.users import User as LocalUser
from gateway.sync.gitlab_tree import Listing, TreeGroup, TreeMember

SYNC, MANUAL = "sync", "manual"


@dataclass
class GroupPlan:
    """Which local group each GitLab group of the subtree maps to, and the group changes that needs."""

    local_id: dict[int, int | None] = field(default_factory=dict)  # gitlab group id -> local id (None: created)
    name: dict[int, str] = field(default_factory=dict)  # gitlab group id -> local name after the run
    create: list[tuple[str, int]] = field(default_factory=list)  # (name, gitlab group id)
    bind: list[tuple[int, int, str]] = field(default_factory=list)  # (local id, gitlab group id, name)
    rename: list[tuple[int, str, str, int]] = field(default_factory=list)  # (local id, old, new, gitlab id)
    conflicts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def existing_ids(self) -> list[int]:
        return sorted(i for i in self.local_id.values() if i is not None)


@dataclass
class Plan:
    """Everything a run changes; `to_json` is what dry runs print and the API returns."""

    groups: GroupPlan
    create_users: list[TreeMember] = field(default_factory=list)
    update_users: list[tuple[LocalUser, TreeMember, dict[str, list[str]]]] = field(default_factory=list)
    user_conflicts: list[dict[str, Any]] = field(default_factory=list)
    # (local user id or None for a created user, gitlab user id, local group id or None, gitlab group id)
    add: list[tuple[int | None, int, int | None, int]] = field(default_factory=list)
    remove: list[tuple[int, int, str]] = field(default_factory=list)  # (local user id, local group id, source)
    revoke: list[tuple[Governed, str]] = field(default_factory=list)  # (user, reason)
    logins: dict[int, str] = field(default_factory=dict)  # gitlab user id -> local login after the run
    removed_logins: dict[int, str] = field(default_factory=dict)  # local user id -> login (for the report)
    group_names: dict[int, str] = field(default_factory=dict)  # local group id -> name after the run

    @property
    def counts(self) -> dict[str, int]:
        return {
            "groups_created": len(self.groups.create), "groups_bound": len(self.groups.bind),
            "groups_renamed": len(self.groups.rename), "users_created": len(self.create_users),
            "users_updated": len(self.update_users), "memberships_added": len(self.add),
            "memberships_removed": len(self.remove), "sessions_revoked": sum(g.sessions for g, _ in self.revoke),
            "users_signed_out": len(self.revoke),
            "conflicts": len(self.groups.conflicts) + len(self.user_conflicts),
        }

    @property
    def changes(self) -> int:
        c = self.counts
        return sum(v for k, v in c.items() if k not in ("conflicts", "users_signed_out"))

    def to_json(self) -> dict[str, Any]:
        g = self.groups
        added = sorted((g.name[gid], self.logins[uid]) for _, uid, _, gid in self.add)
        removed = sorted((self.group_names[lg], self.removed_logins[lu], src) for lu, lg, src in self.remove)
        return {
            "counts": self.counts,
            "groups": {
                "created": [{"name": n, "gitlab_group_id": i} for n, i in sorted(g.create)],
                "bound": [{"name": n, "gitlab_group_id": i} for _, i, n in sorted(g.bind, key=lambda b: b[2])],
                "renamed": [{"old": o, "new": n, "gitlab_group_id": i} for _, o, n, i in sorted(g.rename)],
                "conflicts": g.conflicts,
            },
            "users": {
                "created": [{"login": m.username, "name": m.name, "gitlab_id": m.id}
                            for m in sorted(self.create_users, key=lambda m: m.username.lower())],
                "updated": [{"login": u.login, "gitlab_id": m.id, "changes": ch}
                            for u, m, ch in sorted(self.update_users, key=lambda x: x[0].login.lower())],
                "conflicts": self.user_conflicts,
            },
            "memberships": {
                "added": [{"group": grp, "login": login} for grp, login in added],
                "removed": [{"group": grp, "login": login, "source": src} for grp, login, src in removed],
            },
            "sessions": {
                "revoked": [{"login": u.login, "gitlab_id": u.gitlab_id, "sessions": u.sessions, "reason": r}
                            for u, r in sorted(self.revoke, key=lambda x: x[0].login.lower())],
            },
        }


def report_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """A plan's JSON (`Plan.to_json`, or a run's report) as (change, what, detail) rows, in the order `gateway
    sync --dry-run` prints them and the Provisioning page shows them."""
    rows: list[tuple[str, str, str]] = []
    g, u, m, s = report["groups"], report["users"], report["memberships"], report["sessions"]
    rows += [("create group", x["name"], f"GitLab group {x['gitlab_group_id']}") for x in g["created"]]
    rows += [("bind group", x["name"], f"GitLab group {x['gitlab_group_id']}") for x in g["bound"]]
    rows += [("rename group", x["old"], f"-> {x['new']}") for x in g["renamed"]]
    rows += [("create user", x["login"], f"{x['name']} (GitLab user {x['gitlab_id']})".lstrip())
             for x in u["created"]]
    rows += [("update user", x["login"], ", ".join(f"{k}: {v[0]} -> {v[1]}" for k, v in x["changes"].items()))
             for x in u["updated"]]
    rows += [("add member", x["group"], x["login"]) for x in m["added"]]
    rows += [("remove member", x["group"], f"{x['login']} ({x['source']})") for x in m["removed"]]
    rows += [("revoke sessions", x["login"], f"{x['sessions']} ({x['reason']})") for x in s["revoked"]]
    rows += [("conflict", x["group"], x["message"]) for x in g["conflicts"]]
    rows += [("conflict", x["login"], x["message"]) for x in u["conflicts"]]
    return rows


def _depth_order(groups: list[TreeGroup]) -> list[TreeGroup]:
    """Parents before children (a full path's depth is its number of slashes)."""
    return sorted(groups, key=lambda g: (g.full_path.count("/"), g.full_path, g.id))


def plan_groups(listing: Listing, local: list[LocalGroup], *, create_groups: bool) -> GroupPlan:
    """Map every GitLab group of the subtree to a local group (bound, renamed, created) or to nothing."""
    plan = GroupPlan()
    by_gitlab = {g.gitlab_group_id: g for g in local if g.gitlab_group_id is not None}
    by_name: dict[str, int | None] = {g.name: g.id for g in local}
    names = {g.id: g.name for g in local}
    local_by_id = {g.id: g for g in local}
    listed = {g.id for g in listing.groups}
    for tg in _depth_order(listing.groups):
        path = tg.full_path
        bound = by_gitlab.get(tg.id)
        if bound is not None and not bound.builtin:
            plan.local_id[tg.id] = bound.id
            plan.name[tg.id] = names[bound.id]
            if bound.name != path:
                if path in by_name and by_name[path] != bound.id:
                    plan.conflicts.append({"group": bound.name, "gitlab_path": path, "gitlab_group_id": tg.id,
                                           "reason": "rename_conflict",
                                           "message": "another local group holds the new GitLab path; the "
                                                      "name stays"})
                else:
                    plan.rename.append((bound.id, bound.name, path, tg.id))
                    del by_name[bound.name]
                    by_name[path] = bound.id
                    names[bound.id] = plan.name[tg.id] = path
            continue
        holder_id = by_name.get(path)
        holder = local_by_id.get(holder_id) if holder_id is not None else None
        if holder is not None:
            if holder.builtin or (holder.gitlab_group_id is not None and holder.gitlab_group_id != tg.id):
                reason = "default_group" if holder.builtin else "binding_mismatch"
                plan.conflicts.append({
                    "group": holder.name, "gitlab_path": path, "gitlab_group_id": tg.id, "reason": reason,
                    "message": "the default group has this name" if holder.builtin else
                               "this local group is bound to another GitLab group id"
                               + (" (inside the subtree)" if holder.gitlab_group_id in listed else "")})
                continue
            plan.local_id[tg.id] = holder.id
            plan.name[tg.id] = path
            plan.bind.append((holder.id, tg.id, path))
            continue
        if path in by_name:  # a name freed or taken by a rename earlier in this plan
            plan.conflicts.append({"group": path, "gitlab_path": path, "gitlab_group_id": tg.id,
                                   "reason": "rename_conflict", "message": "the name is being reused in this run"})
            continue
        if create_groups:
            plan.local_id[tg.id] = None
            plan.name[tg.id] = path
            plan.create.append((path, tg.id))
            by_name[path] = None
    return plan


def effective_members(listing: Listing) -> dict[int, set[int]]:
    """GitLab group id -> ids of its active members, direct or through an ancestor inside the subtree."""
    parent = {g.id: g.parent_id for g in listing.groups}
    out: dict[int, set[int]] = {}
    for g in _depth_order(listing.groups):
        direct = {m.id for m in listing.members.get(g.id, []) if m.state == "active"}
        up = parent.get(g.id)
        out[g.id] = direct | (out.get(up, set()) if up is not None else set())
    return out


def plan_members(listing: Listing, groups: GroupPlan, local_users: list[LocalUser], current: list[Member],
                 governed: list[Governed], local_groups: list[LocalGroup], *, keep_manual: bool) -> Plan:
    """Users, memberships and session revocations, given the group mapping and the database's rows."""
    plan = Plan(groups)
    info: dict[int, TreeMember] = {}
    for g in listing.groups:
        for m in listing.members.get(g.id, []):
            info.setdefault(m.id, m)
    active = {uid for uid, m in info.items() if m.state == "active"}
    by_gitlab = {u.gitlab_id: u for u in local_users if u.gitlab_id is not None}
    by_login = {u.login.lower(): u for u in local_users}
    local_of: dict[int, int | None] = {}  # gitlab user id -> local user id (None: created by this run)
    for uid in sorted(active):
        m = info[uid]
        user = by_gitlab.get(uid)
        holder = by_login.get(m.username.lower())
        if user is None and holder is not None and holder.gitlab_id is not None:
            plan.user_conflicts.append({"login": holder.login, "gitlab_id": uid,
                                        "held_by_gitlab_id": holder.gitlab_id,
                                        "message": "a local user with this login has another GitLab id; not merged"})
            continue
        if user is None and holder is not None:
            user = holder  # pre-provisioned without a GitLab id: linked (SPEC §5 rule 3)
        if user is None:
            plan.create_users.append(m)
            local_of[uid] = None
            plan.logins[uid] = m.username
            continue
        local_of[uid] = user.id
        login = m.username
        if holder is not None and holder.id != user.id:
            plan.user_conflicts.append({"login": m.username, "gitlab_id": uid, "held_by_gitlab_id": holder.gitlab_id,
                                        "message": "GitLab renamed this user to a login another local user holds; "
                                                   "the login stays"})
            login = user.login
        wanted = {"login": login, "name": m.name or user.name, "email": m.email or user.email}
        changes = {k: [getattr(user, k), v] for k, v in wanted.items() if getattr(user, k) != v}
        if user.gitlab_id is None:
            changes["gitlab_id"] = ["", str(uid)]
        if changes:
            plan.update_users.append((user, m, changes))
        plan.logins[uid] = login
    effective = effective_members(listing)
    names = {g.id: g.name for g in local_groups}
    for gid, mapped in groups.local_id.items():
        if mapped is not None:
            names[mapped] = groups.name[gid]
    plan.group_names = names
    have: dict[int, dict[int, Member]] = {}
    for row in current:
        have.setdefault(row.group_id, {})[row.user_id] = row
    for gid in sorted(groups.local_id):
        lid = groups.local_id[gid]
        rows = have.get(lid, {}) if lid is not None else {}
        target_local: set[int] = set()
        for uid in sorted(effective.get(gid, set())):
            if uid not in local_of:
                continue  # a conflict: not merged, no memberships
            luid = local_of[uid]
            if luid is not None:
                target_local.add(luid)
                if luid in rows:
                    continue
            plan.add.append((luid, uid, lid, gid))
        for luid, row in sorted(rows.items()):
            if luid not in target_local and (row.source == SYNC or (row.source == MANUAL and not keep_manual)):
                plan.remove.append((luid, row.group_id, row.source))
                plan.removed_logins[luid] = row.login
    inactive = {uid: m.state for uid, m in info.items() if m.state != "active"}
    for who in governed:
        if who.gitlab_id is not None and who.gitlab_id in active:
            continue
        state = inactive.get(who.gitlab_id) if who.gitlab_id is not None else None
        plan.revoke.append((who, f"gitlab_state_{state}" if state else "left_subtree"))
    return plan
