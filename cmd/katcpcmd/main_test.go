package main

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// scriptedDevice listens on 127.0.0.1, greets each client with hello and
// answers each request line with respond(line).
func scriptedDevice(t *testing.T, hello string, respond func(line string) string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	go func() {
		defer close(done)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			conn.Write([]byte(hello))
			r := bufio.NewReader(conn)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					break
				}
				if _, err := conn.Write([]byte(respond(line))); err != nil {
					break
				}
			}
			conn.Close()
		}
	}()
	return ln.Addr().String()
}

func runCmd(t *testing.T, ctx context.Context, args ...string) (string, string, int) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(ctx, args, &out, &errOut)
	return out.String(), errOut.String(), code
}

func TestRequestOK(t *testing.T) {
	addr := scriptedDevice(t, "#version-connect katcp-protocol 5.0-M\n#log info 1.0 dev hello\\_there\n", func(line string) string {
		if line != "?help watchdog x\\_y -1\n" {
			return "!help fail unexpected\n"
		}
		return "#help   watchdog \t Ping\\_the\\_device\n#help x\\_y \xff\\@\n!help ok 2\n"
	})
	// Wait for the #log inform to be printed before the request, so the
	// order is fixed: connect, then request.
	out, errOut, code := runCmd(t, context.Background(), addr, "help", "watchdog", "x y", "-1")
	if code != 0 {
		t.Fatalf("exit %d, stderr %s", code, errOut)
	}
	want := "#help watchdog Ping\\_the\\_device\n#help x\\_y \xff\n!help ok 2\n"
	if !strings.HasSuffix(out, want) {
		t.Errorf("stdout %q, want suffix %q", out, want)
	}
	if !strings.Contains(out, "#log info 1.0 dev hello\\_there\n") {
		t.Errorf("asynchronous #log not printed: %q", out)
	}
}

func TestRequestFailAndInvalid(t *testing.T) {
	addr := scriptedDevice(t, "#version-connect katcp-protocol 5.1-MIB\n", func(line string) string {
		if strings.HasPrefix(line, "?bad[") {
			return "!bad" + line[4:strings.IndexByte(line, ']')+1] + " invalid Unknown\\_request\n"
		}
		return "!" + strings.TrimSpace(line[1:]) + " fail broken\n"
	})
	out, _, code := runCmd(t, context.Background(), "--request-timeout=2s", addr, "bad")
	if code != 2 || out != "!bad[1] invalid Unknown\\_request\n" {
		t.Errorf("invalid: exit %d, out %q", code, out)
	}
	out, _, code = runCmd(t, context.Background(), addr, "--connect-timeout", "3s", "x")
	if code != 2 || out != "!x[1] fail broken\n" {
		t.Errorf("fail: exit %d, out %q", code, out)
	}
}

func TestConnectionErrors(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens here now
	_, errOut, code := runCmd(t, context.Background(), "--connect-timeout", "300ms", addr, "help")
	if code != 1 || !strings.Contains(errOut, "connecting to") {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}

	silent := scriptedDevice(t, "#version-connect katcp-protocol 5.1-MIB\n", func(string) string { return "" })
	_, errOut, code = runCmd(t, context.Background(), "--request-timeout", "200ms", silent, "slow")
	if code != 1 || !strings.Contains(errOut, "deadline exceeded") {
		t.Errorf("timeout: exit %d, stderr %q", code, errOut)
	}
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{nil, {"host:1"}, {"--bogus", "h:1", "x"}, {"--connect-timeout", "x", "h:1", "r"}, {"h:1", "--watch", "a", "extra"}, {"-h"}, {"nats://h:1", "--owners", "x"}} {
		_, errOut, code := runCmd(t, context.Background(), args...)
		if code != 1 || !strings.Contains(errOut, "usage:") {
			t.Errorf("%q: exit %d, stderr %q", args, code, errOut)
		}
	}
	_, errOut, code := runCmd(t, context.Background(), "127.0.0.1:1", "--owners")
	if code != 1 || !strings.Contains(errOut, "needs a NATS address") {
		t.Errorf("--owners without nats://: exit %d, stderr %q", code, errOut)
	}
	_, errOut, code = runCmd(t, context.Background(), "127.0.0.1:1", "bad_name")
	if code != 1 || !strings.Contains(errOut, "not a request name") {
		t.Errorf("bad name: exit %d, stderr %q", code, errOut)
	}
}

func TestParseArgsFlagsAnywhere(t *testing.T) {
	o, err := parseArgs([]string{"h:1", "--watch", "a,b", "--strategy=period 0.5"})
	if err != nil || o.addr != "h:1" || len(o.watch) != 2 || o.strategy != "period 0.5" {
		t.Errorf("%+v, %v", o, err)
	}
	o, err = parseArgs([]string{"h:1", "--request-timeout", "1s", "set", "--x", "-5"})
	if err != nil || o.request != "set" || strings.Join(o.args, " ") != "--x -5" || o.requestTimeout != time.Second {
		t.Errorf("%+v, %v", o, err)
	}
}

func TestWatch(t *testing.T) {
	addr := scriptedDevice(t, "#version-connect katcp-protocol 5.1-MIB\n", func(line string) string {
		switch {
		case strings.HasPrefix(line, "?sensor-list[1] temp"):
			return "#sensor-list[1] temp Temperature degC float\n!sensor-list[1] ok 1\n"
		case strings.HasPrefix(line, "?sensor-sampling[2] temp period 0.5"):
			return "#sensor-status 1700000000.5 1 temp nominal 21.5\n!sensor-sampling[2] ok\n#sensor-status 1700000001.0 1 temp warn 40.0\n"
		}
		return "!x fail unexpected\n"
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out lockedBuffer
	var errOut bytes.Buffer
	done := make(chan int)
	go func() { done <- run(ctx, []string{addr, "--watch", "temp", "--strategy", "period 0.5"}, &out, &errOut) }()
	want := "#sensor-status 1700000000.5 1 temp nominal 21.5\n#sensor-status 1700000001.0 1 temp warn 40.0\n"
	deadline := time.Now().Add(10 * time.Second)
	for out.String() != want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond) // polling with a deadline
	}
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("exit %d, stderr %s", code, errOut.String())
	}
	if got := out.String(); got != want {
		t.Errorf("stdout %q, want %q", got, want)
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
