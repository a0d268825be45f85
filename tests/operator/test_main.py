"""Operator settings are pure decisions: tested without a cluster."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import kopf
import pytest

from lmforge.operator.main import (
    OperatorOptions,
    apply_settings,
    choose_priority,
    higher_peers,
    peer_identity,
    retry_backoffs,
)


def test_explicit_priority_is_kept() -> None:
    assert choose_priority(100) == 100


def test_the_newest_replica_has_the_highest_priority() -> None:
    """D4: a replica restarted after kill -9 outranks the dead one's record, so it never waits."""
    rng = random.Random(7)
    dead = choose_priority(None, now=1_800_000_000.0, rng=rng)
    restarted = choose_priority(None, now=1_800_000_000.001, rng=rng)  # 1 ms later, whatever the draw
    assert restarted > dead
    assert dead < 2**53  # exact in JSON (the peering object's status)


def test_replicas_started_in_the_same_millisecond_rarely_tie() -> None:
    rng = random.Random(7)
    drawn = {choose_priority(None, now=1_800_000_000.0, rng=rng) for _ in range(20)}
    assert len(drawn) >= 19


def test_peer_identity_is_the_pod_name() -> None:
    assert peer_identity({"POD_NAME": "lmforge-operator-abc"}) == "lmforge-operator-abc"
    assert peer_identity({"POD_ID": "x", "POD_NAME": "y"}) == "x"
    assert peer_identity({}) is None


def test_higher_peers_are_the_live_ones_that_outrank_us() -> None:
    peering = {
        "status": {
            "old": {
                "priority": 5,
                "lifetime": 60,
                "lastseen": "2027-01-15T08:00:00+00:00",
            },  # outranks us, alive
            "low": {"priority": 1, "lifetime": 60, "lastseen": "2027-01-15T08:00:00+00:00"},
            "expired": {"priority": 9, "lifetime": 60, "lastseen": "2027-01-15T07:00:00+00:00"},
            "me": {"priority": 9, "lifetime": 60, "lastseen": "2027-01-15T08:00:00+00:00"},
        }
    }
    now = datetime(2027, 1, 15, 8, 0, 20, tzinfo=UTC).timestamp()
    assert higher_peers(peering, priority=3, identity="me", now=now) == [("old", 5, 40.0)]
    assert higher_peers(None, priority=3, identity="me", now=now) == []


def test_settings_retry_api_calls_through_a_long_outage() -> None:
    """D2: kopf's default retries end after ~1 min, and the peering keep-alive dies with them."""
    settings = kopf.OperatorSettings()
    apply_settings(settings, OperatorOptions(), priority=1)
    assert sum(settings.networking.error_backoffs) == 600


def test_retry_backoffs_sum_to_the_budget() -> None:
    assert retry_backoffs(10) == (1, 1, 2, 3, 3)
    assert retry_backoffs(100) == (1, 1, 2, 3, 5, 8, 13, 21, 30, 16)
    assert max(retry_backoffs(600)) == 30 and sum(retry_backoffs(600)) == 600
    with pytest.raises(ValueError, match="--api-retry-seconds must be at least 1, got 0"):
        retry_backoffs(0)


def test_settings_cluster_wide_with_mandatory_peering() -> None:
    settings = kopf.OperatorSettings()
    apply_settings(settings, OperatorOptions(), priority=42)
    assert (settings.peering.name, settings.peering.priority) == ("lmforge", 42)
    assert settings.peering.mandatory and settings.peering.clusterwide and not settings.peering.standalone
    assert settings.persistence.finalizer == "lmforge.dev/finalizer"
    assert settings.posting.reporting_component == "lmforge-operator"


def test_settings_namespaced_standalone() -> None:
    settings = kopf.OperatorSettings()
    apply_settings(settings, OperatorOptions(namespaces=("team-a",), standalone=True), priority=1)
    assert settings.peering.standalone and not settings.peering.mandatory
    assert not settings.peering.clusterwide
