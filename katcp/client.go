package katcp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// ClientConfig configures a Client. The zero value is usable: it connects
// with automatic reconnection and the defaults documented on each field.
type ClientConfig struct {
	// Dial opens the TCP connection. Default: a net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)

	// NoReconnect turns automatic reconnection off: after the first
	// connection ends (or the first attempt fails) the client stays
	// disconnected until it is closed.
	NoReconnect bool
	// BackoffInitial and BackoffMax bound the randomised exponential
	// delay between failed connection attempts. Defaults 0.5 s and 60 s.
	BackoffInitial time.Duration
	BackoffMax     time.Duration

	// NegotiationTimeout bounds the wait, after the TCP connection opens,
	// for the device to say which protocol it speaks
	// (#version-connect katcp-protocol, or #version/#build-state for v4).
	// Default 5 s.
	NegotiationTimeout time.Duration
	// Protocol, when set, presets the protocol version and flags and skips
	// detection: the client counts as connected once TCP is.
	Protocol *ProtocolVersion

	// RequestTimeout applies to a request whose ctx has no deadline and for
	// which the device gave no ?request-timeout-hint. Default 5 s.
	RequestTimeout time.Duration
	// NoMIDs stops the client from using message ids even when the device
	// advertises them.
	NoMIDs bool

	// MaxLineLength limits one received line, terminator included;
	// a longer line closes the connection, as the Python clients do.
	// Default 2 MiB.
	MaxLineLength int
	// MaxWriteBuffer limits the bytes waiting to be written; a device that
	// lets more pile up is disconnected. Default 4 MiB.
	MaxWriteBuffer int
	// InformQueue bounds the informs and events waiting for handlers;
	// when it is full, informs are dropped and counted. Default 4096.
	InformQueue int

	// OnConnected, OnDisconnected and OnConnectFailed are called, in
	// order, from the goroutine that runs inform handlers, never from the
	// read loop. OnDisconnected gets the cause. They must not call Close
	// (which waits for them) other than as `go c.Close()`.
	OnConnected     func(ProtocolInfo)
	OnDisconnected  func(cause error)
	OnConnectFailed func(err error)

	// AfterBatch, if set, is called on the same goroutine after each
	// batch of informs and events it has handled: everything that was
	// queued when the batch was taken. Handlers that gather work
	// across informs (publishing in batches, say) finish it there.
	AfterBatch func()

	// Logger receives the client's logs. Default: discarded.
	Logger *slog.Logger
}

func (cfg ClientConfig) withDefaults() ClientConfig {
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = d.DialContext
	}
	if cfg.BackoffInitial <= 0 {
		cfg.BackoffInitial = 500 * time.Millisecond
	}
	if cfg.BackoffMax <= 0 {
		cfg.BackoffMax = 60 * time.Second
	}
	cfg.BackoffMax = max(cfg.BackoffMax, cfg.BackoffInitial)
	if cfg.NegotiationTimeout <= 0 {
		cfg.NegotiationTimeout = 5 * time.Second
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 5 * time.Second
	}
	if cfg.MaxLineLength <= 0 {
		cfg.MaxLineLength = DefaultMaxLineLength
	}
	if cfg.MaxWriteBuffer <= 0 {
		cfg.MaxWriteBuffer = 4 << 20
	}
	if cfg.InformQueue <= 0 {
		cfg.InformQueue = 4096
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg
}

// ProtocolInfo describes the device at the other end of a connection.
type ProtocolInfo struct {
	Version     ProtocolVersion
	Library     string    // from #version-connect katcp-library, or #version (v4)
	Device      string    // from #version-connect katcp-device, or #build-state (v4)
	Roles       [][]byte  // every #version-connect seen: role name then its arguments, joined by spaces
	ConnectedAt time.Time // when the protocol became known
}

// Connection errors. A request that fails because of the connection wraps
// ErrConnection (errors.Is), never *ReplyError.
var (
	ErrConnection     = errors.New("katcp: connection problem")
	ErrClosed         = &connError{"client closed"}
	ErrNotConnected   = &connError{"not connected"}
	ErrConnectionLost = &connError{"connection lost"}
	ErrNegotiation    = &connError{"protocol negotiation failed"}
	ErrWriteOverflow  = &connError{"write buffer limit exceeded"}
	ErrLineLimit      = &connError{"device sent a line over the limit"}
)

type connError struct{ s string }

func (e *connError) Error() string        { return "katcp: " + e.s }
func (e *connError) Is(target error) bool { return target == ErrConnection }

// ClientStats counts what a client dropped or found odd.
type ClientStats struct {
	LateReplies       uint64 // replies to cancelled requests, dropped
	UnexpectedReplies uint64 // replies matching no request, dropped
	DroppedInforms    uint64 // informs dropped because the handler queue was full
	DeviceRequests    uint64 // requests sent by the device, ignored
	ParseErrors       uint64 // malformed lines from the device, skipped
	Reconnects        uint64 // connections made after the first
}

// Client is a KATCP client for one device. It keeps a connection open
// (reconnecting with backoff unless ClientConfig.NoReconnect), sends
// requests with or without message ids as the device allows, and delivers
// asynchronous informs to handlers.
//
// Client is safe for concurrent use by many goroutines.
type Client struct {
	addr   string
	cfg    ClientConfig
	log    *slog.Logger
	cancel context.CancelFunc // cancels run's context; called by Close
	wg     sync.WaitGroup     // run and dispatch

	events *eventQueue // owned by dispatch (consumer)

	closeOnce sync.Once
	closeErr  error

	// kick asks run to drop the current connection (Disconnect).
	kick chan struct{}
	// stoppedCh is closed when run has exited: after Close, or when a
	// client without reconnection has lost its connection.
	stoppedCh chan struct{}

	major      atomic.Int32                             // the protocol's major version, once known
	handlers   atomic.Pointer[handlerTable]             // replaced under mu
	live       atomic.Pointer[clientConn]               // conn, for reading without mu
	hints      atomic.Pointer[map[string]time.Duration] // the device's timeout hints; replaced under mu
	mu         sync.Mutex                               // guards the fields below
	conn       *clientConn
	info       ProtocolInfo
	closed     bool
	stopped    bool          // run has exited
	lastErr    error         // why the last connection or attempt ended
	changed    chan struct{} // closed and replaced on every state change
	handlerSeq uint64
	gen        uint64 // counts connections

	stats struct {
		lateReplies, unexpectedReplies, droppedInforms, deviceRequests, parseErrors, reconnects atomic.Uint64
	}
}

// NewClient returns a client for the device at addr ("host:port") and
// starts connecting in the background.
func NewClient(addr string, cfg ClientConfig) *Client {
	cfg = cfg.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	c := &Client{
		addr:      addr,
		cfg:       cfg,
		log:       cfg.Logger.With("address", addr),
		cancel:    cancel,
		events:    newEventQueue(cfg.InformQueue),
		kick:      make(chan struct{}, 1),
		stoppedCh: make(chan struct{}),
		changed:   make(chan struct{}),
	}
	c.handlers.Store(&handlerTable{byName: map[string][]*informHandler{}})
	c.wg.Add(2)
	go c.run(ctx)
	go c.dispatch()
	return c
}

// Dial creates a client and waits until it is connected and knows the
// device's protocol, or until ctx ends, in which case it closes the client
// and returns ctx's error. With NoReconnect, a failed first attempt is
// returned at once.
func Dial(ctx context.Context, addr string, cfg ClientConfig) (*Client, error) {
	c := NewClient(addr, cfg)
	if err := c.WaitConnected(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Addr returns the device address the client connects to.
func (c *Client) Addr() string { return c.addr }

// Close stops the client: it fails every pending request with ErrClosed,
// closes the connection, and returns once every goroutine of the client has
// exited. Handlers already running finish first. Close is idempotent.
// Because it waits for the handlers, Close must not be called from a
// callback or inform handler; use `go c.Close()` there.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.Abort()
		c.wg.Wait()
	})
	return c.closeErr
}

// Abort stops the client without waiting: it connects no more and its
// connection closes at once (requests in flight fail). Close, called
// later, waits for the client's goroutines and callbacks. Abort is for a
// caller that must let go of the device now while a callback may still
// be busy.
func (c *Client) Abort() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
}

// Stopped is closed once the client has stopped connecting: after Close,
// or when a client with NoReconnect has lost its connection or failed to
// connect. (katcp-python's until_stopped.)
func (c *Client) Stopped() <-chan struct{} { return c.stoppedCh }

// Send writes any message to the device without waiting for anything
// (katcp-python's send_message). A request sent this way is not tracked:
// its reply is counted as unexpected, except on a connection without
// message ids, where it may be taken for the reply of a tracked request of
// the same name in flight; use Go for requests.
func (c *Client) Send(m Message) error {
	if err := m.Validate(); err != nil {
		return err
	}
	cc, err := c.current()
	if err != nil {
		return err
	}
	return cc.send(&m)
}

// Disconnect drops the current connection, failing its pending requests
// with ErrConnectionLost. The client reconnects unless NoReconnect is set.
func (c *Client) Disconnect() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// Connected reports whether the client is connected and knows the
// device's protocol.
func (c *Client) Connected() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn != nil
}

// Protocol returns what the device said about itself on the current (or
// last) connection.
func (c *Client) Protocol() ProtocolInfo {
	c.mu.Lock()
	cc, info := c.conn, c.info
	c.mu.Unlock()
	if cc != nil {
		return cc.protocolInfo() // roles may arrive after the protocol
	}
	return info
}

// v4 reports whether the current (or last) connection speaks KATCP v4:
// Protocol without the locking and copying.
func (c *Client) v4() bool { return c.major.Load() == 4 }

// LastError returns why the last connection or connection attempt ended,
// or nil.
func (c *Client) LastError() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastErr
}

// Stats returns the client's counters.
func (c *Client) Stats() ClientStats {
	return ClientStats{
		LateReplies:       c.stats.lateReplies.Load(),
		UnexpectedReplies: c.stats.unexpectedReplies.Load(),
		DroppedInforms:    c.stats.droppedInforms.Load(),
		DeviceRequests:    c.stats.deviceRequests.Load(),
		ParseErrors:       c.stats.parseErrors.Load(),
		Reconnects:        c.stats.reconnects.Load(),
	}
}

// WaitConnected waits until the client is connected and knows the device's
// protocol (the same moment: Connected is true). It returns ctx's error
// when ctx ends first, ErrClosed if the client is closed, and the last
// connection error once a client without reconnection has given up.
func (c *Client) WaitConnected(ctx context.Context) error {
	return c.waitState(ctx, func() (bool, error) {
		if c.conn != nil {
			return true, nil
		}
		return false, nil
	})
}

// WaitProtocol is WaitConnected: the client counts as connected only once
// the protocol is known. It exists for users of katcp-python's
// wait_protocol.
func (c *Client) WaitProtocol(ctx context.Context) error { return c.WaitConnected(ctx) }

// WaitDisconnected waits until the client has no connection.
func (c *Client) WaitDisconnected(ctx context.Context) error {
	return c.waitState(ctx, func() (bool, error) { return c.conn == nil, nil })
}

// waitState waits until cond (called with c.mu held) is true.
func (c *Client) waitState(ctx context.Context, cond func() (bool, error)) error {
	for {
		c.mu.Lock()
		ok, err := cond()
		ch, closed, stopped, last := c.changed, c.closed, c.stopped, c.lastErr
		c.mu.Unlock()
		if ok || err != nil {
			return err
		}
		if closed {
			return ErrClosed
		}
		if stopped {
			if last == nil {
				last = ErrNotConnected
			}
			return last
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// connState returns the connection generation, whether it is live, and a
// channel closed at the next state change.
func (c *Client) connState() (gen uint64, connected bool, changed <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen, c.conn != nil, c.changed
}

// notifyLocked wakes waiters; c.mu must be held.
func (c *Client) notifyLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// run owns the connection: it dials, negotiates, waits for the connection
// to end, and backs off between failed attempts.
func (c *Client) run(ctx context.Context) {
	defer c.wg.Done()
	defer func() {
		c.mu.Lock()
		c.stopped = true
		c.notifyLocked()
		c.mu.Unlock()
		c.events.close()
		close(c.stoppedCh)
	}()
	failures := 0
	for connected := false; ; {
		if ctx.Err() != nil {
			return
		}
		cc, err := c.connect(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			c.log.Debug("katcp connection attempt failed", "err", err)
			c.mu.Lock()
			c.lastErr = err
			c.notifyLocked()
			c.mu.Unlock()
			c.events.pushEvent(event{kind: evFailed, err: err})
			if c.cfg.NoReconnect {
				return
			}
			if !sleepCtx(ctx, c.backoff(failures)) {
				return
			}
			failures++
			continue
		}
		failures = 0
		if connected {
			c.stats.reconnects.Add(1)
		}
		connected = true
		cause := c.serve(ctx, cc)
		c.events.pushEvent(event{kind: evDisconnected, err: cause})
		if c.cfg.NoReconnect || ctx.Err() != nil {
			return
		}
	}
}

// backoff returns the randomised delay after n consecutive failures:
// BackoffInitial doubled n times, capped at BackoffMax, then scaled by a
// random factor in [0.5, 1).
func (c *Client) backoff(n int) time.Duration {
	d := c.cfg.BackoffInitial
	for range n {
		if d >= c.cfg.BackoffMax/2 {
			d = c.cfg.BackoffMax
			break
		}
		d *= 2
	}
	d = min(d, c.cfg.BackoffMax)
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// connect dials and negotiates the protocol.
func (c *Client) connect(ctx context.Context) (*clientConn, error) {
	nc, err := c.cfg.Dial(ctx, "tcp", c.addr)
	if err != nil {
		return nil, fmt.Errorf("%w: dial %s: %w", ErrConnection, c.addr, err)
	}
	cc := newClientConn(c, nc)
	if c.cfg.Protocol != nil {
		cc.setProtocol(*c.cfg.Protocol)
	}
	t := time.NewTimer(c.cfg.NegotiationTimeout)
	defer t.Stop()
	select {
	case <-cc.negotiated:
		if cc.negErr == nil {
			return cc, nil
		}
		err = cc.negErr
	case <-cc.done:
		err = fmt.Errorf("%w: %w", ErrNegotiation, cc.cause())
	case <-t.C:
		err = fmt.Errorf("%w: no #version-connect katcp-protocol (or v4 #version) within %v", ErrNegotiation, c.cfg.NegotiationTimeout)
	case <-ctx.Done():
		err = ctx.Err()
	}
	cc.shutdown(err)
	return nil, err
}

// serve publishes cc as the current connection and waits for it to end.
// It returns the cause.
func (c *Client) serve(ctx context.Context, cc *clientConn) error {
	info := cc.protocolInfo()
	c.mu.Lock()
	c.conn = cc
	c.live.Store(cc)
	c.gen++
	c.info = info
	c.hints.Store(nil)
	c.lastErr = nil
	c.notifyLocked()
	c.mu.Unlock()
	c.log.Info("katcp connected", "protocol", info.Version.String())
	c.events.pushEvent(event{kind: evConnected, info: &info})
	if info.Version.Has(FlagTimeoutHint) && info.Version.Major >= 5 {
		c.loadTimeoutHints(ctx, cc)
	}

	var cause error
	select {
	case <-cc.done:
		cause = cc.cause()
	case <-c.kick:
		cause = fmt.Errorf("%w: disconnected by the user", ErrConnectionLost)
	case <-ctx.Done():
		cause = ErrClosed
	}
	c.mu.Lock()
	c.conn = nil
	c.live.Store(nil)
	c.info = cc.protocolInfo()
	c.lastErr = cause
	c.notifyLocked()
	c.mu.Unlock()
	cc.shutdown(cause)
	c.log.Info("katcp disconnected", "cause", cause)
	return cause
}

// loadTimeoutHints asks a device with flag T for its request timeout hints.
func (c *Client) loadTimeoutHints(ctx context.Context, cc *clientConn) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.RequestTimeout)
	defer cancel()
	m := Message{Type: TypeRequest, Name: "request-timeout-hint"}
	r, err := cc.roundTrip(ctx, m, 0)
	if err == nil {
		err = r.Err()
	}
	if err != nil {
		c.log.Warn("katcp ?request-timeout-hint failed; using the default timeout", "err", err)
		return
	}
	hints := make(map[string]time.Duration, len(r.Informs))
	for _, inf := range r.Informs {
		var name string
		var d time.Duration
		if err := DecodeArgs(inf.Args, &name, &d); err != nil || d <= 0 {
			continue
		}
		hints[name] = d
	}
	c.mu.Lock()
	if c.conn == cc {
		c.hints.Store(&hints)
	}
	c.mu.Unlock()
}

// timeoutFor returns the timeout for a request without a deadline.
func (c *Client) timeoutFor(name string) time.Duration {
	if h := c.hints.Load(); h != nil {
		if d, ok := (*h)[name]; ok {
			return d
		}
	}
	return c.cfg.RequestTimeout
}

// current returns the live connection or why there is none.
func (c *Client) current() (*clientConn, error) {
	if cc := c.live.Load(); cc != nil {
		return cc, nil // no lock for the common case
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.conn != nil:
		return c.conn, nil
	case c.closed:
		return nil, ErrClosed
	}
	return nil, ErrNotConnected
}

// ConvertSeconds converts a time for the connected device: v5 seconds, or
// v4 milliseconds. The result is an argument for Request. It is the
// counterpart of katcp-python's convert_seconds.
func (c *Client) ConvertSeconds(t time.Time) ArgAppender {
	if c.v4() {
		return timestampMS(t)
	}
	return timestampS(t)
}

// ParseTimestamp decodes a timestamp argument from the connected device:
// v5 seconds, or v4 milliseconds.
func (c *Client) ParseTimestamp(b []byte) (time.Time, error) {
	if c.v4() {
		return ParseTimestampMS(b)
	}
	return ParseTimestamp(b)
}

type timestampS time.Time

func (t timestampS) AppendArg(dst []byte) []byte { return AppendTimestamp(dst, time.Time(t)) }

type timestampMS time.Time

func (t timestampMS) AppendArg(dst []byte) []byte { return AppendTimestampMS(dst, time.Time(t)) }
