"""The ONE lock order for a person's rows. Every transaction that locks or writes them follows it.

    1. the person's advisory lock (`person`, keyed by their GitLab user id);
    2. their users row (FOR UPDATE; a sign-in also the row holding the login it takes);
    3. their gitlab_grants row (FOR UPDATE, or the UPDATE/INSERT that writes it);
    4. groups, in id order (groups.lock_for_binding), then memberships, sessions and audit rows.

A transaction may skip steps (an administrator's deactivation starts at 2, a failed re-check at 3; a deleted
user's grant goes by ON DELETE CASCADE, 2 then 3) but never goes back to an earlier one while holding a later
one. Sign-ins (sync/provisioning.py) and re-checks (sync/resync.py) of the same person take step 1 first, so
they run one after the other. Before this order, a re-check locked the grant row and then waited for the
advisory lock a sign-in held while it waited for that grant row: PostgreSQL's deadlock detector aborted one of
them after deadlock_timeout (SPEC §5: "must never ... deadlock").

Statements that lock a grant row on their own, outside any transaction (the claim, saving a rotated token),
hold nothing while they wait and cannot close a cycle.
"""

from __future__ import annotations

import asyncpg

# Transaction-scoped: released at COMMIT or ROLLBACK, whatever happens to the connection's code path.
PERSON = "SELECT pg_advisory_xact_lock(hashtextextended('gateway-user:' || $1::bigint::text, 0))"


async def person(conn: asyncpg.Connection, gitlab_id: int) -> None:
    """Step 1: the advisory lock of one GitLab user, until the end of the current transaction."""
    await conn.execute(PERSON, gitlab_id)
