package katcp_test

import (
	"context"
	"runtime"
	"testing"

	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/katcp/katcptest"
)

// BenchmarkRoundTrip is one request at a time through a client and a
// server on 127.0.0.1 (allocations include both sides).
func BenchmarkRoundTrip(b *testing.B) {
	c := echoClient(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Request(ctx, "echo", "hello"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRoundTripParallel is 100 requests in flight on one connection
// (message ids), the shape of the 100-in-flight row of katcp-bench.
func BenchmarkRoundTripParallel(b *testing.B) {
	c := echoClient(b)
	ctx := context.Background()
	b.ReportAllocs()
	b.SetParallelism(100 / runtime.GOMAXPROCS(0))
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.Request(ctx, "echo", "hello"); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// echoClient connects a client to a device with ?echo x, closed with b.
func echoClient(b *testing.B) *katcp.Client {
	dev := katcptest.NewDevice(b, katcp.ServerConfig{})
	dev.Handle("echo", "?echo x", func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		return w.Reply(r.Args[0])
	})
	c, err := katcp.Dial(context.Background(), dev.Addr(), katcp.ClientConfig{NoReconnect: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}
