"""The admin service layer: what the admin API (admin_api.py) and the admin CLI (admin_cli.py) both call.

Every change runs in one transaction that also writes its audit event and NOTIFYs every process whose caches it
touches (see db/notify.py), so an answer means the change is committed, audited and on its way to every replica.
Services take values already typed (str, int, bool) and validate their content themselves; they raise the
GatewayError subclasses of errors.py (NotFound, Conflict, Unprocessable, BadRequest) and return frozen
dataclasses, which shapes.py turns into the JSON of SPEC §4.

    paging.py    opaque cursors and limits of every list
    groups.py    groups and memberships (and the group-name rule)
    sessions.py  listing and revoking sessions
    audit.py     reading the audit trail
    shapes.py    the JSON shapes
User services live in accounts.py.
"""
