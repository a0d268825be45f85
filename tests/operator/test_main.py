"""Operator settings are pure decisions: tested without a cluster."""

from __future__ import annotations

import random

import kopf

from lmforge.operator.main import OperatorOptions, apply_settings, choose_priority


def test_explicit_priority_is_kept() -> None:
    assert choose_priority(100) == 100


def test_random_priorities_do_not_tie() -> None:
    rng = random.Random(7)
    drawn = {choose_priority(None, rng) for _ in range(1000)}
    assert len(drawn) == 1000 and min(drawn) >= 1


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
