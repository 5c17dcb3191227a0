package bridge

import (
	"context"
	"sync"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// maxBatch is the most messages one publish span covers.
const maxBatch = 256

// pubBatch publishes a device's informs or sensor updates under one
// producer span per batch: the messages its katcp.Client hands over in
// one go (ended by the client's AfterBatch) or maxBatch of them. Each
// message carries the batch span's context, so a subscriber continues
// the trace as for a span per message, at a small part of the cost when
// a device sends thousands of updates a second.
type pubBatch struct {
	b        *Bridge
	device   string
	spanName string // "publish katcp.{device}.sensor", ...
	template string // messaging.destination.template

	mu    sync.Mutex // guards the fields below
	span  trace.Span // nil between batches
	hdr   nats.Header
	n     int
	one   string // the first message's subject
	multi bool   // the batch has several subjects (else one is named on the span)
	fails int
}

func newPubBatch(b *Bridge, device, spanName, template string) *pubBatch {
	return &pubBatch{b: b, device: device, spanName: spanName, template: template}
}

// publish sends data on subject within the current batch, with a
// JetStream message id unless id is "".
func (p *pubBatch) publish(subject string, data []byte, id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.span == nil {
		p.startLocked()
	}
	p.n++
	if p.n == 1 {
		p.one = subject
	} else if subject != p.one {
		p.multi = true
	}
	var err error
	if p.hdr != nil || id != "" {
		h := p.hdr
		if h == nil {
			h = nats.Header{}
		}
		if id != "" {
			h.Set(nats.MsgIdHdr, id)
		}
		// PublishMsg encodes the headers before it returns: the same
		// header map serves the whole batch.
		err = p.b.nc.PublishMsg(&nats.Msg{Subject: subject, Data: data, Header: h})
		if id != "" {
			h.Del(nats.MsgIdHdr)
		}
	} else {
		err = p.b.nc.Publish(subject, data)
	}
	if err != nil {
		p.b.metrics.drops.Add(1)
		if p.fails++; p.fails == 1 {
			p.span.RecordError(err)
			p.span.SetStatus(codes.Error, err.Error())
		}
	}
	if p.n >= maxBatch {
		p.endLocked()
	}
}

func (p *pubBatch) startLocked() {
	ctx, span := p.b.tracer.Start(context.Background(), p.spanName, producerSpan...)
	p.span = span
	p.hdr = nil
	if span.SpanContext().IsValid() {
		p.hdr = nats.Header{}
		Inject(ctx, p.b.prop, p.hdr)
	}
}

// end ends the current batch, if any.
func (p *pubBatch) end() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.span != nil {
		p.endLocked()
	}
}

func (p *pubBatch) endLocked() {
	if p.span.IsRecording() {
		p.span.SetAttributes(
			attribute.String("messaging.system", "nats"),
			attribute.String("messaging.operation.type", "publish"),
			attribute.String("messaging.destination.template", p.template),
			attribute.String("katcp.device", p.device),
		)
		if p.n > 1 { // the conventions name a batch's size, not a single message's
			p.span.SetAttributes(attribute.Int("messaging.batch.message_count", p.n))
		}
		if !p.multi {
			p.span.SetAttributes(attribute.String("messaging.destination.name", p.one))
		}
	}
	p.span.End()
	p.span, p.hdr, p.n, p.one, p.multi, p.fails = nil, nil, 0, "", false, 0
}
