package bridge

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/subjects"
)

// worker serves one device: it owns the device's katcp.Client, its
// sensor watchers and its publications.
type worker struct {
	b      *Bridge
	dev    Device
	client *katcp.Client
	subs   []compiled
	sem    chan struct{} // requests in flight
	ctx    context.Context
	cancel context.CancelFunc // ends in-flight requests on a forced shutdown

	loopWG sync.WaitGroup // loop, while it runs

	stats      *deviceStats // the device's request counters
	sensorPubs *pubBatch    // sensor updates' publications
	informPubs *pubBatch    // informs' publications

	sensorOuts cache[*sensorOut] // by sensor name
	spanNames  cache[string]     // request name -> its hop span's name
	statSub    *nats.Subscription

	tried   atomic.Bool    // a first connection attempt has ended
	ready   chan struct{}  // closed once start has set up client
	serveMu sync.RWMutex   // orders reqWG.Add before stopServing's Wait
	serving bool           // requests are taken
	reqWG   sync.WaitGroup // requests taken

	mu         sync.Mutex // guards the fields below
	watchers   []*katcp.SensorWatcher
	state      Status
	requests   map[string]bool // the device's requests (?help); nil until known
	stopped    bool
	closing    bool // stop has begun
	again      bool // kick asked for another read of the request list
	refreshing bool // loop is running
}

func newWorker(b *Bridge, d Device) (*worker, error) {
	w := &worker{b: b, dev: d, sem: make(chan struct{}, b.cfg.MaxInFlight), serving: true, ready: make(chan struct{})}
	w.ctx, w.cancel = context.WithCancel(context.Background())
	subs := d.Sensors
	if len(subs) == 0 {
		subs = []SensorSubscription{{Pattern: "*"}}
	}
	for _, s := range subs {
		c, err := s.compile()
		if err != nil {
			return nil, fmt.Errorf("bridge: device %s: %w", d.Name, err)
		}
		w.subs = append(w.subs, c)
	}
	w.stats = b.metrics.device(d.Name)
	w.sensorPubs = newPubBatch(b, d.Name, "publish katcp.{device}.sensor", b.scheme.Device("{device}")+".sensor.{sensor}")
	w.informPubs = newPubBatch(b, d.Name, "publish katcp.{device}.inform", b.scheme.Device("{device}")+".inform.{inform}")
	w.state = Status{Device: d.Name, State: "disconnected", Since: now(), Reason: "not yet connected", Address: d.Address, Owner: b.instance, Leases: b.leasesOn.Load()}
	return w, nil
}

func now() float64 { return float64(time.Now().UnixNano()) / 1e9 }

// start connects to the device and begins publishing.
func (w *worker) start() error {
	b := w.b
	sub, err := b.nc.Subscribe(b.scheme.Status(w.dev.Name), w.statusRequest)
	if err != nil {
		return fmt.Errorf("bridge: status subject of %s: %w", w.dev.Name, err)
	}
	w.statSub = sub
	cfg := b.cfg.Client
	cfg.Logger = b.log.With("device", w.dev.Name)
	cfg.OnConnected = w.connected
	cfg.OnDisconnected = w.disconnected
	cfg.OnConnectFailed = func(error) { w.tried.Store(true) }
	cfg.AfterBatch = w.endBatches
	w.client = katcp.NewClient(w.dev.Address, cfg)
	w.client.HandleUnhandled(w.inform)
	for _, name := range []string{"log", "disconnect", "version-connect", "version", "build-state"} {
		w.client.HandleInform(name, w.inform)
	}
	w.client.HandleInform("interface-changed", func(katcp.Message) { w.kick() })
	for i, s := range w.subs {
		earlier := w.subs[:i]
		w.watchers = append(w.watchers, w.client.Watch(katcp.WatchConfig{
			Strategy: s.strategy,
			Params:   s.params,
			Select: func(info katcp.SensorInfo) bool {
				for _, e := range earlier { // the first matching pattern wins
					if e.match(info.Name) {
						return false
					}
				}
				return s.match(info.Name)
			},
			OnUpdate: w.sensorUpdate,
		}))
	}
	close(w.ready) // the client may have connected already: its callbacks wait for this
	return nil
}

// kick asks for the device's request list to be read again (after each
// connection and each #interface-changed). A goroutine runs only while
// there is something to read, so that idle devices cost no stack.
func (w *worker) kick() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closing {
		return
	}
	w.again = true
	if !w.refreshing {
		w.refreshing = true
		w.loopWG.Add(1)
		go w.loop()
	}
}

// loop re-reads the request list until no more kicks are pending.
func (w *worker) loop() {
	defer w.loopWG.Done()
	for {
		w.mu.Lock()
		if !w.again || w.ctx.Err() != nil {
			w.refreshing = false
			w.mu.Unlock()
			return
		}
		w.again = false
		w.mu.Unlock()
		ctx, cancel := context.WithTimeout(w.ctx, 10*time.Second)
		r, err := w.client.Request(ctx, "help")
		cancel()
		if err != nil {
			continue // unknown: requests go to the device, which will judge them
		}
		names := make(map[string]bool, len(r.Informs))
		for _, inf := range r.Informs {
			names[inf.Arg(0)] = true
		}
		w.mu.Lock()
		w.requests = names
		w.mu.Unlock()
	}
}

func (w *worker) connected(info katcp.ProtocolInfo) {
	<-w.ready
	w.tried.Store(true)
	if w.client.Stats().Reconnects > 0 {
		w.b.metrics.reconnects.Add(1)
	}
	w.setState("connected", "", info.Version.String())
	w.kick()
}

func (w *worker) disconnected(cause error) {
	w.mu.Lock()
	w.requests = nil
	w.mu.Unlock()
	w.setState("disconnected", cause.Error(), "")
}

func (w *worker) setState(state, reason, protocol string) {
	w.mu.Lock()
	if w.stopped {
		w.mu.Unlock()
		return
	}
	w.gaugeLocked(state)
	w.state.State, w.state.Reason, w.state.Since = state, reason, now()
	if protocol != "" {
		w.state.Protocol = protocol
	}
	doc := mustJSON(w.state)
	w.mu.Unlock()
	w.b.publish(w.b.scheme.Status(w.dev.Name), "publish katcp.{device}.status", doc, attribute.String("katcp.device", w.dev.Name))
}

// gaugeLocked keeps the connected-devices gauge in step with a state
// change; w.mu is held.
func (w *worker) gaugeLocked(next string) {
	was, is := w.state.State == "connected", next == "connected"
	switch {
	case is && !was:
		w.b.metrics.devicesConnected.Add(1)
	case was && !is:
		w.b.metrics.devicesConnected.Add(-1)
	}
}

func (w *worker) status() Status {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.state
}

// statusRequest answers requests on the status subject; the bridge's own
// publications there have no reply subject and are ignored.
func (w *worker) statusRequest(m *nats.Msg) {
	if m.Reply == "" {
		return
	}
	m.Respond(mustJSON(w.status()))
}

func (w *worker) stopStatusRequests() {
	if w.statSub != nil {
		w.statSub.Drain() // the requests already here are answered
	}
}

// cancelRequests ends the requests in flight at once (they get the
// not-served error): the device connection is closed under them.
func (w *worker) cancelRequests() { w.abort() }

// abort cancels the requests and closes the device connection at once,
// without waiting for anything (stop still has to be called).
func (w *worker) abort() {
	w.cancel()
	if w.client != nil {
		w.client.Abort()
	}
}

// stopServing makes the worker answer new requests with a not-served
// error; waitRequests waits for those it took.
func (w *worker) stopServing() {
	w.serveMu.Lock()
	w.serving = false
	w.serveMu.Unlock()
}

func (w *worker) waitRequests() { w.reqWG.Wait() }

// take counts a request in, unless the worker no longer serves.
func (w *worker) take() bool {
	w.serveMu.RLock()
	defer w.serveMu.RUnlock()
	if w.serving {
		w.reqWG.Add(1)
	}
	return w.serving
}

// stop closes the device connection and publishes the final status.
func (w *worker) stop(reason string) {
	w.mu.Lock()
	w.closing = true // no kick starts loop from now on
	w.mu.Unlock()
	w.cancel()
	w.loopWG.Wait()
	w.mu.Lock()
	watchers := w.watchers
	w.mu.Unlock()
	for _, sw := range watchers {
		sw.Close()
	}
	if w.client != nil {
		w.client.Close()
		w.b.metrics.queueDrops.Add(w.client.Stats().DroppedInforms)
	}
	w.endBatches() // after Close: nothing is published into them any more
	w.stopStatusRequests()
	w.mu.Lock()
	w.gaugeLocked("disconnected")
	w.state.State, w.state.Reason, w.state.Since = "disconnected", reason, now()
	doc := mustJSON(w.state)
	w.stopped = true
	w.mu.Unlock()
	w.b.publish(w.b.scheme.Status(w.dev.Name), "publish katcp.{device}.status", doc, attribute.String("katcp.device", w.dev.Name))
}

// inform publishes an asynchronous inform.
func (w *worker) inform(m katcp.Message) {
	if m.Name == "sensor-status" {
		return // published per sensor by the watchers
	}
	w.b.metrics.informs.Add(1)
	w.informPubs.publish(w.b.scheme.Inform(w.dev.Name, m.Name), EncodeArgs(m.Args), "")
}

// endBatches ends the publish spans of the informs and updates the
// client has just handed over.
func (w *worker) endBatches() {
	w.sensorPubs.end()
	w.informPubs.end()
}

// sensorUpdate publishes a sensor update.
func (w *worker) sensorUpdate(u katcp.SensorUpdate) {
	w.b.metrics.sensorUpdates.Add(1)
	out := w.sensorOut(u.Name, u.Type)
	buf := sensorBufs.Get().(*[]byte)
	doc := appendSensorRest(append((*buf)[:0], out.head...), u)
	var id string
	if w.b.lastValues.Load() {
		id = msgID(w.dev.Name, u.Name, u.Timestamp, u.Status.String())
	}
	// Publishing copies doc into the connection's buffer before it
	// returns, so the buffer serves the next update.
	w.sensorPubs.publish(out.subject, doc, id)
	if cap(doc) <= 4096 {
		*buf = doc
		sensorBufs.Put(buf)
	}
}

// cache holds values made per name, read without a lock. It keeps at
// most maxCached of them; beyond that, values are made each time.
type cache[V any] struct {
	m sync.Map
	n atomic.Int32 // entries in m
}

// maxCached bounds each of a worker's caches.
const maxCached = 1 << 16

// get returns the value for key: the cached one if valid accepts it, else
// one made by make (and cached).
func (c *cache[V]) get(key string, valid func(V) bool, make func() V) V {
	if v, ok := c.m.Load(key); ok && valid(v.(V)) {
		return v.(V)
	}
	v := make()
	if c.n.Load() < maxCached {
		if _, loaded := c.m.Swap(key, v); !loaded {
			c.n.Add(1)
		}
	}
	return v
}

// sensorOut is what every update of one sensor shares: the subject and
// the start of the document.
type sensorOut struct {
	subject string
	typ     katcp.SensorType
	head    []byte // appendSensorHead's
}

// sensorOut returns the subject and document head of a sensor's updates.
func (w *worker) sensorOut(name string, t katcp.SensorType) *sensorOut {
	return w.sensorOuts.get(name, func(out *sensorOut) bool { return out.typ == t }, func() *sensorOut {
		return &sensorOut{
			subject: w.b.scheme.Sensor(w.dev.Name, name),
			typ:     t,
			head:    appendSensorHead(nil, w.dev.Name, name, t),
		}
	})
}

// sensorBufs holds buffers for sensor documents.
var sensorBufs = sync.Pool{New: func() any { b := make([]byte, 0, 256); return &b }}

// allowed applies the device's policy to a request name.
func (w *worker) allowed(name string) bool {
	d := w.dev
	if slices.Contains(d.Deny, name) {
		return false
	}
	if len(d.Allow) > 0 && !slices.Contains(d.Allow, name) {
		return false
	}
	if d.ReadOnly && !slices.Contains(ReadOnlyRequests, name) {
		return false
	}
	return true
}

// handle is the micro endpoint handler: it checks what it can at once and
// starts the KATCP request, which answers when it completes.
func (w *worker) handle(req micro.Request) {
	b := w.b
	if !w.take() {
		w.stats.request("not-served", 0)
		b.respond(context.Background(), req, nil, "", errNotServed(w.dev.Name, "it is moving to another bridge replica"))
		return
	}
	select {
	case w.sem <- struct{}{}:
	default:
		w.reqWG.Done()
		w.stats.request("busy", 0)
		b.respond(context.Background(), req, nil, "", &errorReply{code: 503, source: "bridge",
			text: fmt.Sprintf("device %s has %d requests in flight; try again", w.dev.Name, cap(w.sem))})
		return
	}
	if !b.track() {
		<-w.sem
		w.reqWG.Done()
		w.stats.request("not-served", 0)
		b.respond(context.Background(), req, nil, "", errNotServed(w.dev.Name, "the bridge replica is shutting down"))
		return
	}
	b.metrics.inFlight.Add(1)
	w.serve(req, func() {
		<-w.sem
		b.metrics.inFlight.Add(-1)
		b.inflight.Done()
		w.reqWG.Done()
	})
}

// Span kinds, as variables: no slice to build per request.
var (
	serverSpan = []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindServer)}
	clientSpan = []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindClient)}
)

// hopSpanName returns "katcp <request>", the name of the KATCP hop's span,
// made once per request name (the names are the device's, which prepare
// has checked when the device's list is known).
func (w *worker) hopSpanName(request string) string {
	return w.spanNames.get(request, func(string) bool { return true }, func() string { return "katcp " + request })
}

// bigReply is the number of in-response informs above which a reply is
// encoded and sent on its own goroutine rather than the device
// connection's read goroutine.
const bigReply = 64

// serve performs one request and calls done once it has answered. The
// KATCP request completes asynchronously: no goroutine waits for it, and
// the reply is sent from the device connection's read goroutine.
func (w *worker) serve(req micro.Request, done func()) {
	b := w.b
	start := time.Now()
	ctx := Extract(context.Background(), b.prop, nats.Header(req.Headers()))
	p, perr := b.scheme.Parse(req.Subject())
	name := p.Name
	ctx, span := b.tracer.Start(ctx, "process katcp.{device}.req.{request}", serverSpan...)
	if span.IsRecording() { // no attributes to build for a span nobody records
		span.SetAttributes(
			attribute.String("messaging.system", "nats"),
			attribute.String("messaging.operation.type", "process"),
			attribute.String("katcp.device", w.dev.Name),
			attribute.String("katcp.request", name),
		)
	}
	finish := func(body []byte, status string, er *errorReply) {
		defer done()
		defer span.End()
		outcome := status
		if er != nil {
			span.SetStatus(codes.Error, er.text)
			span.SetAttributes(attribute.Int("katcp.error_code", er.code), attribute.String("katcp.error_source", er.source))
			switch {
			case er.status != "":
				outcome = er.status // the device answered: fail, invalid, ...
			case outcome == "":
				outcome = fmt.Sprintf("error-%d", er.code)
			}
		}
		w.stats.request(outcome, time.Since(start))
		if err := b.respond(ctx, req, body, status, er); err != nil {
			b.log.Warn("bridge: could not send a reply", "device", w.dev.Name, "request", name, "err", err)
		}
	}

	m, timeout, er := w.prepare(req, p, perr)
	if er != nil {
		finish(nil, "", er)
		return
	}
	asJSON := strings.HasPrefix(req.Headers().Get(HeaderAccept), ContentJSON)
	_, kspan := b.tracer.Start(ctx, w.hopSpanName(p.Name), clientSpan...)
	if kspan.IsRecording() {
		kspan.SetAttributes(
			attribute.String("rpc.system", "katcp"),
			attribute.String("rpc.method", p.Name),
			attribute.String("server.address", w.dev.Address),
			attribute.String("katcp.device", w.dev.Name),
		)
	}
	// The reply is published from the device connection's read
	// goroutine: while NATS pushes back (nats.go flushes a full buffer in
	// Publish), the device's later replies and informs wait in TCP, as
	// they would for any consumer that cannot keep up.
	w.client.RequestFunc(context.Background(), m, timeout, func(r *katcp.Reply, err error) {
		if err != nil {
			if kspan.IsRecording() {
				kspan.RecordError(err)
				kspan.SetStatus(codes.Error, err.Error())
			}
			kspan.End()
			er := errorFor(err, w.dev.Name, timeout)
			if w.ctx.Err() != nil && (errors.Is(err, katcp.ErrConnection) || errors.Is(err, katcp.ErrClosed)) {
				// A forced stop closed the connection under it.
				er = errorFor(context.Canceled, w.dev.Name, timeout)
			}
			finish(nil, "", er)
			return
		}
		if kspan.IsRecording() {
			kspan.SetAttributes(attribute.Int("katcp.mid", r.MID), attribute.String("katcp.status", r.Status()), attribute.Int("katcp.informs", len(r.Informs)))
		}
		if !r.OK() {
			kspan.SetStatus(codes.Error, r.Status())
		}
		kspan.End()
		if len(r.Informs) > bigReply {
			b.run(func() { finish(replyOf(r, asJSON)) })
			return
		}
		finish(replyOf(r, asJSON))
	})
}

// prepare checks a request and turns it into a KATCP request and its
// timeout.
func (w *worker) prepare(req micro.Request, p subjects.Parsed, perr error) (katcp.Message, time.Duration, *errorReply) {
	b := w.b
	var m katcp.Message
	if perr != nil || p.Kind != subjects.KindRequest {
		return m, 0, errBadRequest("bad request subject %q", req.Subject())
	}
	if !w.allowed(p.Name) {
		return m, 0, &errorReply{code: 403, source: "bridge", text: fmt.Sprintf("request %s to device %s is denied by policy", p.Name, w.dev.Name)}
	}
	h := req.Headers()
	timeout := time.Duration(w.dev.Timeout)
	if timeout <= 0 {
		timeout = b.cfg.DefaultTimeout
	}
	if v := h.Get(HeaderTimeout); v != "" {
		f, err := katcp.ParseFloat([]byte(v))
		if err != nil || !(f > 0) {
			return m, 0, errBadRequest("header %s: %q is not a positive number of seconds", HeaderTimeout, v)
		}
		if f >= b.cfg.MaxTimeout.Seconds() { // also before converting: no overflow
			timeout = b.cfg.MaxTimeout
		} else {
			timeout = time.Duration(f * float64(time.Second))
		}
	}
	timeout = min(timeout, b.cfg.MaxTimeout)
	args, err := DecodeArgs(req.Data(), strings.HasPrefix(h.Get(HeaderContentType), ContentJSON))
	if err != nil {
		return m, 0, errBadRequest("%v", err)
	}
	if w.dev.ReadOnly && p.Name == "log-level" && len(args) > 0 {
		return m, 0, &errorReply{code: 403, source: "bridge", text: fmt.Sprintf("device %s is read-only: ?log-level may only be queried", w.dev.Name)}
	}
	if !w.client.Connected() {
		if !w.tried.Load() { // just taken over: not "not connected" yet
			return m, 0, errNotServed(w.dev.Name, "the bridge is connecting to it")
		}
		return m, 0, errorFor(katcp.ErrNotConnected, w.dev.Name, timeout)
	}
	w.mu.Lock()
	known := w.requests == nil || w.requests[p.Name]
	w.mu.Unlock()
	if !known {
		return m, 0, &errorReply{code: 404, source: "bridge", text: fmt.Sprintf("device %s has no request %s", w.dev.Name, p.Name)}
	}
	return katcp.Message{Type: katcp.TypeRequest, Name: p.Name, Args: args}, timeout, nil
}

// replyOf encodes a device's reply: the body, the status when it is ok,
// or the device's refusal.
func replyOf(r *katcp.Reply, asJSON bool) ([]byte, string, *errorReply) {
	body, err := encodeReply(r, asJSON)
	if err != nil {
		return nil, "", &errorReply{code: 500, source: "bridge", text: err.Error()}
	}
	status := r.Status()
	switch status {
	case "ok":
		return body, status, nil
	case "fail":
		return body, "", &errorReply{code: 500, source: "device", status: status, text: reason(r)}
	}
	return body, "", &errorReply{code: 400, source: "device", status: status, text: reason(r)}
}

func reason(r *katcp.Reply) string {
	if s := r.Arg(1); s != "" {
		return s
	}
	return "device replied " + r.Status()
}
