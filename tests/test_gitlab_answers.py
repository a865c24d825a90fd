"""Pure readings of GitLab's answers (SPEC §16), as properties: what a 403 message means for the user, and how
long a 429 asks us to wait."""

from __future__ import annotations

import email.utils
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sync.gitlab import GITLAB_REFUSALS, MAX_RETRY_AFTER, gitlab_refusal, retry_after

# Every page a GitLab refusal can show: fixed sentences only.
PAGES = {(code, message, advice) for _, code, message, advice in GITLAB_REFUSALS} | {(
    "gitlab_refused", "GitLab refuses to let applications use your account",
    "Sign in to GitLab in your browser to see why, then sign in here again.")}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_every_api_guard_refusal_is_a_refusal_that_never_echoes_gitlab(reason: str) -> None:
    """Property: any "403 Forbidden - <reason>" is a 403 refusal whose page is one of the fixed ones: none of
    GitLab's words are shown (they may carry GitLab's URL or the user's handle)."""
    refusal = gitlab_refusal(f"403 Forbidden - {reason}")
    assert refusal is not None and refusal.status == 403
    assert (refusal.code, refusal.message, refusal.advice) in PAGES


@given(st.one_of(st.none(), st.integers(), st.text(max_size=100).filter(
    lambda t: not t.lower().startswith("403 forbidden - "))))
def test_other_403_messages_are_not_refusals(message: object) -> None:
    """Property: a 403 that is not the API guard's (insufficient scope, a proxy's page) is not blamed on the user."""
    assert gitlab_refusal(message) is None


def test_each_reason_of_gitlab_maps_to_its_own_code() -> None:
    # GitLab's wording (lib/gitlab/auth/user_access_denied_reason.rb); "pending approval" also says "blocked".
    said = {
        "Your account is pending approval from your administrator and hence blocked.": "gitlab_pending_approval",
        "Your account has been blocked.": "blocked",
        "Your account has been deactivated by your administrator. Please log back in": "gitlab_deactivated",
        "Your primary email address is not confirmed. Please check your inbox": "gitlab_email_unconfirmed",
        "Your password expired. Please access GitLab from a web browser": "gitlab_password_expired",
        "You (@ann) must accept the Terms of Service in order to perform this action.": "gitlab_terms",
        "This action cannot be performed by internal users": "gitlab_internal_user",
        "The `ann` user cannot perform this action.": "gitlab_refused",  # older GitLab's fallback
    }
    for reason, code in said.items():
        refusal = gitlab_refusal(f"403 Forbidden - {reason}")
        assert refusal is not None and refusal.code == code, reason


@given(st.text(max_size=80))
def test_retry_after_is_bounded_and_never_raises(value: str) -> None:
    """Property: whatever GitLab (or a proxy) sends as Retry-After, the wait shown is None or 0..MAX_RETRY_AFTER."""
    wait = retry_after(value)
    assert wait is None or 0 <= wait <= MAX_RETRY_AFTER


@given(st.integers(min_value=0, max_value=10**12))
def test_retry_after_seconds(seconds: int) -> None:
    assert retry_after(str(seconds)) == min(seconds, MAX_RETRY_AFTER)


def test_retry_after_as_an_http_date() -> None:
    soon = email.utils.formatdate(time.time() + 90, usegmt=True)
    wait = retry_after(soon)
    assert wait is not None and 85 <= wait <= 91
    assert retry_after(email.utils.formatdate(time.time() - 90, usegmt=True)) == 0
