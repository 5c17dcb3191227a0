package katcp

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// fakeNet hands the client one end of a net.Pipe per dial; the test
// plays the device on the other end.
type fakeNet struct {
	t     *testing.T
	conns chan *fakeDevice
	mu    sync.Mutex
	fail  int // refuse this many dials first
	dials []time.Time
}

func newFakeNet(t *testing.T) *fakeNet {
	return &fakeNet{t: t, conns: make(chan *fakeDevice, 16)}
}

func (f *fakeNet) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	f.mu.Lock()
	f.dials = append(f.dials, time.Now())
	if f.fail > 0 {
		f.fail--
		f.mu.Unlock()
		return nil, errors.New("connection refused")
	}
	f.mu.Unlock()
	client, dev := net.Pipe()
	f.conns <- &fakeDevice{t: f.t, conn: dev, r: bufio.NewReader(dev)}
	return client, nil
}

// accept returns the device end of the next connection.
func (f *fakeNet) accept() *fakeDevice {
	f.t.Helper()
	select {
	case d := <-f.conns:
		f.t.Cleanup(func() { d.conn.Close() })
		return d
	case <-time.After(time.Hour):
		f.t.Fatal("client did not connect")
		return nil
	}
}

type fakeDevice struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

// send writes raw bytes to the client.
func (d *fakeDevice) send(s string) {
	d.t.Helper()
	if _, err := io.WriteString(d.conn, s); err != nil {
		d.t.Fatalf("device write: %v", err)
	}
}

// expect reads one line from the client and checks its exact bytes.
func (d *fakeDevice) expect(want string) {
	d.t.Helper()
	got, err := d.r.ReadString('\n')
	if err != nil {
		d.t.Fatalf("device read: %v (want %q)", err, want)
	}
	if got != want {
		d.t.Fatalf("client wrote %q, want %q", got, want)
	}
}

const (
	aiokatcpHello     = "#version-connect katcp-protocol 5.1-MIB\n#version-connect katcp-library aiokatcp-1.9\n#version-connect katcp-device sim-1.0 build\n"
	katcpPythonHello  = "#version-connect katcp-protocol 5.0-IM\n#version-connect katcp-library katcp-python-0.9\n"
	cLibraryHello     = "#version-connect katcp-protocol 5.0-M\n#version-connect katcp-library katcp-c-1\n"
	cLibraryV4Hello   = "#version katcp-c-4.9\n#build-state dev-1.2\n"
	timeoutHintsHello = "#version-connect katcp-protocol 5.1-MITB\n"
)

// connect starts a client against a fake device that greets with hello.
func connect(t *testing.T, cfg ClientConfig, hello string) (*Client, *fakeDevice, *fakeNet) {
	t.Helper()
	fn := newFakeNet(t)
	cfg.Dial = fn.dial
	c := NewClient("device:7147", cfg)
	t.Cleanup(func() { c.Close() })
	d := fn.accept()
	d.send(hello)
	if err := c.WaitConnected(context.Background()); err != nil {
		t.Fatalf("WaitConnected: %v", err)
	}
	return c, d, fn
}

// result of a request run in the background.
type result struct {
	r   *Reply
	err error
}

func goRequest(c *Client, ctx context.Context, name string, args ...any) chan result {
	ch := make(chan result, 1)
	go func() {
		r, err := c.Request(ctx, name, args...)
		ch <- result{r, err}
	}()
	return ch
}

func TestClientAiokatcpStyle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, aiokatcpHello)
		synctest.Wait() // the roles after katcp-protocol
		info := c.Protocol()
		if info.Version != (ProtocolVersion{5, 1, "MIB"}) || info.Library != "aiokatcp-1.9" || info.Device != "sim-1.0 build" {
			t.Errorf("protocol info = %+v", info)
		}
		if len(info.Roles) != 3 || string(info.Roles[2]) != "katcp-device sim-1.0 build" {
			t.Errorf("roles = %q", info.Roles)
		}
		if info.ConnectedAt.IsZero() {
			t.Error("ConnectedAt not set")
		}

		// Two requests in flight, answered out of order, with informs.
		a := goRequest(c, context.Background(), "help")
		d.expect("?help[1]\n")
		b := goRequest(c, context.Background(), "sensor-value", "x y")
		d.expect("?sensor-value[2] x\\_y\n")
		d.send("#sensor-value[2] 1700000000.5 1 x\\_y nominal 5\n!sensor-value[2] ok 1\n")
		d.send("#help[1] a first\n#help[1] b second\n!help[1] ok 2\n")
		rb := <-b
		if rb.err != nil || len(rb.r.Informs) != 1 || rb.r.Informs[0].Arg(2) != "x y" || string(rb.r.Values()[0]) != "1" {
			t.Fatalf("sensor-value: %+v, %v", rb.r, rb.err)
		}
		ra := <-a
		if ra.err != nil || len(ra.r.Informs) != 2 || ra.r.Informs[1].Arg(0) != "b" || ra.r.Values()[0][0] != '2' {
			t.Fatalf("help: %+v, %v", ra.r, ra.err)
		}
	})
}

func TestClientReplyErrors(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, aiokatcpHello)
		for i, tt := range []struct {
			reply  string
			is     error
			status string
			reason string
		}{
			{"fail Hardware\\_did\\_not\\_respond.", ErrFail, "fail", "Hardware did not respond."},
			{"invalid Unknown\\_request.", ErrInvalid, "invalid", "Unknown request."},
			{"weird", ErrInvalid, "weird", ""},
		} {
			ch := goRequest(c, context.Background(), "set-rate", 4.1)
			d.expect(fmt.Sprintf("?set-rate[%d] 4.1\n", i+1))
			d.send(fmt.Sprintf("!set-rate[%d] %s\n", i+1, tt.reply))
			res := <-ch
			var re *ReplyError
			if !errors.As(res.err, &re) || !errors.Is(res.err, tt.is) || re.Status != tt.status || re.Reason != tt.reason {
				t.Errorf("reply %q: error %v (%+v)", tt.reply, res.err, re)
			}
			if errors.Is(res.err, ErrConnection) {
				t.Errorf("a refusal must not look like a connection problem: %v", res.err)
			}
			if res.r == nil || res.r.Status() != tt.status {
				t.Errorf("reply %q: the reply is not returned with the error", tt.reply)
			}
		}
		// The raw variant does not interpret the status.
		ch := make(chan result, 1)
		go func() {
			r, err := c.RequestRaw(context.Background(), Message{Type: TypeRequest, Name: "x"})
			ch <- result{r, err}
		}()
		d.expect("?x[4]\n")
		d.send("!x[4] fail no\n")
		if res := <-ch; res.err != nil || res.r.Status() != "fail" {
			t.Errorf("RequestRaw: %+v, %v", res.r, res.err)
		}
	})
}

func TestClientKatcpPythonSequential(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, katcpPythonHello)
		for i := 1; i <= 3; i++ {
			ch := goRequest(c, context.Background(), "watchdog")
			d.expect(fmt.Sprintf("?watchdog[%d]\n", i))
			d.send(fmt.Sprintf("!watchdog[%d] ok\n", i))
			if res := <-ch; res.err != nil {
				t.Fatal(res.err)
			}
		}
	})
}

func TestClientCLibraryNoMIDs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, cLibraryHello)
		// Different names go out together; the same name waits its turn.
		a1 := goRequest(c, context.Background(), "sensor-list")
		d.expect("?sensor-list\n")
		a2 := goRequest(c, context.Background(), "sensor-list", "b")
		synctest.Wait()
		w := goRequest(c, context.Background(), "watchdog")
		d.expect("?watchdog\n") // not the second ?sensor-list
		d.send("!watchdog ok\n")
		if res := <-w; res.err != nil {
			t.Fatal(res.err)
		}
		d.send("#sensor-list a x \\@ integer\n!sensor-list ok 1\n")
		if res := <-a1; res.err != nil || len(res.r.Informs) != 1 {
			t.Fatalf("first: %+v, %v", res.r, res.err)
		}
		d.expect("?sensor-list b\n")
		d.send("#sensor-list b y \\@ float\n!sensor-list ok 1\n")
		if res := <-a2; res.err != nil || res.r.Informs[0].Arg(0) != "b" {
			t.Fatalf("second: %+v, %v", res.r, res.err)
		}
		// Asking for a message id from a device without I is an error.
		_, err := c.RequestRaw(context.Background(), Message{Type: TypeRequest, Name: "x", MID: 5})
		if !errors.Is(err, ErrBadMID) {
			t.Errorf("explicit mid without I: %v", err)
		}
	})
}

func TestClientInResponseInformsWithoutMID(t *testing.T) {
	// The C library with I would still omit the mid on in-response informs.
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, "#version-connect katcp-protocol 5.0-MI\n")
		ch := goRequest(c, context.Background(), "help")
		d.expect("?help[1]\n")
		d.send("#help a\n#help b\n!help[1] ok 2\n")
		if res := <-ch; res.err != nil || len(res.r.Informs) != 2 {
			t.Fatalf("%+v, %v", res.r, res.err)
		}
	})
}

func TestClientV4(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, cLibraryV4Hello)
		info := c.Protocol()
		if info.Version.Major != 4 || info.Library != "katcp-c-4.9" {
			t.Errorf("info = %+v", info)
		}
		ts := time.Unix(1700000000, 250e6)
		ch := goRequest(c, context.Background(), "set-time", c.ConvertSeconds(ts))
		d.expect("?set-time 1700000000250\n")
		d.send("!set-time ok 1700000000250\n")
		res := <-ch
		if res.err != nil {
			t.Fatal(res.err)
		}
		got, err := c.ParseTimestamp(res.r.Values()[0])
		if err != nil || !got.Equal(ts) {
			t.Errorf("ParseTimestamp = %v, %v", got, err)
		}
	})
}

func TestClientV4ByVersionConnect(t *testing.T) {
	// The C library's default build announces 4.9 with #version-connect.
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, "#version-connect katcp-protocol 4.9-M\n")
		if v := c.Protocol().Version; v.Major != 4 || v.Minor != 9 {
			t.Errorf("version %v", v)
		}
		ch := goRequest(c, context.Background(), "watchdog")
		d.expect("?watchdog\n") // no message ids in v4
		d.send("!watchdog ok\n")
		if res := <-ch; res.err != nil {
			t.Fatal(res.err)
		}
	})
}

func TestClientDefaultTimeoutAndLateReply(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, aiokatcpHello)
		start := time.Now()
		ch := goRequest(c, context.Background(), "slow")
		d.expect("?slow[1]\n")
		res := <-ch
		if !errors.Is(res.err, context.DeadlineExceeded) || errors.Is(res.err, ErrConnection) {
			t.Fatalf("err = %v, want DeadlineExceeded", res.err)
		}
		if got := time.Since(start); got != 5*time.Second {
			t.Errorf("default timeout took %v, want 5s", got)
		}
		// The late reply is dropped and counted; the next request gets a
		// new id and its own reply.
		ch = goRequest(c, context.Background(), "slow")
		d.expect("?slow[2]\n")
		d.send("#slow[1] late-inform\n!slow[1] ok late\n!slow[2] ok fresh\n")
		res = <-ch
		if res.err != nil || string(res.r.Values()[0]) != "fresh" || len(res.r.Informs) != 0 {
			t.Fatalf("%+v, %v", res.r, res.err)
		}
		if got := c.Stats().LateReplies; got != 1 {
			t.Errorf("LateReplies = %d, want 1", got)
		}
		// An abandoned id is forgotten after a while: a reply that late
		// is unexpected, and the table does not grow.
		ch = goRequest(c, context.Background(), "never")
		d.expect("?never[3]\n")
		<-ch
		time.Sleep(time.Minute + time.Second) // past the grace after the 5 s timeout
		d.send("!never[3] ok\n")
		synctest.Wait()
		if s := c.Stats(); s.LateReplies != 1 || s.UnexpectedReplies != 1 {
			t.Errorf("stats %+v", s)
		}
	})
}

func TestClientLateReplyWithoutMIDs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, cLibraryHello)
		ctx, cancel := context.WithCancel(context.Background())
		ch := goRequest(c, ctx, "slow")
		d.expect("?slow\n")
		cancel()
		if res := <-ch; !errors.Is(res.err, context.Canceled) {
			t.Fatalf("err = %v", res.err)
		}
		// The next ?slow waits until the cancelled one's reply is in, and
		// does not take it.
		ch = goRequest(c, context.Background(), "slow")
		synctest.Wait()
		d.send("!slow ok late\n")
		d.expect("?slow\n")
		d.send("!slow ok fresh\n")
		if res := <-ch; res.err != nil || string(res.r.Values()[0]) != "fresh" {
			t.Fatalf("%+v, %v", res.r, res.err)
		}
		if got := c.Stats().LateReplies; got != 1 {
			t.Errorf("LateReplies = %d, want 1", got)
		}
	})
}

func TestClientCtxDeadlineWins(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{RequestTimeout: time.Minute}, aiokatcpHello)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		start := time.Now()
		ch := goRequest(c, ctx, "slow")
		d.expect("?slow[1]\n")
		if res := <-ch; !errors.Is(res.err, context.DeadlineExceeded) {
			t.Fatalf("err = %v", res.err)
		}
		if got := time.Since(start); got != 2*time.Second {
			t.Errorf("took %v, want 2s", got)
		}
	})
}

func TestClientTimeoutHints(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fn := newFakeNet(t)
		c := NewClient("device:7147", ClientConfig{Dial: fn.dial})
		defer c.Close()
		d := fn.accept()
		d.send(timeoutHintsHello)
		d.expect("?request-timeout-hint[1]\n")
		d.send("#request-timeout-hint[1] slow 30.0\n#request-timeout-hint[1] quick 0\n!request-timeout-hint[1] ok 2\n")
		if err := c.WaitConnected(context.Background()); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		start := time.Now()
		ch := goRequest(c, context.Background(), "slow")
		d.expect("?slow[2]\n")
		<-ch
		if got := time.Since(start); got != 30*time.Second {
			t.Errorf("hinted request timed out after %v, want 30s", got)
		}
		start = time.Now()
		ch = goRequest(c, context.Background(), "quick")
		d.expect("?quick[3]\n")
		<-ch
		if got := time.Since(start); got != 5*time.Second {
			t.Errorf("request with a zero hint timed out after %v, want the 5s default", got)
		}
	})
}

func TestClientExplicitMID(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, aiokatcpHello)
		call := c.GoRaw(context.Background(), Message{Type: TypeRequest, Name: "a", MID: 77})
		d.expect("?a[77]\n")
		if _, err := c.RequestRaw(context.Background(), Message{Type: TypeRequest, Name: "b", MID: 77}); !errors.Is(err, ErrBadMID) {
			t.Errorf("mid in flight: err = %v", err)
		}
		d.send("!a[77] ok\n")
		if r, err := call.Result(); err != nil || !r.OK() {
			t.Fatalf("%+v, %v", r, err)
		}
	})
}

func TestClientGo(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, aiokatcpHello)
		a := c.Go(context.Background(), "add", 1, 2)
		b := c.Go(context.Background(), "fail")
		d.expect("?add[1] 1 2\n")
		d.expect("?fail[2]\n")
		d.send("!fail[2] fail nope\n!add[1] ok 3\n")
		<-a.Done()
		if r, err := a.Result(); err != nil || string(r.Values()[0]) != "3" {
			t.Errorf("add: %+v, %v", r, err)
		}
		if _, err := b.Result(); !errors.Is(err, ErrFail) {
			t.Errorf("fail: %v", err)
		}
		// A call that times out reports it.
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		slow := c.Go(ctx, "slow")
		d.expect("?slow[3]\n")
		<-slow.Done()
		if _, err := slow.Result(); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("slow: %v", err)
		}
		if _, err := c.Go(context.Background(), "bad_name").Result(); !errors.Is(err, ErrBadName) {
			t.Errorf("bad name: %v", err)
		}
	})
}

func TestClientStream(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, aiokatcpHello)
		var got []string
		ch := make(chan result, 1)
		go func() {
			r, err := c.RequestStream(context.Background(), func(m Message) { got = append(got, m.Arg(0)) }, "sensor-list")
			ch <- result{r, err}
		}()
		d.expect("?sensor-list[1]\n")
		var b strings.Builder
		for i := range 1000 {
			fmt.Fprintf(&b, "#sensor-list[1] s%d d u integer\n", i)
		}
		b.WriteString("!sensor-list[1] ok 1000\n")
		d.send(b.String())
		res := <-ch
		if res.err != nil || len(res.r.Informs) != 0 || len(got) != 1000 || got[999] != "s999" {
			t.Fatalf("%v, %d informs streamed", res.err, len(got))
		}
	})
}

func TestClientInformHandlers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, aiokatcpHello)
		var mu sync.Mutex
		var seen []string
		record := func(prefix string) func(Message) {
			return func(m Message) {
				mu.Lock()
				seen = append(seen, prefix+m.Arg(0))
				mu.Unlock()
			}
		}
		remove := c.HandleInform("a", record("a:"))
		c.HandleInform("b", record("b:"))
		c.HandleUnhandled(record("other:"))
		c.HandleInform("boom", func(Message) { panic("handler bug") })
		d.send("#a 1\n#b 2\n#boom\n#c 3\n#a 4\n")
		synctest.Wait()
		remove()
		d.send("#a 5\n")
		synctest.Wait()
		mu.Lock()
		want := "a:1 b:2 other:3 a:4 other:5"
		if got := strings.Join(seen, " "); got != want {
			t.Errorf("handled %q, want %q", got, want)
		}
		mu.Unlock()
		// Device requests and stray replies are counted, nothing else.
		d.send("?from-device\n!nobody ok\n")
		synctest.Wait()
		if s := c.Stats(); s.DeviceRequests != 1 || s.UnexpectedReplies != 1 {
			t.Errorf("stats = %+v", s)
		}
		if !c.Connected() {
			t.Error("client disconnected")
		}
	})
}

func TestClientInformQueueOverflow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{InformQueue: 2}, "#version-connect katcp-protocol 5.1-MIB\n")
		release := make(chan struct{})
		var n int
		c.HandleInform("x", func(Message) {
			<-release
			n++
		})
		synctest.Wait() // the hello and the connection event are handled
		d.send("#x\n")
		synctest.Wait() // the handler holds the first
		d.send("#x\n#x\n#x\n#x\n")
		synctest.Wait()
		close(release)
		synctest.Wait()
		if n != 3 || c.Stats().DroppedInforms != 2 {
			t.Errorf("handled %d, dropped %d; want 3 and 2", n, c.Stats().DroppedInforms)
		}
	})
}

// The informs read before a reply are queued for the handlers before
// anything the reply's caller queues (the sensor watcher's Synced relies
// on it).
func TestClientInformsQueuedBeforeReply(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, aiokatcpHello)
		var order []string // appended on the dispatch goroutine only
		c.HandleInform("x", func(m Message) { order = append(order, "#x "+m.Arg(0)) })
		m, _ := NewRequest("y")
		c.RequestFunc(context.Background(), m, 0, func(*Reply, error) {
			// On the read goroutine, as the reply is handled.
			c.events.pushEvent(event{kind: evFunc, fn: func() { order = append(order, "!y") }})
		})
		d.expect("?y[1]\n")
		d.send("#x 1\n#x 2\n!y[1] ok\n#x 3\n")
		synctest.Wait()
		if got := strings.Join(order, ", "); got != "#x 1, #x 2, !y, #x 3" {
			t.Errorf("dispatched %s", got)
		}
	})
}

// An inform reaches the handlers once the reader would wait for more
// bytes, even when what is left is not a whole line: the LF of a CRLF, the
// start of the next line, blanks.
func TestClientInformsNotHeldByPartialLines(t *testing.T) {
	for _, tail := range []string{"\r\n", "\n#x 2", "\n  "} {
		synctest.Test(t, func(t *testing.T) {
			c, d, _ := connect(t, ClientConfig{}, aiokatcpHello)
			got := make(chan string, 4)
			c.HandleInform("x", func(m Message) { got <- m.Arg(0) })
			d.send("#x 1" + tail)
			synctest.Wait()
			if len(got) != 1 || <-got != "1" {
				t.Errorf("after %q: #x 1 not handled", "#x 1"+tail)
			}
		})
	}
}

// A device whose lines end in CRLF is connected once its greeting is read.
func TestClientCRLFGreeting(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, _, _ := connect(t, ClientConfig{}, strings.ReplaceAll(aiokatcpHello, "\n", "\r\n"))
		if v := c.Protocol().Version; v.Major != 5 {
			t.Errorf("protocol %s", v)
		}
	})
}

// The informs that come with the greeting reach the handlers before
// OnConnected, even when more follow at once.
func TestClientGreetingInformsBeforeOnConnected(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var order []string // appended on the dispatch goroutine only
		fn := newFakeNet(t)
		c := NewClient("device:7147", ClientConfig{Dial: fn.dial, OnConnected: func(ProtocolInfo) { order = append(order, "connected") }})
		defer c.Close()
		c.HandleInform("version-connect", func(m Message) { order = append(order, m.Arg(0)) })
		d := fn.accept()
		// More than the reader reads before announcing the protocol, and a
		// line left open so that it then waits with nothing to read.
		d.send(aiokatcpHello + strings.Repeat("#foo\n", 20) + "#foo")
		if err := c.WaitConnected(context.Background()); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if got := strings.Join(order, " "); got != "katcp-protocol katcp-library katcp-device connected" {
			t.Errorf("dispatched %s", got)
		}
	})
}

func TestClientMalformedLinesSkipped(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, aiokatcpHello)
		ch := goRequest(c, context.Background(), "x")
		d.expect("?x[1]\n")
		d.send("!x[1 ok\n#bad\\q\n!x[1] ok\n")
		if res := <-ch; res.err != nil {
			t.Fatal(res.err)
		}
		if got := c.Stats().ParseErrors; got != 2 {
			t.Errorf("ParseErrors = %d", got)
		}
	})
}

func TestClientReconnectBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fn := newFakeNet(t)
		fn.fail = 4
		var mu sync.Mutex
		var events []string
		note := func(s string) {
			mu.Lock()
			events = append(events, s)
			mu.Unlock()
		}
		c := NewClient("device:7147", ClientConfig{
			Dial:            fn.dial,
			OnConnected:     func(ProtocolInfo) { note("connected") },
			OnDisconnected:  func(error) { note("disconnected") },
			OnConnectFailed: func(error) { note("failed") },
		})
		defer c.Close()
		d := fn.accept()
		d.send(aiokatcpHello)
		if err := c.WaitConnected(context.Background()); err != nil {
			t.Fatal(err)
		}
		fn.mu.Lock()
		dials := fn.dials
		fn.mu.Unlock()
		// Delays double from 0.5 s, each randomised within [d/2, d].
		for i, d := range []time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second} {
			gap := dials[i+1].Sub(dials[i])
			if gap < d/2 || gap > d {
				t.Errorf("delay %d = %v, want within [%v, %v]", i, gap, d/2, d)
			}
		}
		// The device goes away: pending requests fail as connection
		// problems, and the client reconnects at once.
		ch := goRequest(c, context.Background(), "x")
		d.expect("?x[1]\n")
		d.conn.Close()
		if res := <-ch; !errors.Is(res.err, ErrConnectionLost) || !errors.Is(res.err, ErrConnection) {
			t.Fatalf("pending request: %v", res.err)
		}
		d2 := fn.accept()
		d2.send(katcpPythonHello)
		if err := c.WaitConnected(context.Background()); err != nil {
			t.Fatal(err)
		}
		if v := c.Protocol().Version.String(); v != "5.0-IM" {
			t.Errorf("protocol after reconnect = %s", v)
		}
		synctest.Wait()
		mu.Lock()
		if got := strings.Join(events, " "); got != "failed failed failed failed connected disconnected connected" {
			t.Errorf("callbacks: %s", got)
		}
		mu.Unlock()
		if c.Stats().Reconnects != 1 {
			t.Errorf("Reconnects = %d", c.Stats().Reconnects)
		}
	})
}

func TestClientBackoffCap(t *testing.T) {
	c := &Client{cfg: ClientConfig{BackoffInitial: time.Second, BackoffMax: 10 * time.Second}}
	for n := range 100 {
		d := c.backoff(n)
		if d > 10*time.Second || d < 500*time.Millisecond {
			t.Fatalf("backoff(%d) = %v", n, d)
		}
		if n > 10 && d < 5*time.Second {
			t.Fatalf("backoff(%d) = %v, want within [5s, 10s]", n, d)
		}
	}
}

func TestClientDisconnectForcesReconnect(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, _, fn := connect(t, ClientConfig{}, aiokatcpHello)
		c.Disconnect()
		d2 := fn.accept()
		if err := c.WaitDisconnected(context.Background()); err != nil {
			t.Fatal(err)
		}
		d2.send(aiokatcpHello)
		if err := c.WaitConnected(context.Background()); err != nil {
			t.Fatal(err)
		}
	})
}

func TestClientNoReconnect(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, fn := connect(t, ClientConfig{NoReconnect: true}, aiokatcpHello)
		d.send("#disconnect bye\n")
		d.conn.Close()
		if err := c.WaitDisconnected(context.Background()); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if len(fn.conns) != 0 {
			t.Error("client reconnected")
		}
		if _, err := c.Request(context.Background(), "x"); !errors.Is(err, ErrNotConnected) {
			t.Errorf("request after disconnect: %v", err)
		}
		if err := c.WaitConnected(context.Background()); !errors.Is(err, ErrConnection) {
			t.Errorf("WaitConnected on a stopped client: %v", err)
		}
		// A first attempt that fails is returned by Dial.
		fn.fail = 1
		_, err := Dial(context.Background(), "device:1", ClientConfig{Dial: fn.dial, NoReconnect: true})
		if !errors.Is(err, ErrConnection) {
			t.Errorf("Dial: %v", err)
		}
	})
}

func TestClientNegotiation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fn := newFakeNet(t)
		for _, tt := range []struct{ hello, want string }{
			{"", "no #version-connect"},
			{"#version-connect katcp-protocol banana\n", "invalid protocol version"},
			{"#version-connect katcp-protocol 6.0-M\n", "unsupported KATCP protocol version 6.0-M"},
		} {
			var got error
			c := NewClient("d:1", ClientConfig{Dial: fn.dial, NoReconnect: true, OnConnectFailed: func(err error) { got = err }})
			d := fn.accept()
			start := time.Now()
			d.send(tt.hello)
			err := c.WaitConnected(context.Background())
			if !errors.Is(err, ErrNegotiation) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("hello %q: %v", tt.hello, err)
			}
			if tt.hello == "" && time.Since(start) != 5*time.Second {
				t.Errorf("negotiation timeout after %v", time.Since(start))
			}
			c.Close()
			if got == nil || !errors.Is(got, ErrNegotiation) {
				t.Errorf("OnConnectFailed got %v", got)
			}
		}
		// A preset protocol skips detection.
		c := NewClient("d:1", ClientConfig{Dial: fn.dial, Protocol: &ProtocolVersion{5, 0, "I"}})
		defer c.Close()
		d := fn.accept()
		if err := c.WaitConnected(context.Background()); err != nil {
			t.Fatal(err)
		}
		ch := goRequest(c, context.Background(), "x")
		d.expect("?x[1]\n")
		d.send("!x[1] ok\n")
		<-ch
	})
}

func TestClientLineLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, fn := connect(t, ClientConfig{MaxLineLength: 64}, aiokatcpHello)
		go io.WriteString(d.conn, "#x "+strings.Repeat("y", 100)+"\n") // fails when the client hangs up
		if err := c.WaitDisconnected(context.Background()); err != nil {
			t.Fatal(err)
		}
		if err := c.LastError(); !errors.Is(err, ErrLineLimit) {
			t.Errorf("cause = %v", err)
		}
		fn.accept() // and it reconnects
	})
}

func TestClientWriteOverflow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// The device never reads: requests pile up until the limit.
		c, _, _ := connect(t, ClientConfig{MaxWriteBuffer: 1024}, aiokatcpHello)
		big := strings.Repeat("z", 300)
		var err error
		for i := 0; i < 100 && err == nil; i++ {
			c.Go(context.Background(), "x", big)
			synctest.Wait()
			err = c.LastError()
		}
		if !errors.Is(err, ErrWriteOverflow) {
			t.Errorf("cause = %v", err)
		}
	})
}

func TestClientCloseFailsPending(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, aiokatcpHello)
		ch := goRequest(c, context.Background(), "x")
		d.expect("?x[1]\n")
		c.Close()
		if res := <-ch; !errors.Is(res.err, ErrClosed) {
			t.Errorf("pending: %v", res.err)
		}
		c.Close()
		if _, err := c.Request(context.Background(), "x"); !errors.Is(err, ErrClosed) {
			t.Errorf("after close: %v", err)
		}
		if err := c.WaitConnected(context.Background()); !errors.Is(err, ErrClosed) {
			t.Errorf("WaitConnected after close: %v", err)
		}
	})
}

func TestDialCtx(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fn := newFakeNet(t)
		fn.fail = 1000
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_, err := Dial(ctx, "d:1", ClientConfig{Dial: fn.dial})
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Dial: %v", err)
		}
	})
}

func TestClientRequestFunc(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{RequestTimeout: 5 * time.Second}, aiokatcpHello)
		type res struct {
			r   *Reply
			err error
		}
		start := func(ctx context.Context, timeout time.Duration, name string, args ...any) chan res {
			ch := make(chan res, 2) // 2: a second call would be caught below
			m, err := NewRequest(name, args...)
			if err != nil {
				t.Fatal(err)
			}
			c.RequestFunc(ctx, m, timeout, func(r *Reply, err error) { ch <- res{r, err} })
			return ch
		}
		once := func(ch chan res) res {
			t.Helper()
			r := <-ch
			synctest.Wait()
			if len(ch) != 0 {
				t.Fatal("callback called twice")
			}
			return r
		}
		add := start(context.Background(), 0, "add", 1, 2)
		fail := start(context.Background(), 0, "fail")
		d.expect("?add[1] 1 2\n")
		d.expect("?fail[2]\n")
		d.send("!fail[2] fail nope\n!add[1] ok 3\n")
		if r := once(add); r.err != nil || string(r.r.Values()[0]) != "3" {
			t.Errorf("add: %+v, %v", r.r, r.err)
		}
		// The status is not interpreted, as for RequestRaw.
		if r := once(fail); r.err != nil || r.r.Status() != "fail" || r.r.Arg(1) != "nope" {
			t.Errorf("fail: %+v, %v", r.r, r.err)
		}

		// The timeout ends a request; its late reply is dropped and counted.
		slow := start(context.Background(), time.Second, "slow")
		d.expect("?slow[3]\n")
		if r := once(slow); !errors.Is(r.err, context.DeadlineExceeded) {
			t.Errorf("slow: %v", r.err)
		}
		d.send("!slow[3] ok\n")
		synctest.Wait()
		if n := c.Stats().LateReplies; n != 1 {
			t.Errorf("late replies %d, want 1", n)
		}

		// Without a timeout, the client's default applies.
		def := start(context.Background(), 0, "slow")
		d.expect("?slow[4]\n")
		t0 := time.Now()
		if r := once(def); !errors.Is(r.err, context.DeadlineExceeded) || time.Since(t0) != 5*time.Second {
			t.Errorf("default timeout: %v after %v", r.err, time.Since(t0))
		}

		// Cancelling ctx ends it with ctx's error.
		ctx, cancel := context.WithCancel(context.Background())
		cancelled := start(ctx, time.Minute, "slow")
		d.expect("?slow[5]\n")
		cancel()
		if r := once(cancelled); !errors.Is(r.err, context.Canceled) {
			t.Errorf("cancelled: %v", r.err)
		}

		// Bad input is reported through f too, at once.
		ch := make(chan res, 2)
		c.RequestFunc(context.Background(), Message{Type: TypeRequest, Name: "bad_name"}, 0, func(r *Reply, err error) { ch <- res{r, err} })
		if r := once(ch); !errors.Is(r.err, ErrBadName) {
			t.Errorf("bad name: %v", r.err)
		}
		c.RequestFunc(context.Background(), Message{Type: TypeInform, Name: "x"}, 0, func(r *Reply, err error) { ch <- res{r, err} })
		if r := once(ch); !errors.Is(r.err, ErrBadType) {
			t.Errorf("inform: %v", r.err)
		}

		// A lost connection fails what is in flight.
		lost := start(context.Background(), 0, "slow")
		d.expect("?slow[6]\n")
		d.conn.Close()
		if r := once(lost); !errors.Is(r.err, ErrConnection) {
			t.Errorf("lost: %v", r.err)
		}
	})
}

func TestClientAfterBatch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		var seen []string
		cfg := ClientConfig{AfterBatch: func() {
			mu.Lock()
			seen = append(seen, "|")
			mu.Unlock()
		}}
		c, d, _ := connect(t, cfg, aiokatcpHello)
		c.HandleInform("x", func(m Message) {
			mu.Lock()
			seen = append(seen, m.Arg(0))
			mu.Unlock()
		})
		synctest.Wait()
		mu.Lock()
		seen = nil
		mu.Unlock()
		d.send("#x 1\n#x 2\n#x 3\n")
		synctest.Wait()
		mu.Lock()
		defer mu.Unlock()
		// Every inform is followed, sooner or later, by the end of its
		// batch, and a batch ends after its informs.
		got := strings.Join(seen, "")
		if !strings.HasPrefix(got, "1") || !strings.HasSuffix(got, "3|") || strings.ReplaceAll(got, "|", "") != "123" {
			t.Errorf("handlers and batch ends: %q", got)
		}
	})
}

// A request that cannot be sent when its turn comes (no message ids, the
// write buffer overflows) is finished outside the connection's lock: its
// callback may call the client again.
func TestClientRequestFuncCallbackReentersClient(t *testing.T) {
	c, d, _ := connect(t, ClientConfig{NoMIDs: true, MaxWriteBuffer: 1024}, aiokatcpHello)
	first := make(chan error, 1)
	second := make(chan error, 1)
	m1, _ := NewRequest("x")
	m2, _ := NewRequest("x", strings.Repeat("z", 2000))
	c.RequestFunc(context.Background(), m1, time.Minute, func(r *Reply, err error) { first <- err })
	d.expect("?x\n")
	c.RequestFunc(context.Background(), m2, time.Minute, func(r *Reply, err error) {
		m3, _ := NewRequest("y") // a retry, say
		c.RequestFunc(context.Background(), m3, time.Second, func(*Reply, error) {})
		second <- err
	})
	go d.send("!x ok\n") // sending the queued ?x overflows the write buffer
	deadline := time.After(10 * time.Second)
	select {
	case err := <-first:
		if err != nil {
			t.Errorf("first: %v", err)
		}
	case <-deadline:
		t.Fatal("the first request was never answered")
	}
	select {
	case err := <-second:
		if !errors.Is(err, ErrWriteOverflow) {
			t.Errorf("second: %v, want the overflow", err)
		}
	case <-deadline:
		t.Fatal("deadlock: a callback re-entering the client")
	}
}
