package katcp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("katcp: server closed")

// ErrAlreadyReplied is returned by a ReplyWriter asked to reply twice.
var ErrAlreadyReplied = errors.New("katcp: request already replied to")

// LibraryVersion is what the server reports as its katcp-library.
const LibraryVersion = "katcp-go-0.1"

// ServerConfig configures a Server. The zero value serves a v5 device.
type ServerConfig struct {
	// DeviceName and DeviceVersion are reported as
	// #version-connect katcp-device <DeviceName>-<DeviceVersion> <BuildState>
	// (v4: #version <DeviceName>-<DeviceVersion>, #build-state <BuildState>).
	DeviceName    string
	DeviceVersion string
	BuildState    string

	// V4 makes the server speak KATCP v4: #version and #build-state on
	// connect, millisecond timestamps and periods, no rate strategies, no
	// flags.
	V4 bool

	// MaxPending bounds the requests being handled across all
	// connections; when it is reached, connections stop reading until
	// one finishes. Default 1024.
	MaxPending int
	// Sequential handles each connection's requests one at a time, in
	// order (replies then come in request order). By default a
	// connection's requests run concurrently.
	Sequential bool
	// MaxLineLength limits one request line, terminator included; a
	// longer line gets a #log error and is skipped. Default 2 MiB.
	MaxLineLength int
	// MaxBacklog bounds the bytes waiting to be written to one client. A
	// client that falls further behind (typically on #sensor-status) is
	// sent #disconnect and dropped, so that it never slows the others.
	// Default 4 MiB.
	MaxBacklog int
	// InterfaceChangedDelay debounces #interface-changed after sensors or
	// requests are added or removed. Default 100 ms.
	InterfaceChangedDelay time.Duration

	// Restart implements ?restart; without it ?restart fails.
	Restart func(ctx context.Context) error
	// Halt is called after ?halt has been answered, before the server
	// shuts down.
	Halt func()

	// Logger receives the server's own logs. Default: discarded.
	Logger *slog.Logger
}

func (cfg ServerConfig) withDefaults() ServerConfig {
	if cfg.DeviceName == "" {
		cfg.DeviceName = "device"
	}
	if cfg.DeviceVersion == "" {
		cfg.DeviceVersion = "1.0"
	}
	if cfg.BuildState == "" {
		cfg.BuildState = cfg.DeviceName + "-" + cfg.DeviceVersion
	}
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = 1024
	}
	if cfg.MaxLineLength <= 0 {
		cfg.MaxLineLength = DefaultMaxLineLength
	}
	if cfg.MaxBacklog <= 0 {
		cfg.MaxBacklog = 4 << 20
	}
	if cfg.InterfaceChangedDelay <= 0 {
		cfg.InterfaceChangedDelay = 100 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg
}

// Request is a request received by a Server.
type Request struct {
	Message
	// RemoteAddr is the client's address.
	RemoteAddr string
	v4         bool
}

// Decode decodes the request's arguments into dst (see DecodeArgs); the
// number of arguments must match. The error, returned by a handler, makes
// a fail reply naming the bad argument.
func (r *Request) Decode(dst ...any) error {
	if len(r.Args) != len(dst) {
		return Fail("?%s takes %d arguments, got %d", r.Name, len(dst), len(r.Args))
	}
	if r.v4 {
		// v4 timestamps are milliseconds.
		for i, d := range dst {
			if t, ok := d.(*time.Time); ok {
				v, err := ParseTimestampMS(r.Args[i])
				if err != nil {
					return fmt.Errorf("argument %d: %w", i+1, err)
				}
				*t = v
				dst[i] = new(string) // decoded here, skip below
			}
		}
	}
	return DecodeArgs(r.Args, dst...)
}

// Fail returns an error that a handler returns to reply "fail" with the
// formatted reason.
func Fail(format string, args ...any) error {
	return &ReplyError{Status: "fail", Reason: fmt.Sprintf(format, args...)}
}

// Invalid returns an error that a handler returns to reply "invalid" with
// the formatted reason, for requests that are malformed.
func Invalid(format string, args ...any) error {
	return &ReplyError{Status: "invalid", Reason: fmt.Sprintf(format, args...)}
}

// HandlerFunc handles one request. It sends in-response informs with
// w.Inform and the reply with w.Reply or w.Fail; returning nil without
// replying replies "ok", returning an error without replying replies
// "fail" with the error's text ("invalid" for a *ReplyError made by
// Invalid). ctx ends when the client goes or the server closes. A panic
// replies "fail" and is logged.
type HandlerFunc func(ctx context.Context, w *ReplyWriter, r *Request) error

type requestEntry struct {
	help    string
	hint    time.Duration
	handler HandlerFunc
	builtin bool
}

// Server is a KATCP device server, shaped like net/http.Server: register
// requests with Handle and sensors in Sensors, then Serve a listener.
// It implements every standard request. It is safe for concurrent use.
type Server struct {
	cfg     ServerConfig
	log     *slog.Logger
	sensors *SensorSet
	pending chan struct{} // semaphore: MaxPending

	mu         sync.Mutex // guards the fields below
	requests   map[string]*requestEntry
	reqTable   atomic.Pointer[map[string]*requestEntry] // a copy of requests for handle, replaced under mu
	listeners  map[net.Listener]struct{}
	conns      map[*serverConn]struct{}
	shutting   bool
	logLevel   LogLevel
	ifaceTimer *time.Timer
	ifaceWhat  uint8 // 1 sensors, 2 requests
	doneCh     chan struct{}
	connWG     sync.WaitGroup

	jobs        chan *pendingRequest // to idle workers; closed once no connection is left (workers exit)
	workerWG    sync.WaitGroup       // workers
	quitOnce    sync.Once
	disconnects atomic.Uint64
}

// NewServer returns a server with the standard requests and no sensors.
func NewServer(cfg ServerConfig) *Server {
	cfg = cfg.withDefaults()
	s := &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		sensors:   NewSensorSet(),
		pending:   make(chan struct{}, cfg.MaxPending),
		requests:  make(map[string]*requestEntry),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*serverConn]struct{}),
		logLevel:  LogInfo,
		doneCh:    make(chan struct{}),
		jobs:      make(chan *pendingRequest),
	}
	s.addStandardRequests()
	s.publishRequestsLocked() // no other goroutine has s yet
	s.sensors.onChange = s.sensorChanged
	return s
}

// Sensors returns the server's sensor set. Adding or removing sensors
// sends #interface-changed to the clients.
func (s *Server) Sensors() *SensorSet { return s.sensors }

// Handle registers (or replaces) a request. help is the ?help text. It
// panics on an invalid name.
func (s *Server) Handle(name, help string, h HandlerFunc) {
	if !ValidName(name) {
		panic(fmt.Sprintf("katcp: Handle: invalid request name %q", name))
	}
	s.mu.Lock()
	old := s.requests[name]
	e := &requestEntry{help: help, handler: h}
	if old != nil {
		e.hint = old.hint
	}
	s.requests[name] = e
	s.publishRequestsLocked()
	s.mu.Unlock()
	s.interfaceChanged(2)
}

// SetTimeoutHint sets the ?request-timeout-hint of a registered request
// (0 for none).
func (s *Server) SetTimeoutHint(name string, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.requests[name]; e != nil {
		e.hint = d
	}
}

// publishRequestsLocked makes the requests as they are now the ones handle
// sees, without a lock per request; s.mu is held.
func (s *Server) publishRequestsLocked() {
	t := maps.Clone(s.requests)
	s.reqTable.Store(&t)
}

// RemoveRequest removes a request.
func (s *Server) RemoveRequest(name string) {
	s.mu.Lock()
	_, ok := s.requests[name]
	delete(s.requests, name)
	s.publishRequestsLocked()
	s.mu.Unlock()
	if ok {
		s.interfaceChanged(2)
	}
}

// ClientCount returns how many clients are connected.
func (s *Server) ClientCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// SlowClientDisconnects counts clients dropped for falling behind.
func (s *Server) SlowClientDisconnects() uint64 { return s.disconnects.Load() }

func (s *Server) sensorChanged(added, removed *Sensor) {
	if removed != nil {
		s.mu.Lock()
		conns := s.connList()
		s.mu.Unlock()
		for _, c := range conns {
			c.dropSampler(removed.Name(), removed)
		}
	}
	s.interfaceChanged(1)
}

// interfaceChanged schedules a debounced #interface-changed.
func (s *Server) interfaceChanged(what uint8) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.conns) == 0 {
		return // nobody to tell; new clients read the new interface
	}
	s.ifaceWhat |= what
	if s.ifaceTimer == nil {
		s.ifaceTimer = time.AfterFunc(s.cfg.InterfaceChangedDelay, s.sendInterfaceChanged)
	}
}

func (s *Server) sendInterfaceChanged() {
	s.mu.Lock()
	what := s.ifaceWhat
	s.ifaceWhat, s.ifaceTimer = 0, nil
	conns := s.connList()
	s.mu.Unlock()
	var m Message
	switch what {
	case 1:
		m, _ = NewInform("interface-changed", "sensor-list")
	case 2:
		m, _ = NewInform("interface-changed", "request-list")
	default:
		m, _ = NewInform("interface-changed")
	}
	for _, c := range conns {
		c.send(&m)
	}
}

// connList returns the connections; s.mu must be held.
func (s *Server) connList() []*serverConn {
	out := make([]*serverConn, 0, len(s.conns))
	for c := range s.conns {
		out = append(out, c)
	}
	return out
}

// Version returns the protocol version and flags the server advertises.
func (s *Server) Version() ProtocolVersion {
	if s.cfg.V4 {
		return ProtocolVersion{Major: 4, Minor: 0}
	}
	return ProtocolVersion{Major: 5, Minor: 1, Flags: "MITB"}
}

// ListenAndServe listens on addr ("127.0.0.1:7147") and serves.
func (s *Server) ListenAndServe(addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return s.Serve(l)
}

// Serve accepts connections on l until Shutdown or Close, then returns
// ErrServerClosed. It closes l.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.shutting {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	var delay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			shutting := s.shutting
			s.mu.Unlock()
			if shutting {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay) // transient accept error (e.g. too many files): back off
				continue
			}
			return err
		}
		delay = 0
		if !s.startConn(nc) {
			nc.Close()
			return ErrServerClosed
		}
	}
}

func (s *Server) startConn(nc net.Conn) bool {
	c := newServerConn(s, nc)
	s.mu.Lock()
	if s.shutting {
		s.mu.Unlock()
		return false
	}
	others := s.connList()
	s.conns[c] = struct{}{}
	s.connWG.Add(1)
	s.mu.Unlock()
	c.greet()
	if len(others) > 0 {
		m, _ := NewInform("client-connected", c.remote)
		for _, o := range others {
			o.send(&m)
		}
	}
	go c.serve()
	return true
}

func (s *Server) removeConn(c *serverConn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.connWG.Done()
}

// Shutdown stops the server gracefully: it stops accepting, lets the
// requests being handled finish until ctx ends, then sends #disconnect to
// every client and closes the connections. It returns ctx's error if ctx
// ended first (the connections are closed anyway). It waits for the
// handlers, so a handler must not call it (or Close) other than as
// `go srv.Shutdown(ctx)`; ?halt stops the server without waiting, and its
// caller then calls Close, as after any Serve, to release the workers.
func (s *Server) Shutdown(ctx context.Context) error {
	conns := s.beginShutdown()
	for _, c := range conns {
		c.stopReading()
	}
	var err error
	for _, c := range conns {
		if err = c.waitIdle(ctx); err != nil {
			break
		}
	}
	for _, c := range conns {
		c.close("server shutting down")
	}
	s.connWG.Wait()
	s.stopWorkers()
	return err
}

// Close closes the listeners and every connection at once (after a
// #disconnect), cancelling the handlers' contexts, and waits for the
// connections' goroutines.
func (s *Server) Close() error {
	conns := s.beginShutdown()
	for _, c := range conns {
		c.close("server closed")
	}
	s.connWG.Wait()
	s.stopWorkers()
	return nil
}

// pendingRequest is a request read and its reply writer, in one
// allocation.
type pendingRequest struct {
	Request
	ReplyWriter
}

// newPendingRequest takes m, a copy the server owns, for connection c.
func newPendingRequest(c *serverConn, m Message) *pendingRequest {
	return &pendingRequest{
		Request{Message: m, RemoteAddr: c.remote, v4: c.srv.cfg.V4},
		ReplyWriter{conn: c, name: m.Name, mid: m.MID},
	}
}

// dispatch hands a request to an idle worker, or starts a new one.
// Workers outlive their request so that their grown stacks are reused;
// there are at most MaxPending of them, and they exit with the server.
func (s *Server) dispatch(rq *pendingRequest) {
	select {
	case s.jobs <- rq:
	default:
		s.workerWG.Add(1)
		go s.worker(rq)
	}
}

func (s *Server) worker(rq *pendingRequest) {
	defer s.workerWG.Done()
	for {
		s.serveRequest(rq)
		rq = nil // an idle worker keeps no request alive
		var ok bool
		if rq, ok = <-s.jobs; !ok {
			return
		}
	}
}

// serveRequest handles a request read by a connection's read loop and
// releases what the read loop took for it.
func (s *Server) serveRequest(rq *pendingRequest) {
	c := rq.conn
	s.handle(c.ctx, rq)
	c.active.Add(-1)
	<-s.pending
	c.handlers.Done()
}

func (s *Server) stopWorkers() {
	s.quitOnce.Do(func() { close(s.jobs) }) // no connection is left to dispatch
	s.workerWG.Wait()
}

func (s *Server) beginShutdown() []*serverConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.shutting {
		s.shutting = true
		close(s.doneCh)
		if s.ifaceTimer != nil {
			s.ifaceTimer.Stop()
			s.ifaceTimer = nil
		}
	}
	for l := range s.listeners {
		l.Close()
	}
	return s.connList()
}

// Done is closed when the server starts shutting down (Shutdown, Close or
// ?halt).
func (s *Server) Done() <-chan struct{} { return s.doneCh }

// handle runs one request's handler with the reply discipline.
func (s *Server) handle(ctx context.Context, rq *pendingRequest) {
	req, w := &rq.Request, &rq.ReplyWriter
	m := &req.Message
	e := (*s.reqTable.Load())[m.Name]
	if e == nil {
		w.Respond("invalid", "unknown request "+m.Name)
		return
	}
	err := s.run(ctx, e.handler, w, req)
	if w.replied.Load() {
		if err != nil {
			s.log.Warn("katcp: handler returned an error after replying", "request", m.Name, "err", err)
		}
		return
	}
	if err == nil {
		w.Reply()
		return
	}
	var re *ReplyError
	if errors.As(err, &re) && re.Status != "" {
		w.Respond(re.Status, re.Reason)
		return
	}
	if errors.Is(err, ErrInvalid) {
		w.Respond("invalid", err.Error())
		return
	}
	w.Fail(err.Error())
}

func (s *Server) run(ctx context.Context, h HandlerFunc, w *ReplyWriter, r *Request) (err error) {
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("katcp: panic in request handler", "request", r.Name, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			err = fmt.Errorf("internal error handling ?%s", r.Name)
		}
	}()
	return h(ctx, w, r)
}

// ReplyWriter sends a request's in-response informs and its reply.
type ReplyWriter struct {
	conn    *serverConn
	name    string
	mid     int
	replied atomic.Bool
}

// Inform sends an in-response inform (#name[mid] args...).
func (w *ReplyWriter) Inform(args ...any) error {
	if w.replied.Load() {
		return ErrAlreadyReplied
	}
	m, err := NewMessage(TypeInform, w.name, w.mid, args...)
	if err != nil {
		return err
	}
	return w.conn.send(&m)
}

// informArgs sends an in-response inform whose arguments are bytes
// already, which it does not keep.
func (w *ReplyWriter) informArgs(args [][]byte) error {
	if w.replied.Load() {
		return ErrAlreadyReplied
	}
	m := Message{Type: TypeInform, Name: w.name, MID: w.mid, Args: args}
	return w.conn.send(&m)
}

// Reply sends "!name[mid] ok args...".
func (w *ReplyWriter) Reply(args ...any) error {
	return w.Respond("ok", args...)
}

// Fail sends "!name[mid] fail reason".
func (w *ReplyWriter) Fail(reason string) error {
	return w.Respond("fail", reason)
}

// Respond sends a reply with any status. A second reply is refused with
// ErrAlreadyReplied and logged.
func (w *ReplyWriter) Respond(status string, args ...any) error {
	m, err := newMessage(TypeReply, w.name, w.mid, status, args)
	if err != nil {
		return err
	}
	if w.replied.Swap(true) {
		w.conn.srv.log.Warn("katcp: handler replied twice", "request", w.name)
		return ErrAlreadyReplied
	}
	return w.conn.sendReply(&m)
}
