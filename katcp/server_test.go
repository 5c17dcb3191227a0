package katcp

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// pipeListener hands out the server ends of net.Pipe connections.
type pipeListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), closed: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// testServer runs a Server on a pipeListener for the length of a test.
type testServer struct {
	*Server
	t     *testing.T
	l     *pipeListener
	serve chan error
}

func startServer(t *testing.T, cfg ServerConfig) *testServer {
	t.Helper()
	ts := &testServer{Server: NewServer(cfg), t: t, l: newPipeListener(), serve: make(chan error, 1)}
	go func() { ts.serve <- ts.Serve(ts.l) }()
	t.Cleanup(func() {
		ts.Close()
		if err := <-ts.serve; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
	})
	return ts
}

// peer is a raw client connection to a testServer.
type peer struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

// connect opens a connection and reads the greeting (n lines).
func (ts *testServer) connect(greeting int) *peer {
	ts.t.Helper()
	client, server := net.Pipe()
	ts.l.conns <- server
	p := &peer{t: ts.t, conn: client, r: bufio.NewReader(client)}
	ts.t.Cleanup(func() { client.Close() })
	for range greeting {
		p.line()
	}
	return p
}

func (p *peer) send(s string) {
	p.t.Helper()
	if _, err := io.WriteString(p.conn, s); err != nil {
		p.t.Fatalf("write: %v", err)
	}
}

func (p *peer) line() string {
	p.t.Helper()
	l, err := p.r.ReadString('\n')
	if err != nil {
		p.t.Fatalf("read: %v (got %q)", err, l)
	}
	return l
}

// expect checks the next lines, exactly.
func (p *peer) expect(lines ...string) {
	p.t.Helper()
	for _, want := range lines {
		if got := p.line(); got != want {
			p.t.Fatalf("got  %q\nwant %q", got, want)
		}
	}
}

// roundTrip sends a request and checks every line up to the reply.
func (p *peer) roundTrip(req string, lines ...string) {
	p.t.Helper()
	p.send(req)
	p.expect(lines...)
}

// readAvailable returns what the server has written so far without
// blocking (inside a synctest bubble, after synctest.Wait).
func (p *peer) readAvailable() string {
	p.t.Helper()
	var lines []string
	got := make(chan string)
	go func() {
		defer close(got)
		for {
			l, err := p.r.ReadString('\n')
			if err != nil {
				return
			}
			got <- l
		}
	}()
	for {
		synctest.Wait()
		select {
		case l, ok := <-got:
			if !ok {
				return strings.Join(lines, "")
			}
			lines = append(lines, l)
			continue
		default:
		}
		p.conn.SetReadDeadline(time.Now()) // stop the reader goroutine
		for l := range got {
			lines = append(lines, l)
		}
		p.conn.SetReadDeadline(time.Time{})
		return strings.Join(lines, "")
	}
}

const v5Greeting = "#version-connect katcp-protocol 5.1-MITB\n" +
	"#version-connect katcp-library katcp-go-0.1 katcp-go-0.1\n" +
	"#version-connect katcp-device sim-2.0 sim-2.0-build\n"

var simConfig = ServerConfig{DeviceName: "sim", DeviceVersion: "2.0", BuildState: "sim-2.0-build"}

func TestServerGreeting(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ts := startServer(t, simConfig)
		p := ts.connect(0)
		p.expect(strings.SplitAfter(v5Greeting, "\n")[:3]...)

		cfg := simConfig
		cfg.V4 = true
		ts4 := startServer(t, cfg)
		p4 := ts4.connect(0)
		p4.expect("#version sim-2.0\n", "#build-state sim-2.0-build\n")
	})
}

func TestServerStandardRequests(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ts := startServer(t, simConfig)
		ts.Handle("echo", "Echo the arguments. ?echo [args...]", func(ctx context.Context, w *ReplyWriter, r *Request) error {
			args := make([]any, len(r.Args))
			for i, a := range r.Args {
				args[i] = a
			}
			return w.Reply(args...)
		})
		ts.SetTimeoutHint("echo", 2500*time.Millisecond)
		p := ts.connect(3)
		p.roundTrip("?watchdog\n", "!watchdog ok\n")
		p.roundTrip("?watchdog[7]\n", "!watchdog[7] ok\n")
		p.roundTrip("?echo[9] a\\_b \\@ \xff\n", "!echo[9] ok a\\_b \\@ \xff\n")
		p.roundTrip("?help echo\n", "#help echo Echo\\_the\\_arguments.\\_?echo\\_[args...]\n", "!help ok 1\n")
		p.roundTrip("?help nope\n", "!help fail unknown\\_request\\_nope\n")
		p.send("?help[3]\n")
		names := []string{"client-list", "echo", "halt", "help", "log-level", "request-timeout-hint", "restart",
			"sensor-list", "sensor-sampling", "sensor-value", "version-list", "watchdog"}
		for _, n := range names {
			if l := p.line(); !strings.HasPrefix(l, "#help[3] "+n+" ") {
				t.Fatalf("help inform %q, want %s", l, n)
			}
		}
		p.expect(fmt.Sprintf("!help[3] ok %d\n", len(names)))
		p.roundTrip("?version-list\n",
			"#version-list katcp-protocol 5.1-MITB\n",
			"#version-list katcp-library katcp-go-0.1 katcp-go-0.1\n",
			"#version-list katcp-device sim-2.0 sim-2.0-build\n",
			"!version-list ok 3\n")
		p.roundTrip("?log-level\n", "!log-level ok info\n")
		p.roundTrip("?log-level debug\n", "!log-level ok debug\n")
		p.roundTrip("?log-level loud\n", "!log-level fail unknown\\_log\\_level\\_\"loud\"\n")
		p.roundTrip("?client-list\n", "#client-list pipe\n", "!client-list ok 1\n")
		p.roundTrip("?request-timeout-hint\n", "#request-timeout-hint echo 2.5\n", "!request-timeout-hint ok 1\n")
		p.roundTrip("?request-timeout-hint watchdog\n", "#request-timeout-hint watchdog 0.0\n", "!request-timeout-hint ok 1\n")
		p.roundTrip("?request-timeout-hint nope\n", "!request-timeout-hint fail unknown\\_request\\_nope\n")
		p.roundTrip("?restart\n", "!restart fail restart\\_is\\_not\\_supported\\_by\\_this\\_device\n")
		p.roundTrip("?no-such-thing[4] x\n", "!no-such-thing[4] invalid unknown\\_request\\_no-such-thing\n")
		// Malformed lines get a #log error to this client only, and
		// replies and informs from the client are ignored.
		p.roundTrip("?bad x\\q\n!stray ok\n#stray\n?watchdog\n",
			"#log error 946684800.0 katcp malformed\\_line\\_at\\_byte\\_253,\\_column\\_6:\\_invalid\\_escape\\_sequence\n",
			"!watchdog ok\n")
	})
}

func TestServerRestartHook(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var restarted atomic.Bool
		cfg := simConfig
		cfg.Restart = func(context.Context) error {
			if restarted.Swap(true) {
				return errors.New("already restarting")
			}
			return nil
		}
		p := startServer(t, cfg).connect(3)
		p.roundTrip("?restart\n", "!restart ok\n")
		p.roundTrip("?restart\n", "!restart fail already\\_restarting\n")
	})
}

func TestServerHandlerReplies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var logs strings.Builder
		cfg := simConfig
		cfg.Logger = slog.New(slog.NewTextHandler(&syncWriter{w: &logs}, nil))
		ts := startServer(t, cfg)
		ts.Handle("list", "", func(ctx context.Context, w *ReplyWriter, r *Request) error {
			w.Inform("a", 1)
			w.Inform("b", 2.5)
			return w.Reply(2)
		})
		ts.Handle("nothing", "", func(context.Context, *ReplyWriter, *Request) error { return nil })
		ts.Handle("err", "", func(context.Context, *ReplyWriter, *Request) error { return errors.New("disk full") })
		ts.Handle("inval", "", func(context.Context, *ReplyWriter, *Request) error { return Invalid("need %d args", 2) })
		ts.Handle("boom", "", func(context.Context, *ReplyWriter, *Request) error { panic("bug") })
		ts.Handle("twice", "", func(ctx context.Context, w *ReplyWriter, r *Request) error {
			w.Reply()
			if err := w.Reply(); !errors.Is(err, ErrAlreadyReplied) {
				t.Errorf("second reply: %v", err)
			}
			if err := w.Inform("late"); !errors.Is(err, ErrAlreadyReplied) {
				t.Errorf("inform after reply: %v", err)
			}
			return errors.New("ignored")
		})
		ts.Handle("add", "", func(ctx context.Context, w *ReplyWriter, r *Request) error {
			var a, b int64
			if err := r.Decode(&a, &b); err != nil {
				return err
			}
			return w.Reply(a + b)
		})
		p := ts.connect(3)
		p.roundTrip("?list[5]\n", "#list[5] a 1\n", "#list[5] b 2.5\n", "!list[5] ok 2\n")
		p.roundTrip("?nothing\n", "!nothing ok\n")
		p.roundTrip("?err\n", "!err fail disk\\_full\n")
		p.roundTrip("?inval\n", "!inval invalid need\\_2\\_args\n")
		p.roundTrip("?boom\n", "!boom fail internal\\_error\\_handling\\_?boom\n")
		p.roundTrip("?twice\n", "!twice ok\n")
		p.roundTrip("?add 2 -5\n", "!add ok -3\n")
		p.roundTrip("?add 2\n", "!add fail ?add\\_takes\\_2\\_arguments,\\_got\\_1\n")
		p.roundTrip("?add 2 x\n", "!add fail argument\\_2:\\_katcp:\\_invalid\\_integer\\_\"x\"\n")
		synctest.Wait()
		if !strings.Contains(logs.String(), "panic in request handler") || !strings.Contains(logs.String(), "replied twice") {
			t.Errorf("log: %s", logs.String())
		}
	})
}

type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func TestServerConcurrentAndSequential(t *testing.T) {
	for _, seq := range []bool{false, true} {
		synctest.Test(t, func(t *testing.T) {
			cfg := simConfig
			cfg.Sequential = seq
			ts := startServer(t, cfg)
			ts.Handle("sleep", "", func(ctx context.Context, w *ReplyWriter, r *Request) error {
				var d time.Duration
				if err := r.Decode(&d); err != nil {
					return err
				}
				select {
				case <-time.After(d):
				case <-ctx.Done():
					return ctx.Err()
				}
				return nil
			})
			p := ts.connect(3)
			p.send("?sleep[1] 2\n?sleep[2] 1\n")
			if seq {
				p.expect("!sleep[1] ok\n", "!sleep[2] ok\n")
			} else {
				p.expect("!sleep[2] ok\n", "!sleep[1] ok\n")
			}
		})
	}
}

func TestServerBackPressure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := simConfig
		cfg.MaxPending = 2
		ts := startServer(t, cfg)
		var running, peak atomic.Int32
		release := make(chan struct{})
		ts.Handle("hold", "", func(ctx context.Context, w *ReplyWriter, r *Request) error {
			n := running.Add(1)
			defer running.Add(-1)
			for {
				p := peak.Load()
				if n <= p || peak.CompareAndSwap(p, n) {
					break
				}
			}
			<-release
			return nil
		})
		a := ts.connect(3)
		b := ts.connect(3)
		a.line() // #client-connected
		go a.send("?hold[1]\n?hold[2]\n?hold[3]\n")
		go b.send("?hold[1]\n")
		synctest.Wait()
		if got := running.Load(); got != 2 {
			t.Errorf("%d handlers running, want the limit 2", got)
		}
		close(release)
		got := map[string]bool{}
		for range 3 {
			got[a.line()] = true
		}
		b.expect("!hold[1] ok\n")
		if len(got) != 3 || peak.Load() != 2 {
			t.Errorf("replies %v, peak %d", got, peak.Load())
		}
	})
}

func TestServerClientConnectedAndLog(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ts := startServer(t, simConfig)
		a := ts.connect(3)
		b := ts.connect(3)
		a.expect("#client-connected pipe\n")
		log := slog.New(ts.LogHandler("sim.pump"))
		log.Debug("hidden at info")
		log.Warn("pressure high", "bar", 3.5)
		a.expect("#log warn 946684800.0 sim.pump pressure\\_high\\_bar=3.5\n")
		b.expect("#log warn 946684800.0 sim.pump pressure\\_high\\_bar=3.5\n")
		b.roundTrip("?log-level off\n", "!log-level ok off\n")
		log.Error("nobody hears this")
		b.roundTrip("?log-level all\n", "!log-level ok all\n")
		log.WithGroup("valve").Debug("open")
		a.expect("#log debug 946684800.0 sim.pump.valve open\n")
	})
}

func TestServerInterfaceChanged(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ts := startServer(t, simConfig)
		p := ts.connect(3)
		start := time.Now()
		ts.Sensors().Add(MustSensor(SensorInteger, "a", SensorOptions{}))
		ts.Sensors().Add(MustSensor(SensorInteger, "b", SensorOptions{}))
		p.expect("#interface-changed sensor-list\n")
		if d := time.Since(start); d != 100*time.Millisecond {
			t.Errorf("debounced for %v, want 100ms", d)
		}
		ts.Handle("x", "", func(context.Context, *ReplyWriter, *Request) error { return nil })
		ts.Sensors().Remove("a")
		p.expect("#interface-changed\n")
		ts.RemoveRequest("x")
		p.expect("#interface-changed request-list\n")
	})
}

func TestServerSlowClientDisconnected(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := simConfig
		cfg.MaxBacklog = 4096
		ts := startServer(t, cfg)
		s := MustSensor(SensorInteger, "n", SensorOptions{})
		ts.Sensors().Add(s)
		slow := ts.connect(3)
		fast := ts.connect(3)
		slow.line() // #client-connected
		slow.roundTrip("?sensor-sampling n auto\n", "#sensor-status 946684800.0 1 n unknown 0\n", "!sensor-sampling ok n auto\n")
		fast.roundTrip("?sensor-sampling n auto\n", "#sensor-status 946684800.0 1 n unknown 0\n", "!sensor-sampling ok n auto\n")
		// slow stops reading; fast keeps up.
		done := make(chan struct{})
		go func() {
			defer close(done)
			for i := range 500 {
				want := fmt.Sprintf("#sensor-status 946684800.0 1 n nominal %d\n", i)
				if got := fast.line(); got != want {
					t.Errorf("fast client got %q, want %q", got, want)
					return
				}
			}
		}()
		for i := range 500 {
			s.Set(i)
			synctest.Wait() // the fast client reads each one
		}
		<-done
		synctest.Wait()
		if got := ts.SlowClientDisconnects(); got != 1 {
			t.Errorf("slow disconnects = %d, want 1", got)
		}
		// The slow client finds a #disconnect and the end of the stream.
		all, _ := io.ReadAll(slow.r)
		if !strings.HasSuffix(string(all), "#disconnect client\\_too\\_slow:\\_write\\_backlog\\_over\\_the\\_limit\n") {
			t.Errorf("slow client's tail: %q", tail(string(all), 120))
		}
	})
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[len(s)-n:]
}

func TestServerShutdown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ts := NewServer(simConfig)
		l := newPipeListener()
		serveErr := make(chan error, 1)
		go func() { serveErr <- ts.Serve(l) }()
		ts2 := &testServer{Server: ts, t: t, l: l}
		ts.Handle("work", "", func(ctx context.Context, w *ReplyWriter, r *Request) error {
			select {
			case <-time.After(3 * time.Second):
				return w.Reply("done")
			case <-ctx.Done():
				return ctx.Err()
			}
		})
		p := ts2.connect(3)
		p.send("?work[1]\n")
		synctest.Wait()
		shut := make(chan error, 1)
		go func() { shut <- ts.Shutdown(context.Background()) }()
		p.expect("!work[1] ok done\n", "#disconnect server\\_shutting\\_down\n")
		if err := <-shut; err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-serveErr; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
		if _, err := p.r.ReadString('\n'); err != io.EOF {
			t.Errorf("after shutdown: %v", err)
		}
		if err := ts.Serve(newPipeListener()); !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve after Shutdown: %v", err)
		}

		// Shutdown with a deadline cancels the handlers that overrun it.
		ts3 := startServer(t, simConfig)
		ts3.Handle("work", "", func(ctx context.Context, w *ReplyWriter, r *Request) error {
			<-ctx.Done()
			return ctx.Err()
		})
		p3 := ts3.connect(3)
		p3.send("?work\n")
		synctest.Wait()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		go func() { shut <- ts3.Shutdown(ctx) }()
		p3.expect("!work fail context\\_canceled\n", "#disconnect server\\_shutting\\_down\n")
		if err := <-shut; !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Shutdown: %v", err)
		}
	})
}

func TestServerHalt(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		halted := make(chan struct{})
		cfg := simConfig
		cfg.Halt = func() { close(halted) }
		ts := startServer(t, cfg)
		a := ts.connect(3)
		b := ts.connect(3)
		a.line()
		a.roundTrip("?halt\n", "!halt ok\n", "#disconnect device\\_halting\n")
		b.expect("#disconnect device\\_halting\n")
		<-halted
		<-ts.Done()
	})
}

func TestServerClientGoesAway(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ts := startServer(t, simConfig)
		cancelled := make(chan struct{})
		ts.Handle("wait", "", func(ctx context.Context, w *ReplyWriter, r *Request) error {
			<-ctx.Done()
			close(cancelled)
			return ctx.Err()
		})
		p := ts.connect(3)
		p.send("?wait\n")
		synctest.Wait()
		p.conn.Close()
		<-cancelled
	})
}
