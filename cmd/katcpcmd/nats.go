package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"

	"github.com/nats-io/nats.go"

	"github.com/katcp-go/katcp-bridge/bridge"
	"github.com/katcp-go/katcp-bridge/bridge/natsclient"
	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/subjects"
)

// natsTarget splits "nats://host:port/device" (or tls://) into the server
// URL and the device; ok is false for a plain host:port.
func natsTarget(addr string) (server, device string, ok bool, err error) {
	if !strings.Contains(addr, "://") {
		return "", "", false, nil
	}
	u, err := url.Parse(addr)
	if err != nil {
		return "", "", true, fmt.Errorf("bad NATS address %q: %w", addr, err)
	}
	device = strings.Trim(u.Path, "/")
	if err := subjects.ValidDevice(device); err != nil {
		return "", "", true, fmt.Errorf("NATS address %q needs a device: nats://host:port/<device>: %w", addr, err)
	}
	u.Path = ""
	return u.String(), device, true, nil
}

// dialBridge connects to NATS at server for the bridge's client.
func dialBridge(o options, server string) (*natsclient.Client, func(), error) {
	nc, err := nats.Connect(server, nats.Name("katcpcmd"), nats.Timeout(o.connectTimeout))
	if err != nil {
		return nil, nil, fmt.Errorf("connecting to %s: %w", server, err)
	}
	c, err := natsclient.New(nc, natsclient.Options{Prefix: o.prefix})
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return c, nc.Close, nil
}

// runNATS is run's counterpart for a device behind katcp-bridge.
func runNATS(ctx context.Context, o options, server, device string, p *printer, stderr io.Writer) int {
	c, closeNATS, err := dialBridge(o, server)
	if err != nil {
		fmt.Fprintf(stderr, "katcpcmd: %v\n", err)
		return 1
	}
	defer closeNATS()
	// Asynchronous informs, as they arrive.
	sub, err := c.SubscribeInforms(device, "*", func(_ context.Context, _ string, m katcp.Message) { p.print(&m) })
	if err != nil {
		fmt.Fprintf(stderr, "katcpcmd: %v\n", err)
		return 1
	}
	defer sub.Unsubscribe()
	if o.watch != nil {
		return watchNATS(ctx, c, device, o, p, stderr)
	}
	args := make([]any, len(o.args))
	for i, a := range o.args {
		args[i] = a
	}
	ctx, cancel := context.WithTimeout(ctx, o.requestTimeout)
	defer cancel()
	r, err := c.Request(ctx, device, o.request, args...)
	if r == nil {
		fmt.Fprintf(stderr, "katcpcmd: %v\n", err)
		return 1
	}
	for i := range r.Informs {
		p.print(&r.Informs[i])
	}
	p.print(&r.Message)
	if !r.OK() {
		return 2
	}
	return 0
}

// watchNATS prints the sensor updates the bridge publishes for the named
// sensors (the bridge decides the strategy) until interrupted.
func watchNATS(ctx context.Context, c *natsclient.Client, device string, o options, p *printer, stderr io.Writer) int {
	for _, name := range o.watch {
		sub, err := c.SubscribeSensors(device, name, func(_ context.Context, u bridge.SensorUpdate) {
			m, err := katcp.NewInform("sensor-status", u.Timestamp, 1, u.Name, u.Status, sensorValueArg(u.Type, u.Value))
			if err == nil {
				p.print(&m)
			}
		})
		if err != nil {
			fmt.Fprintf(stderr, "katcpcmd: %v\n", err)
			return 1
		}
		defer sub.Unsubscribe()
	}
	// The current values first, so that a quiet sensor shows at once.
	rctx, cancel := context.WithTimeout(ctx, o.requestTimeout)
	for _, name := range o.watch {
		r, err := c.Request(rctx, device, "sensor-value", name)
		if err != nil && !errors.Is(err, katcp.ErrFail) {
			fmt.Fprintf(stderr, "katcpcmd: %v\n", err)
			cancel()
			return 1
		}
		if err != nil {
			fmt.Fprintf(stderr, "katcpcmd: watch %s: %v\n", name, err)
			cancel()
			return 2
		}
		for _, inf := range r.Informs {
			inf.Name, inf.MID = "sensor-status", 0
			p.print(&inf)
		}
	}
	cancel()
	<-ctx.Done()
	return 0
}

// sensorValueArg turns a published JSON value back into a KATCP argument
// of the sensor's type.
func sensorValueArg(typ string, v any) any {
	switch v := v.(type) {
	case nil:
		return ""
	case bool, string:
		return v
	case json.Number:
		if typ == "integer" {
			if n, err := v.Int64(); err == nil {
				return n
			}
		}
		if f, err := v.Float64(); err == nil {
			return f
		}
		return v.String()
	case map[string]any:
		if s, ok := v["base64"].(string); ok {
			if b, err := base64.StdEncoding.DecodeString(s); err == nil {
				return b
			}
		}
	}
	return fmt.Sprint(v)
}

// owners prints which bridge replica serves which device.
func owners(ctx context.Context, o options, stdout, stderr io.Writer) int {
	u, err := url.Parse(o.addr)
	if err != nil || !strings.Contains(o.addr, "://") || strings.Trim(u.Path, "/") != "" {
		fmt.Fprintf(stderr, "katcpcmd: --owners needs a NATS address nats://host:port, not %q\n", o.addr)
		return 1
	}
	c, closeNATS, err := dialBridge(o, o.addr)
	if err != nil {
		fmt.Fprintf(stderr, "katcpcmd: %v\n", err)
		return 1
	}
	defer closeNATS()
	ctx, cancel := context.WithTimeout(ctx, o.requestTimeout)
	defer cancel()
	ow, err := c.Owners(ctx)
	if err != nil {
		fmt.Fprintf(stderr, "katcpcmd: %v\n", err)
		return 1
	}
	mode := "leases off: one replica serves every device"
	if ow.Leases {
		mode = "leases in bucket " + ow.Bucket
	}
	fmt.Fprintf(stdout, "# %s; %d replicas; answered by %s\n", mode, len(ow.Replicas), ow.AnsweredBy)
	for _, d := range ow.Devices {
		if d.Owner == "" {
			fmt.Fprintf(stdout, "%s\t-\t(not served)\n", d.Device)
			continue
		}
		fmt.Fprintf(stdout, "%s\t%s\t%s\n", d.Device, d.Instance, d.Owner)
	}
	return 0
}
