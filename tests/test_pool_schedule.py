"""`RetryPolicy`, the pool's rule for the samples of a failed call, without Ray: a batch is
split into single calls, a single call is retried up to `max_attempts`, then the sample is one
failure row naming why; the counters say what happened."""

from __future__ import annotations

from collections import Counter

from diffcam.tasks.pool_schedule import Call, RetryPolicy, describe_failure


def _item(sid: str) -> dict:
    return {"sample_id": sid, "run_id": "r", "shard_id": 0, "line_no": 3}


def test_a_failed_batch_is_split_into_one_call_per_sample():
    stats: Counter[str] = Counter()
    policy = RetryPolicy(max_attempts=3, stats=stats)
    batch = [_item("a"), _item("b"), _item("c")]
    policy.dispatched(batch)
    requeue, row = policy.failed(batch, "RayActorError: died", timed_out=False)
    assert requeue == [[_item("a")], [_item("b")], [_item("c")]] and row is None
    assert stats == Counter(isolated=3)


def test_a_sample_failing_alone_is_retried_then_becomes_one_failure_row():
    stats: Counter[str] = Counter()
    policy = RetryPolicy(max_attempts=3, stats=stats)
    it = _item("poison")
    policy.dispatched([it, _item("other")])  # first in a batch of two
    policy.failed([it, _item("other")], "x", timed_out=False)
    outcomes = []
    for _ in range(3):
        policy.dispatched([it])
        outcomes.append(policy.failed([it], "RayTaskError: boom", timed_out=False))
    assert [o[0] for o in outcomes[:2]] == [[[it]], [[it]]] and outcomes[0][1] is None and outcomes[1][1] is None
    requeue, row = outcomes[2]
    assert requeue == [] and row is not None
    f = row["failures"]
    assert (row["sample_id"], row["samples"], row["token_maps"]) == ("poison", None, [])
    assert (f["stage"], f["error_class"], f["attempts"]) == ("worker", "WorkerCrash", 4)  # 4 calls carried it
    assert "3 time(s)" in f["message"] and "RayTaskError: boom" in f["message"]
    assert stats == Counter(isolated=2, retried=2, poison=1)


def test_a_sample_that_keeps_timing_out_is_a_worker_timeout():
    policy = RetryPolicy(max_attempts=1, stats=Counter())
    call = Call(slot=0, items=[_item("slow")], started=0.0, timed_out=True)
    why = describe_failure(RuntimeError("killed"), call, call_timeout_s=2.0)
    assert why == "timed out after 2 s per sample (worker killed)"
    policy.dispatched(call.items)
    _, row = policy.failed(call.items, why, timed_out=True)
    assert row is not None and row["failures"]["error_class"] == "WorkerTimeout"
    assert describe_failure(ValueError("first line\nsecond"), Call(0, [], 0.0), None) == "ValueError: first line"
