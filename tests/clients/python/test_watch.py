"""WatchExecution from Python: a full watch, its errors, heartbeats."""

import grpc
import pytest

from conftest import metadata, pb, wait_for


def watch(stub, execution_id, last_revision=0, **kwargs):
    kwargs.setdefault("metadata", metadata())
    request = pb.WatchExecutionRequest(execution_id=execution_id, last_revision=last_revision)
    return stub.WatchExecution(request, **kwargs)


def test_a_full_watch_to_the_end(stub, simulator):
    execution_id = simulator.create(
        [
            {"id": "a", "simulate": {"durationMs": 300}},
            {"id": "b", "simulate": {"durationMs": 300}, "dependsOn": ["a"]},
        ]
    )
    call = watch(stub, execution_id)
    responses = list(call)  # ends without raising: the stream ended OK
    assert call.code() == grpc.StatusCode.OK
    changes = [r.execution for r in responses if not r.heartbeat]
    revisions = [e.revision for e in changes]
    assert revisions == sorted(set(revisions)), f"revisions must strictly increase: {revisions}"
    assert len(changes) >= 2
    assert responses[-1].execution.state == pb.EXECUTION_STATE_COMPLETED
    assert not responses[-1].heartbeat
    assert all(e.state != pb.EXECUTION_STATE_COMPLETED for e in changes[:-1])
    # A heartbeat repeats the snapshot (and revision) of the message before it.
    for before, heartbeat in zip(responses, responses[1:]):
        if heartbeat.heartbeat:
            assert heartbeat.execution.revision == before.execution.revision


def test_heartbeats_keep_a_quiet_stream_alive(stub, simulator):
    # The test gateway sends a heartbeat after 300 ms of quiet.
    execution_id = simulator.create([{"id": "slow", "simulate": {"durationMs": 60000}}])
    call = watch(stub, execution_id, timeout=10)
    seen = []
    for response in call:
        seen.append(response)
        if response.heartbeat:
            break
    call.cancel()
    assert seen[-1].heartbeat
    assert seen[-1].execution.revision == seen[-2].execution.revision


def test_reconnecting_with_the_last_revision_sends_no_duplicate(stub, simulator):
    execution_id = simulator.create([{"id": "job", "simulate": {"durationMs": 60000}}])
    wait_for(lambda: simulator.status(execution_id)["status"] == "processing", "processing")
    # Another watcher keeps the gateway's poller (and so its revision) alive meanwhile.
    keeper = watch(stub, execution_id, timeout=10)
    next(keeper)
    first_call = watch(stub, execution_id, timeout=10)
    first = next(first_call)
    first_call.cancel()
    # Nothing changed: the gateway holds the first message back until a change, and
    # sends only the heartbeat, which has the same revision.
    second_call = watch(stub, execution_id, last_revision=first.execution.revision, timeout=10)
    second = next(second_call)
    second_call.cancel()
    keeper.cancel()
    assert second.heartbeat
    assert second.execution.revision == first.execution.revision


def test_a_watch_of_an_unknown_execution_ends_with_not_found(stub):
    with pytest.raises(grpc.RpcError) as caught:
        list(watch(stub, "exec_unknown_to_synthome"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_watch_deadline_ends_the_stream(stub, simulator):
    execution_id = simulator.create([{"id": "slow", "simulate": {"durationMs": 60000}}])
    call = watch(stub, execution_id, timeout=0.5)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
