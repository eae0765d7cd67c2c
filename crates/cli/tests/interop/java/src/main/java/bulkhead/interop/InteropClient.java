package bulkhead.interop;

import bulkhead.v1.BulkheadGrpc;
import bulkhead.v1.BulkheadOuterClass.Event;
import bulkhead.v1.BulkheadOuterClass.GetRequest;
import bulkhead.v1.BulkheadOuterClass.HealthRequest;
import bulkhead.v1.BulkheadOuterClass.Instance;
import bulkhead.v1.BulkheadOuterClass.LaunchRequest;
import bulkhead.v1.BulkheadOuterClass.LaunchResponse;
import bulkhead.v1.BulkheadOuterClass.ListRequest;
import bulkhead.v1.BulkheadOuterClass.TerminateRequest;
import bulkhead.v1.BulkheadOuterClass.WaitFor;
import bulkhead.v1.BulkheadOuterClass.WatchRequest;
import io.grpc.ManagedChannel;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.netty.NettyChannelBuilder;
import io.netty.channel.EventLoopGroup;
import io.netty.channel.epoll.EpollDomainSocketChannel;
import io.netty.channel.epoll.EpollEventLoopGroup;
import io.netty.channel.unix.DomainSocketAddress;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

/**
 * A stock gRPC client of bulkhead: grpc-java (its Netty transport) over the Unix socket,
 * with its default options. Usage: {@code java -jar bulkhead-interop-java.jar SOCKET
 * WORKLOAD SESSION}.
 *
 * <p>Calls grpc.health.v1 Health/Check, bulkhead's Health, Launch (wait for ready), Get,
 * List, Watch (history, then follow until the instance is terminated) and Terminate, and
 * prints one JSON object with what it saw, like client.py. Any failure exits non-zero with
 * the gRPC status on stderr.
 *
 * <p>The channel is what grpc-java documents for a Unix socket: a {@link DomainSocketAddress}
 * on Netty's epoll transport, plaintext, nothing else set. With no authority override
 * grpc-java sends the socket path as {@code :authority}; the JSON says what it sent
 * ({@code "authority"}) so the test can check that this case is the one covered.
 */
public final class InteropClient {
    private static final long DEADLINE_S = 60;

    public static void main(String[] args) {
        // Never hang a test: Netty's event loop threads are not daemons.
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(180_000);
            } catch (InterruptedException e) {
                return;
            }
            System.err.println("interop client: gave up after 180 s");
            System.exit(3);
        });
        watchdog.setDaemon(true);
        watchdog.start();
        if (args.length != 3) {
            System.err.println("usage: java -jar bulkhead-interop-java.jar SOCKET WORKLOAD SESSION");
            System.exit(2);
        }
        int code = 1;
        EventLoopGroup loop = new EpollEventLoopGroup();
        ManagedChannel channel = NettyChannelBuilder.forAddress(new DomainSocketAddress(args[0]))
                .eventLoopGroup(loop)
                .channelType(EpollDomainSocketChannel.class)
                .usePlaintext()
                .build();
        try {
            System.out.println(calls(channel, args[1], args[2]));
            code = 0;
        } catch (Throwable t) {
            t.printStackTrace();
        } finally {
            System.out.flush();
            channel.shutdownNow();
            loop.shutdownGracefully(0, 1, TimeUnit.SECONDS);
        }
        System.exit(code);
    }

    static String calls(ManagedChannel channel, String workload, String session)
            throws InterruptedException {
        BulkheadGrpc.BulkheadBlockingStub stub = BulkheadGrpc.newBlockingStub(channel);
        HealthGrpc.HealthBlockingStub health = HealthGrpc.newBlockingStub(channel);
        Json out = new Json();
        out.put("authority", channel.authority());
        out.put("grpc_health", health.withDeadlineAfter(DEADLINE_S, TimeUnit.SECONDS)
                .check(HealthCheckRequest.newBuilder().setService("").build())
                .getStatus().name());
        out.put("grpc_health_bulkhead", health.withDeadlineAfter(DEADLINE_S, TimeUnit.SECONDS)
                .check(HealthCheckRequest.newBuilder().setService("bulkhead.v1.Bulkhead").build())
                .getStatus().name());
        out.put("health", stub.withDeadlineAfter(DEADLINE_S, TimeUnit.SECONDS)
                .health(HealthRequest.getDefaultInstance()).getStatus());

        LaunchResponse launched = stub.withDeadlineAfter(DEADLINE_S, TimeUnit.SECONDS)
                .launch(LaunchRequest.newBuilder()
                        .setWorkload(workload)
                        .setSession(session)
                        .setWait(WaitFor.WAIT_FOR_READY)
                        .build());
        String id = launched.getInstance().getId();
        Json launch = new Json();
        launch.put("id", id);
        launch.put("state", launched.getInstance().getState());
        launch.put("created", launched.getCreated());
        out.put("launch", launch);
        out.put("get", stub.withDeadlineAfter(DEADLINE_S, TimeUnit.SECONDS)
                .get(GetRequest.newBuilder().setId(id).build()).getState());
        List<String> ids = new ArrayList<>();
        for (Instance i : stub.withDeadlineAfter(DEADLINE_S, TimeUnit.SECONDS)
                .list(ListRequest.getDefaultInstance()).getInstancesList()) {
            ids.add(i.getId());
        }
        out.put("list", ids);

        // Watch: history then live, until this instance's `terminated` event.
        List<String> seen = new ArrayList<>();
        CountDownLatch done = new CountDownLatch(1);
        Throwable[] watchError = new Throwable[1];
        Thread watcher = new Thread(() -> {
            try {
                Iterator<Event> events = stub.withDeadlineAfter(DEADLINE_S, TimeUnit.SECONDS)
                        .watch(WatchRequest.newBuilder().setSinceId(0).build());
                while (events.hasNext()) {
                    Event e = events.next();
                    if (e.getInstance().equals(id)) {
                        synchronized (seen) {
                            seen.add(e.getKind());
                        }
                        if (e.getKind().equals("terminated")) {
                            return;
                        }
                    }
                }
            } catch (Throwable t) {
                watchError[0] = t;
            } finally {
                done.countDown();
            }
        });
        watcher.setDaemon(true);
        watcher.start();
        out.put("terminate", stub.withDeadlineAfter(DEADLINE_S, TimeUnit.SECONDS)
                .terminate(TerminateRequest.newBuilder().setId(id).build()).getState());
        if (!done.await(DEADLINE_S, TimeUnit.SECONDS)) {
            throw new IllegalStateException("watch: no `terminated` event for " + id);
        }
        if (watchError[0] != null) {
            throw new IllegalStateException("watch failed", watchError[0]);
        }
        synchronized (seen) {
            out.put("watch", new ArrayList<>(seen));
        }
        return out.toString();
    }

    /** A JSON object of strings, booleans, string lists and nested objects, in order. */
    static final class Json {
        private final StringBuilder b = new StringBuilder();

        void put(String key, Object value) {
            b.append(b.length() == 0 ? "" : ",").append(quote(key)).append(':').append(value(value));
        }

        private static String value(Object v) {
            if (v instanceof Boolean || v instanceof Json) {
                return v.toString();
            }
            if (v instanceof List) {
                StringBuilder s = new StringBuilder("[");
                for (Object o : (List<?>) v) {
                    s.append(s.length() == 1 ? "" : ",").append(value(o));
                }
                return s.append(']').toString();
            }
            return quote(String.valueOf(v));
        }

        private static String quote(String s) {
            StringBuilder q = new StringBuilder("\"");
            for (char c : s.toCharArray()) {
                if (c == '"' || c == '\\') {
                    q.append('\\').append(c);
                } else if (c < 0x20) {
                    q.append(String.format("\\u%04x", (int) c));
                } else {
                    q.append(c);
                }
            }
            return q.append('"').toString();
        }

        @Override
        public String toString() {
            return "{" + b + "}";
        }
    }
}
