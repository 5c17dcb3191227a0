package bridge

import (
	"context"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/propagation"
)

// HeaderCarrier adapts nats.Header to OpenTelemetry propagation. Keys are
// used exactly as given (W3C's "traceparent" stays lowercase; nats.Header
// is case-sensitive).
type HeaderCarrier nats.Header

var _ propagation.TextMapCarrier = HeaderCarrier{}

// Get returns the first value of key.
func (c HeaderCarrier) Get(key string) string {
	if v := c[key]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// Set sets key to value.
func (c HeaderCarrier) Set(key, value string) { c[key] = []string{value} }

// Keys lists the keys.
func (c HeaderCarrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}

// Inject writes ctx's trace context into h (a nil h is left alone).
func Inject(ctx context.Context, p propagation.TextMapPropagator, h nats.Header) {
	if h != nil {
		p.Inject(ctx, HeaderCarrier(h))
	}
}

// Extract returns ctx with the trace context found in h.
func Extract(ctx context.Context, p propagation.TextMapPropagator, h nats.Header) context.Context {
	if h == nil {
		return ctx
	}
	return p.Extract(ctx, HeaderCarrier(h))
}
