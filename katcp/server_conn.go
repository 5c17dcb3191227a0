package katcp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// serverConn is one client connection of a Server. serve owns it: it runs
// the read loop on its own goroutine, starts the write loop, and on exit
// waits for both and for the handlers.
type serverConn struct {
	srv    *Server
	nc     net.Conn
	remote string // KATCP address form
	ctx    context.Context
	cancel context.CancelFunc

	handlers sync.WaitGroup       // running handlers
	active   atomic.Int32         // requests being handled
	seq      chan *pendingRequest // Sequential mode: requests in order

	wmu     sync.Mutex // guards the fields below
	wbuf    []byte
	spare   []byte // the other buffer, while not being written
	closed  bool   // no more writes
	slow    bool   // over the backlog limit: being disconnected
	writing bool   // a goroutine is writing to nc (only one at a time)
	stall   stallDeadline
	wsignal chan struct{}
	wdone   chan struct{} // write loop exited

	stopRead chan struct{} // closed to stop reading new requests (Shutdown)
	stopOnce sync.Once
	closeOne sync.Once
	closedCh chan struct{} // closed by close
	readDone chan struct{} // closed when readLoop has returned

	smu      sync.Mutex // guards samplers
	samplers map[string]*sampler
}

func newServerConn(s *Server, nc net.Conn) *serverConn {
	ctx, cancel := context.WithCancel(context.Background())
	c := &serverConn{
		srv:      s,
		nc:       nc,
		remote:   katcpAddr(nc.RemoteAddr()),
		ctx:      ctx,
		cancel:   cancel,
		wsignal:  make(chan struct{}, 1),
		wdone:    make(chan struct{}),
		stopRead: make(chan struct{}),
		closedCh: make(chan struct{}),
		readDone: make(chan struct{}),
		samplers: make(map[string]*sampler),
	}
	if s.cfg.Sequential {
		c.seq = make(chan *pendingRequest, 1)
	}
	return c
}

// katcpAddr formats a network address as a KATCP address argument.
func katcpAddr(a net.Addr) string {
	if a == nil {
		return "0.0.0.0"
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return a.String()
	}
	return Address{Addr: ap.Addr().Unmap(), Port: ap.Port(), HasPort: true}.String()
}

// greet sends the informs a client gets on connecting.
func (c *serverConn) greet() {
	cfg := c.srv.cfg
	device := cfg.DeviceName + "-" + cfg.DeviceVersion
	var ms []Message
	if cfg.V4 {
		a, _ := NewInform("version", device)
		b, _ := NewInform("build-state", cfg.BuildState)
		ms = append(ms, a, b)
	} else {
		a, _ := NewInform("version-connect", "katcp-protocol", c.srv.Version())
		b, _ := NewInform("version-connect", "katcp-library", LibraryVersion, LibraryVersion)
		d, _ := NewInform("version-connect", "katcp-device", device, cfg.BuildState)
		ms = append(ms, a, b, d)
	}
	for i := range ms {
		c.send(&ms[i])
	}
}

// send queues m for the client. A client whose backlog passes the limit
// is disconnected.
func (c *serverConn) send(m *Message) error {
	ok, err := c.appendLocked(m)
	if !ok {
		return err
	}
	return c.queuedLocked(err)
}

// appendLocked takes wmu and appends m to the write buffer. When the
// connection is closing it releases wmu and reports !ok; otherwise wmu
// stays held for the caller.
func (c *serverConn) appendLocked(m *Message) (ok bool, err error) {
	c.wmu.Lock()
	if c.closed || c.slow {
		c.wmu.Unlock()
		return false, net.ErrClosed
	}
	c.wbuf, err = AppendMessage(c.wbuf, m)
	return true, err
}

// queuedLocked finishes a write into wbuf: c.wmu is held and released.
func (c *serverConn) queuedLocked(err error) error {
	over := len(c.wbuf) > c.srv.cfg.MaxBacklog
	if over {
		c.slow = true
	}
	c.wmu.Unlock()
	if err != nil {
		return err
	}
	if over {
		c.srv.disconnects.Add(1)
		c.srv.log.Warn("katcp: disconnecting a client that cannot keep up", "client", c.remote, "backlog", c.srv.cfg.MaxBacklog)
		go c.close("client too slow: write backlog over the limit") // not on the caller's goroutine: it may be a sensor setter
		return errSlowClient
	}
	select {
	case c.wsignal <- struct{}{}:
	default:
	}
	return nil
}

var errSlowClient = errors.New("katcp: client too slow")

// sendSensorStatus queues "#sensor-status ts 1 name status value".
func (c *serverConn) sendSensorStatus(r *Reading) {
	v4 := c.srv.cfg.V4
	c.wmu.Lock()
	if c.closed || c.slow {
		c.wmu.Unlock()
		return
	}
	b := append(c.wbuf, "#sensor-status "...)
	if v4 {
		b = AppendTimestampMS(b, r.Timestamp)
	} else {
		b = AppendTimestamp(b, r.Timestamp)
	}
	b = append(b, " 1 "...)
	b = AppendEscaped(b, []byte(r.Name))
	b = append(b, ' ')
	b = append(b, r.Status.String()...)
	b = append(b, ' ')
	b = AppendEscaped(b, c.v4Value(r))
	c.wbuf = append(b, '\n')
	c.queuedLocked(nil)
}

// v4Value converts a timestamp sensor's value to milliseconds for v4.
func (c *serverConn) v4Value(r *Reading) []byte {
	if !c.srv.cfg.V4 {
		return r.Value
	}
	if s, ok := c.srv.sensors.Get(r.Name); ok && s.info.Type == SensorTimestamp {
		if t, err := ParseTimestamp(r.Value); err == nil {
			return AppendTimestampMS(nil, t)
		}
	}
	return r.Value
}

// writeStall is how long a peer may refuse data before it is dropped.
const writeStall = 30 * time.Second

// stallDeadline keeps a connection's write deadline between writeStall/2
// and writeStall ahead, moving it only when it has come within half of
// that, so that most writes cost no deadline update. It is used by the
// one goroutine writing at a time.
type stallDeadline struct{ at time.Time }

func (d *stallDeadline) extend(nc net.Conn) {
	now := time.Now()
	if d.at.Sub(now) < writeStall/2 {
		d.at = now.Add(writeStall)
		nc.SetWriteDeadline(d.at)
	}
}

func (c *serverConn) writeLoop() {
	defer close(c.wdone)
	for {
		c.wmu.Lock()
		for c.writing || (len(c.wbuf) == 0 && !c.closed) {
			c.wmu.Unlock()
			<-c.wsignal
			c.wmu.Lock()
		}
		if len(c.wbuf) == 0 { // closed and flushed
			c.wmu.Unlock()
			return
		}
		if len(c.wbuf) < 4096 && !c.closed {
			c.wmu.Unlock()
			runtime.Gosched() // let concurrent replies join this write
			c.wmu.Lock()
			if c.writing {
				c.wmu.Unlock()
				continue
			}
		}
		out := c.takeLocked()
		c.wmu.Unlock()
		err := c.write(out)
		if c.wrote(out, err) {
			return
		}
	}
}

// takeLocked claims the queued bytes for writing; c.wmu is held.
func (c *serverConn) takeLocked() []byte {
	c.writing = true
	out := c.wbuf
	c.wbuf, c.spare = c.spare[:0], nil
	return out
}

// write writes out with the stall deadline (close sets its own).
func (c *serverConn) write(out []byte) error {
	c.wmu.Lock()
	if !c.closed { // under wmu: close's short flush deadline is never pushed back
		c.stall.extend(c.nc)
	}
	c.wmu.Unlock()
	_, err := c.nc.Write(out)
	return err
}

// wrote ends a write; on error the connection is finished. It reports
// whether the write loop should stop.
func (c *serverConn) wrote(out []byte, err error) bool {
	c.wmu.Lock()
	c.writing = false
	if cap(out) <= 1<<20 { // keep it for the next write, unless a burst grew it
		c.spare = out[:0]
	}
	if err != nil {
		c.closed = true
		c.wbuf = nil
	}
	c.wmu.Unlock()
	select {
	case c.wsignal <- struct{}{}:
	default:
	}
	if err != nil {
		c.nc.Close()
		return true
	}
	return false
}

// sendReply queues m and, when no write is in progress, writes it at once
// on the calling goroutine (saving a hand-over to the write loop).
func (c *serverConn) sendReply(m *Message) error {
	ok, err := c.appendLocked(m)
	if !ok {
		return err
	}
	if err != nil || c.writing || len(c.wbuf) > 64<<10 || c.active.Load() > 1 {
		// Busy: the write loop batches this with the other replies.
		return c.queuedLocked(err)
	}
	out := c.takeLocked()
	c.wmu.Unlock()
	err = c.write(out)
	c.wrote(out, err)
	return err
}

// serve runs the connection until it ends.
func (c *serverConn) serve() {
	s := c.srv
	defer s.removeConn(c)
	go c.writeLoop()
	var seqDone chan struct{}
	if c.seq != nil {
		seqDone = make(chan struct{})
		go func() {
			defer close(seqDone)
			for rq := range c.seq {
				s.serveRequest(rq)
			}
		}()
	}
	gone := c.readLoop()
	close(c.readDone)
	select {
	case <-c.stopRead:
		// Shutdown: pending requests finish; Shutdown closes us.
	default:
		gone = true
	}
	if gone {
		c.cancel() // the client went: handlers' contexts end
	}
	if c.seq != nil {
		close(c.seq)
		<-seqDone
	}
	c.handlers.Wait()
	select {
	case <-c.stopRead:
		<-c.closedCh
	default:
		c.close("")
	}
	<-c.wdone
	c.nc.Close()
	c.stopSamplers()
}

// readLoop reads requests until the connection ends or Shutdown stops
// it; it reports whether the client went away.
func (c *serverConn) readLoop() (gone bool) {
	s := c.srv
	r := NewReaderSize(c.nc, s.cfg.MaxLineLength)
	for {
		m, err := r.ReadMessage()
		if err != nil {
			var pe *ParseError
			if errors.As(err, &pe) {
				c.logToClient("error", fmt.Sprintf("malformed line at byte %d, column %d: %s",
					pe.Offset, pe.Column, strings.TrimPrefix(pe.Err.Error(), "katcp: ")))
				continue
			}
			return !errors.Is(err, os.ErrDeadlineExceeded) // EOF or error: gone; deadline: Shutdown
		}
		if m.Type != TypeRequest {
			continue // clients' informs and replies are ignored
		}
		msg := m.Clone()
		select {
		case s.pending <- struct{}{}: // back-pressure: wait for a slot
		case <-c.stopRead:
			return false
		case <-c.ctx.Done():
			return false
		}
		select {
		case <-c.stopRead:
			<-s.pending
			return false
		default:
		}
		c.handlers.Add(1)
		c.active.Add(1)
		if c.seq != nil {
			c.seq <- newPendingRequest(c, msg)
			continue
		}
		s.dispatch(newPendingRequest(c, msg))
	}
}

// logToClient sends a #log inform to this client only.
func (c *serverConn) logToClient(level, msg string) {
	m, err := c.srv.logInform(level, "katcp", msg)
	if err == nil {
		c.send(&m)
	}
}

// stopReading stops taking new requests (Shutdown). The read loop ends at
// its next request, or at once by a read deadline.
func (c *serverConn) stopReading() {
	c.stopOnce.Do(func() {
		close(c.stopRead)
		c.nc.SetReadDeadline(time.Now())
	})
}

// waitIdle waits until the connection's handlers have finished, or ctx
// ends (then their contexts are cancelled and they are waited for).
func (c *serverConn) waitIdle(ctx context.Context) error {
	stop := context.AfterFunc(ctx, c.cancel)
	defer stop()
	<-c.readDone // no more Adds to handlers
	c.handlers.Wait()
	return ctx.Err()
}

// close sends #disconnect reason (unless reason is empty), flushes what is
// queued, and closes the connection. Handlers' contexts are cancelled.
func (c *serverConn) close(reason string) {
	c.closeOne.Do(func() {
		c.cancel()
		c.wmu.Lock()
		if c.slow {
			c.wbuf = c.wbuf[:0] // a slow client gets the notice without the backlog
		}
		if reason != "" {
			m, _ := NewInform("disconnect", reason)
			c.wbuf, _ = AppendMessage(c.wbuf, &m)
		}
		c.closed = true
		// The write loop flushes for at most a second; serve closes the
		// socket once it has.
		c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		c.wmu.Unlock()
		select {
		case c.wsignal <- struct{}{}:
		default:
		}
		c.nc.SetReadDeadline(time.Now())
		close(c.closedCh)
	})
}

// setSampler replaces the sampler of one sensor (nil to stop sampling).
func (c *serverConn) setSampler(name string, sm *sampler) {
	c.smu.Lock()
	old := c.samplers[name]
	if sm == nil {
		delete(c.samplers, name)
	} else {
		c.samplers[name] = sm
	}
	c.smu.Unlock()
	if old != nil {
		old.stop()
	}
}

// dropSampler stops sampling a removed sensor.
func (c *serverConn) dropSampler(name string, s *Sensor) {
	c.smu.Lock()
	sm := c.samplers[name]
	if sm != nil && sm.sensor == s {
		delete(c.samplers, name)
	} else {
		sm = nil
	}
	c.smu.Unlock()
	if sm != nil {
		sm.stop()
	}
}

func (c *serverConn) sampling(name string) (samplingParams, bool) {
	c.smu.Lock()
	defer c.smu.Unlock()
	sm := c.samplers[name]
	if sm == nil {
		return samplingParams{}, false
	}
	return sm.p, true
}

func (c *serverConn) stopSamplers() {
	c.smu.Lock()
	all := c.samplers
	c.samplers = nil
	c.smu.Unlock()
	for _, sm := range all {
		sm.stop()
	}
}
