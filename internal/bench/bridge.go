package bench

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/embedded"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/katcp-go/katcp-bridge/bridge"
	"github.com/katcp-go/katcp-bridge/katcp"
)

func startNATS() (*server.Server, error) {
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true})
	if err != nil {
		return nil, err
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		return nil, fmt.Errorf("nats-server not ready")
	}
	return ns, nil
}

// rawNATSResponder answers every request on subject with "!echo ok hello";
// with traced, each reply has a sampled traceparent header.
func rawNATSResponder(url, subject string, traced bool) (*nats.Conn, error) {
	nc, err := nats.Connect(url)
	if err != nil {
		return nil, err
	}
	reply := []byte("!echo ok hello\n")
	_, err = nc.Subscribe(subject, func(m *nats.Msg) {
		if traced {
			m.RespondMsg(&nats.Msg{Data: reply, Header: nats.Header{"traceparent": {sampledParent}}})
		} else {
			m.Respond(reply)
		}
	})
	return nc, err
}

// idealPipelined is the ideal bridge for many requests in flight: n
// subscriptions (subject.0 ... subject.<n-1>), each forwarding requests
// as lines over its own raw TCP connection to the echo server, pipelined
// (a writer goroutine sends what has gathered in one write), with one
// goroutine per connection answering the replies in order. It is the two
// hops with nothing else: no KATCP, no headers, no spans.
//
// With katcpDevice, the far end is a KATCP device: informs (its
// greeting) are skipped. With statusHeader, the replies carry the
// Katcp-Status header, as the bridge's do.
func idealPipelined(url, subject, echoAddr string, n int, katcpDevice, statusHeader bool) (func(), error) {
	nc, err := nats.Connect(url)
	if err != nil {
		return nil, err
	}
	var conns []net.Conn
	var wg sync.WaitGroup
	done := make(chan struct{})
	stop := func() {
		nc.Close()
		for _, c := range conns {
			c.Close()
		}
		close(done)
		wg.Wait()
	}
	for i := range n {
		c, err := net.Dial("tcp", echoAddr)
		if err != nil {
			stop()
			return nil, err
		}
		conns = append(conns, c)
		replies := make(chan string, 4096) // reply subjects, in the order sent
		var mu sync.Mutex
		var pending, spare []byte
		kick := make(chan struct{}, 1)
		_, err = nc.Subscribe(fmt.Sprintf("%s.%d", subject, i), func(m *nats.Msg) {
			mu.Lock()
			pending = append(append(append(pending, "?echo "...), m.Data...), '\n')
			replies <- m.Reply
			mu.Unlock()
			select {
			case kick <- struct{}{}:
			default:
			}
		})
		if err != nil {
			stop()
			return nil, err
		}
		wg.Add(1)
		go func() { // writes what has gathered, in one go
			defer wg.Done()
			for {
				select {
				case <-kick:
				case <-done:
					return
				}
				mu.Lock()
				out := pending
				pending, spare = spare[:0], nil
				mu.Unlock()
				if _, err := c.Write(out); err != nil {
					return
				}
				mu.Lock()
				spare = out[:0]
				mu.Unlock()
			}
		}()
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := bufio.NewReader(c)
			for {
				l, err := r.ReadSlice('\n')
				if err != nil {
					return
				}
				switch {
				case katcpDevice && l[0] != '!':
				case statusHeader:
					nc.PublishMsg(&nats.Msg{Subject: <-replies, Data: l, Header: nats.Header{bridge.HeaderStatus: {"ok"}}})
				default:
					nc.Publish(<-replies, l)
				}
			}
		}()
	}
	return stop, nil
}

// sampledParent is a W3C traceparent of a sampled trace, as a traced
// bridge puts on its replies and publications.
const sampledParent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

// idealBridge forwards each request as one line to a raw TCP echo server
// and answers with the line: the two hops and nothing else.
func idealBridge(url, subject, echoAddr string) (func(), error) {
	nc, err := nats.Connect(url)
	if err != nil {
		return nil, err
	}
	c, err := net.Dial("tcp", echoAddr)
	if err != nil {
		nc.Close()
		return nil, err
	}
	r := bufio.NewReader(c)
	var mu sync.Mutex
	_, err = nc.Subscribe(subject, func(m *nats.Msg) {
		mu.Lock()
		c.Write(append(append([]byte("?echo "), m.Data...), '\n'))
		line, _ := r.ReadSlice('\n')
		out := append([]byte(nil), line...)
		mu.Unlock()
		m.Respond(out)
	})
	return func() { nc.Close(); c.Close() }, err
}

func natsRequests(url, subject string, d time.Duration, workers int, subjects func(i int) string) (float64, error) {
	nc, err := nats.Connect(url)
	if err != nil {
		return 0, err
	}
	defer nc.Close()
	var next atomic.Int64
	return rate(d, workers, func() error {
		s := subject
		if subjects != nil {
			s = subjects(int(next.Add(1)))
		}
		m, err := nc.Request(s, []byte("hello"), 10*time.Second)
		if err != nil {
			return err
		}
		if m.Header.Get(bridge.HeaderErrorCode) != "" {
			return fmt.Errorf("%s: %s", s, m.Header.Get(bridge.HeaderErrorText))
		}
		return nil
	})
}

// rawPublishRate measures plain publishes received by one subscriber,
// paced as bridgeSensorRate is; with traced, each message has a
// traceparent header.
func rawPublishRate(url string, d time.Duration, traced bool) (float64, error) {
	sub, err := nats.Connect(url)
	if err != nil {
		return 0, err
	}
	defer sub.Close()
	p := newPacer()
	s, err := sub.Subscribe("raw.sensor", func(*nats.Msg) { p.received() })
	if err != nil {
		return 0, err
	}
	s.SetPendingLimits(-1, -1)
	sub.Flush()
	pub, err := nats.Connect(url)
	if err != nil {
		return 0, err
	}
	defer pub.Close()
	payload := []byte(`{"device":"d","name":"s.0","type":"integer","timestamp":1700000000.5,"status":"nominal","value":12345}`)
	msg := &nats.Msg{Subject: "raw.sensor", Data: payload, Header: nats.Header{"traceparent": {sampledParent}}}
	r, _ := paced(d, p, sensorWindow, func(i int64) {
		if traced {
			pub.PublishMsg(msg)
		} else {
			pub.Publish("raw.sensor", payload)
		}
	})
	return r, nil
}

// sensorWindow is how many sensor updates the sensor rows keep in flight.
const sensorWindow = 4096

// rawSubject is the subject of the raw responder, with traceparent
// headers on its replies or not.
func rawSubject(traced bool) string {
	if traced {
		return "raw.traced"
	}
	return "raw.req"
}

// benchBridge runs a bridge over n in-process devices.
type benchBridge struct {
	devs []*device
	nc   *nats.Conn
	b    *bridge.Bridge
}

func startBridge(url string, n, sensors int, tp trace.TracerProvider) (*benchBridge, error) {
	bb := &benchBridge{}
	var devices []bridge.Device
	for i := range n {
		d, err := startDevice(sensors)
		if err != nil {
			bb.close()
			return nil, err
		}
		bb.devs = append(bb.devs, d)
		devices = append(devices, bridge.Device{Name: fmt.Sprintf("d%03d", i), Address: d.addr,
			Sensors: []bridge.SensorSubscription{{Pattern: "*", Strategy: "event"}}})
	}
	nc, err := nats.Connect(url)
	if err != nil {
		bb.close()
		return nil, err
	}
	bb.nc = nc
	b, err := bridge.New(nc, bridge.Config{Devices: devices, TracerProvider: tp, MaxInFlight: 1024})
	if err != nil {
		bb.close()
		return nil, err
	}
	if err := b.Start(); err != nil {
		bb.close()
		return nil, err
	}
	bb.b = b
	deadline := time.Now().Add(30 * time.Second)
	for b.Metrics() != nil && time.Now().Before(deadline) {
		if strings.Contains(metricsText(b), fmt.Sprintf("katcp_bridge_devices_connected %d\n", n)) {
			return bb, nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	bb.close()
	return nil, fmt.Errorf("devices did not connect")
}

func metricsText(b *bridge.Bridge) string {
	var sb strings.Builder
	b.Metrics().WritePrometheus(&sb)
	return sb.String()
}

func (bb *benchBridge) close() {
	if bb.b != nil {
		bb.b.Shutdown(context.Background())
	}
	if bb.nc != nil {
		bb.nc.Close()
	}
	for _, d := range bb.devs {
		d.close()
	}
}

// alwaysOn is tracing with the SDK, every span sampled, and an exporter
// that drops them.
func alwaysOn() (*sdktrace.TracerProvider, func()) {
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()), sdktrace.WithBatcher(discard{}))
	return tp, func() { tp.Shutdown(context.Background()) }
}

type discard struct{}

func (discard) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error { return nil }
func (discard) Shutdown(context.Context) error                             { return nil }

// BridgeRows measures the bridge rows, with tracing off and on.
func BridgeRows(o Options) ([]Row, error) {
	ns, err := startNATS()
	if err != nil {
		return nil, err
	}
	defer ns.Shutdown()
	url := ns.ClientURL()
	echo, err := StartEchoServer()
	if err != nil {
		return nil, err
	}
	defer echo.Close()
	stopIdeal, err := idealBridge(url, "ideal.req", echo.Addr())
	if err != nil {
		return nil, err
	}
	defer stopIdeal()
	raw, err := rawNATSResponder(url, rawSubject(false), false)
	if err != nil {
		return nil, err
	}
	defer raw.Close()
	kdev, err := startDevice(0)
	if err != nil {
		return nil, err
	}
	defer kdev.close()
	// The best any bridge can do in the 100-in-flight row, against the
	// same baseline: the ideal bridge, pipelined; then with what the row
	// and the contract add, one at a time (a KATCP device, the
	// Katcp-Status header on replies).
	refs := []struct {
		prefix, addr              string
		katcpDevice, statusHeader bool
		name, note                string
		subjects                  [10]string
	}{
		{prefix: "idealp", addr: echo.Addr(), name: "  reference: ideal bridge, pipelined, 100 in flight", note: "two hops and nothing else: the ceiling of the row above"},
		{prefix: "idealn", addr: kdev.addr, katcpDevice: true, name: "  reference: the same, KATCP device", note: "the ceiling with our katcp.Server as the device"},
		{prefix: "idealk", addr: kdev.addr, katcpDevice: true, statusHeader: true, name: "  reference: the same, KATCP device, status header", note: "and with the reply header the contract requires"},
	}
	for i := range refs {
		ref := &refs[i]
		stop, err := idealPipelined(url, ref.prefix, ref.addr, len(ref.subjects), ref.katcpDevice, ref.statusHeader)
		if err != nil {
			return nil, err
		}
		defer stop()
		for j := range ref.subjects {
			ref.subjects[j] = fmt.Sprintf("%s.%d", ref.prefix, j)
		}
	}
	rawTraced, err := rawNATSResponder(url, rawSubject(true), true)
	if err != nil {
		return nil, err
	}
	defer rawTraced.Close()

	var rows []Row
	tpOn, stopTracing := alwaysOn()
	defer stopTracing()
	// One bridge, its tracing switched on and off: the comparison below
	// alternates the two on the same bridge, devices and connections.
	sw := &switchTP{sdk: tpOn, off: noop.NewTracerProvider()}
	bb, err := startBridge(url, 10, 1, sw)
	if err != nil {
		return nil, err
	}
	defer bb.close()
	var tenSubjects [10]string
	for i := range tenSubjects {
		tenSubjects[i] = fmt.Sprintf("katcp.d%03d.req.echo", i)
	}
	// natsRaw measures the raw NATS side of row k, with a traceparent
	// header on each reply or publication or not.
	natsRaw := func(k string, traced bool) func() (float64, error) {
		return func() (float64, error) {
			switch k {
			case "one":
				return natsRequests(url, rawSubject(traced), o.Duration, 1, nil)
			case "inflight":
				return natsRequests(url, rawSubject(traced), o.Duration, 100, nil)
			}
			return rawPublishRate(url, o.Duration, traced)
		}
	}
	var delivered float64
	ours := map[string]func() (float64, error){
		"one": func() (float64, error) {
			return natsRequests(url, "", o.Duration, 1, func(int) string { return "katcp.d000.req.echo" })
		},
		"inflight": func() (float64, error) {
			// No formatting per request: the baseline does none.
			return natsRequests(url, "", o.Duration, 100, func(i int) string { return tenSubjects[i%10] })
		},
		"sensors": func() (float64, error) { return bridgeSensorRate(url, bb, o.Duration, &delivered) },
	}
	for _, traced := range []bool{false, true} {
		if (o.Tracing == "on" && !traced) || (o.Tracing == "off" && traced) {
			continue
		}
		sw.on.Store(traced)
		label := "tracing off"
		if traced {
			label = "tracing on"
		}
		if o.wants("one") {
			b, u, spread, err := o.pair(
				func() (float64, error) { return natsRequests(url, "ideal.req", o.Duration, 1, nil) },
				ours["one"])
			if err != nil {
				return nil, err
			}
			// Round-trip time ratio: ours over the ideal bridge's.
			rows = append(rows, Row{Name: "bridge: one request at a time (" + label + ")", Baseline: "ideal bridge", Base: b, Ours: u, Unit: "req/s", Ratio: b / u, Target: 1.15, Spread: spread + " (ratio = round trip ours/ideal)"})
		}
		if o.wants("inflight") {
			b, u, spread, err := o.pair(
				natsRaw("inflight", false),
				ours["inflight"])
			if err != nil {
				return nil, err
			}
			rows = append(rows, Row{Name: "bridge: 100 in flight over 10 devices (" + label + ")", Baseline: "raw NATS 100 in flight", Base: b, Ours: u, Unit: "req/s", Ratio: u / b, Target: 0.7, Higher: true, Spread: spread})
			if !traced {
				for _, ref := range refs {
					b, u, spread, err := o.pair(natsRaw("inflight", false), func() (float64, error) {
						return natsRequests(url, "", o.Duration, 100, func(i int) string { return ref.subjects[i%10] })
					})
					if err != nil {
						return nil, err
					}
					rows = append(rows, Row{Name: ref.name, Baseline: "raw NATS 100 in flight", Base: b, Ours: u, Unit: "req/s", Ratio: u / b, Info: true, Spread: spread + " (" + ref.note + ")"})
				}
			}
		}
		if o.wants("sensors") {
			b, u, spread, err := o.pair(
				natsRaw("sensors", false),
				ours["sensors"])
			if err != nil {
				return nil, err
			}
			rows = append(rows, Row{Name: "bridge: sensor updates device -> NATS subscriber (" + label + ")", Baseline: "raw NATS publish", Base: b, Ours: u, Unit: "updates/s", Ratio: u / b, Target: 0.5, Higher: true, Spread: spread + fmt.Sprintf(" (last run delivered %.0f%% of the updates set)", 100*delivered)})
		}
	}
	if o.Tracing != "both" && o.Tracing != "" {
		return rows, nil
	}
	// Tracing's cost: ours with tracing off and on, alternately.
	for _, k := range []string{"one", "inflight", "sensors"} {
		if !o.wants(k) {
			continue
		}
		f := ours[k]
		off, on, spread, err := o.pair(
			func() (float64, error) { sw.on.Store(false); return f() },
			func() (float64, error) { sw.on.Store(true); return f() })
		if err != nil {
			return nil, err
		}
		rows = append(rows, Row{Name: "tracing on vs off: " + k, Baseline: "tracing off", Base: off, Ours: on, Unit: "rate", Ratio: off/on - 1, Target: 0.10, Spread: spread + " (ratio = slowdown, measured alternately)"})
		// What the trace context alone costs NATS: the same traffic with
		// and without a traceparent header, no bridge, no spans.
		off, on, spread, err = o.pair(natsRaw(k, false), natsRaw(k, true))
		if err != nil {
			return nil, err
		}
		rows = append(rows, Row{Name: "  reference: raw NATS " + k + ", traceparent header", Baseline: "no header", Base: off, Ours: on, Unit: "rate", Ratio: off/on - 1, Info: true, Spread: spread + " (slowdown from the header alone: the floor of the row above)"})
	}
	return rows, nil
}

// switchTP is a tracer provider whose tracers use the SDK or do nothing,
// as on says, so that one bridge can be measured both ways.
type switchTP struct {
	embedded.TracerProvider
	on  atomic.Bool
	sdk trace.TracerProvider
	off trace.TracerProvider
}

func (s *switchTP) Tracer(name string, opts ...trace.TracerOption) trace.Tracer {
	return &switchTracer{s: s, on: s.sdk.Tracer(name, opts...), off: s.off.Tracer(name, opts...)}
}

type switchTracer struct {
	embedded.Tracer
	s       *switchTP
	on, off trace.Tracer
}

func (t *switchTracer) Start(ctx context.Context, name string, opts ...trace.SpanStartOption) (context.Context, trace.Span) {
	if t.s.on.Load() {
		return t.on.Start(ctx, name, opts...)
	}
	return t.off.Start(ctx, name, opts...)
}

// bridgeSensorRate sets one sensor of device 0 as fast as the bridge
// delivers the updates to a NATS subscriber (keeping sensorWindow in
// flight) and counts the updates the subscriber receives. delivered is
// set to the share of the updates set that reached the subscriber.
//
// Pacing stands for a device on its own machine: setting the sensor
// flat out in this process would spend one of the two cores on updates
// that the device's connection then drops, and measure that contention
// rather than the bridge.
func bridgeSensorRate(url string, bb *benchBridge, d time.Duration, delivered *float64) (float64, error) {
	sub, err := nats.Connect(url)
	if err != nil {
		return 0, err
	}
	defer sub.Close()
	p := newPacer()
	s, err := sub.Subscribe("katcp.d000.sensor.>", func(*nats.Msg) { p.received() })
	if err != nil {
		return 0, err
	}
	s.SetPendingLimits(-1, -1)
	sub.Flush()
	sensor, _ := bb.devs[0].srv.Sensors().Get("s.0")
	r, share := paced(d, p, sensorWindow, func(i int64) { sensor.Set(i) })
	*delivered = share
	return r, nil
}

// MemoryRow measures the bridge's memory per connected, idle device with
// n devices simulated by a child process (so that their memory is not
// counted).
func MemoryRow(n int) (Row, error) {
	self, err := os.Executable()
	if err != nil {
		return Row{}, err
	}
	port, err := freePortRange(n)
	if err != nil {
		return Row{}, err
	}
	child := exec.Command(self, "--sim-devices", strconv.Itoa(n), "--sim-port", strconv.Itoa(port))
	child.Stderr = os.Stderr
	stdout, _ := child.StdoutPipe()
	if err := child.Start(); err != nil {
		return Row{}, err
	}
	defer func() { child.Process.Kill(); child.Wait() }()
	if _, err := bufio.NewReader(stdout).ReadString('\n'); err != nil { // "ready"
		return Row{}, fmt.Errorf("simulated devices: %w", err)
	}
	ns, err := startNATS()
	if err != nil {
		return Row{}, err
	}
	defer ns.Shutdown()
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		return Row{}, err
	}
	defer nc.Close()
	before := heap()
	var devices []bridge.Device
	for i := range n {
		devices = append(devices, bridge.Device{Name: fmt.Sprintf("d%04d", i), Address: fmt.Sprintf("127.0.0.1:%d", port+i)})
	}
	b, err := bridge.New(nc, bridge.Config{Devices: devices, TracerProvider: noop.NewTracerProvider()})
	if err != nil {
		return Row{}, err
	}
	if err := b.Start(); err != nil {
		return Row{}, err
	}
	defer b.Shutdown(context.Background())
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(metricsText(b), fmt.Sprintf("katcp_bridge_devices_connected %d\n", n)) {
		if time.Now().After(deadline) {
			return Row{}, fmt.Errorf("the %d devices did not all connect", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(time.Second) // settle: sensor subscriptions, ?help
	per := float64(heap()-before) / float64(n)
	return Row{Name: fmt.Sprintf("bridge: memory per connected, idle device (%d devices)", n), Ours: per / 1024, Unit: "KiB", Ratio: per / 1024, Target: 64}, nil
}

// heap returns the bytes in use (heap and goroutine stacks) after a GC.
func heap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse + ms.StackInuse
}

func freePortRange(n int) (int, error) {
	for try := 0; try < 50; try++ {
		base := 20000 + (os.Getpid()*7+try*997)%30000
		ok := true
		var ls []net.Listener
		for i := range n {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", base+i))
			if err != nil {
				ok = false
				break
			}
			ls = append(ls, l)
		}
		for _, l := range ls {
			l.Close()
		}
		if ok {
			return base, nil
		}
	}
	return 0, fmt.Errorf("no range of %d free ports", n)
}

// RunSimDevices serves n idle simulated devices on consecutive ports and
// prints "ready"; it is the child process of MemoryRow.
func RunSimDevices(ctx context.Context, n, port int) error {
	var servers []*katcp.Server
	for i := range n {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port+i))
		if err != nil {
			return err
		}
		s := katcp.NewServer(katcp.ServerConfig{DeviceName: fmt.Sprintf("idle%04d", i)})
		s.Sensors().Add(katcp.MustSensor(katcp.SensorInteger, "counter", katcp.SensorOptions{}))
		servers = append(servers, s)
		go s.Serve(l)
	}
	fmt.Println("ready")
	<-ctx.Done()
	for _, s := range servers {
		s.Close()
	}
	return nil
}
