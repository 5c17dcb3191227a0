package katcp_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/katcp/katcptest"
)

// fastReconnect keeps reconnection tests quick on real sockets.
var fastReconnect = katcp.ClientConfig{BackoffInitial: 10 * time.Millisecond, BackoffMax: 50 * time.Millisecond}

func within(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestClientAgainstServer(t *testing.T) {
	ctx := within(t)
	dev := katcptest.NewDevice(t, katcp.ServerConfig{DeviceName: "pump", DeviceVersion: "1.2"})
	dev.Handle("add", "?add a b", func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		var a, b float64
		if err := r.Decode(&a, &b); err != nil {
			return err
		}
		return w.Reply(a + b)
	})
	c, err := katcp.Dial(ctx, dev.Addr(), katcp.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	info := c.Protocol()
	if info.Version.String() != "5.1-MITB" {
		t.Errorf("protocol %v", info.Version)
	}
	r, err := c.Request(ctx, "add", 1.5, 2)
	if err != nil || string(r.Values()[0]) != "3.5" {
		t.Fatalf("add: %v, %v", r, err)
	}
	_, err = c.Request(ctx, "add", "x", 2)
	var re *katcp.ReplyError
	if !errors.As(err, &re) || re.Status != "fail" || re.Reason != `argument 1: katcp: invalid float "x"` {
		t.Errorf("bad argument: %v", err)
	}
	if _, err := c.Request(ctx, "nope"); !errors.Is(err, katcp.ErrInvalid) {
		t.Errorf("unknown request: %v", err)
	}
	// Many requests in flight, with message ids.
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := c.Request(ctx, "add", i, 1)
			if err != nil || string(r.Values()[0]) != string(katcp.AppendFloat(nil, float64(i+1))) {
				t.Errorf("add %d: %v, %v", i, r, err)
			}
		}()
	}
	wg.Wait()
	help, err := c.Request(ctx, "help")
	if err != nil || len(help.Informs) != 12 {
		t.Errorf("help: %d informs, %v", len(help.Informs), err)
	}
}

func TestClientReconnectsWhenServerRestarts(t *testing.T) {
	ctx := within(t)
	dev := katcptest.NewDevice(t, katcp.ServerConfig{})
	temp := dev.AddSensor(katcp.SensorFloat, "temp", katcp.SensorOptions{Units: "degC"})
	temp.Set(20.0)
	c := katcp.NewClient(dev.Addr(), fastReconnect)
	defer c.Close()

	var mu sync.Mutex
	var seen []katcp.Status
	w := c.Watch(katcp.WatchConfig{Names: []string{"temp"}, Strategy: katcp.StrategyEvent,
		OnUpdate: func(u katcp.SensorUpdate) {
			mu.Lock()
			seen = append(seen, u.Status)
			mu.Unlock()
		}})
	defer w.Close()
	if err := w.WaitFor(ctx, "temp", func(u katcp.SensorUpdate) bool { return u.Value == 20.0 }); err != nil {
		t.Fatal(err)
	}
	temp.Set(21.0)
	if err := w.WaitFor(ctx, "temp", func(u katcp.SensorUpdate) bool { return u.Value == 21.0 }); err != nil {
		t.Fatal(err)
	}

	dev.Stop()
	if err := w.WaitFor(ctx, "temp", func(u katcp.SensorUpdate) bool { return u.Status == katcp.StatusUnreachable }); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Request(ctx, "watchdog"); !errors.Is(err, katcp.ErrConnection) {
		t.Errorf("request while the device is down: %v", err)
	}
	temp.Set(22.0)
	dev.Restart()
	// The watcher subscribes again on the new connection.
	if err := w.WaitFor(ctx, "temp", func(u katcp.SensorUpdate) bool { return u.Value == 22.0 }); err != nil {
		t.Fatal(err)
	}
	temp.Set(23.0)
	if err := w.WaitFor(ctx, "temp", func(u katcp.SensorUpdate) bool { return u.Value == 23.0 }); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Request(ctx, "watchdog"); err != nil {
		t.Errorf("after restart: %v", err)
	}
	if c.Stats().Reconnects < 1 {
		t.Errorf("Reconnects = %d", c.Stats().Reconnects)
	}
}

func TestClientSurvivesMisbehaviour(t *testing.T) {
	ctx := within(t)
	dev := katcptest.NewDevice(t, katcp.ServerConfig{})
	dev.HandleReply("slow", "done")
	dev.SetDelay("slow", time.Hour)
	c, err := katcp.Dial(ctx, dev.Addr(), fastReconnect)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	// Garbage between lines: skipped and counted, the connection stays.
	dev.SendGarbage([]byte("#bad\\q line\n\x00\x1b junk\n"))
	if _, err := c.Request(ctx, "watchdog"); err != nil {
		t.Fatal(err)
	}
	for c.Stats().ParseErrors < 2 {
		if ctx.Err() != nil {
			t.Fatalf("ParseErrors = %d", c.Stats().ParseErrors)
		}
		time.Sleep(time.Millisecond)
	}

	// A delayed reply times out with the caller's deadline.
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := c.Request(short, "slow"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("slow: %v", err)
	}

	// Dropped connections: the client reconnects by itself.
	dev.DropConnections()
	for c.Stats().Reconnects < 1 { // polling with the test's deadline
		if ctx.Err() != nil {
			t.Fatal("the client did not reconnect")
		}
		time.Sleep(time.Millisecond)
	}
	if err := c.WaitConnected(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Request(ctx, "watchdog"); err != nil {
		t.Fatal(err)
	}
	if n := dev.Clients(); n != 1 {
		t.Errorf("device sees %d clients", n)
	}
}

func TestClientAgainstV4Server(t *testing.T) {
	ctx := within(t)
	dev := katcptest.NewDevice(t, katcp.ServerConfig{V4: true})
	ts := dev.AddSensor(katcp.SensorTimestamp, "last", katcp.SensorOptions{})
	when := time.Unix(1700000000, 123e6)
	ts.Set(when)
	c, err := katcp.Dial(ctx, dev.Addr(), katcp.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if v := c.Protocol().Version; v.Major != 4 {
		t.Fatalf("version %v", v)
	}
	w := c.Watch(katcp.WatchConfig{Names: []string{"last"}, Strategy: katcp.StrategyPeriod, Params: []any{100 * time.Millisecond}})
	defer w.Close()
	if err := w.WaitFor(ctx, "last", func(u katcp.SensorUpdate) bool {
		v, ok := u.Value.(time.Time)
		return ok && v.Equal(when)
	}); err != nil {
		t.Fatal(err)
	}
}
