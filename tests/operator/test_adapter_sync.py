"""The adapter sync decision: what each replica loads and unloads, and the status it reports."""

from lmforge.operator.adapter_sync import AdapterAction, plan, served_adapters, status_entries


def test_served_adapters_reads_cards_whose_parent_is_the_base():
    body = {"data": [{"id": "chat", "root": "/models/base"},
                     {"id": "sql", "root": "/adapters/sql", "parent": "chat"},
                     {"id": "other", "root": "/x", "parent": "another-base"}]}  # fmt: skip
    assert served_adapters(body, "chat") == {"sql": "/adapters/sql"}
    assert served_adapters({}, "chat") == {}


def test_plan_loads_missing_unloads_extra_and_reloads_moved_adapters():
    desired = {"sql": "/a/sql", "support": "/a/support-v2"}
    served = {
        "pod-b": {},  # a new replica: gets everything
        "pod-a": {"sql": "/a/sql", "support": "/a/support-v1", "old": "/a/old"},
    }
    assert plan(desired, served) == [
        AdapterAction("pod-a", "unload", "old"),
        AdapterAction("pod-a", "unload", "support"),
        AdapterAction("pod-a", "load", "support", "/a/support-v2"),
        AdapterAction("pod-b", "load", "sql", "/a/sql"),
        AdapterAction("pod-b", "load", "support", "/a/support-v2"),
    ]
    in_sync = {"pod-a": dict(desired), "pod-b": dict(desired)}
    assert plan(desired, in_sync) == []
    assert plan({}, in_sync) == [
        AdapterAction(p, "unload", n) for p in ("pod-a", "pod-b") for n in ("sql", "support")
    ]


def test_status_lists_serving_replicas_and_last_error():
    desired = {"sql": "/a/sql", "bad": "/a/bad"}
    served = {"pod-a": {"sql": "/a/sql"}, "pod-b": {"sql": "/a/old-sql"}}
    errors = {"bad": "/a/bad/adapter_config.json: use_dora=True is not supported"}
    assert status_entries(desired, served, errors) == [
        {"name": "bad", "path": "/a/bad", "replicas": [], "lastError": errors["bad"]},
        {"name": "sql", "path": "/a/sql", "replicas": ["pod-a"]},
    ]
