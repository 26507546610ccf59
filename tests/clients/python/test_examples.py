"""The examples that docs/clients.md quotes, run for real."""

import json
import threading

import grpc

from conftest import EXAMPLES, channel, metadata, pb, pb_grpc, wait_for
from watch_robustly import watch_robustly


def test_the_service_config_is_what_the_guide_recommends():
    config = json.loads((EXAMPLES / "service_config.json").read_text())
    by_method = {c["name"][0]["method"]: c for c in config["methodConfig"]}
    assert by_method["GetExecutionStatus"]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    # Streams are never replayed by the library: the code reconnects with last_revision.
    assert "retryPolicy" not in by_method["WatchExecution"]


def test_watch_robustly_to_the_end(stub, simulator):
    execution_id = simulator.create([{"id": "job", "simulate": {"durationMs": 200}}])
    seen = []
    final = watch_robustly(stub, execution_id, metadata=metadata(), on_message=seen.append)
    assert final.state == pb.EXECUTION_STATE_COMPLETED
    assert seen[-1].execution == final


def test_watch_robustly_reconnects_after_an_outage(simulator, faults):
    """The short-outage gateway ends watches with UNAVAILABLE UPSTREAM_OUTAGE after
    300 ms of failing upstream; the example reconnects with last_revision and sees the
    execution to its end."""
    execution_id = simulator.create([{"id": "job", "simulate": {"durationMs": 4000}}])
    seen, retries, outcome = [], [], {}
    first_message = threading.Event()

    def on_message(response):
        seen.append(response)
        first_message.set()

    def on_retry(code, reason, delay):
        retries.append((code, reason))
        faults()  # Synthome recovers while the client waits to reconnect

    def run():
        with channel("SYNTHOME_GATEWAY_SHORT_OUTAGE_ADDR") as ch:
            try:
                outcome["final"] = watch_robustly(
                    pb_grpc.ExecutionStatusServiceStub(ch),
                    execution_id,
                    metadata=metadata(),
                    on_message=on_message,
                    on_retry=on_retry,
                    initial_backoff=0.1,
                    max_backoff=0.5,
                )
            except Exception as error:  # reported below
                outcome["error"] = error

    watcher = threading.Thread(target=run)
    watcher.start()
    assert first_message.wait(10)
    faults(errorRate=1.0)
    watcher.join(timeout=30)
    assert "error" not in outcome, outcome.get("error")
    assert retries and retries[0] == (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_OUTAGE"), retries
    assert outcome["final"].state == pb.EXECUTION_STATE_COMPLETED
    revisions = [r.execution.revision for r in seen if not r.heartbeat]
    assert revisions == sorted(set(revisions)), revisions
