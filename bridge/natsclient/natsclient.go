// Package natsclient is for Go services that use KATCP devices through
// katcp-bridge: requests with ctx and typed errors, sensor and inform
// subscriptions with decoded documents, and trace propagation both ways.
//
//	c := natsclient.New(nc, natsclient.Options{})
//	r, err := c.Request(ctx, "m000", "sensor-value", "pump.speed")
//	switch {
//	case errors.Is(err, katcp.ErrFail):          // the device refused (*katcp.ReplyError)
//	case errors.Is(err, natsclient.ErrNotConnected): // the bridge could not reach it
//	}
//
// A Client is safe for concurrent use.
package natsclient

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/katcp-go/katcp-bridge/bridge"
	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/subjects"
)

// Errors from the bridge itself, matched with errors.Is against an *Error.
var (
	ErrBadRequest   = errors.New("natsclient: bad request")                   // 400 from the bridge
	ErrDenied       = errors.New("natsclient: denied by policy")              // 403
	ErrUnknown      = errors.New("natsclient: unknown device or request")     // 404
	ErrNotConnected = errors.New("natsclient: device not connected")          // 503
	ErrTimeout      = errors.New("natsclient: device did not answer in time") // 504
	ErrNotServed    = errors.New("natsclient: no bridge serves the device")   // no responders, or 503 with Katcp-Not-Served
)

// Error is a failure reported by the bridge (not a device's refusal, which
// is a *katcp.ReplyError).
type Error struct {
	Code int    // the Nats-Service-Error-Code
	Text string // the Nats-Service-Error
	// NotServed: the replica that answered no longer serves the device
	// (it is moving to another replica, or the replica is stopping); the
	// error matches ErrNotServed, and a retry reaches the new owner.
	NotServed bool
}

func (e *Error) Error() string { return fmt.Sprintf("katcp-bridge: %d: %s", e.Code, e.Text) }

// Is maps codes to the sentinels.
func (e *Error) Is(target error) bool {
	if e.NotServed {
		return target == ErrNotServed
	}
	switch e.Code {
	case 400:
		return target == ErrBadRequest
	case 403:
		return target == ErrDenied
	case 404:
		return target == ErrUnknown
	case 503:
		return target == ErrNotConnected
	case 504:
		return target == ErrTimeout
	}
	return false
}

// Options configure a Client.
type Options struct {
	Prefix           string
	LastValuesStream string               // the bridge's last-values stream, for SubscribeLastSensors
	TracerProvider   trace.TracerProvider // default otel.GetTracerProvider()
	Propagator       propagation.TextMapPropagator
}

// Client calls devices through the bridge.
type Client struct {
	lastValues string
	nc         *nats.Conn
	scheme     subjects.Scheme
	tracer     trace.Tracer
	prop       propagation.TextMapPropagator
}

// New returns a client on nc.
func New(nc *nats.Conn, o Options) (*Client, error) {
	scheme, err := subjects.New(o.Prefix)
	if err != nil {
		return nil, err
	}
	tp := o.TracerProvider
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	prop := o.Propagator
	if prop == nil {
		prop = propagation.TraceContext{}
	}
	return &Client{lastValues: o.LastValuesStream, nc: nc, scheme: scheme, tracer: tp.Tracer("github.com/katcp-go/katcp-bridge/bridge/natsclient"), prop: prop}, nil
}

// Reply is a device's reply with its in-response informs.
type Reply = katcp.Reply

// Request sends ?request with args to device and waits for the reply,
// reassembling replies that came in several messages. ctx's deadline
// travels to the bridge (Katcp-Timeout). A fail or invalid reply returns
// the reply and a *katcp.ReplyError; the bridge's own failures are
// *Error; a device no bridge serves is ErrNotServed.
func (c *Client) Request(ctx context.Context, device, request string, args ...any) (*Reply, error) {
	m, err := katcp.NewRequest(request, args...)
	if err != nil {
		return nil, err
	}
	if err := subjects.ValidDevice(device); err != nil {
		return nil, err
	}
	subject := c.scheme.Request(device, request)
	ctx, span := c.tracer.Start(ctx, "send katcp.{device}.req.{request}",
		trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(
			attribute.String("messaging.system", "nats"),
			attribute.String("messaging.destination.name", subject),
			attribute.String("katcp.device", device),
			attribute.String("katcp.request", request),
		))
	defer span.End()
	r, err := c.do(ctx, subject, bridge.EncodeArgs(m.Args))
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	return r, err
}

func (c *Client) do(ctx context.Context, subject string, body []byte) (*Reply, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
	}
	deadline, _ := ctx.Deadline()
	// The bridge gets a little less time than we wait, so that its
	// timeout reply (504, ErrTimeout) reaches us before our deadline.
	wait := time.Until(deadline)
	wait -= min(wait/10, 250*time.Millisecond)
	if wait < time.Millisecond {
		return nil, fmt.Errorf("natsclient: %s: %w", subject, context.DeadlineExceeded)
	}
	inbox := c.nc.NewInbox()
	sub, err := c.nc.SubscribeSync(inbox)
	if err != nil {
		return nil, err
	}
	defer sub.Unsubscribe()
	msg := &nats.Msg{Subject: subject, Reply: inbox, Data: body, Header: nats.Header{}}
	msg.Header.Set(bridge.HeaderTimeout, strconv.FormatFloat(wait.Seconds(), 'f', 3, 64))
	bridge.Inject(ctx, c.prop, msg.Header)
	if err := c.nc.PublishMsg(msg); err != nil {
		return nil, err
	}
	var data []byte
	for {
		reply, err := sub.NextMsgWithContext(ctx)
		if errors.Is(err, nats.ErrNoResponders) {
			return nil, fmt.Errorf("%w: %s", ErrNotServed, subject)
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("natsclient: %s: %w", subject, ctx.Err())
			}
			return nil, err
		}
		if reply.Header.Get("Status") == "503" && len(reply.Data) == 0 {
			return nil, fmt.Errorf("%w: %s", ErrNotServed, subject)
		}
		data = append(data, reply.Data...)
		if reply.Header.Get(bridge.HeaderMore) != "" {
			continue
		}
		return decodeReply(reply.Header, data)
	}
}

func decodeReply(h nats.Header, data []byte) (*Reply, error) {
	status := h.Get(bridge.HeaderStatus)
	if status == "" {
		code, _ := strconv.Atoi(h.Get(bridge.HeaderErrorCode))
		return nil, &Error{Code: code, Text: h.Get(bridge.HeaderErrorText), NotServed: h.Get(bridge.HeaderNotServed) == "true"}
	}
	r := &Reply{}
	rd := katcp.NewReader(bytes.NewReader(data))
	for {
		m, err := rd.ReadMessage()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("natsclient: bad reply body: %w", err)
		}
		if m.Type == katcp.TypeReply {
			r.Message = m.Clone()
		} else {
			r.Informs = append(r.Informs, m.Clone())
		}
	}
	if r.Name == "" {
		return nil, errors.New("natsclient: reply body has no reply")
	}
	return r, r.Err()
}

// Status asks for a device's current state (waiting at most 5 s when ctx
// has no deadline).
func (c *Client) Status(ctx context.Context, device string) (bridge.Status, error) {
	var st bridge.Status
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
	}
	msg, err := c.nc.RequestWithContext(ctx, c.scheme.Status(device), nil)
	if errors.Is(err, nats.ErrNoResponders) {
		return st, fmt.Errorf("%w: %s", ErrNotServed, device)
	}
	if err != nil {
		return st, err
	}
	return st, json.Unmarshal(msg.Data, &st)
}

// Owners asks the bridge replicas which of them serves which device.
func (c *Client) Owners(ctx context.Context) (bridge.Owners, error) {
	var o bridge.Owners
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
	}
	msg, err := c.nc.RequestWithContext(ctx, c.scheme.Owners(), nil)
	if errors.Is(err, nats.ErrNoResponders) {
		return o, fmt.Errorf("%w: no bridge answers %s", ErrNotServed, c.scheme.Owners())
	}
	if err != nil {
		return o, err
	}
	return o, json.Unmarshal(msg.Data, &o)
}

// SensorHandler receives a sensor update and the context of its trace.
type SensorHandler func(ctx context.Context, u bridge.SensorUpdate)

// SubscribeSensors delivers the updates (numbers in Value are
// json.Number, exact for any integer) of a device's sensors ("*" for
// every device) whose names match pattern: an exact name, or a prefix
// ending in ".>" ("pump.>"), or ">" for all. Malformed documents are
// skipped.
func (c *Client) SubscribeSensors(device, pattern string, f SensorHandler) (*nats.Subscription, error) {
	subject := c.scheme.Device(device) + ".sensor." + sensorPattern(pattern)
	return c.nc.Subscribe(subject, func(m *nats.Msg) {
		var u bridge.SensorUpdate
		dec := json.NewDecoder(bytes.NewReader(m.Data))
		dec.UseNumber() // integers beyond 2^53 stay exact (json.Number)
		if dec.Decode(&u) != nil {
			return
		}
		f(bridge.Extract(context.Background(), c.prop, m.Header), u)
	})
}

func sensorPattern(p string) string {
	switch {
	case p == "" || p == ">" || p == "*":
		return ">"
	case len(p) > 2 && p[len(p)-2:] == ".>":
		return subjects.EscapeSensor(p[:len(p)-2]) + ".>"
	}
	return subjects.EscapeSensor(p)
}

// SubscribeLastSensors is SubscribeSensors for a subscriber that starts
// late: it first delivers the last update of every matching sensor, kept
// by the bridge in JetStream, then the live updates, in order. It needs
// the bridge's last-values stream (Options.LastValuesStream, default
// bridge.DefaultLastValuesStream). Call stop to end it.
func (c *Client) SubscribeLastSensors(ctx context.Context, device, pattern string, f SensorHandler) (stop func(), err error) {
	js, err := jetstream.New(c.nc)
	if err != nil {
		return nil, err
	}
	stream := c.lastValues
	if stream == "" {
		stream = bridge.DefaultLastValuesStream
	}
	subject := c.scheme.Device(device) + ".sensor." + sensorPattern(pattern)
	cons, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{subject},
		DeliverPolicy:  jetstream.DeliverLastPerSubjectPolicy,
	})
	if err != nil {
		return nil, fmt.Errorf("natsclient: last values of %s: %w", subject, err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		var u bridge.SensorUpdate
		dec := json.NewDecoder(bytes.NewReader(m.Data()))
		dec.UseNumber()
		if dec.Decode(&u) != nil {
			return
		}
		f(bridge.Extract(context.Background(), c.prop, m.Headers()), u)
	})
	if err != nil {
		return nil, err
	}
	return cc.Stop, nil
}

// InformHandler receives an asynchronous inform and its trace context.
type InformHandler func(ctx context.Context, device string, m katcp.Message)

// SubscribeInforms delivers a device's asynchronous informs named name
// ("*" for all names; device "*" for all devices).
func (c *Client) SubscribeInforms(device, name string, f InformHandler) (*nats.Subscription, error) {
	subject := c.scheme.Device(device) + ".inform." + name
	return c.nc.Subscribe(subject, func(m *nats.Msg) {
		p, err := c.scheme.Parse(m.Subject)
		if err != nil {
			return
		}
		line := append([]byte("#"+p.Name+" "), m.Data...)
		msg, err := katcp.ParseMessage(line)
		if err != nil {
			return
		}
		f(bridge.Extract(context.Background(), c.prop, m.Header), p.Device, msg)
	})
}
