"""The in-memory dedupe window: exact count horizon, age horizon. Template-owned."""

from __future__ import annotations

from {{ cookiecutter.package_name }}.runtime.dedupe import BUCKET_IDS, DedupeWindow


def test_the_count_horizon_keeps_exactly_the_newest_ids() -> None:
    window = DedupeWindow(max_ids=1500, ttl_s=3600)
    ids = [f"e{n}" for n in range(3000)]
    for start in range(0, 3000, 700):  # batches straddling bucket boundaries
        window.add([(event_id, 100.0) for event_id in ids[start : start + 700]], 100.0)
    assert len(window) == 1500
    assert all(event_id in window for event_id in ids[1500:])
    assert not any(event_id in window for event_id in ids[:1500])


def test_the_age_horizon_forgets_ids_older_than_the_ttl() -> None:
    window = DedupeWindow(max_ids=10_000, ttl_s=60)
    window.add([("old", 1000.0)], 1000.0)
    window.add([("newer", 1030.0)], 1030.0)
    window.expire(1060.5)
    assert "old" not in window and "newer" in window
    window.expire(1090.5)
    assert len(window) == 0


def test_an_id_recorded_again_is_counted_once() -> None:
    window = DedupeWindow(max_ids=BUCKET_IDS * 3, ttl_s=3600)
    window.add([("a", 1.0), ("b", 1.0)], 1.0)
    window.add([("a", 2.0)], 2.0)
    assert len(window) == 2 and "a" in window and "c" not in window
    assert 1 not in window  # not an id: never a member
