package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
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

	svc        micro.Service
	workers    map[string]*worker // fixed after Start
	started    atomic.Bool
	draining   atomic.Bool
	lastValues atomic.Bool // sensor updates are kept in JetStream

	trackMu  sync.Mutex     // orders inflight.Add before Shutdown's Wait
	inflight sync.WaitGroup // request goroutines
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
		cfg:      c,
		nc:       nc,
		scheme:   scheme,
		log:      c.Logger,
		tracer:   tp.Tracer(tracerName),
		prop:     prop,
		metrics:  c.Metrics,
		instance: instance,
		workers:  make(map[string]*worker),
	}
	return b, nil
}

// Metrics returns the bridge's metrics.
func (b *Bridge) Metrics() *Metrics { return b.metrics }

// Scheme returns the bridge's subject scheme.
func (b *Bridge) Scheme() subjects.Scheme { return b.scheme }

// Start registers the micro service with an endpoint per device and starts
// the workers, which connect to their devices in the background.
func (b *Bridge) Start() error {
	if !b.started.CompareAndSwap(false, true) {
		return errors.New("bridge: already started")
	}
	b.setupLastValues()
	// The workers exist before the service does: its STATS handler reads
	// the map, which is not written after this.
	for _, d := range b.cfg.Devices {
		w, err := newWorker(b, d)
		if err != nil {
			return err
		}
		b.workers[d.Name] = w
	}
	svc, err := micro.AddService(b.nc, micro.Config{
		Name:        ServiceName,
		Version:     Version,
		Description: "KATCP devices on NATS",
		Metadata:    map[string]string{"instance": b.instance, "prefix": b.scheme.Prefix(), "last_values": strconv.FormatBool(b.lastValues.Load())},
		StatsHandler: func(e *micro.Endpoint) any {
			if w := b.workers[e.Name]; w != nil {
				return w.status()
			}
			return nil
		},
	})
	if err != nil {
		return fmt.Errorf("bridge: micro service: %w", err)
	}
	b.svc = svc
	for _, d := range b.cfg.Devices {
		w := b.workers[d.Name]
		// The default queue group: should two bridges ever serve one
		// device (a rolling update), each request still runs once.
		err = svc.AddEndpoint(d.Name, micro.HandlerFunc(w.handle),
			micro.WithEndpointSubject(b.scheme.Requests(d.Name)),
			micro.WithEndpointMetadata(map[string]string{"address": d.Address, "device": d.Name}))
		if err != nil {
			b.abort()
			return fmt.Errorf("bridge: endpoint for %s: %w", d.Name, err)
		}
	}
	for _, w := range b.workers {
		if err := w.start(); err != nil {
			b.abort()
			return err
		}
	}
	return nil
}

func (b *Bridge) abort() {
	if b.svc != nil {
		b.svc.Stop()
	}
	for _, w := range b.workers {
		w.stop("bridge failed to start")
	}
}

// Ready reports whether the bridge has started and NATS is connected.
func (b *Bridge) Ready() bool {
	return b.started.Load() && !b.draining.Load() && b.nc.IsConnected()
}

// Shutdown stops taking requests, lets those in flight finish until ctx
// ends, publishes every device's final (disconnected) status and closes
// the KATCP connections. The NATS connection is the caller's to drain.
func (b *Bridge) Shutdown(ctx context.Context) error {
	b.trackMu.Lock()
	first := b.draining.CompareAndSwap(false, true)
	b.trackMu.Unlock()
	if !first {
		return nil
	}
	if b.svc != nil {
		b.svc.Stop() // drains the endpoints: no new requests
	}
	for _, w := range b.workers {
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
		for _, w := range b.workers {
			w.cancelRequests()
		}
		<-done
	}
	for _, w := range b.workers {
		w.stop("bridge shutting down")
	}
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
	code   int
	source string // "bridge" or "device"
	status string // the device's status, if it answered
	text   string
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
		return &errorReply{code: 503, source: "bridge", text: "request cancelled: bridge shutting down"}
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
		if er.status != "" {
			h.Set(HeaderStatus, er.status)
		}
		h.Set(micro.ErrorHeader, er.text)
		h.Set(micro.ErrorCodeHeader, strconv.Itoa(er.code))
	}
	return b.nc.PublishMsg(&nats.Msg{Subject: req.Reply(), Data: body, Header: h})
}

// publish sends an inform or sensor update with a producer span whose
// context travels in the message headers.
func (b *Bridge) publish(subject, spanName string, data []byte, attrs ...attribute.KeyValue) {
	b.publishMsg(subject, spanName, data, "", attrs...)
}

// publishMsg is publish with a JetStream message id ("" for none).
func (b *Bridge) publishMsg(subject, spanName string, data []byte, id string, attrs ...attribute.KeyValue) {
	ctx, span := b.tracer.Start(context.Background(), spanName,
		trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(append(attrs,
			attribute.String("messaging.system", "nats"),
			attribute.String("messaging.operation.type", "publish"),
			attribute.String("messaging.destination.name", subject),
		)...))
	msg := &nats.Msg{Subject: subject, Data: data}
	if span.SpanContext().IsValid() || id != "" {
		msg.Header = nats.Header{}
		Inject(ctx, b.prop, msg.Header)
		if id != "" {
			msg.Header.Set(nats.MsgIdHdr, id)
		}
	}
	if err := b.nc.PublishMsg(msg); err != nil {
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
