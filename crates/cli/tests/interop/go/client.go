// A stock gRPC client of bulkhead: grpc-go over the Unix socket, with its default options.
// Usage: bulkhead-interop-go SOCKET WORKLOAD SESSION.
//
// Calls grpc.health.v1 Health/Check (grpc-go's own stubs), bulkhead's Health, Launch (wait
// for ready), Get, List, Watch (history, then follow until the instance is terminated) and
// Terminate, and prints one JSON object with what it saw, like the grpc-java client. Any
// failure exits non-zero with the gRPC status on stderr.
//
// The channel is what grpc-go documents for a Unix socket: the target "unix://" + path,
// plaintext (WithInsecure), nothing else set: no authority, no dialer. grpc-go 1.33 sends
// "localhost" as :authority for a unix: target; the JSON says what it sent ("authority")
// so the test can check which case is covered.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"reflect"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	pb "bulkhead/interop/bulkheadv1"
)

const deadline = 60 * time.Second

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: bulkhead-interop-go SOCKET WORKLOAD SESSION")
		os.Exit(2)
	}
	// Never hang a test.
	go func() {
		time.Sleep(180 * time.Second)
		fmt.Fprintln(os.Stderr, "interop client: gave up after 180 s")
		os.Exit(3)
	}()
	conn, err := grpc.Dial("unix://"+os.Args[1], grpc.WithInsecure())
	if err != nil {
		fail("dial", err)
	}
	defer conn.Close()
	out, err := calls(conn, os.Args[2], os.Args[3])
	if err != nil {
		fail("call", err)
	}
	b, err := json.Marshal(out)
	if err != nil {
		fail("json", err)
	}
	fmt.Println(string(b))
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "interop client: %s: %v\n", what, err)
	os.Exit(1)
}

// authority is the :authority grpc-go sends on every call of conn. grpc-go keeps it in an
// unexported field and has no accessor: reflection reads it (read-only).
func authority(conn *grpc.ClientConn) string {
	f := reflect.ValueOf(conn).Elem().FieldByName("authority")
	if !f.IsValid() || f.Kind() != reflect.String {
		return ""
	}
	return f.String()
}

func ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), deadline)
}

// ordered keeps the JSON keys in the order the calls were made, like the Java client.
type ordered struct {
	keys   []string
	values map[string]interface{}
}

func (o *ordered) put(k string, v interface{}) {
	if o.values == nil {
		o.values = map[string]interface{}{}
	}
	o.keys = append(o.keys, k)
	o.values[k] = v
}

func (o *ordered) MarshalJSON() ([]byte, error) {
	b := []byte{'{'}
	for i, k := range o.keys {
		if i > 0 {
			b = append(b, ',')
		}
		kj, _ := json.Marshal(k)
		vj, err := json.Marshal(o.values[k])
		if err != nil {
			return nil, err
		}
		b = append(append(append(b, kj...), ':'), vj...)
	}
	return append(b, '}'), nil
}

func calls(conn *grpc.ClientConn, workload, session string) (*ordered, error) {
	stub := pb.NewBulkheadClient(conn)
	health := healthpb.NewHealthClient(conn)
	out := &ordered{}
	if a := authority(conn); a != "" {
		out.put("authority", a)
	}

	for _, c := range []struct{ key, service string }{
		{"grpc_health", ""}, {"grpc_health_bulkhead", "bulkhead.v1.Bulkhead"},
	} {
		cx, cancel := ctx()
		r, err := health.Check(cx, &healthpb.HealthCheckRequest{Service: c.service})
		cancel()
		if err != nil {
			return nil, fmt.Errorf("grpc.health.v1 check %q: %w", c.service, err)
		}
		out.put(c.key, r.Status.String())
	}
	cx, cancel := ctx()
	h, err := stub.Health(cx, &pb.HealthRequest{})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("health: %w", err)
	}
	out.put("health", h.Status)

	cx, cancel = ctx()
	launched, err := stub.Launch(cx, &pb.LaunchRequest{
		Workload: workload,
		Session:  &session,
		Wait:     pb.WaitFor_WAIT_FOR_READY,
	})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("launch: %w", err)
	}
	id := launched.Instance.GetId()
	launch := &ordered{}
	launch.put("id", id)
	launch.put("state", launched.Instance.GetState())
	launch.put("created", launched.Created)
	out.put("launch", launch)

	cx, cancel = ctx()
	got, err := stub.Get(cx, &pb.GetRequest{Id: id})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("get: %w", err)
	}
	out.put("get", got.State)

	cx, cancel = ctx()
	list, err := stub.List(cx, &pb.ListRequest{})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("list: %w", err)
	}
	ids := []string{}
	for _, i := range list.Instances {
		ids = append(ids, i.Id)
	}
	out.put("list", ids)

	// Watch: history then live, until this instance's `terminated` event. The stream is
	// open (its headers received) before Terminate is called.
	wcx, wcancel := ctx()
	defer wcancel()
	events, err := stub.Watch(wcx, &pb.WatchRequest{SinceId: 0})
	if err != nil {
		return nil, fmt.Errorf("watch: %w", err)
	}
	type result struct {
		seen []string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		seen := []string{}
		for {
			e, err := events.Recv()
			if err == io.EOF {
				done <- result{seen, fmt.Errorf("watch ended before the `terminated` event of %s", id)}
				return
			}
			if err != nil {
				done <- result{seen, fmt.Errorf("watch: %w", err)}
				return
			}
			if e.Instance == id {
				seen = append(seen, e.Kind)
				if e.Kind == "terminated" {
					done <- result{seen, nil}
					return
				}
			}
		}
	}()

	cx, cancel = ctx()
	term, err := stub.Terminate(cx, &pb.TerminateRequest{Id: id})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("terminate: %w", err)
	}
	out.put("terminate", term.State)

	r := <-done
	if r.err != nil {
		return nil, r.err
	}
	out.put("watch", r.seen)
	return out, nil
}
