"""Shared fixtures of the Python client suite.

Stubs are generated from proto/ with grpcio-tools into a temporary directory when the
suite starts (never committed), exactly as a team generating its own client would.
tests/other_languages.rs starts the simulator and the gateways and passes their
addresses in SYNTHOME_* environment variables.
"""

import atexit
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[3]
PROTO = REPO / "proto"
EXAMPLES = REPO / "docs" / "examples"


def _generate_stubs() -> Path:
    out = Path(tempfile.mkdtemp(prefix="synthome-stubs-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO / "synthome/status/v1/execution_status.proto"),
        ]
    )
    assert code == 0, "protoc failed on proto/"
    return out


sys.path.insert(0, str(_generate_stubs()))
sys.path.insert(0, str(EXAMPLES / "python"))

from synthome.status.v1 import execution_status_pb2 as pb  # noqa: E402
from synthome.status.v1 import execution_status_pb2_grpc as pb_grpc  # noqa: E402


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run this suite through `cargo test --test other_languages`")
    return value


API_KEY = os.environ.get("SYNTHOME_TEST_API_KEY", "")
# A key the simulator does not accept: Synthome answers 401 for it.
REFUSED_KEY = "sy_test_refused_by_the_simulator"


def metadata(key: str = API_KEY):
    return (("authorization", f"Bearer {key}"),)


def service_config() -> str:
    """The service config recommended in docs/clients.md, as a JSON string."""
    return (EXAMPLES / "service_config.json").read_text()


def channel(addr_var: str, *, retries: bool = False) -> grpc.Channel:
    """A channel to one of the gateways; with `retries`, it uses the recommended service
    config; without, retries are off so errors come back as the gateway sent them."""
    options = [("grpc.enable_retries", 1 if retries else 0)]
    if retries:
        options.append(("grpc.service_config", service_config()))
    else:
        options.append(("grpc.service_config_disable_resolution", 1))
    return grpc.insecure_channel(env(addr_var), options=options)


class Simulator:
    """The simulated Synthome API: creates executions and changes fault knobs."""

    def __init__(self, base_url: str):
        self.base_url = base_url

    def _request(self, method: str, path: str, body=None, key=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        if key:
            request.add_header("authorization", f"Bearer {key}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def create(self, jobs) -> str:
        """Creates an execution of `jobs` (dicts with id, type, simulate, dependsOn)."""
        nodes = [
            {
                "id": job["id"],
                "type": job.get("type", "generate"),
                "params": {"simulate": job.get("simulate", {})},
                "dependsOn": job.get("dependsOn", []),
            }
            for job in jobs
        ]
        body = {"executionPlan": {"jobs": nodes}, "options": {}}
        return self._request("POST", "/api/execute", body, key=API_KEY)["executionId"]

    def status(self, execution_id: str):
        """Reads an execution directly from the simulator (not through the gateway)."""
        return self._request("GET", f"/api/execute/{execution_id}/status", key=API_KEY)

    def set_faults(self, **faults):
        return self._request("PUT", "/_simulator/faults", faults)


class Probe:
    """Counters the Rust test exposes about its gateways and simulator."""

    def __init__(self, base_url: str):
        self.base_url = base_url

    def _get(self, path: str):
        with urllib.request.urlopen(self.base_url + path, timeout=10) as response:
            return json.loads(response.read())

    def status_requests(self, execution_id: str) -> int:
        return self._get(f"/status-requests/{execution_id}")["statusRequests"]

    def active_pollers(self, gateway: str) -> int:
        return self._get(f"/pollers/{gateway}")["activePollers"]


def wait_for(condition, what: str, timeout: float = 10.0):
    """Polls `condition` until it holds; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(scope="session")
def simulator():
    return Simulator(env("SYNTHOME_SIMULATOR_URL"))


@pytest.fixture(scope="session")
def slow_simulator():
    return Simulator(env("SYNTHOME_SLOW_SIMULATOR_URL"))


@pytest.fixture(scope="session")
def probe():
    return Probe(env("SYNTHOME_PROBE_URL"))


@pytest.fixture
def faults(simulator):
    """Sets simulator faults for one test and clears them afterwards."""
    yield simulator.set_faults
    simulator.set_faults()


@pytest.fixture(scope="session")
def stub():
    with channel("SYNTHOME_GATEWAY_ADDR") as ch:
        yield pb_grpc.ExecutionStatusServiceStub(ch)


@pytest.fixture(scope="session")
def retrying_stub():
    with channel("SYNTHOME_GATEWAY_ADDR", retries=True) as ch:
        yield pb_grpc.ExecutionStatusServiceStub(ch)
