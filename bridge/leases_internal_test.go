package bridge

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/katcp/katcptest"
)

func jetStreamServer(t *testing.T) *server.Server {
	t.Helper()
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true, JetStream: true, StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server did not start")
	}
	t.Cleanup(ns.Shutdown)
	return ns
}

func poll(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A device closed behind the lease loop's back (as the renewal timer
// does) must not stay held by a replica that serves it no more.
func TestLeaseOnUnservedDeviceIsReleased(t *testing.T) {
	ns := jetStreamServer(t)
	dev := katcptest.NewDevice(t, katcp.ServerConfig{})
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	b, err := New(nc, Config{Devices: []Device{{Name: "d0", Address: dev.Addr()}}, Leases: LeasesOn,
		LeaseTTL: time.Second, LeaseRenew: 100 * time.Millisecond, NoLastValues: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	defer b.Shutdown(context.Background())
	poll(t, "d0 served", func() bool { return len(b.Serving()) == 1 && dev.Clients() == 1 })
	b.unserve([]string{"d0"}, true, "lease lost: it could not be renewed in time")
	poll(t, "d0 released and served again", func() bool {
		_, acquired, _, released := b.Metrics().Leases()
		return released == 1 && acquired == 2 && len(b.Serving()) == 1 && dev.Clients() == 1
	})
	if p := dev.PeakClients(); p > 1 {
		t.Errorf("%d connections at once", p)
	}
}

func TestShutdownAfterFailedStart(t *testing.T) {
	ns := jetStreamServer(t)
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(nc, Config{Devices: []Device{{Name: "x", Address: "127.0.0.1:1"}}, Leases: LeasesOff, NoLastValues: true})
	if err != nil {
		t.Fatal(err)
	}
	nc.Close()
	if err := b.Start(); err == nil {
		t.Fatal("Start on a closed connection worked")
	}
	if err := b.Shutdown(context.Background()); err != nil {
		t.Errorf("Shutdown after a failed Start: %v", err)
	}
}
