"""Stock clients of the standard gRPC services, default options, over the Unix socket:
grpcio-health-checking's stubs and grpcio-reflection's. Usage: standard.py SOCKET

Prints one JSON object: the health of "" and "bulkhead.v1.Bulkhead", the error code for
an unknown service, the services reflection lists, and whether reflection returns the
file that defines bulkhead.v1.Bulkhead."""
import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

channel = grpc.insecure_channel("unix:" + sys.argv[1])
health = health_pb2_grpc.HealthStub(channel)
out = {}
for name in ["", "bulkhead.v1.Bulkhead"]:
    r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30)
    out[name or "overall"] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
try:
    health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
    out["unknown"] = "OK"
except grpc.RpcError as e:
    out["unknown"] = e.code().name

refl = reflection_pb2_grpc.ServerReflectionStub(channel)
reqs = [
    reflection_pb2.ServerReflectionRequest(list_services=""),
    reflection_pb2.ServerReflectionRequest(file_containing_symbol="bulkhead.v1.Bulkhead"),
]
answers = list(refl.ServerReflectionInfo(iter(reqs), timeout=30))
out["services"] = sorted(s.name for s in answers[0].list_services_response.service)
files = answers[1].file_descriptor_response.file_descriptor_proto
out["file_found"] = any(b"bulkhead.proto" in f for f in files)
print(json.dumps(out))
