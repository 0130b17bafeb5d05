"""core.credentials: tokens verify only unaltered, only for their cluster, only until they expire."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dist_llm_train.core.credentials import (
    Claims,
    CredentialError,
    TokenAuthority,
    check_secret,
    generate_secret,
    ps_call_allowed,
)

SECRET = generate_secret()


def test_round_trip_and_claims() -> None:
    authority = TokenAuthority(SECRET, clock=lambda: 1000.0)
    token = authority.mint_for("worker", "w-1", job="job-9", ttl_s=60)
    assert authority.verify(token) == Claims("worker", "w-1", "job-9", 1060.0)
    assert authority.verify(token.encode()) == Claims("worker", "w-1", "job-9", 1060.0)
    assert SECRET not in token  # the token carries a signature by a derived key, never the secret


def test_expiry_and_other_cluster() -> None:
    now = [1000.0]
    authority = TokenAuthority(SECRET, clock=lambda: now[0])
    token = authority.mint_for("admin", ttl_s=10)
    now[0] = 1011.0
    with pytest.raises(CredentialError, match="expired"):
        authority.verify(token)
    with pytest.raises(CredentialError, match="signature"):
        TokenAuthority(generate_secret()).verify(TokenAuthority(SECRET).mint_for("admin"))


@pytest.mark.parametrize("bad", [None, "", "dlt1", "dlt1.a.b.c", "jwt.a.b", "dlt1.%%%.sig", "x" * 5000, b"\xff"])
def test_malformed_tokens_are_refused(bad: str | bytes | None) -> None:
    with pytest.raises(CredentialError):
        TokenAuthority(SECRET).verify(bad)


@given(st.integers(min_value=0), st.characters(codec="ascii"))
def test_any_one_character_change_is_refused(position: int, replacement: str) -> None:
    authority = TokenAuthority(SECRET)
    token = authority.mint_for("worker", "w-1", job="j")
    i = position % len(token)
    altered = token[:i] + replacement + token[i + 1 :]
    if altered == token:
        return
    with pytest.raises(CredentialError):  # the signature covers the token's text, so no change slips through
        authority.verify(altered)


def test_short_secrets_are_refused() -> None:
    with pytest.raises(CredentialError, match="at least 32"):
        check_secret("short")
    with pytest.raises(CredentialError):
        TokenAuthority("x" * 31)


def test_ps_permissions() -> None:
    worker = Claims("worker", "w1", "j")
    ps_call_allowed(worker, "push", "j", "w1")
    ps_call_allowed(worker, "init_job", "j")
    for op, job, wid in (("push", "j", "w2"), ("push", "k", "w1"), ("set_members", "j", None), ("stats", None, None)):
        with pytest.raises(CredentialError):
            ps_call_allowed(worker, op, job, wid)
    with pytest.raises(CredentialError):
        ps_call_allowed(Claims("worker", "w1"), "pull", "j", "w1")  # the controller-only worker credential
    with pytest.raises(CredentialError):
        ps_call_allowed(Claims("admin"), "push", "j", "w1")
    ps_call_allowed(Claims("controller"), "set_members", "j")
    with pytest.raises(CredentialError):
        ps_call_allowed(Claims("join", "w1"), "pull", "j", "w1")
