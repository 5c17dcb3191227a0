package katcp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// clientConn is one TCP connection of a Client, with its read and write
// loops. run creates it and shuts it down.
type clientConn struct {
	c  *Client
	nc net.Conn
	wg sync.WaitGroup // readLoop and writeLoop

	negotiated chan struct{} // closed once the protocol is known (or refused)
	negErr     error         // set before negotiated is closed
	negOnce    sync.Once

	done     chan struct{} // closed when the connection is finished
	doneOnce sync.Once
	err      error // why; set before done is closed

	wmu     sync.Mutex // guards wbuf and writing
	wbuf    []byte
	spare   []byte        // the other buffer, while not being written
	writing bool          // a goroutine is writing to nc (one at a time)
	stall   stallDeadline // used by the writing goroutine
	wsignal chan struct{} // wakes writeLoop
	active  atomic.Int32  // synchronous requests waiting for replies

	mu      sync.Mutex // guards the fields below
	proto   ProtocolVersion
	library string
	device  string
	roles   [][]byte
	useMIDs bool
	nextMID int
	byMID   map[int]*call
	byName  map[string][]*call // requests without mid, in send order per name; the head is on the wire
	at      time.Time

	tmu       sync.Mutex // guards deadlines
	deadlines []*deadline

	detected      *ProtocolVersion // owned by readLoop: negotiated, not yet announced
	sinceDetected int              // owned by readLoop: messages read since
	informs       []Message        // owned by readLoop: copies read, not yet queued for the handlers
	calls         atomic.Int32     // len(byMID)+len(byName): 0 when no request is registered
}

func newClientConn(c *Client, nc net.Conn) *clientConn {
	cc := &clientConn{
		c:          c,
		nc:         nc,
		negotiated: make(chan struct{}),
		done:       make(chan struct{}),
		wsignal:    make(chan struct{}, 1),
		byMID:      make(map[int]*call),
		byName:     make(map[string][]*call),
	}
	cc.wg.Add(2)
	go cc.readLoop()
	go cc.writeLoop()
	return cc
}

// fail marks the connection finished with err (the first cause wins) and
// closes the socket, which stops both loops.
func (cc *clientConn) fail(err error) {
	cc.doneOnce.Do(func() {
		cc.err = err
		close(cc.done)
		cc.nc.Close()
	})
}

func (cc *clientConn) cause() error {
	<-cc.done
	return cc.err
}

// shutdown finishes the connection, waits for its loops and fails every
// pending request.
func (cc *clientConn) shutdown(err error) {
	cc.fail(err)
	cc.wg.Wait()
	cc.negOnce.Do(func() { close(cc.negotiated) })
	lost := cc.err
	if !errors.Is(lost, ErrConnection) {
		lost = fmt.Errorf("%w: %w", ErrConnectionLost, lost)
	}
	cc.mu.Lock()
	calls := make([]*call, 0, len(cc.byMID))
	for _, cl := range cc.byMID {
		calls = append(calls, cl)
	}
	for _, q := range cc.byName {
		calls = append(calls, q...)
	}
	cc.byMID, cc.byName = nil, nil
	cc.countLocked()
	cc.mu.Unlock()
	for _, cl := range calls {
		cl.finish(nil, lost)
	}
}

func (cc *clientConn) setProtocol(v ProtocolVersion) {
	cc.mu.Lock()
	cc.proto = v
	cc.useMIDs = v.Major >= 5 && v.Has(FlagMessageIDs) && !cc.c.cfg.NoMIDs
	cc.at = time.Now()
	cc.mu.Unlock()
	cc.c.major.Store(int32(v.Major))
	cc.negOnce.Do(func() { close(cc.negotiated) })
}

func (cc *clientConn) refuse(err error) {
	cc.negOnce.Do(func() {
		cc.negErr = err
		close(cc.negotiated)
	})
}

func (cc *clientConn) protocolInfo() ProtocolInfo {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return ProtocolInfo{Version: cc.proto, Library: cc.library, Device: cc.device, Roles: cc.roles, ConnectedAt: cc.at}
}

// send queues one message for writing.
func (cc *clientConn) send(m *Message) error {
	return cc.queue(m, true)
}

// queue appends m to the write buffer and, if wake, wakes the write loop.
func (cc *clientConn) queue(m *Message, wake bool) error {
	cc.wmu.Lock()
	var err error
	cc.wbuf, err = AppendMessage(cc.wbuf, m)
	over := len(cc.wbuf) > cc.c.cfg.MaxWriteBuffer
	cc.wmu.Unlock()
	if err != nil {
		return err
	}
	if over {
		cc.fail(fmt.Errorf("%w: more than %d bytes waiting for the device", ErrWriteOverflow, cc.c.cfg.MaxWriteBuffer))
		return ErrWriteOverflow
	}
	if wake {
		select {
		case cc.wsignal <- struct{}{}:
		default:
		}
	}
	return nil
}

func (cc *clientConn) writeLoop() {
	defer cc.wg.Done()
	for {
		select {
		case <-cc.wsignal:
		case <-cc.done:
			return
		}
		runtime.Gosched() // let concurrent requests join this write
		for {
			out, ok := cc.take()
			if !ok {
				break
			}
			if !cc.write(out) {
				return
			}
		}
	}
}

// take claims the queued bytes unless they are empty or another goroutine
// is writing.
func (cc *clientConn) take() ([]byte, bool) {
	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	if cc.writing || len(cc.wbuf) == 0 {
		return nil, false
	}
	cc.writing = true
	out := cc.wbuf
	cc.wbuf, cc.spare = cc.spare[:0], nil
	return out, true
}

// write writes claimed bytes; a device that accepts nothing for
// writeStall is dropped. It reports success.
func (cc *clientConn) write(out []byte) bool {
	cc.stall.extend(cc.nc)
	_, err := cc.nc.Write(out)
	cc.wmu.Lock()
	cc.writing = false
	if cap(out) <= 64<<10 { // keep it for the next write, unless a burst grew it
		cc.spare = out[:0]
	}
	cc.wmu.Unlock()
	if err != nil {
		cc.fail(fmt.Errorf("%w: write: %w", ErrConnectionLost, err))
		return false
	}
	// Wake the write loop for whatever was queued meanwhile. Waking it even
	// when nothing was measurably cuts the latency of lone requests (a
	// runnable goroutine keeps the scheduler from parking the thread).
	select {
	case cc.wsignal <- struct{}{}:
	default:
	}
	return true
}

// flushDirect writes what is queued on the calling goroutine, unless
// another write is in progress: a lone request then skips the hand-over
// to the write loop.
func (cc *clientConn) flushDirect() {
	if out, ok := cc.take(); ok {
		cc.write(out)
	}
}

func (cc *clientConn) readLoop() {
	defer cc.wg.Done()
	c := cc.c
	r := NewReaderSize(cc.nc, c.cfg.MaxLineLength)
	defer cc.queueInforms()
	r.beforeFill = cc.beforeRead
	for {
		if len(cc.informs) >= 256 {
			cc.queueInforms() // in batches
		}
		m, err := r.ReadMessage()
		if err != nil {
			var pe *ParseError
			switch {
			case errors.Is(err, ErrLineTooLong):
				cc.fail(fmt.Errorf("%w: %w", ErrLineLimit, err))
				return
			case errors.As(err, &pe):
				c.stats.parseErrors.Add(1)
				c.log.Warn("katcp: malformed line from device", "err", err)
				continue
			}
			cc.fail(fmt.Errorf("%w: read: %w", ErrConnectionLost, err))
			return
		}
		switch m.Type {
		case TypeReply:
			// The informs that came first reach the handlers before
			// anything this reply lets its caller queue.
			cc.queueInforms()
			cc.handleReply(&m)
		case TypeInform:
			cc.handleInform(&m)
		case TypeRequest:
			c.stats.deviceRequests.Add(1)
			c.log.Warn("katcp: ignoring a request sent by the device", "name", m.Name)
		}
		if cc.detected != nil {
			// The protocol became known; announce it once the informs that
			// came with it (library, device) have been read too.
			if cc.sinceDetected++; cc.sinceDetected > 16 {
				cc.announce()
			}
		}
	}
}

// beforeRead runs when the reader has no complete line left and is about
// to read (and perhaps wait): what was read so far is handed on.
func (cc *clientConn) beforeRead() {
	cc.queueInforms()
	if cc.detected != nil {
		cc.announce()
	}
}

// announce publishes the detected protocol, after the informs read with it.
func (cc *clientConn) announce() {
	cc.queueInforms()
	v := *cc.detected
	cc.detected = nil
	cc.setProtocol(v)
}

// handleReply completes the matching request.
func (cc *clientConn) handleReply(m *Message) {
	cl, unsent, err := cc.popCall(m)
	if unsent != nil {
		unsent.finish(nil, err) // not under cc.mu: finish runs callbacks
	}
	if cl == nil {
		cc.c.stats.unexpectedReplies.Add(1)
		cc.c.log.Warn("katcp: reply matches no request", "name", m.Name, "mid", m.MID)
		return
	}
	if cl.abandoned() {
		cc.c.stats.lateReplies.Add(1)
		return
	}
	cl.replyV = Reply{Message: m.Clone()} // read only through the reply finish hands over
	cl.finish(&cl.replyV, nil)
}

// popCall removes and returns the request a reply answers, and sends the
// next queued request of the same name when mids are not in use; unsent
// is that request if it could not be sent, with why.
func (cc *clientConn) popCall(m *Message) (cl, unsent *call, err error) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	defer cc.countLocked()
	if m.MID != 0 {
		cl := cc.byMID[m.MID]
		if cl == nil || cl.name != m.Name {
			return nil, nil, nil
		}
		delete(cc.byMID, m.MID)
		return cl, nil, nil
	}
	q := cc.byName[m.Name]
	if len(q) == 0 {
		return nil, nil, nil
	}
	cl = q[0]
	q = q[1:]
	if len(q) == 0 {
		delete(cc.byName, m.Name)
	} else {
		cc.byName[m.Name] = q
		unsent, err = cc.sendHeadLocked(q)
	}
	return cl, unsent, err
}

// sendHeadLocked writes the head of a per-name queue, skipping requests
// abandoned before they were sent. A head that cannot be sent is taken
// off the queue and returned with why, for the caller to finish once it
// has released cc.mu.
func (cc *clientConn) sendHeadLocked(q []*call) (unsent *call, err error) {
	for len(q) > 0 {
		head := q[0]
		if !head.abandoned() {
			head.sent = true
			if err := cc.send(&head.req); err != nil {
				if rest := q[1:]; len(rest) == 0 {
					delete(cc.byName, head.name)
				} else {
					cc.byName[head.name] = rest // the connection is failing: shutdown ends them
				}
				return head, err
			}
			return nil, nil
		}
		q = q[1:]
		if len(q) == 0 {
			delete(cc.byName, head.name)
		} else {
			cc.byName[head.name] = q
		}
	}
	return nil, nil
}

// handleInform routes an inform to the request it belongs to, to the
// protocol bookkeeping, and to the handlers.
func (cc *clientConn) handleInform(m *Message) {
	if cl := cc.findCall(m); cl != nil {
		if !cl.abandoned() {
			cl.inform(m)
		}
		return
	}
	switch m.Name {
	case "version-connect":
		cc.versionConnect(m)
	case "version", "build-state":
		cc.versionV4(m)
	case "disconnect":
		cc.c.log.Info("katcp device is disconnecting", "reason", m.Arg(0))
	case "log":
		cc.c.log.Debug("katcp device log", "level", m.Arg(0), "name", m.Arg(2), "message", m.Arg(3))
	}
	if !cc.c.events.room(len(cc.informs)) {
		cc.c.stats.droppedInforms.Add(1) // no copy made
		return
	}
	cc.informs = append(cc.informs, m.Clone())
}

// queueInforms hands the informs read so far to the dispatch goroutine in
// one go.
func (cc *clientConn) queueInforms() {
	if len(cc.informs) == 0 {
		return
	}
	if n := cc.c.events.pushInforms(cc.informs); n < len(cc.informs) {
		cc.c.stats.droppedInforms.Add(uint64(len(cc.informs) - n))
	}
	clear(cc.informs)
	cc.informs = cc.informs[:0]
}

// findCall returns the pending request an inform belongs to: by mid, or
// by name for informs without one (devices such as the C library omit the
// mid on in-response informs).
func (cc *clientConn) findCall(m *Message) *call {
	if cc.calls.Load() == 0 {
		return nil
	}
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if m.MID != 0 {
		if cl := cc.byMID[m.MID]; cl != nil && cl.name == m.Name {
			return cl
		}
		return nil
	}
	if q := cc.byName[m.Name]; len(q) > 0 && q[0].sent {
		return q[0]
	}
	var found *call
	for _, cl := range cc.byMID {
		if cl.name == m.Name {
			if found != nil {
				return nil // ambiguous: several requests of that name in flight
			}
			found = cl
		}
	}
	return found
}

func (cc *clientConn) versionConnect(m *Message) {
	if len(m.Args) == 0 {
		return
	}
	role := string(m.Args[0])
	cc.mu.Lock()
	cc.roles = append(cc.roles, joinArgs(m.Args))
	switch role {
	case "katcp-library":
		cc.library = string(joinArgs(m.Args[1:]))
	case "katcp-device":
		cc.device = string(joinArgs(m.Args[1:]))
	}
	cc.mu.Unlock()
	if role != "katcp-protocol" {
		return
	}
	v, err := ParseProtocolVersion([]byte(m.Arg(1)))
	switch {
	case err != nil:
		cc.refuse(fmt.Errorf("%w: %w", ErrNegotiation, err))
	case v.Major != 5 && v.Major != 4:
		cc.refuse(fmt.Errorf("%w: unsupported KATCP protocol version %s (want 4.x or 5.x)", ErrNegotiation, v))
	default:
		cc.detected = &v
	}
}

// versionV4 handles the informs a v4 device sends instead of
// #version-connect.
func (cc *clientConn) versionV4(m *Message) {
	cc.mu.Lock()
	if m.Name == "version" {
		cc.library = string(joinArgs(m.Args))
	} else {
		cc.device = string(joinArgs(m.Args))
	}
	known := cc.proto.Major != 0 || cc.detected != nil
	cc.mu.Unlock()
	if !known {
		cc.detected = &ProtocolVersion{Major: 4}
	}
}

func joinArgs(args [][]byte) []byte {
	var b []byte
	for i, a := range args {
		if i > 0 {
			b = append(b, ' ')
		}
		b = append(b, a...)
	}
	return b
}

// deadline ends a call at its timeout. Deadlines are recycled per
// connection (synctest bubbles want timers to stay with their
// connection): one whose Stop came too late is not reused, so a firing
// can only ever abandon the call it was set for.
type deadline struct {
	t  *time.Timer
	cl atomic.Pointer[call]
	cc *clientConn
}

func (d *deadline) fire() {
	if cl := d.cl.Load(); cl != nil {
		d.cc.abandon(cl, context.DeadlineExceeded)
	}
}

// setDeadline arranges for cl to end after timeout; the caller passes
// the result to stopDeadline once cl is done.
func (cc *clientConn) setDeadline(cl *call, timeout time.Duration) *deadline {
	cc.tmu.Lock()
	if n := len(cc.deadlines); n > 0 {
		d := cc.deadlines[n-1]
		cc.deadlines = cc.deadlines[:n-1]
		cc.tmu.Unlock()
		d.cl.Store(cl)
		d.t.Reset(timeout)
		return d
	}
	cc.tmu.Unlock()
	d := &deadline{cc: cc}
	d.cl.Store(cl)
	d.t = time.AfterFunc(timeout, d.fire)
	return d
}

func (cc *clientConn) stopDeadline(d *deadline) {
	if !d.t.Stop() {
		return // fired, or firing: not reused
	}
	d.cl.Store(nil)
	cc.tmu.Lock()
	if len(cc.deadlines) < 256 {
		cc.deadlines = append(cc.deadlines, d)
	}
	cc.tmu.Unlock()
}

// roundTrip sends req and waits for its reply or ctx. A positive timeout
// bounds the wait as well as ctx (it then fails with
// context.DeadlineExceeded).
func (cc *clientConn) roundTrip(ctx context.Context, req Message, timeout time.Duration) (*Reply, error) {
	direct := cc.active.Add(1) == 1
	defer cc.active.Add(-1)
	cl, err := cc.start(req, nil, direct)
	if err != nil {
		return nil, err
	}
	if direct {
		cc.flushDirect()
	}
	if timeout > 0 {
		d := cc.setDeadline(cl, timeout)
		defer cc.stopDeadline(d)
	}
	var why error
	if done := ctx.Done(); done != nil {
		select {
		case <-cl.done:
		case <-done:
			why = ctx.Err()
			cc.abandon(cl, why)
		}
	}
	<-cl.done
	if cl.err == nil && cl.reply == nil {
		if why == nil {
			cl.mu.Lock()
			why = cl.why
			cl.mu.Unlock()
		}
		return nil, why
	}
	return cl.reply, cl.err
}

// start registers and sends a request.
// With direct, the caller writes the request itself (flushDirect) after
// start returns; otherwise the write loop does.
func (cc *clientConn) start(req Message, stream func(Message), direct bool) (*call, error) {
	cl := newCall(req, stream)
	if err := cc.register(cl, direct); err != nil {
		return nil, err
	}
	return cl, nil
}

// register records cl as in flight and queues its request (see start).
func (cc *clientConn) register(cl *call, direct bool) error {
	req := cl.req
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.byMID == nil {
		return cc.cause()
	}
	switch {
	case req.MID != 0:
		if !cc.useMIDs {
			return fmt.Errorf("%w: the device does not support message ids (protocol %s)", ErrBadMID, cc.proto)
		}
		if _, busy := cc.byMID[req.MID]; busy {
			return fmt.Errorf("%w: message id %d is in flight", ErrBadMID, req.MID)
		}
	case cc.useMIDs:
		for {
			cc.nextMID = cc.nextMID%MaxMID + 1
			if _, busy := cc.byMID[cc.nextMID]; !busy {
				break
			}
		}
		cl.req.MID = cc.nextMID
	}
	if cl.req.MID != 0 {
		cc.byMID[cl.req.MID] = cl
		cc.countLocked() // before the request can be on the wire
		cl.sent = true
		if err := cc.queue(&cl.req, !direct); err != nil {
			delete(cc.byMID, cl.req.MID)
			cc.countLocked()
			return err
		}
		return nil
	}
	// Without ids, one request per name is on the wire at a time, so that
	// replies match by name even when the device answers out of order.
	q := append(cc.byName[req.Name], cl)
	cc.byName[req.Name] = q
	cc.countLocked()
	if len(q) == 1 {
		cl.sent = true
		if err := cc.queue(&cl.req, !direct); err != nil {
			delete(cc.byName, req.Name)
			cc.countLocked()
			return err
		}
	}
	return nil
}

// countLocked records whether requests are registered, for findCall;
// cc.mu is held.
func (cc *clientConn) countLocked() {
	cc.calls.Store(int32(len(cc.byMID) + len(cc.byName)))
}

// abandon gives up on a request whose caller has gone. A request still
// queued is dropped; one on the wire stays registered until its reply
// comes or the connection ends, so that a late reply is recognised and
// dropped, never taken for another request's. Without message ids, later
// requests of the same name therefore wait for that reply: a device that
// never answers blocks the name until the connection is renewed
// (Client.Disconnect).
func (cc *clientConn) abandon(cl *call, why error) {
	cl.mu.Lock()
	if !cl.abandoned() && cl.why == nil { // the first reason wins
		cl.why = why
	}
	cl.mu.Unlock()
	cc.mu.Lock()
	if cc.byName != nil && !cl.sent && cl.req.MID == 0 {
		q := cc.byName[cl.name]
		for i, x := range q {
			if x == cl {
				if len(q) == 1 {
					delete(cc.byName, cl.name)
				} else {
					cc.byName[cl.name] = append(q[:i:i], q[i+1:]...)
				}
				cc.countLocked()
				break
			}
		}
	}
	if mid := cl.req.MID; mid != 0 && cl.sent && cc.byMID != nil && !cl.abandoned() {
		// An id is not reused for 2^31 requests, so its entry can go
		// after a while: a device that never answers does not grow the
		// table. A reply after that counts as unexpected.
		time.AfterFunc(max(4*cc.c.cfg.RequestTimeout, time.Minute), func() {
			cc.mu.Lock()
			if cc.byMID != nil && cc.byMID[mid] == cl {
				delete(cc.byMID, mid)
				cc.countLocked()
			}
			cc.mu.Unlock()
		})
	}
	cc.mu.Unlock()
	cl.finish(nil, nil)
}
