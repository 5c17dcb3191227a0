package katcptest_test

import (
	"net"
	"testing"
	"time"

	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/katcp/katcptest"
)

func dial(t *testing.T, d *katcptest.Device) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", d.Addr())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func waitClients(t *testing.T, d *katcptest.Device, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for d.Clients() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d clients, want %d", d.Clients(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestPeakClients(t *testing.T) {
	d := katcptest.NewDevice(t, katcp.ServerConfig{})
	a := dial(t, d)
	waitClients(t, d, 1)
	a.Close()
	b := dial(t, d) // the server may not have seen a's end yet
	defer b.Close()
	waitClients(t, d, 1)
	if p := d.PeakClients(); p != 1 {
		t.Errorf("peak %d after one client closed and another connected, want 1", p)
	}
	c := dial(t, d)
	defer c.Close()
	waitClients(t, d, 2)
	if p := d.PeakClients(); p != 2 {
		t.Errorf("peak %d with two clients at once, want 2", p)
	}
}
