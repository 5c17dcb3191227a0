package bridge_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/katcp-go/katcp-bridge/bridge"
	"github.com/katcp-go/katcp-bridge/bridge/natsclient"
	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/katcp/katcptest"
)

// startNATS runs an embedded nats-server on 127.0.0.1.
func startNATS(t *testing.T, maxPayload int32) *server.Server {
	t.Helper()
	opts := &server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true}
	if maxPayload < 0 { // JetStream wanted
		opts.JetStream, opts.StoreDir, maxPayload = true, t.TempDir(), 0
	}
	if maxPayload > 0 {
		opts.MaxPayload = maxPayload
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server did not start")
	}
	t.Cleanup(ns.Shutdown)
	return ns
}

func connectNATS(t *testing.T, ns *server.Server) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(ns.ClientURL(), nats.Name("test"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// waitFor polls cond until it holds or the test's deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type fixture struct {
	dev    *katcptest.Device
	nc     *nats.Conn
	b      *bridge.Bridge
	client *natsclient.Client
	spans  *tracetest.SpanRecorder
	tp     *sdktrace.TracerProvider
}

func startBridge(t *testing.T, maxPayload int32, mutate func(*bridge.Device)) *fixture {
	t.Helper()
	dev := katcptest.NewDevice(t, katcp.ServerConfig{DeviceName: "pump"})
	dev.Handle("add", "?add a b", func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		var a, b float64
		if err := r.Decode(&a, &b); err != nil {
			return err
		}
		return w.Reply(a + b)
	})
	dev.Handle("echo", "?echo args", func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		args := make([]any, len(r.Args))
		for i, a := range r.Args {
			args[i] = a
		}
		w.Inform("first")
		return w.Reply(args...)
	})
	dev.HandleReply("slow", "done")
	dev.SetDelay("slow", time.Hour)
	dev.Handle("bad", "", func(context.Context, *katcp.ReplyWriter, *katcp.Request) error { return katcp.Invalid("no way") })
	speed := dev.AddSensor(katcp.SensorFloat, "pump.speed", katcp.SensorOptions{Units: "rpm"})
	speed.Set(12.5)
	dev.AddSensor(katcp.SensorString, "note", katcp.SensorOptions{}).Set([]byte("caf\xe9"))

	ns := startNATS(t, maxPayload)
	nc := connectNATS(t, ns)
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	d := bridge.Device{Name: "m000", Address: dev.Addr()}
	if mutate != nil {
		mutate(&d)
	}
	b, err := bridge.New(nc, bridge.Config{
		Devices:        []bridge.Device{d},
		Client:         katcp.ClientConfig{BackoffInitial: 10 * time.Millisecond, BackoffMax: 50 * time.Millisecond},
		TracerProvider: tp,
		DefaultTimeout: 2 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Shutdown(context.Background()) })
	callerNC := connectNATS(t, ns)
	client, err := natsclient.New(callerNC, natsclient.Options{TracerProvider: tp})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{dev: dev, nc: callerNC, b: b, client: client, spans: rec, tp: tp}
	waitFor(t, "the device to connect", func() bool {
		st, err := client.Status(ctxFor(t), "m000")
		return err == nil && st.State == "connected"
	})
	return f
}

// rawRequest sends a NATS request as any NATS tool would.
func (f *fixture) rawRequest(t *testing.T, subject, body string, hdr nats.Header) *nats.Msg {
	t.Helper()
	msg := &nats.Msg{Subject: subject, Data: []byte(body), Header: hdr}
	reply, err := f.nc.RequestMsg(msg, 10*time.Second)
	if err != nil {
		t.Fatalf("request %s: %v", subject, err)
	}
	return reply
}

func TestBridgeRequests(t *testing.T) {
	f := startBridge(t, 0, func(d *bridge.Device) { d.Deny = []string{"halt"} })

	// Wire body in, wire lines out, as `nats req` shows them.
	m := f.rawRequest(t, "katcp.m000.req.echo", `a\_b \@ 3`, nil)
	if got, want := string(m.Data), "#echo first\n!echo ok a\\_b \\@ 3\n"; got != want {
		t.Errorf("echo body %q, want %q", got, want)
	}
	if m.Header.Get(bridge.HeaderStatus) != "ok" || m.Header.Get(bridge.HeaderErrorCode) != "" {
		t.Errorf("echo headers %v", m.Header)
	}
	// JSON both ways, lossless for bytes.
	m = f.rawRequest(t, "katcp.m000.req.echo", `["x y", {"base64": "/w=="}, 7]`, nats.Header{"Content-Type": {"application/json"}, "Accept": {"application/json"}})
	var jr bridge.JSONReply
	if err := json.Unmarshal(m.Data, &jr); err != nil {
		t.Fatal(err)
	}
	if jr.Status != "ok" || len(jr.Args) != 3 || string(jr.Args[0]) != "x y" || string(jr.Args[1]) != "\xff" || string(jr.Args[2]) != "7" || len(jr.Informs) != 1 {
		t.Errorf("JSON reply %s", m.Data)
	}

	tests := []struct {
		subject, body string
		hdr           nats.Header
		code          string
		status        string
		source        string
		text          string
	}{
		{"katcp.m000.req.add", "1 x", nil, "500", "fail", "device", `argument 2: katcp: invalid float "x"`},
		{"katcp.m000.req.bad", "", nil, "400", "invalid", "device", "no way"},
		{"katcp.m000.req.nosuch", "", nil, "404", "", "bridge", "device m000 has no request nosuch"},
		{"katcp.m000.req.halt", "", nil, "403", "", "bridge", "request halt to device m000 is denied by policy"},
		{"katcp.m000.req.echo", `a\q`, nil, "400", "", "bridge", "malformed request body"},
		{"katcp.m000.req.echo", `[1,`, nats.Header{"Content-Type": {"application/json"}}, "400", "", "bridge", "malformed request body"},
		{"katcp.m000.req.echo", "", nats.Header{"Katcp-Timeout": {"soon"}}, "400", "", "bridge", "Katcp-Timeout"},
		{"katcp.m000.req.slow", "", nats.Header{"Katcp-Timeout": {"0.2"}}, "504", "", "bridge", "did not reply within 200ms"},
	}
	// Until the bridge has read the device's ?help, unknown requests go to
	// the device (which answers invalid).
	waitFor(t, "the device's request list", func() bool {
		return f.rawRequest(t, "katcp.m000.req.nosuch", "", nil).Header.Get(bridge.HeaderErrorCode) == "404"
	})
	for _, tt := range tests {
		m := f.rawRequest(t, tt.subject, tt.body, tt.hdr)
		if got := m.Header.Get(bridge.HeaderErrorCode); got != tt.code {
			t.Errorf("%s %q: code %q, want %s (%v)", tt.subject, tt.body, got, tt.code, m.Header)
		}
		if got := m.Header.Get(bridge.HeaderStatus); got != tt.status {
			t.Errorf("%s: Katcp-Status %q, want %q", tt.subject, got, tt.status)
		}
		if got := m.Header.Get(bridge.HeaderSource); got != tt.source {
			t.Errorf("%s: source %q, want %q", tt.subject, got, tt.source)
		}
		if got := m.Header.Get(bridge.HeaderErrorText); !strings.Contains(got, tt.text) {
			t.Errorf("%s: error text %q, want %q", tt.subject, got, tt.text)
		}
	}

	// The Go consumer: typed errors.
	ctx := ctxFor(t)
	r, err := f.client.Request(ctx, "m000", "add", 1, 2.5)
	if err != nil || string(r.Values()[0]) != "3.5" {
		t.Errorf("add: %v %v", r, err)
	}
	if _, err := f.client.Request(ctx, "m000", "add", 1, "x"); !errors.Is(err, katcp.ErrFail) {
		t.Errorf("fail: %v", err)
	}
	if _, err := f.client.Request(ctx, "m000", "halt"); !errors.Is(err, natsclient.ErrDenied) {
		t.Errorf("denied: %v", err)
	}
	if _, err := f.client.Request(ctx, "nobody", "help"); !errors.Is(err, natsclient.ErrNotServed) {
		t.Errorf("unserved device: %v", err)
	}
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if _, err := f.client.Request(short, "m000", "slow"); !errors.Is(err, natsclient.ErrTimeout) && !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("slow: %v", err)
	}
	if got := f.b.Metrics().Requests("m000", "ok"); got < 3 {
		t.Errorf("ok requests counted %d", got)
	}
}

func TestBridgeNotConnectedIsImmediate(t *testing.T) {
	f := startBridge(t, 0, nil)
	f.dev.Stop()
	waitFor(t, "disconnected status", func() bool {
		st, err := f.client.Status(ctxFor(t), "m000")
		return err == nil && st.State == "disconnected"
	})
	start := time.Now()
	_, err := f.client.Request(ctxFor(t), "m000", "add", 1, 2)
	if !errors.Is(err, natsclient.ErrNotConnected) {
		t.Fatalf("err = %v", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("not-connected error took %v", time.Since(start))
	}
	f.dev.Restart()
	waitFor(t, "reconnection", func() bool {
		_, err := f.client.Request(ctxFor(t), "m000", "add", 1, 2)
		return err == nil
	})
}

func TestBridgeReadOnlyAndAllow(t *testing.T) {
	f := startBridge(t, 0, func(d *bridge.Device) { d.ReadOnly = true })
	ctx := ctxFor(t)
	if _, err := f.client.Request(ctx, "m000", "add", 1, 2); !errors.Is(err, natsclient.ErrDenied) {
		t.Errorf("add on a read-only device: %v", err)
	}
	if _, err := f.client.Request(ctx, "m000", "sensor-value", "pump.speed"); err != nil {
		t.Errorf("sensor-value on a read-only device: %v", err)
	}
	g := startBridge(t, 0, func(d *bridge.Device) { d.Allow = []string{"echo"} })
	if _, err := g.client.Request(ctx, "m000", "echo"); err != nil {
		t.Errorf("allowed: %v", err)
	}
	if _, err := g.client.Request(ctx, "m000", "add", 1, 2); !errors.Is(err, natsclient.ErrDenied) {
		t.Errorf("not allowed: %v", err)
	}
}

func TestBridgeLargeReplyInChunks(t *testing.T) {
	f := startBridge(t, 16<<10, nil)
	for i := range 2000 {
		f.dev.AddSensor(katcp.SensorInteger, fmt.Sprintf("bulk.sensor-%04d", i), katcp.SensorOptions{Description: "a sensor with a long enough description"})
	}
	r, err := f.client.Request(ctxFor(t), "m000", "sensor-list")
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Informs) != 2002 || r.Arg(1) != "2002" {
		t.Fatalf("%d informs, reply %v", len(r.Informs), r.Message)
	}
	if r.Informs[2001].Arg(0) != "pump.speed" {
		t.Errorf("last inform %v", r.Informs[2001])
	}
	// A refusal as large travels the same way, headers on the last part.
	f.dev.Handle("bigfail", "", func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		for i := range 2000 {
			w.Inform(i, "a line long enough to need several messages")
		}
		return katcp.Fail("too much")
	})
	waitFor(t, "bigfail to be known", func() bool {
		_, err := f.client.Request(ctxFor(t), "m000", "bigfail")
		return !errors.Is(err, natsclient.ErrUnknown)
	})
	r, err = f.client.Request(ctxFor(t), "m000", "bigfail")
	var re *katcp.ReplyError
	if !errors.As(err, &re) || re.Reason != "too much" || r == nil || len(r.Informs) != 2000 {
		t.Errorf("large refusal: %v, %d informs", err, len(r.Informs))
	}
}

func TestBridgeSensorsInformsAndStatus(t *testing.T) {
	f := startBridge(t, 0, nil)
	var mu sync.Mutex
	updates := map[string][]bridge.SensorUpdate{}
	var informs []katcp.Message
	var statuses []bridge.Status
	var parents []trace.SpanContext
	_, err := f.client.SubscribeSensors("*", ">", func(ctx context.Context, u bridge.SensorUpdate) {
		mu.Lock()
		updates[u.Name] = append(updates[u.Name], u)
		parents = append(parents, trace.SpanContextFromContext(ctx))
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.client.SubscribeInforms("m000", "*", func(ctx context.Context, device string, m katcp.Message) {
		mu.Lock()
		informs = append(informs, m)
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	stSub, err := f.nc.Subscribe("katcp.m000.status", func(m *nats.Msg) {
		var st bridge.Status
		if json.Unmarshal(m.Data, &st) == nil {
			mu.Lock()
			statuses = append(statuses, st)
			mu.Unlock()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stSub.Unsubscribe()
	f.nc.Flush()

	speed, _ := f.dev.Server().Sensors().Get("pump.speed")
	speed.Set(99.5)
	waitFor(t, "a sensor update", func() bool {
		mu.Lock()
		defer mu.Unlock()
		us := updates["pump.speed"]
		return len(us) > 0 && num(us[len(us)-1].Value) == 99.5
	})
	mu.Lock()
	u := updates["pump.speed"][len(updates["pump.speed"])-1]
	if u.Device != "m000" || u.Type != "float" || u.Status != "nominal" || u.Timestamp < 1e9 {
		t.Errorf("update %+v", u)
	}
	if !parents[len(parents)-1].IsValid() {
		t.Error("sensor update carries no trace context")
	}
	mu.Unlock()

	log := slogFor(f.dev.Server())
	log("pressure high")
	waitFor(t, "the #log inform", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, m := range informs {
			if m.Name == "log" && m.Arg(3) == "pressure high" {
				return true
			}
		}
		return false
	})

	// The device goes away: sensors become unreachable, the status says so.
	f.dev.Stop()
	waitFor(t, "unreachable", func() bool {
		mu.Lock()
		defer mu.Unlock()
		us := updates["pump.speed"]
		return len(us) > 0 && us[len(us)-1].Status == "unreachable" && us[len(us)-1].Value == nil
	})
	waitFor(t, "a disconnected status", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(statuses) > 0 && statuses[len(statuses)-1].State == "disconnected"
	})
	// It comes back: sensors resume.
	f.dev.Restart()
	speed.Set(7.0)
	waitFor(t, "updates after the restart", func() bool {
		mu.Lock()
		defer mu.Unlock()
		us := updates["pump.speed"]
		return len(us) > 0 && num(us[len(us)-1].Value) == 7.0
	})
	waitFor(t, "the string sensor's value, in base64", func() bool {
		mu.Lock()
		defer mu.Unlock()
		us := updates["note"]
		if len(us) == 0 {
			return false
		}
		v, ok := us[len(us)-1].Value.(map[string]any)
		return ok && v["base64"] == "Y2Fm6Q=="
	})
}

func slogFor(s *katcp.Server) func(string) {
	return func(msg string) { slog.New(s.LogHandler("device")).Warn(msg) }
}

func TestBridgeTraceAcrossHops(t *testing.T) {
	f := startBridge(t, 0, nil)
	ctx, span := f.tp.Tracer("test").Start(ctxFor(t), "caller")
	if _, err := f.client.Request(ctx, "m000", "add", 1, 2); err != nil {
		t.Fatal(err)
	}
	span.End()
	root := span.SpanContext().TraceID()
	byName := map[string]sdktrace.ReadOnlySpan{}
	waitFor(t, "the bridge's spans", func() bool {
		for _, s := range f.spans.Ended() {
			if s.SpanContext().TraceID() == root {
				byName[s.Name()] = s
			}
		}
		return byName["katcp add"] != nil && byName["process katcp.{device}.req.{request}"] != nil
	})
	send := byName["send katcp.{device}.req.{request}"]
	process := byName["process katcp.{device}.req.{request}"]
	hop := byName["katcp add"]
	if send == nil || send.Parent().SpanID() != span.SpanContext().SpanID() {
		t.Fatalf("send span %v", send)
	}
	if process.Parent().SpanID() != send.SpanContext().SpanID() {
		t.Errorf("process span's parent %v, want the send span", process.Parent().SpanID())
	}
	if hop.Parent().SpanID() != process.SpanContext().SpanID() || hop.SpanKind() != trace.SpanKindClient {
		t.Errorf("katcp span's parent %v kind %v", hop.Parent().SpanID(), hop.SpanKind())
	}
	attrs := map[string]string{}
	for _, a := range hop.Attributes() {
		attrs[string(a.Key)] = a.Value.Emit()
	}
	if attrs["rpc.system"] != "katcp" || attrs["rpc.method"] != "add" || attrs["katcp.status"] != "ok" || attrs["katcp.mid"] == "" {
		t.Errorf("katcp span attributes %v", attrs)
	}
}

func TestBridgeMicroService(t *testing.T) {
	f := startBridge(t, 0, nil)
	m, err := f.nc.Request("$SRV.INFO.katcp-bridge", nil, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var info micro.Info
	if err := json.Unmarshal(m.Data, &info); err != nil {
		t.Fatal(err)
	}
	if len(info.Endpoints) != 1 || info.Endpoints[0].Subject != "katcp.m000.req.*" || info.Endpoints[0].Metadata["address"] != f.dev.Addr() ||
		info.Endpoints[0].Metadata["owner"] == "" || info.Metadata["replica"] == "" || info.Metadata["leases"] != "false" {
		t.Errorf("info %+v", info)
	}
	m, err = f.nc.Request("$SRV.STATS.katcp-bridge", nil, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(m.Data), `"state":"connected"`) {
		t.Errorf("stats %s", m.Data)
	}
}

func TestBridgeConfigValidate(t *testing.T) {
	bad := []bridge.Config{
		{Devices: []bridge.Device{{Name: "a.b", Address: "h:1"}}},
		{Devices: []bridge.Device{{Name: "a", Address: "nowhere"}}},
		{Devices: []bridge.Device{{Name: "a", Address: "h:1"}, {Name: "a", Address: "h:2"}}},
		{Devices: []bridge.Device{{Name: "a", Address: "h:1", Sensors: []bridge.SensorSubscription{{Pattern: "/(/"}}}}},
		{Devices: []bridge.Device{{Name: "a", Address: "h:1", Sensors: []bridge.SensorSubscription{{Strategy: "period"}}}}},
		{Devices: []bridge.Device{{Name: "a", Address: "h:1", Deny: []string{"bad_name"}}}},
		{Prefix: "a..b"},
	}
	for i, c := range bad {
		if err := c.Validate(); err == nil {
			t.Errorf("config %d accepted", i)
		}
	}
}

// num reads a sensor value published as a JSON number.
func num(v any) float64 {
	n, ok := v.(json.Number)
	if !ok {
		return math.NaN()
	}
	f, _ := n.Float64()
	return f
}

func TestBridgeLastValues(t *testing.T) {
	f := startBridge(t, -1, nil) // with JetStream
	if !f.b.LastValues() {
		t.Fatal("last values off although JetStream is there")
	}
	speed, _ := f.dev.Server().Sensors().Get("pump.speed")
	speed.Set(50.0)
	waitFor(t, "the update to be kept", func() bool {
		m, err := f.nc.Request("$JS.API.DIRECT.GET.KATCP_SENSORS", []byte(`{"last_by_subj":"katcp.m000.sensor.pump.speed"}`), time.Second)
		return err == nil && strings.Contains(string(m.Data), `"value":50`)
	})
	// A late subscriber: the last value of every sensor, then live updates.
	var mu sync.Mutex
	var got []bridge.SensorUpdate
	stop, err := f.client.SubscribeLastSensors(ctxFor(t), "m000", ">", func(_ context.Context, u bridge.SensorUpdate) {
		mu.Lock()
		got = append(got, u)
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	waitFor(t, "the last values", func() bool {
		mu.Lock()
		defer mu.Unlock()
		names := map[string]bool{}
		for _, u := range got {
			names[u.Name] = true
		}
		return names["pump.speed"] && names["note"]
	})
	mu.Lock()
	first := got[0]
	for _, u := range got {
		if u.Name == "pump.speed" {
			first = u
			break
		}
	}
	mu.Unlock()
	if num(first.Value) != 50 {
		t.Errorf("last value %v, want 50", first.Value)
	}
	speed.Set(60.0)
	waitFor(t, "a live update after the last values", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) > 0 && got[len(got)-1].Name == "pump.speed" && num(got[len(got)-1].Value) == 60
	})
}

// Sensor updates and informs are published under producer spans, one per
// batch the device's connection hands over (at most 256 messages), and
// every message carries its batch span's context.
func TestBridgePublishSpans(t *testing.T) {
	f := startBridge(t, 0, func(d *bridge.Device) {
		d.Sensors = []bridge.SensorSubscription{{Pattern: "*", Strategy: "event"}} // every change
	})
	var mu sync.Mutex
	parents := map[string]int{} // parent span id -> messages
	ours := map[string]bool{}   // parents of the messages this test caused
	got := 0
	last := false
	sub, err := f.nc.Subscribe("katcp.m000.>", func(m *nats.Msg) {
		if strings.Contains(m.Subject, ".req.") || strings.HasSuffix(m.Subject, ".status") {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		tp := strings.Split(m.Header.Get("traceparent"), "-")
		if len(tp) != 4 {
			t.Errorf("%s: traceparent %q", m.Subject, m.Header.Get("traceparent"))
			return
		}
		parents[tp[2]]++
		// The initial values may have been published, in part, before
		// this subscription: their batch is not checked.
		if strings.HasSuffix(m.Subject, ".log") || (strings.HasSuffix(m.Subject, ".pump.speed") && !strings.HasSuffix(string(m.Data), `"value":12.5}`)) {
			ours[tp[2]] = true
			got++
		}
		if strings.HasSuffix(m.Subject, ".pump.speed") && strings.HasSuffix(string(m.Data), `"value":1000}`) {
			last = true
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	f.nc.Flush()
	speed, _ := f.dev.Server().Sensors().Get("pump.speed")
	for i := 1; i <= 1000; i++ {
		speed.Set(float64(i))
	}
	slogFor(f.dev.Server())("a log inform")
	waitFor(t, "the last update", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return last
	})

	// Every parent is an ended producer span whose message count is the
	// number of messages that name it.
	waitFor(t, "the publish spans", func() bool {
		mu.Lock()
		defer mu.Unlock()
		ended := map[string]bool{}
		for _, s := range f.spans.Ended() {
			ended[s.SpanContext().SpanID().String()] = true
		}
		for id := range ours {
			if !ended[id] {
				return false
			}
		}
		return true
	})
	mu.Lock()
	defer mu.Unlock()
	kinds := map[string]int{}
	for _, s := range f.spans.Ended() {
		id := s.SpanContext().SpanID().String()
		if !ours[id] {
			continue
		}
		n := parents[id]
		kinds[s.Name()]++
		count := 1
		attrs := map[string]string{}
		for _, a := range s.Attributes() {
			attrs[string(a.Key)] = a.Value.Emit()
			if a.Key == "messaging.batch.message_count" {
				count = int(a.Value.AsInt64())
			}
		}
		if s.SpanKind() != trace.SpanKindProducer || attrs["messaging.system"] != "nats" || attrs["katcp.device"] != "m000" {
			t.Errorf("span %s: kind %v attributes %v", s.Name(), s.SpanKind(), attrs)
		}
		if count != n || count > 256 {
			t.Errorf("span %s: message count %d, %d messages name it", s.Name(), count, n)
		}
		if n == 1 && attrs["messaging.destination.name"] == "" {
			t.Errorf("span %s of one message names no destination: %v", s.Name(), attrs)
		}
	}
	if kinds["publish katcp.{device}.sensor"] == 0 || kinds["publish katcp.{device}.inform"] == 0 {
		t.Errorf("publish spans %v", kinds)
	}
	if got < 2 { // the client's queue may drop updates in such a flood, not all of them
		t.Errorf("%d messages, want the updates and the inform", got)
	}
}

// A Shutdown whose context ends with requests in flight ends them at
// once: their callers get the not-served error, and Shutdown says so.
func TestBridgeForcedShutdownEndsRequests(t *testing.T) {
	f := startBridge(t, 0, nil)
	got := make(chan *nats.Msg, 1)
	go func() {
		m, err := f.nc.Request("katcp.m000.req.slow", nil, 30*time.Second)
		if err != nil {
			t.Errorf("slow request: %v", err)
		}
		got <- m
	}()
	waitFor(t, "the request in flight", func() bool {
		var b strings.Builder
		f.b.Metrics().WritePrometheus(&b)
		return strings.Contains(b.String(), "katcp_bridge_requests_in_flight 1\n")
	})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := f.b.Shutdown(ctx); err == nil || !strings.Contains(err.Error(), "in flight") {
		t.Errorf("Shutdown: %v, want requests still in flight", err)
	}
	m := <-got
	if m == nil {
		return
	}
	if m.Header.Get(bridge.HeaderNotServed) != "true" || m.Header.Get(bridge.HeaderErrorCode) != "503" {
		t.Errorf("reply headers %v", m.Header)
	}
}
