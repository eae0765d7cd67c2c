"""A stock gRPC client of bulkhead: Python grpcio with its default options, over the
Unix socket. Usage: client.py SOCKET STUBS_DIR WORKLOAD SESSION

Calls Health, Launch (wait for ready), Get, List, Watch (history, then follow until the
instance is terminated), Terminate, and prints one JSON object with what it saw. Any
failure raises (a non-zero exit with the gRPC status)."""
import json
import sys
import threading

sys.path.insert(0, sys.argv[2])
import grpc  # noqa: E402
import bulkhead_pb2 as pb  # noqa: E402
import bulkhead_pb2_grpc as rpc  # noqa: E402

socket, _, workload, session = sys.argv[1:5]
# Default options: no authority override (grpcio sends the socket path as :authority).
channel = grpc.insecure_channel("unix:" + socket)
stub = rpc.BulkheadStub(channel)
out = {}
out["health"] = stub.Health(pb.HealthRequest(), timeout=30).status
launched = stub.Launch(
    pb.LaunchRequest(workload=workload, session=session, wait=pb.WAIT_FOR_READY),
    timeout=60,
)
iid = launched.instance.id
out["launch"] = {"id": iid, "state": launched.instance.state, "created": launched.created}
out["get"] = stub.Get(pb.GetRequest(id=iid), timeout=30).state
out["list"] = [i.id for i in stub.List(pb.ListRequest(), timeout=30).instances]

# Watch: history then live, until this instance's `terminated` event.
seen = []
done = threading.Event()


def watch():
    for e in stub.Watch(pb.WatchRequest(since_id=0), timeout=60):
        if e.instance == iid:
            seen.append(e.kind)
            if e.kind == "terminated":
                done.set()
                return


t = threading.Thread(target=watch)
t.start()
term = stub.Terminate(pb.TerminateRequest(id=iid), timeout=60)
out["terminate"] = term.state
done.wait(60)
t.join(5)
out["watch"] = seen
print(json.dumps(out))
