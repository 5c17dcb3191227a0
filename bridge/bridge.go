package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/subjects"
)

// ServiceName is the bridge's NATS micro service name.
const ServiceName = "katcp-bridge"

// Version is the bridge's service version.
const Version = "0.1.0"

const tracerName = "github.com/katcp-go/katcp-bridge/bridge"

// Bridge serves KATCP devices on NATS: one worker per device. It is safe
// for concurrent use.
type Bridge struct {
	cfg      Config
	nc       *nats.Conn
	scheme   subjects.Scheme
	log      *slog.Logger
	tracer   trace.Tracer
	prop     propagation.TextMapPropagator
	metrics  *Metrics
	instance string
	id       string // this replica in the lease bucket

	devices    map[string]Device // configured
	started    atomic.Bool
	draining   atomic.Bool
	lastValues atomic.Bool // sensor updates are kept in JetStream
	leases     *leases     // nil without leases
	leasesOn   atomic.Bool
	ownersSub  *nats.Subscription

	mu      sync.Mutex         // guards workers, lingering and svc
	workers map[string]*worker // the devices served now
	// lingering devices are no longer served but keep their endpoints,
	// answering "not served", until another replica serves them (see
	// unserve).
	lingering map[string]lingerer
	stopping  map[string]*stopper                // workers closing (see unserve)
	svc       micro.Service                      // one endpoint per served or lingering device
	served    atomic.Pointer[map[string]*worker] // a copy of workers for STATS

	stopLeases chan struct{} // ends a pending lease setup
	setupDone  chan struct{}

	trackMu  sync.Mutex     // orders inflight.Add before Shutdown's Wait
	inflight sync.WaitGroup // requests being handled

	work     chan func()    // to idle request runners
	runners  sync.WaitGroup // request runners
	quitRuns chan struct{}  // closed at the end of Shutdown: runners exit
}

// runnerIdle is how long a request runner waits for another request.
const runnerIdle = 2 * time.Second

// run runs a request on an idle runner, or on a new one. Runners wait a
// while for the next request before they exit, so that a request starts
// on a stack an earlier one has grown (a new goroutine's stack is grown,
// by copying, two or three times per request, more with tracing on),
// and idle bridges keep no goroutines.
func (b *Bridge) run(f func()) {
	select {
	case b.work <- f:
	default:
		b.runners.Add(1)
		go b.runLoop(f)
	}
}

func (b *Bridge) runLoop(f func()) {
	defer b.runners.Done()
	f()
	idle := time.NewTimer(runnerIdle)
	defer idle.Stop()
	for {
		select {
		case f := <-b.work:
			f()
			idle.Reset(runnerIdle)
		case <-idle.C:
			return
		case <-b.quitRuns:
			return
		}
	}
}

// stopper is a worker being stopped; done closes when it has.
type stopper struct {
	w    *worker
	done chan struct{}
}

type lingerer struct {
	w     *worker
	since time.Time
}

// New checks cfg and returns a bridge that will use nc. Start starts it.
func New(nc *nats.Conn, cfg Config) (*Bridge, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	c := cfg.withDefaults()
	scheme, _ := subjects.New(c.Prefix)
	tp := c.TracerProvider
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	prop := c.Propagator
	if prop == nil {
		prop = propagation.TraceContext{}
	}
	instance := c.Instance
	if instance == "" {
		instance = nc.Opts.Name
	}
	if instance == "" {
		instance = ServiceName
	}
	b := &Bridge{
		cfg:        c,
		nc:         nc,
		scheme:     scheme,
		log:        c.Logger,
		tracer:     tp.Tracer(tracerName),
		prop:       prop,
		metrics:    c.Metrics,
		instance:   instance,
		id:         replicaID(instance),
		devices:    make(map[string]Device, len(c.Devices)),
		workers:    make(map[string]*worker),
		lingering:  make(map[string]lingerer),
		stopping:   make(map[string]*stopper),
		stopLeases: make(chan struct{}),
		setupDone:  make(chan struct{}),
		work:       make(chan func()),
		quitRuns:   make(chan struct{}),
	}
	b.served.Store(&map[string]*worker{})
	live := func() uint64 {
		var n uint64
		for _, w := range *b.served.Load() {
			n += w.client.Stats().DroppedInforms
		}
		return n
	}
	b.metrics.liveQueueDrops.Store(&live)
	for _, d := range c.Devices { // checked by Validate, sensor patterns too
		b.devices[d.Name] = d
	}
	return b, nil
}

// Metrics returns the bridge's metrics.
func (b *Bridge) Metrics() *Metrics { return b.metrics }

// Scheme returns the bridge's subject scheme.
func (b *Bridge) Scheme() subjects.Scheme { return b.scheme }

// Start starts serving. Without leases (LeasesOff, or LeasesAuto on a
// NATS system without JetStream) it serves every configured device at
// once; with leases, the devices this replica wins, as it wins them. The
// workers connect to their devices in the background.
func (b *Bridge) Start() error {
	if !b.started.CompareAndSwap(false, true) {
		return errors.New("bridge: already started")
	}
	b.setupLastValues()
	sub, err := b.nc.QueueSubscribe(b.scheme.Owners(), "owners", b.ownersRequest)
	if err != nil {
		close(b.setupDone)
		return fmt.Errorf("bridge: owners subject: %w", err)
	}
	b.ownersSub = sub
	if b.cfg.Leases == LeasesOff {
		close(b.setupDone)
		b.log.Info("leases are off: serving every configured device; run one replica only")
		b.serve(slices.Sorted(maps.Keys(b.devices)))
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	l, na, err := b.setupLeases(ctx)
	// No responders may only mean that JetStream is still starting (a
	// cluster electing its leaders): ask again for a little while.
	for retry := time.Now().Add(2 * time.Second); err != nil && errors.Is(err, nats.ErrNoResponders) && time.Now().Before(retry); {
		select {
		case <-time.After(200 * time.Millisecond):
		case <-ctx.Done():
		}
		l, na, err = b.setupLeases(ctx)
	}
	cancel()
	switch {
	case err == nil:
		close(b.setupDone)
		b.startLeases(l)
	case na && b.cfg.Leases == LeasesAuto:
		close(b.setupDone)
		b.log.Warn("JetStream is not available: serving every configured device without leases; run one replica only", "err", err)
		b.serve(slices.Sorted(maps.Keys(b.devices)))
	default:
		b.log.Error("leases: cannot use the bucket; serving nothing until it works", "err", err)
		go b.retryLeases()
	}
	return nil
}

func (b *Bridge) startLeases(l *leases) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.draining.Load() {
		return
	}
	b.leases = l
	b.leasesOn.Store(true)
	b.updateServiceLocked()
	b.log.Info("leases: sharing devices with other replicas", "bucket", l.bucket, "replica", l.id, "ttl", l.ttl, "renew", l.renew)
	l.start()
}

// retryLeases tries the lease bucket until it works or the bridge stops.
func (b *Bridge) retryLeases() {
	defer close(b.setupDone)
	t := time.NewTicker(b.cfg.LeaseRenew)
	defer t.Stop()
	for {
		select {
		case <-b.stopLeases:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), b.cfg.LeaseTTL)
		l, _, err := b.setupLeases(ctx)
		cancel()
		if err == nil {
			b.startLeases(l)
			return
		}
		b.log.Warn("leases: bucket still unavailable", "err", err)
	}
}

// serve starts workers for devices and adds their endpoints; it returns
// the devices it could not serve. It serves nothing once the bridge is
// draining. A device whose previous worker is still closing waits for
// it: never two connections to one device.
func (b *Bridge) serve(names []string) (failed []string) {
	b.lockClosed(names)
	defer b.mu.Unlock()
	if b.draining.Load() {
		return names
	}
	added := false
	for _, n := range names {
		if b.workers[n] != nil {
			continue
		}
		w, err := newWorker(b, b.devices[n])
		if err == nil {
			err = w.start()
		}
		if err != nil {
			b.log.Error("bridge: cannot serve a device", "device", n, "err", err)
			failed = append(failed, n)
			continue
		}
		b.workers[n] = w
		delete(b.lingering, n)
		added = true
	}
	if added {
		b.updateServiceLocked()
	}
	return failed
}

// unserve stops serving devices: from now on their endpoints answer
// "not served"; the requests in flight finish (or are cancelled when
// force is set), then the device connections close. The endpoints linger
// until another replica serves the devices (endLinger): in a NATS
// cluster, a request already on its way to this replica's server when it
// unsubscribes is forwarded to another member of the queue group, if
// there is one, and lost otherwise.
func (b *Bridge) unserve(names []string, force bool, reason string) {
	b.mu.Lock()
	var stops []*stopper
	for _, n := range names {
		if w := b.workers[n]; w != nil {
			delete(b.workers, n)
			w.stopServing()
			b.lingering[n] = lingerer{w, time.Now()}
			st := &stopper{w, make(chan struct{})}
			b.stopping[n] = st
			stops = append(stops, st)
		} else if st := b.stopping[n]; st != nil && force {
			st.w.abort() // a gentler stop is under way: close the device now
		}
	}
	b.publishServedLocked()
	b.mu.Unlock()
	for _, st := range stops {
		b.finish(st, force, reason)
	}
}

// finish stops a worker that no longer serves: its requests finish (for
// at most a lease TTL) or are cancelled at once when force is set.
func (b *Bridge) finish(st *stopper, force bool, reason string) {
	if force {
		st.w.abort() // the socket closes first: no waiting on NATS before
	}
	t := time.AfterFunc(b.cfg.LeaseTTL, st.w.abort)
	st.w.waitRequests()
	t.Stop()
	st.w.stop(reason)
	b.mu.Lock()
	if b.stopping[st.w.dev.Name] == st {
		delete(b.stopping, st.w.dev.Name)
	}
	b.mu.Unlock()
	close(st.done)
}

// endLinger removes the endpoints of lingering devices; older than
// (when positive) ends only those that have lingered that long.
func (b *Bridge) endLinger(names []string, older time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	removed := false
	for _, n := range names {
		if l, ok := b.lingering[n]; ok && (older <= 0 || time.Since(l.since) >= older) {
			delete(b.lingering, n)
			removed = true
		}
	}
	if removed && !b.draining.Load() {
		b.updateServiceLocked()
	}
}

// busy reports whether a worker serves the device or is still closing
// it: its lease must not go yet.
func (b *Bridge) busy(dev string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.workers[dev] != nil || b.stopping[dev] != nil
}

// lockClosed waits until no worker of the devices named (of any device
// when names is nil) is closing, and returns with b.mu held.
func (b *Bridge) lockClosed(names []string) {
	for {
		b.mu.Lock()
		var wait chan struct{}
		for n, st := range b.stopping {
			if names == nil || slices.Contains(names, n) {
				wait = st.done
				break
			}
		}
		if wait == nil {
			return
		}
		b.mu.Unlock()
		<-wait
	}
}

// lingeringDevices returns the devices whose endpoints linger.
func (b *Bridge) lingeringDevices() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Collect(maps.Keys(b.lingering))
}

func (b *Bridge) publishServedLocked() {
	cp := maps.Clone(b.workers)
	b.served.Store(&cp)
}

// updateServiceLocked replaces the micro service by one whose endpoints
// are the served devices. The new service subscribes before the old one
// stops (the same queue group, so each request is handled once), so the
// devices that stay are served throughout. b.mu is held.
func (b *Bridge) updateServiceLocked() {
	b.publishServedLocked()
	svc, err := micro.AddService(b.nc, micro.Config{
		Name:        ServiceName,
		Version:     Version,
		Description: "KATCP devices on NATS",
		Metadata: map[string]string{
			"instance":    b.instance,
			"replica":     b.id,
			"prefix":      b.scheme.Prefix(),
			"last_values": strconv.FormatBool(b.lastValues.Load()),
			"leases":      strconv.FormatBool(b.leasesOn.Load()),
		},
		StatsHandler: func(e *micro.Endpoint) any {
			if w := (*b.served.Load())[e.Name]; w != nil {
				return w.status()
			}
			return nil
		},
	})
	if err != nil {
		b.log.Error("bridge: cannot register the micro service", "err", err)
		return
	}
	handlers := make(map[string]*worker, len(b.workers)+len(b.lingering))
	for n, l := range b.lingering {
		handlers[n] = l.w
	}
	maps.Copy(handlers, b.workers)
	for _, name := range slices.Sorted(maps.Keys(handlers)) {
		d := b.devices[name]
		err = svc.AddEndpoint(name, micro.HandlerFunc(handlers[name].handle),
			micro.WithEndpointSubject(b.scheme.Requests(name)),
			micro.WithEndpointMetadata(map[string]string{"address": d.Address, "device": name, "owner": b.instance}))
		if err != nil {
			b.log.Error("bridge: cannot add a device's endpoint", "device", name, "err", err)
		}
	}
	if b.svc != nil {
		b.svc.Stop()
	}
	b.svc = svc
}

// Owners returns which replica serves which device, as this replica sees
// it; the owners subject answers with the same document.
func (b *Bridge) Owners() Owners {
	if l := b.currentLeases(); l != nil {
		return l.snapshot()
	}
	// Without leases; or with leases on, while the bucket cannot be used
	// yet (nothing is served then).
	o := Owners{Leases: b.cfg.Leases == LeasesOn, AnsweredBy: b.instance, Replicas: []Replica{{ID: b.id, Instance: b.instance}}, Devices: []DeviceOwner{}}
	served := *b.served.Load()
	for _, name := range slices.Sorted(maps.Keys(b.devices)) {
		d := DeviceOwner{Device: name}
		if served[name] != nil {
			d.Owner, d.Instance = b.id, b.instance
		}
		o.Devices = append(o.Devices, d)
	}
	return o
}

func (b *Bridge) currentLeases() *leases {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.leases
}

func (b *Bridge) ownersRequest(m *nats.Msg) {
	if m.Reply != "" {
		m.Respond(mustJSON(b.Owners()))
	}
}

// Serving returns the devices this replica serves now, sorted.
func (b *Bridge) Serving() []string {
	p := b.served.Load()
	if p == nil {
		return nil
	}
	return slices.Sorted(maps.Keys(*p))
}

// Ready reports whether the bridge has started and NATS is connected.
func (b *Bridge) Ready() bool {
	return b.started.Load() && !b.draining.Load() && b.nc.IsConnected()
}

// Shutdown stops taking requests, lets those in flight finish until ctx
// ends, publishes every served device's final (disconnected) status,
// closes the KATCP connections and then releases the leases, so that
// other replicas take the devices over at once. The NATS connection is
// the caller's to drain.
func (b *Bridge) Shutdown(ctx context.Context) error {
	b.trackMu.Lock()
	first := b.draining.CompareAndSwap(false, true)
	b.trackMu.Unlock()
	if !first || !b.started.Load() {
		return nil
	}
	close(b.stopLeases)
	<-b.setupDone
	l := b.currentLeases()
	if l != nil {
		l.drain() // takes and hands over nothing more
	}
	if b.ownersSub != nil {
		b.ownersSub.Drain()
	}
	// Stop serving, but keep the endpoints (answering "not served") until
	// other replicas serve the devices; see unserve.
	b.mu.Lock()
	workers := b.workers
	b.workers = map[string]*worker{}
	stops := make([]*stopper, 0, len(workers))
	for n, w := range workers {
		w.stopServing()
		b.lingering[n] = lingerer{w, time.Now()}
		st := &stopper{w, make(chan struct{})}
		b.stopping[n] = st // a lease lost meanwhile cancels its requests
		stops = append(stops, st)
	}
	b.publishServedLocked()
	b.mu.Unlock()
	for _, w := range workers {
		w.stopStatusRequests()
	}
	done := make(chan struct{})
	go func() {
		b.inflight.Wait()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = fmt.Errorf("bridge: requests still in flight: %w", ctx.Err())
		for _, w := range workers {
			w.cancelRequests()
		}
		<-done
	}
	for _, st := range stops {
		st.w.stop("bridge shutting down")
		b.mu.Lock()
		if b.stopping[st.w.dev.Name] == st {
			delete(b.stopping, st.w.dev.Name)
		}
		b.mu.Unlock()
		close(st.done)
	}
	if l != nil {
		// The connections are closed (also those a lost lease or a
		// hand-over was closing): the leases may go. Wait (at most a
		// lease TTL) for the other replicas, if any, to serve the devices.
		b.lockClosed(nil)
		b.mu.Unlock()
		l.release()
		if !l.othersAlive() {
			b.mu.Lock()
			clear(b.lingering)
			b.mu.Unlock()
		}
		deadline := time.NewTimer(l.ttl)
		poll := time.NewTicker(10 * time.Millisecond)
	wait:
		for len(b.lingeringDevices()) > 0 {
			select {
			case <-poll.C:
			case <-deadline.C:
				break wait
			case <-ctx.Done():
				break wait
			}
		}
		deadline.Stop()
		poll.Stop()
		l.close()
	}
	b.mu.Lock()
	svc := b.svc
	b.svc = nil
	clear(b.lingering)
	b.mu.Unlock()
	if svc != nil {
		svc.Stop()
	}
	close(b.quitRuns) // no request runs any more: every one was waited for
	b.runners.Wait()
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if ferr := b.nc.FlushWithContext(fctx); ferr != nil && err == nil && !errors.Is(ferr, nats.ErrConnectionClosed) {
		err = fmt.Errorf("bridge: flush: %w", ferr)
	}
	return err
}

// track counts a request goroutine in, unless the bridge is draining.
func (b *Bridge) track() bool {
	b.trackMu.Lock()
	defer b.trackMu.Unlock()
	if b.draining.Load() {
		return false
	}
	b.inflight.Add(1)
	return true
}

// errorReply describes a failed request for the caller.
type errorReply struct {
	code      int
	source    string // "bridge" or "device"
	status    string // the device's status, if it answered
	text      string
	notServed bool // this replica does not serve the device (now)
}

// errNotServed answers a request that reached a replica which no longer
// serves the device: it is moving to another replica or the bridge is
// stopping. Callers may retry at once.
func errNotServed(device, why string) *errorReply {
	return &errorReply{code: 503, source: "bridge", notServed: true, text: "device " + device + " is not served here: " + why + "; try again"}
}

// The bridge's own failures, as the contract's error codes.
func errBadRequest(format string, args ...any) *errorReply {
	return &errorReply{code: 400, source: "bridge", text: fmt.Sprintf(format, args...)}
}

func errorFor(err error, device string, timeout time.Duration) *errorReply {
	switch {
	case errors.Is(err, katcp.ErrNotConnected), errors.Is(err, katcp.ErrClosed):
		return &errorReply{code: 503, source: "bridge", text: "device " + device + " is not connected"}
	case errors.Is(err, katcp.ErrConnection):
		return &errorReply{code: 503, source: "bridge", text: "connection to device " + device + " lost: " + err.Error()}
	case errors.Is(err, context.DeadlineExceeded):
		return &errorReply{code: 504, source: "bridge", text: fmt.Sprintf("device %s did not reply within %v", device, timeout)}
	case errors.Is(err, context.Canceled):
		return errNotServed(device, "the request was cancelled as this replica stopped serving the device")
	}
	return &errorReply{code: 500, source: "bridge", text: err.Error()}
}

// respond sends a reply (possibly in chunks) or an error to the caller.
// It publishes to the reply subject itself rather than through
// micro.Request's Respond and Error: those record state that the micro
// service reads when the endpoint handler returns, and the handler has
// returned long before (the request runs on its own goroutine).
func (b *Bridge) respond(ctx context.Context, req micro.Request, body []byte, status string, er *errorReply) error {
	if req.Reply() == "" {
		return nil // published without a reply subject: nobody to answer
	}
	h := nats.Header{}
	Inject(ctx, b.prop, h)
	if status != "" {
		h.Set(HeaderStatus, status)
	}
	// Bodies over the payload limit go in parts; the last carries the
	// headers, for errors as for successes.
	max := int(b.nc.MaxPayload())
	limit := max - min(4096, max/2) // room for headers
	for len(body) > limit {
		chunk := &nats.Msg{Subject: req.Reply(), Data: body[:limit], Header: nats.Header{HeaderMore: []string{"1"}}}
		if err := b.nc.PublishMsg(chunk); err != nil {
			return err
		}
		body = body[limit:]
	}
	if er != nil {
		h.Set(HeaderSource, er.source)
		if er.notServed {
			h.Set(HeaderNotServed, "true")
		}
		if er.status != "" {
			h.Set(HeaderStatus, er.status)
		}
		h.Set(micro.ErrorHeader, er.text)
		h.Set(micro.ErrorCodeHeader, strconv.Itoa(er.code))
	}
	return b.nc.PublishMsg(&nats.Msg{Subject: req.Reply(), Data: body, Header: h})
}

// producerSpan starts a publication's span (a variable: no slice to
// build per message).
var producerSpan = []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindProducer)}

// publish sends a status document with a producer span whose context
// travels in the message headers (informs and sensor updates go through
// a pubBatch).
func (b *Bridge) publish(subject, spanName string, data []byte, attrs ...attribute.KeyValue) {
	ctx, span := b.tracer.Start(context.Background(), spanName, producerSpan...)
	if span.IsRecording() { // no attributes to build for a span nobody records
		span.SetAttributes(attrs...)
		span.SetAttributes(
			attribute.String("messaging.system", "nats"),
			attribute.String("messaging.operation.type", "publish"),
			attribute.String("messaging.destination.name", subject),
		)
	}
	var err error
	if span.SpanContext().IsValid() {
		msg := &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
		Inject(ctx, b.prop, msg.Header)
		err = b.nc.PublishMsg(msg)
	} else {
		err = b.nc.Publish(subject, data) // no message to build
	}
	if err != nil {
		b.metrics.drops.Add(1)
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only our own types are marshalled
	}
	return b
}
