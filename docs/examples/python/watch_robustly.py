"""Watch one execution to its end, reconnecting when the stream breaks.

Run by tests/clients/python/test_examples.py against a real gateway; quoted in
docs/clients.md. Needs stubs generated from proto/ (package synthome.status.v1) and the
grpcio-status package.
"""

import random
import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from synthome.status.v1 import execution_status_pb2 as pb

FINAL_STATES = {pb.EXECUTION_STATE_COMPLETED, pb.EXECUTION_STATE_FAILED}

# Codes after which watching again can succeed: UNAVAILABLE (GATEWAY_SHUTTING_DOWN,
# CONNECTION_MAX_AGE, UPSTREAM_OUTAGE, WATCH_INTERRUPTED, or no connection at all) and
# RESOURCE_EXHAUSTED
# (TOO_MANY_WATCHES). NOT_FOUND, UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT
# and INTERNAL are final: watching again gives the same answer.
RECONNECT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def error_details(error: grpc.RpcError):
    """The ErrorInfo reason and the RetryInfo delay (seconds) of a failed call."""
    reason, delay = "", None
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToTimedelta().total_seconds()
    return reason, delay


def watch_robustly(
    stub,
    execution_id,
    *,
    metadata=(),
    on_message=lambda response: None,
    on_retry=lambda code, reason, delay: None,
    max_attempts=10,
    initial_backoff=0.5,
    max_backoff=30.0,
):
    """Streams `execution_id` until it completes or fails and returns the final
    Execution. Reconnects with `last_revision` after a retryable end, waiting the
    gateway's RetryInfo delay (else an exponential backoff), with jitter, never longer
    than `max_backoff`. Raises grpc.RpcError on a final error, and RuntimeError when
    `max_attempts` streams in a row ended without progress."""
    last_revision = 0
    backoff = initial_backoff
    failures = 0
    while True:
        request = pb.WatchExecutionRequest(
            execution_id=execution_id, last_revision=last_revision
        )
        final = None
        try:
            for response in stub.WatchExecution(request, metadata=metadata):
                on_message(response)
                if not response.heartbeat:
                    last_revision = response.execution.revision
                    backoff, failures = initial_backoff, 0
                if response.execution.state in FINAL_STATES:
                    final = response.execution
            if final is not None:
                return final  # the stream ended with OK right after the final state
            code, reason, delay = grpc.StatusCode.OK, "", None  # ended early: go on
        except grpc.RpcError as error:
            if error.code() not in RECONNECT_CODES:
                raise
            code = error.code()
            reason, delay = error_details(error)
        failures += 1
        if failures >= max_attempts:
            raise RuntimeError(f"gave up watching after {failures} broken streams ({code})")
        wait = min(backoff if delay is None else delay, max_backoff)
        wait += random.uniform(0, initial_backoff)  # so that clients do not reconnect in step
        on_retry(code, reason, wait)
        time.sleep(wait)
        backoff = min(backoff * 2, max_backoff)
