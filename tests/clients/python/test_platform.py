"""Health, reflection and gRPC-Web, as tools and browsers use them."""

import http.client
import struct

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import channel, env, metadata, pb

SERVICE = "synthome.status.v1.ExecutionStatusService"


def test_health_check_is_serving():
    with channel("SYNTHOME_GATEWAY_ADDR") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


def reflect(ch, method_path, request):
    """One request on a reflection stream; v1 and v1alpha messages are identical on the
    wire, and grpcio-reflection ships client stubs for v1alpha only."""
    call = ch.stream_stream(
        method_path,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return next(iter(call(iter([request]), timeout=5)))


def test_reflection_v1alpha_lists_the_service():
    with channel("SYNTHOME_GATEWAY_ADDR") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    names = [service.name for service in response.list_services_response.service]
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names


def test_reflection_v1_lists_and_describes_the_service():
    path = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
    with channel("SYNTHOME_GATEWAY_ADDR") as ch:
        listed = reflect(ch, path, reflection_pb2.ServerReflectionRequest(list_services=""))
        described = reflect(
            ch, path, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)
        )
    assert SERVICE in [service.name for service in listed.list_services_response.service]
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    contract = next(f for f in files if f.name == "synthome/status/v1/execution_status.proto")
    methods = {m.name for s in contract.service for m in s.method}
    assert methods == {"GetExecutionStatus", "WatchExecution"}


def grpc_web_frames(body: bytes):
    """Splits a gRPC-Web body into (flags, payload) frames."""
    frames, at = [], 0
    while at < len(body):
        flags, length = struct.unpack(">BI", body[at : at + 5])
        frames.append((flags, body[at + 5 : at + 5 + length]))
        at += 5 + length
    assert at == len(body), "truncated gRPC-Web frame"
    return frames


def test_grpc_web_watch_over_http_1_1(simulator):
    execution_id = simulator.create(
        [
            {"id": "a", "simulate": {"durationMs": 200}},
            {"id": "b", "simulate": {"durationMs": 200}, "dependsOn": ["a"]},
        ]
    )
    message = pb.WatchExecutionRequest(execution_id=execution_id).SerializeToString()
    host, port = env("SYNTHOME_GATEWAY_ADDR").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request(
        "POST",
        f"/{SERVICE}/WatchExecution",
        body=struct.pack(">BI", 0, len(message)) + message,
        headers={
            "content-type": "application/grpc-web+proto",
            "x-grpc-web": "1",
            "accept": "application/grpc-web+proto",
            **dict(metadata()),
        },
    )
    response = connection.getresponse()
    assert response.version == 11, "the call must have gone over HTTP/1.1"
    assert response.status == 200
    assert response.getheader("content-type").startswith("application/grpc-web+proto")
    frames = grpc_web_frames(response.read())
    connection.close()

    *data, (trailer_flags, trailer) = frames
    assert trailer_flags == 0x80, "the last frame must be the trailer frame"
    trailers = dict(
        line.split(":", 1) for line in trailer.decode().strip().split("\r\n") if line
    )
    assert trailers["grpc-status"].strip() == "0", trailers
    assert data and all(flags == 0 for flags, _ in data)
    updates = [pb.WatchExecutionResponse.FromString(payload) for _, payload in data]
    changes = [u.execution.revision for u in updates if not u.heartbeat]
    assert changes == sorted(set(changes))
    assert updates[-1].execution.state == pb.EXECUTION_STATE_COMPLETED

