package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/katcp-go/katcp-bridge/katcp"
)

// startSim runs katcp-sim in-process and returns the devices' addresses.
func startSim(t *testing.T, args ...string) []string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	var stderr bytes.Buffer
	done := make(chan error, 1)
	go func() {
		err := run(ctx, args, pw, &stderr)
		pw.Close()
		done <- err
	}()
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("katcp-sim: %v", err)
		}
		wg.Wait()
	})
	var addrs []string
	sc := bufio.NewScanner(pr)
	for len(addrs) < wantDevices(args) && sc.Scan() {
		f := strings.Fields(sc.Text())
		addrs = append(addrs, f[1])
	}
	wg.Add(1)
	go func() { defer wg.Done(); io.Copy(io.Discard, pr) }()
	return addrs
}

func wantDevices(args []string) int {
	for i, a := range args {
		if a == "--devices" {
			n := 0
			for _, c := range args[i+1] {
				n = n*10 + int(c-'0')
			}
			return n
		}
	}
	return 1
}

func TestSimDevices(t *testing.T) {
	addrs := startSim(t, "--listen", "127.0.0.1:0", "--devices", "3", "--sensors", "2", "--period", "10ms")
	if len(addrs) != 3 {
		t.Fatalf("addresses %v", addrs)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := katcp.Dial(ctx, addrs[2], katcp.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if d := c.Protocol().Device; !strings.HasPrefix(d, "sim002-1.0") {
		t.Errorf("device %q", d)
	}
	list, err := c.SensorList(ctx, "")
	if err != nil || len(list) != 7*2+3 {
		t.Fatalf("%d sensors, %v", len(list), err)
	}
	r, err := c.Request(ctx, "add", 2, 3.5)
	if err != nil || r.Arg(1) != "5.5" {
		t.Errorf("add: %v %v", r, err)
	}
	if r, err := c.Request(ctx, "echo", "a b", ""); err != nil || r.Arg(1) != "a b" || r.Arg(2) != "" || len(r.Args) != 3 {
		t.Errorf("echo: %v %v", r, err)
	}
	if _, err := c.Request(ctx, "fail", "nope"); err == nil {
		t.Error("fail succeeded")
	}
	w := c.Watch(katcp.WatchConfig{Names: []string{"int.1", "position"}, Strategy: katcp.StrategyEvent})
	defer w.Close()
	if err := w.WaitFor(ctx, "int.1", func(u katcp.SensorUpdate) bool { v, _ := u.Value.(int64); return v > 3 }); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Request(ctx, "set-target", 2.5); err != nil {
		t.Fatal(err)
	}
	if err := w.WaitFor(ctx, "position", func(u katcp.SensorUpdate) bool { return u.Value == 2.5 }); err != nil {
		t.Fatal(err)
	}
	short, done := context.WithTimeout(ctx, 50*time.Millisecond)
	defer done()
	if _, err := c.Request(short, "slow", 0.2); err == nil {
		t.Error("slow returned early")
	}
}

func TestSimV4FlatOut(t *testing.T) {
	addrs := startSim(t, "--listen", "127.0.0.1:0", "--sensors", "1", "--period", "0", "--protocol", "4")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := katcp.Dial(ctx, addrs[0], katcp.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Protocol().Version.Major != 4 {
		t.Errorf("protocol %v", c.Protocol().Version)
	}
	w := c.Watch(katcp.WatchConfig{Names: []string{"int.0"}, Strategy: katcp.StrategyEvent})
	defer w.Close()
	if err := w.WaitFor(ctx, "int.0", func(u katcp.SensorUpdate) bool { v, _ := u.Value.(int64); return v > 100 }); err != nil {
		t.Fatal(err)
	}
}

func TestSimBadFlags(t *testing.T) {
	for _, args := range [][]string{{"--protocol", "3"}, {"--devices", "0"}, {"extra"}, {"--listen", "nowhere"}, {"--log-level", "loud"}} {
		var out, errOut bytes.Buffer
		if err := run(context.Background(), args, &out, &errOut); err == nil {
			t.Errorf("%q: no error", args)
		}
	}
}
