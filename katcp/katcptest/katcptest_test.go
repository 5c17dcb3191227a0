package katcptest_test

import (
	"bufio"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/katcp/katcptest"
)

// dial connects to d and returns once the device has answered a
// request on the connection (so it has accepted it).
func dial(t *testing.T, d *katcptest.Device) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", d.Addr())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("?watchdog\n")); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(line, "!watchdog") {
			return c
		}
	}
}

func TestPeakClients(t *testing.T) {
	d := katcptest.NewDevice(t, katcp.ServerConfig{})
	a := dial(t, d)
	a.Close()
	b := dial(t, d) // the server may not have seen a's end yet
	defer b.Close()
	if p := d.PeakClients(); p != 1 {
		t.Errorf("peak %d after one client closed and another connected, want 1", p)
	}
	c := dial(t, d)
	defer c.Close()
	if p := d.PeakClients(); p != 2 {
		t.Errorf("peak %d with two clients at once, want 2", p)
	}
}
