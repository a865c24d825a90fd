"""The error tree. Handlers and services raise these; one middleware (pages.py) turns them into an HTML page
for browsers or JSON for everything else, with the class's status. Nothing else builds error responses.

    GatewayError                      status  code
    ├── BadRequest                    400     bad_request
    │   └── InvalidState              400     invalid_state        (sign-in state missing, tampered, expired)
    ├── Unauthenticated               401     unauthenticated
    ├── Forbidden                     403     forbidden
    │   └── SignInRefused             403     (a §5 refusal: code names which one)
    ├── NotFound                      404     not_found
    ├── Conflict                      409     conflict
    ├── Unprocessable                 422     invalid
    ├── TooManySignIns                429     rate_limited        (server.signin_rate exceeded; Retry-After)
    ├── UpstreamError                 502     bad_gateway         (the proxied tool is down)
    ├── GitLabUnavailable             502     gitlab_unavailable  (error, 5xx, timeout, partial listing)
    │   └── GitLabRateLimited         503     gitlab_rate_limited (GitLab answered 429: Retry-After is passed on)
    ├── UpstreamTimeout               504     gateway_timeout
    ├── DatabaseUnavailable           503     database_unavailable
    └── AccessUnconfirmed             503     access_unconfirmed  (§11: GitLab unreachable past resync_grace)
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base: carries an HTTP status, a machine code, a title and a sentence telling the user what to do."""

    status = 500
    code = "internal"
    title = "Something went wrong"
    advice = "Try again in a moment."
    retry_label = "Try again"  # the text of the retry_url link
    details: dict[str, Any] | None = None  # extra members of the JSON answer
    retry_after: int | None = None  # seconds, sent as Retry-After
    # A refusal page's way out: GitLab's page where the user can sign out to come back as someone else.
    switch_account_url: str | None = None
    json_only = False  # answered as JSON even to a browser (bad bearer tokens: SPEC §14)
    # What went wrong inside (an exception, an upstream's failure): logged with the request, never shown.
    cause: str | None = None

    def __init__(self, message: str | None = None, *, code: str | None = None, advice: str | None = None,
                 retry_url: str | None = None) -> None:
        self.message = message or self.title
        super().__init__(self.message)
        if code is not None:
            self.code = code
        if advice is not None:
            self.advice = advice
        self.retry_url = retry_url


class BadRequest(GatewayError):
    status, code, title = 400, "bad_request", "Bad request"
    advice = "Check the request and try again."


class InvalidState(BadRequest):
    code, title = "invalid_state", "This sign-in link is invalid or has expired"
    advice = "Sign-in links are valid for 10 minutes in the browser that started them. Start again."


class Unauthenticated(GatewayError):
    status, code, title = 401, "unauthenticated", "You are not signed in"
    advice = "Sign in and try again."


class Forbidden(GatewayError):
    status, code, title = 403, "forbidden", "Access denied"
    advice = "Ask an administrator if you think you should have access."


class SignInRefused(Forbidden):
    """A refusal of SPEC §5 or §16; `code` says which rule (not_allowed, signup_disabled, gitlab_deactivated...).

    `login` and `gitlab_id` say who was refused, when known: the audit event and the log line name them.
    """

    code, title = "sign_in_refused", "You cannot sign in"

    def __init__(self, message: str | None = None, *, code: str | None = None, advice: str | None = None,
                 retry_url: str | None = None, login: str | None = None, gitlab_id: int | None = None) -> None:
        super().__init__(message, code=code, advice=advice, retry_url=retry_url)
        self.login, self.gitlab_id = login, gitlab_id


class NotFound(GatewayError):
    status, code, title = 404, "not_found", "Not found"
    advice = "Check the name or id."


class Conflict(GatewayError):
    status, code, title = 409, "conflict", "Conflict"
    advice = "It already exists or is in use."


class Unprocessable(GatewayError):
    status, code, title = 422, "invalid", "Invalid input"
    advice = "Correct the input and try again."


class TooManySignIns(GatewayError):
    """Anonymous sign-in traffic from one client address beyond `server.signin_rate` (SPEC §16)."""

    status, code, title = 429, "rate_limited", "Too many sign-in attempts"
    advice = "Wait a moment, then sign in again."

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"Too many sign-in attempts from your address: try again in {retry_after} seconds")
        self.retry_after = retry_after


class UpstreamError(GatewayError):
    status, code, title = 502, "bad_gateway", "The application is not answering"
    advice = "The service behind the gateway is down or restarting. Try again in a moment."


class GitLabUnavailable(GatewayError):
    status, code, title = 502, "gitlab_unavailable", "GitLab is unavailable, try again"
    advice = "GitLab did not answer correctly. Nothing was changed; wait a moment and sign in again."


class GitLabRateLimited(GitLabUnavailable):
    """GitLab answered 429 (SPEC §16): a 503 that says how long to wait."""

    status, code, title = 503, "gitlab_rate_limited", "GitLab is busy, try again shortly"

    def __init__(self, message: str, *, retry_after: int | None) -> None:
        wait = f"in {retry_after} seconds" if retry_after else "in a moment"
        super().__init__(message, advice=f"GitLab asked the gateway to slow down. Nothing was changed; sign in "
                                         f"again {wait}.")
        self.retry_after = retry_after


class UpstreamTimeout(GatewayError):
    status, code, title = 504, "gateway_timeout", "The application took too long to answer"
    advice = "Try again; if it keeps happening, tell the people who run this service."


class DatabaseUnavailable(GatewayError):
    status, code, title = 503, "database_unavailable", "The gateway's database is unavailable"
    advice = "Nothing was changed. Try again in a moment."


class AccessUnconfirmed(GatewayError):
    status, code, title = 503, "access_unconfirmed", "Cannot confirm your access with GitLab"
    advice = ("GitLab has not answered the gateway's re-checks for a while. Your session resumes by itself "
              "as soon as GitLab answers again; try again in a few minutes.")
