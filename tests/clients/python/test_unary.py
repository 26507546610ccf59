"""GetExecutionStatus from Python: every state, and every error with its ErrorInfo."""

import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conftest import REFUSED_KEY, channel, metadata, pb, pb_grpc, wait_for


def get(stub, execution_id, **kwargs):
    kwargs.setdefault("metadata", metadata())
    request = pb.GetExecutionStatusRequest(execution_id=execution_id)
    return stub.GetExecutionStatus(request, **kwargs).execution


def wait_for_state(stub, execution_id, state):
    return wait_for(
        lambda: (lambda e: e if e.state == state else None)(get(stub, execution_id)),
        f"{execution_id} to reach {pb.ExecutionState.Name(state)}",
    )


def details(error: grpc.RpcError):
    """ErrorInfo, RetryInfo and BadRequest decoded from grpc-status-details-bin."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no grpc-status-details-bin on {error.code()}"
    assert status.code == error.code().value[0]
    found = {}
    for kind in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.RetryInfo,
        error_details_pb2.BadRequest,
    ):
        for detail in status.details:
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


def assert_error(error, code, reason):
    assert error.code() == code, error
    info = details(error)["ErrorInfo"]
    assert (info.domain, info.reason) == ("synthome-gateway", reason)
    return details(error)


def test_pending(slow_simulator):
    # The slow simulator's pending phase lasts minutes.
    execution_id = slow_simulator.create([{"id": "job1"}])
    with channel("SYNTHOME_GATEWAY_SLOW_ADDR") as ch:
        execution = get(pb_grpc.ExecutionStatusServiceStub(ch), execution_id)
    assert execution.id == execution_id
    assert execution.state == pb.EXECUTION_STATE_PENDING
    assert execution.upstream_status == "pending"
    assert execution.HasField("create_time") and not execution.HasField("complete_time")
    assert (execution.progress.total_jobs, execution.progress.completed_jobs) == (1, 0)
    assert execution.progress.current_job == "job1"


def test_processing(stub, simulator):
    execution_id = simulator.create(
        [
            {"id": "clip", "simulate": {"durationMs": 20}},
            {"id": "merge", "type": "merge", "simulate": {"durationMs": 60000}, "dependsOn": ["clip"]},
        ]
    )
    execution = wait_for_state(stub, execution_id, pb.EXECUTION_STATE_PROCESSING)
    # Wait for the first job to be done, so progress is exact.
    execution = wait_for(
        lambda: (lambda e: e if e.progress.completed_jobs == 1 else None)(get(stub, execution_id)),
        "the first job to complete",
    )
    assert execution.state == pb.EXECUTION_STATE_PROCESSING
    assert [job.status for job in execution.jobs] == ["completed", "processing"]
    assert execution.progress.current_job == "merge"
    assert execution.progress.total_jobs == 2
    assert 50 <= execution.progress.progress < 100
    assert execution.revision > 0


def test_completed(stub, simulator):
    execution_id = simulator.create([{"id": "image", "type": "generateImage", "simulate": {"durationMs": 10}}])
    execution = wait_for_state(stub, execution_id, pb.EXECUTION_STATE_COMPLETED)
    assert execution.upstream_status == "completed"
    assert execution.result.url.startswith("https://")
    assert execution.progress.progress == 100
    assert execution.HasField("complete_time")
    assert execution.error == ""


def test_failed(stub, simulator):
    execution_id = simulator.create(
        [{"id": "sync", "type": "lipSync", "simulate": {"durationMs": 10, "fail": "face not detected"}}]
    )
    execution = wait_for_state(stub, execution_id, pb.EXECUTION_STATE_FAILED)
    assert "face not detected" in execution.error
    assert execution.jobs[0].status == "failed"
    assert execution.jobs[0].error == "face not detected"


def test_a_call_without_a_key_uses_the_gateways_own(stub, simulator):
    execution_id = simulator.create([{"id": "job1", "simulate": {"durationMs": 10}}])
    execution = get(stub, execution_id, metadata=())
    assert execution.id == execution_id


def test_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as caught:
        get(stub, "not an id!")
    found = assert_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EXECUTION_ID")
    violations = found["BadRequest"].field_violations
    assert [violation.field for violation in violations] == ["execution_id"]


def test_credentials_missing():
    with channel("SYNTHOME_GATEWAY_NO_KEY_ADDR") as ch:
        with pytest.raises(grpc.RpcError) as caught:
            get(pb_grpc.ExecutionStatusServiceStub(ch), "V1StGXR8Z5jdHi6BmyT12", metadata=())
    assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "CREDENTIALS_MISSING")


def test_a_key_synthome_refuses(stub, simulator):
    execution_id = simulator.create([{"id": "job1", "simulate": {"durationMs": 10}}])
    with pytest.raises(grpc.RpcError) as caught:
        get(stub, execution_id, metadata=metadata(REFUSED_KEY))
    assert_error(caught.value, grpc.StatusCode.UNAUTHENTICATED, "UPSTREAM_UNAUTHENTICATED")
    assert REFUSED_KEY not in (caught.value.details() or "")


def test_not_found(stub):
    with pytest.raises(grpc.RpcError) as caught:
        get(stub, "exec_unknown_to_synthome")
    found = assert_error(caught.value, grpc.StatusCode.NOT_FOUND, "EXECUTION_NOT_FOUND")
    assert found["ErrorInfo"].metadata["upstream_http_status"] == "404"
    assert found["ErrorInfo"].metadata["execution_id"] == "exec_unknown_to_synthome"


def test_rate_limited_with_retry_info(stub, simulator, faults):
    execution_id = simulator.create([{"id": "job1", "simulate": {"durationMs": 10}}])
    faults(rateLimitRate=1.0, retryAfterSecs=3)
    with pytest.raises(grpc.RpcError) as caught:
        get(stub, execution_id)
    found = assert_error(caught.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED")
    assert found["RetryInfo"].retry_delay.seconds == 3
    assert found["ErrorInfo"].metadata["upstream_http_status"] == "429"


def test_upstream_server_error_without_retries(stub, simulator, faults):
    execution_id = simulator.create([{"id": "job1", "simulate": {"durationMs": 10}}])
    faults(errorRate=1.0)
    with pytest.raises(grpc.RpcError) as caught:
        get(stub, execution_id)
    found = assert_error(caught.value, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_SERVER_ERROR")
    assert found["RetryInfo"].retry_delay.seconds == 1
    assert found["ErrorInfo"].metadata["upstream_http_status"] == "500"


def test_the_recommended_service_config_retries_unavailable(simulator, probe, faults):
    """docs/examples/service_config.json on the channel: a call that meets a 500 is
    retried by grpcio itself and succeeds once Synthome recovers."""
    execution_id = simulator.create([{"id": "job1", "simulate": {"durationMs": 0}}])
    wait_for(lambda: simulator.status(execution_id)["status"] == "completed", "completion")
    before = probe.status_requests(execution_id)
    faults(errorRate=1.0)
    outcome = {}

    def call():
        with channel("SYNTHOME_GATEWAY_ADDR", retries=True) as ch:
            try:
                outcome["execution"] = get(pb_grpc.ExecutionStatusServiceStub(ch), execution_id)
            except grpc.RpcError as error:
                outcome["error"] = error

    caller = threading.Thread(target=call)
    caller.start()
    # The first attempt reached Synthome and got a 500; let Synthome recover.
    wait_for(lambda: probe.status_requests(execution_id) > before, "the first attempt")
    faults()
    caller.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["execution"].state == pb.EXECUTION_STATE_COMPLETED
    assert probe.status_requests(execution_id) - before >= 2


def test_deadline_exceeded(stub, simulator, faults):
    execution_id = simulator.create([{"id": "job1", "simulate": {"durationMs": 10}}])
    faults(latencyMs=1500)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        get(stub, execution_id, timeout=0.3)
    elapsed = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.2, f"the deadline was not kept: {elapsed:.2f}s"
    # The gateway answers just before the deadline, with details; if the client's own
    # timer fires first there are none, which is fine too.
    status = rpc_status.from_call(caught.value)
    if status is not None:
        assert details(caught.value)["ErrorInfo"].reason == "DEADLINE_EXCEEDED"
