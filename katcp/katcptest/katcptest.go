// Package katcptest starts real KATCP devices on 127.0.0.1 for tests, in
// the manner of net/http/httptest.
//
//	dev := katcptest.NewDevice(t, katcp.ServerConfig{})
//	dev.Handle("add", "?add a b", addHandler)
//	temp := dev.AddSensor(katcp.SensorFloat, "temp", katcp.SensorOptions{})
//	c, _ := katcp.Dial(ctx, dev.Addr(), katcp.ClientConfig{})
//
// A Device can also misbehave on cue: delay a request's replies, drop every
// connection, send garbage bytes, stop listening and come back on the same
// address. It is closed by t.Cleanup. A Device is safe for concurrent use.
package katcptest

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/katcp-go/katcp-bridge/katcp"
)

// Device is a KATCP device server listening on 127.0.0.1.
type Device struct {
	t    testing.TB
	cfg  katcp.ServerConfig
	addr string

	mu       sync.Mutex // guards the fields below
	srv      *katcp.Server
	ln       *trackingListener
	served   chan struct{} // closed when the current Serve returns
	handlers map[string]handler
	sensors  []*katcp.Sensor
	delays   map[string]time.Duration
	down     bool
	// peakBefore is the peak of the listeners before the last Restart.
	peakBefore int
}

type handler struct {
	help string
	h    katcp.HandlerFunc
}

// NewDevice starts a device on 127.0.0.1:0 with cfg and registers its
// Close with t.Cleanup.
func NewDevice(t testing.TB, cfg katcp.ServerConfig) *Device {
	t.Helper()
	d := &Device{t: t, cfg: cfg, handlers: make(map[string]handler), delays: make(map[string]time.Duration)}
	if err := d.start("127.0.0.1:0"); err != nil {
		t.Fatalf("katcptest: %v", err)
	}
	t.Cleanup(d.Close)
	return d
}

// Addr returns the device's "host:port".
func (d *Device) Addr() string { return d.addr }

// Server returns the running server (a new one after Restart).
func (d *Device) Server() *katcp.Server {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.srv
}

func (d *Device) start(addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	d.addr = l.Addr().String()
	srv := katcp.NewServer(d.cfg)
	for name, h := range d.handlers {
		srv.Handle(name, h.help, d.wrap(name, h.h))
	}
	srv.Sensors().Add(d.sensors...)
	tl := &trackingListener{Listener: l, conns: make(map[net.Conn]struct{})}
	if d.ln != nil {
		d.ln.mu.Lock()
		d.peakBefore = max(d.peakBefore, d.ln.peak)
		d.ln.mu.Unlock()
	}
	served := make(chan struct{})
	d.srv, d.ln, d.served, d.down = srv, tl, served, false
	go func() {
		defer close(served)
		srv.Serve(tl)
	}()
	return nil
}

// wrap applies the scripted delay of a request.
func (d *Device) wrap(name string, h katcp.HandlerFunc) katcp.HandlerFunc {
	return func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		d.mu.Lock()
		delay := d.delays[name]
		d.mu.Unlock()
		if delay > 0 {
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			}
		}
		return h(ctx, w, r)
	}
}

// Handle registers a request (see katcp.Server.Handle); it survives
// Restart.
func (d *Device) Handle(name, help string, h katcp.HandlerFunc) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.handlers[name] = handler{help, h}
	d.srv.Handle(name, help, d.wrap(name, h))
}

// HandleReply registers a request that always replies ok with args.
func (d *Device) HandleReply(name string, args ...any) {
	d.Handle(name, "replies ok", func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		return w.Reply(args...)
	})
}

// AddSensor adds a sensor (it survives Restart) and returns it. It fails
// the test on a bad definition.
func (d *Device) AddSensor(t katcp.SensorType, name string, opts katcp.SensorOptions) *katcp.Sensor {
	d.t.Helper()
	s, err := katcp.NewSensor(t, name, opts)
	if err != nil {
		d.t.Fatalf("katcptest: %v", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.sensors = append(d.sensors, s)
	d.srv.Sensors().Add(s)
	return s
}

// SetDelay delays the replies of a request registered with Handle (0
// removes the delay). The delay ends early when the client goes.
func (d *Device) SetDelay(name string, delay time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.delays[name] = delay
}

// DropConnections closes every client connection abruptly, without
// #disconnect. The device keeps listening.
func (d *Device) DropConnections() {
	d.mu.Lock()
	ln := d.ln
	d.mu.Unlock()
	ln.each(func(c net.Conn) { c.Close() })
}

// SendGarbage writes raw bytes to every connected client (between, or in
// the middle of, the server's own lines).
func (d *Device) SendGarbage(b []byte) {
	d.mu.Lock()
	ln := d.ln
	d.mu.Unlock()
	ln.each(func(c net.Conn) { c.Write(b) })
}

// Clients returns how many clients are connected.
func (d *Device) Clients() int {
	d.mu.Lock()
	ln := d.ln
	d.mu.Unlock()
	n := 0
	ln.each(func(net.Conn) { n++ })
	return n
}

// Stop closes the server and its connections; the address stays free for
// Restart.
func (d *Device) Stop() {
	d.mu.Lock()
	if d.down {
		d.mu.Unlock()
		return
	}
	d.down = true
	srv, served := d.srv, d.served
	d.mu.Unlock()
	srv.Close()
	<-served
}

// Restart stops the device if it runs and starts it again on the same
// address, with the same requests and sensors.
func (d *Device) Restart() {
	d.t.Helper()
	d.Stop()
	d.mu.Lock()
	defer d.mu.Unlock()
	var err error
	for range 100 { // the port may be briefly busy
		if err = d.start(d.addr); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	d.t.Fatalf("katcptest: restart on %s: %v", d.addr, err)
}

// Close stops the device for good.
func (d *Device) Close() { d.Stop() }

// PeakClients returns the most clients that were connected at once since
// the device started. A connection counts until its client closes it
// (on Linux; elsewhere until the server closes it), so that a client
// that closes and one that connects right after never count twice.
func (d *Device) PeakClients() int {
	d.mu.Lock()
	ln := d.ln
	d.mu.Unlock()
	ln.mu.Lock()
	defer ln.mu.Unlock()
	return max(ln.peak, d.peakBefore)
}

// trackingListener remembers the open connections it accepted.
type trackingListener struct {
	net.Listener
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	peak  int
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	tc := &trackedConn{Conn: c, l: l}
	l.conns[tc] = struct{}{}
	open := 0
	for o := range l.conns {
		if o == net.Conn(tc) || !peerClosed(o.(*trackedConn).Conn) {
			open++
		}
	}
	l.peak = max(l.peak, open)
	return tc, nil
}

func (l *trackingListener) each(f func(net.Conn)) {
	l.mu.Lock()
	conns := make([]net.Conn, 0, len(l.conns))
	for c := range l.conns {
		conns = append(conns, c)
	}
	l.mu.Unlock()
	for _, c := range conns {
		f(c)
	}
}

type trackedConn struct {
	net.Conn
	l    *trackingListener
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
	})
	err := c.Conn.Close()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
