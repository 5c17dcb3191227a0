package katcp

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Sentinels matched by *ReplyError.
var (
	ErrFail    = errors.New("katcp: request failed")
	ErrInvalid = errors.New("katcp: request invalid")
)

// ReplyError is a device's refusal: a reply whose status is not "ok".
// errors.Is(err, ErrFail) holds for "fail", errors.Is(err, ErrInvalid) for
// "invalid" and for any status other than ok, fail and invalid (as aiokatcp
// does).
type ReplyError struct {
	Request string // the request's name
	Status  string // "fail", "invalid", or whatever the device sent
	Reason  string // the device's reason, the reply's second argument
}

func (e *ReplyError) Error() string {
	if e.Reason == "" {
		return fmt.Sprintf("katcp: ?%s: %s", e.Request, e.Status)
	}
	return fmt.Sprintf("katcp: ?%s: %s: %q", e.Request, e.Status, e.Reason)
}

func (e *ReplyError) Is(target error) bool {
	if e.Status == "fail" {
		return target == ErrFail
	}
	return target == ErrInvalid
}

// Reply is a device's reply to a request, with the informs that came with
// it. The messages are the client's to keep.
type Reply struct {
	Message           // the reply; Args[0] is the status
	Informs []Message // in-response informs, in order (none when streamed)
}

// Status returns the reply's status ("ok", "fail", "invalid", ...).
func (r *Reply) Status() string { return r.Arg(0) }

// OK reports whether the status is "ok".
func (r *Reply) OK() bool { return r.Status() == "ok" }

// Values returns the reply's arguments after the status.
func (r *Reply) Values() [][]byte {
	if len(r.Args) == 0 {
		return nil
	}
	return r.Args[1:]
}

// Err returns a *ReplyError when the status is not "ok", else nil.
func (r *Reply) Err() error {
	if r.OK() {
		return nil
	}
	status := r.Status()
	if status == "" {
		status = "no status"
	}
	return &ReplyError{Request: r.Name, Status: status, Reason: r.Arg(1)}
}

// call is one request in flight.
type call struct {
	req    Message
	name   string
	stream func(Message) // nil: collect informs
	sent   bool          // guarded by clientConn.mu

	mu      sync.Mutex // guards informs
	informs []Message
	streamQ chan Message // when stream != nil

	state   atomic.Int32 // 0 pending, 1 finished
	done    chan struct{}
	reply   *Reply
	replyV  Reply // what reply points to once the reply has come (saves an allocation)
	err     error
	why     error               // guarded by mu: why an abandoned call ended
	cleanup func()              // guarded by mu; run once the call is finished
	then    func(*Reply, error) // RequestFunc's callback; set before the call starts
	// RequestFunc's timer and ctx hook, stopped by finish (guarded by mu).
	deadline *deadline
	stopCtx  func() bool
}

// setCleanup arranges for f to run when the call finishes (at once if it
// has).
func (cl *call) setCleanup(f func()) {
	cl.mu.Lock()
	if !cl.abandoned() {
		cl.cleanup = f
		f = nil
	}
	cl.mu.Unlock()
	if f != nil {
		f()
	}
}

func newCall(req Message, stream func(Message)) *call {
	cl := &call{req: req, name: req.Name, stream: stream, done: make(chan struct{})}
	if stream != nil {
		cl.streamQ = make(chan Message, 256)
	}
	return cl
}

// finish settles the call once: with a reply, an error, or neither
// (abandoned by its caller).
func (cl *call) finish(reply *Reply, err error) {
	if !cl.state.CompareAndSwap(0, 1) {
		return
	}
	cl.mu.Lock()
	if reply != nil {
		reply.Informs = cl.informs
	}
	cl.informs = nil
	cleanup := cl.cleanup
	cl.cleanup = nil
	d, stop := cl.deadline, cl.stopCtx
	cl.deadline, cl.stopCtx = nil, nil
	cl.reply, cl.err = reply, err
	why := cl.why
	cl.mu.Unlock()
	close(cl.done)
	if cleanup != nil {
		cleanup()
	}
	if d != nil {
		d.cc.stopDeadline(d)
	}
	if stop != nil {
		stop()
	}
	if cl.then != nil {
		if reply == nil && err == nil {
			err = why
		}
		if err != nil {
			err = fmt.Errorf("katcp: ?%s: %w", cl.name, err)
		}
		cl.then(reply, err)
	}
}

func (cl *call) abandoned() bool { return cl.state.Load() != 0 }

// inform records an in-response inform. For a streaming call it hands the
// inform to the caller's goroutine, waiting while the caller is busy (the
// device is then slowed through TCP, not buffered without bound).
func (cl *call) inform(m *Message) {
	if cl.stream == nil {
		cl.mu.Lock()
		cl.informs = append(cl.informs, m.Clone())
		cl.mu.Unlock()
		return
	}
	select {
	case cl.streamQ <- m.Clone():
	case <-cl.done:
	}
}

// Request sends ?name with args and waits for the reply. args may be any
// value AppendArg accepts (strings, bytes, numbers, times, addresses, ...).
//
// On "ok" it returns the reply (Values holds the arguments after "ok") and
// the in-response informs. A "fail" or "invalid" reply returns the reply
// and a *ReplyError. Problems with the connection wrap ErrConnection;
// ctx's end returns ctx's error. When ctx has no deadline, the device's
// ?request-timeout-hint for the request applies, else
// ClientConfig.RequestTimeout.
func (c *Client) Request(ctx context.Context, name string, args ...any) (*Reply, error) {
	m, err := NewRequest(name, args...)
	if err != nil {
		return nil, err
	}
	return c.do(ctx, m, nil, true)
}

// RequestRaw sends m, a request, as it is and returns the reply without
// interpreting its status: a "fail" reply is not an error here. A non-zero
// m.MID overrides the automatic message id; it is an error when the device
// does not support ids or the id is in flight.
func (c *Client) RequestRaw(ctx context.Context, m Message) (*Reply, error) {
	return c.do(ctx, m, nil, false)
}

// RequestStream is Request for replies with many informs: each
// in-response inform is passed to onInform, on the calling goroutine, as
// it arrives, instead of being collected in Reply.Informs.
func (c *Client) RequestStream(ctx context.Context, onInform func(Message), name string, args ...any) (*Reply, error) {
	m, err := NewRequest(name, args...)
	if err != nil {
		return nil, err
	}
	return c.do(ctx, m, onInform, true)
}

func (c *Client) do(ctx context.Context, m Message, stream func(Message), check bool) (*Reply, error) {
	if m.Type != TypeRequest {
		return nil, fmt.Errorf("%w: want a request, got a %s", ErrBadType, m.Type)
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	cc, err := c.current()
	if err != nil {
		return nil, fmt.Errorf("katcp: ?%s: %w", m.Name, err)
	}
	var timeout time.Duration // applied by roundTrip: cheaper than a context
	if _, ok := ctx.Deadline(); !ok {
		timeout = c.timeoutFor(m.Name)
	}
	var r *Reply
	if stream == nil {
		r, err = cc.roundTrip(ctx, m, timeout)
	} else {
		if timeout > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, timeout)
			defer cancel()
		}
		r, err = c.streamTrip(ctx, cc, m, stream)
	}
	if err != nil {
		return nil, fmt.Errorf("katcp: ?%s: %w", m.Name, err)
	}
	if check {
		return r, r.Err()
	}
	return r, nil
}

func (c *Client) streamTrip(ctx context.Context, cc *clientConn, m Message, onInform func(Message)) (*Reply, error) {
	cl, err := cc.start(m, onInform, false)
	if err != nil {
		return nil, err
	}
	for {
		select {
		case inf := <-cl.streamQ:
			onInform(inf)
			continue
		case <-cl.done:
		case <-ctx.Done():
			cc.abandon(cl, ctx.Err())
		}
		break
	}
	// Informs queued before the reply belong before it.
	for {
		select {
		case inf := <-cl.streamQ:
			if cl.reply != nil {
				onInform(inf)
			}
			continue
		default:
		}
		break
	}
	if cl.err == nil && cl.reply == nil {
		return nil, ctx.Err()
	}
	return cl.reply, cl.err
}

// RequestFunc sends m, a request message as for RequestRaw, and returns
// at once; f is called exactly once with the reply (its status not
// interpreted) or the error, as RequestRaw would have returned them. It
// is the cheapest way to keep many requests in flight: no goroutine waits
// for each.
//
// f runs on the connection's read goroutine when the reply arrives, or on
// the goroutine that ends the request otherwise (a timer, ctx's
// cancellation, the connection's end, or the caller's own goroutine when
// the request cannot start). It must not block: work that takes long
// delays every other reply from the device and belongs on another
// goroutine. The reply is f's to keep.
//
// The request ends when ctx ends; a positive timeout bounds it too
// (ending it with context.DeadlineExceeded) and is cheaper than a
// context deadline. With neither a timeout nor a deadline on ctx, the
// device's ?request-timeout-hint or ClientConfig.RequestTimeout applies.
func (c *Client) RequestFunc(ctx context.Context, m Message, timeout time.Duration, f func(*Reply, error)) {
	if m.Type != TypeRequest {
		f(nil, fmt.Errorf("%w: want a request, got a %s", ErrBadType, m.Type))
		return
	}
	if err := m.Validate(); err != nil {
		f(nil, err)
		return
	}
	cc, err := c.current()
	if err != nil {
		f(nil, fmt.Errorf("katcp: ?%s: %w", m.Name, err))
		return
	}
	if _, ok := ctx.Deadline(); !ok && timeout <= 0 {
		timeout = c.timeoutFor(m.Name)
	}
	cl := newCall(m, nil)
	cl.then = f
	if err := cc.register(cl, false); err != nil {
		f(nil, fmt.Errorf("katcp: ?%s: %w", m.Name, err))
		return
	}
	var d *deadline
	if timeout > 0 {
		d = cc.setDeadline(cl, timeout)
	}
	var stop func() bool
	if ctx.Done() != nil {
		stop = context.AfterFunc(ctx, func() { cc.abandon(cl, ctx.Err()) })
	}
	cl.mu.Lock()
	if !cl.abandoned() {
		cl.deadline, cl.stopCtx = d, stop // finish stops them
		d, stop = nil, nil
	}
	cl.mu.Unlock()
	if d != nil { // finished already
		cc.stopDeadline(d)
	}
	if stop != nil {
		stop()
	}
}

// Call is a request in flight, started by Go.
type Call struct {
	cl    *call
	err   error // set when the call could not start
	done  chan struct{}
	check bool
	name  string
}

// Go starts a request and returns at once; the result arrives on
// Call.Done. It is the counterpart of katcp-python's future_request and
// callback_request. ctx bounds the request as for Request; a Call that is
// never waited for still ends at its deadline.
func (c *Client) Go(ctx context.Context, name string, args ...any) *Call {
	m, err := NewRequest(name, args...)
	if err != nil {
		return failedCall(err)
	}
	return c.goMessage(ctx, m, true)
}

// GoRaw is Go for a request message as it is, like RequestRaw.
func (c *Client) GoRaw(ctx context.Context, m Message) *Call {
	if m.Type != TypeRequest {
		return failedCall(fmt.Errorf("%w: want a request, got a %s", ErrBadType, m.Type))
	}
	if err := m.Validate(); err != nil {
		return failedCall(err)
	}
	return c.goMessage(ctx, m, false)
}

func failedCall(err error) *Call {
	ch := make(chan struct{})
	close(ch)
	return &Call{err: err, done: ch}
}

func (c *Client) goMessage(ctx context.Context, m Message, check bool) *Call {
	cc, err := c.current()
	if err != nil {
		return failedCall(fmt.Errorf("katcp: ?%s: %w", m.Name, err))
	}
	cancel := context.CancelFunc(func() {})
	if _, ok := ctx.Deadline(); !ok {
		ctx, cancel = context.WithTimeout(ctx, c.timeoutFor(m.Name))
	}
	cl, err := cc.start(m, nil, false)
	if err != nil {
		cancel()
		return failedCall(fmt.Errorf("katcp: ?%s: %w", m.Name, err))
	}
	call := &Call{cl: cl, done: cl.done, check: check, name: m.Name}
	stop := context.AfterFunc(ctx, func() {
		cl.mu.Lock()
		call.err = fmt.Errorf("katcp: ?%s: %w", m.Name, ctx.Err())
		cl.mu.Unlock()
		cc.abandon(cl, ctx.Err())
	})
	cl.setCleanup(func() {
		stop()
		cancel()
	})
	return call
}

// Done is closed when the call has finished.
func (c *Call) Done() <-chan struct{} { return c.done }

// Result waits for the call and returns what Request (or RequestRaw, for
// GoRaw) would have returned.
func (c *Call) Result() (*Reply, error) {
	<-c.done
	if c.cl == nil {
		return nil, c.err
	}
	cl := c.cl
	if cl.err != nil {
		return nil, fmt.Errorf("katcp: ?%s: %w", c.name, cl.err)
	}
	if cl.reply == nil {
		// Abandoned at ctx's end: the AfterFunc records why.
		cl.mu.Lock()
		err := c.err
		cl.mu.Unlock()
		if err == nil {
			err = fmt.Errorf("katcp: ?%s: %w", c.name, context.Canceled)
		}
		return nil, err
	}
	if c.check {
		return cl.reply, cl.reply.Err()
	}
	return cl.reply, nil
}
