// Package e2e runs the real binaries (katcp-bridge, katcp-sim, katcpcmd)
// as separate processes against a real nats-server process, all on
// 127.0.0.1, and checks them from the outside.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

var bin string // directory of the built binaries

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "katcp-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = dir
	goTool := filepath.Join(runtime.GOROOT(), "bin", "go")
	for name, pkg := range map[string]string{
		"katcp-bridge": "../cmd/katcp-bridge",
		"katcp-sim":    "../cmd/katcp-sim",
		"katcpcmd":     "../cmd/katcpcmd",
		"nats-server":  "github.com/nats-io/nats-server/v2",
	} {
		out, err := exec.Command(goTool, "build", "-o", filepath.Join(dir, name), pkg).CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n%s", name, err, out)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is a running binary with its output captured.
type proc struct {
	t      *testing.T
	name   string
	cmd    *exec.Cmd
	mu     sync.Mutex
	out    bytes.Buffer // stdout
	errOut bytes.Buffer // stderr
	done   chan struct{}
	waited error
}

type syncWriter struct {
	p *proc
	b *bytes.Buffer
}

func (w syncWriter) Write(b []byte) (int, error) {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	return w.b.Write(b)
}

func start(t *testing.T, name string, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, name: name, cmd: exec.Command(filepath.Join(bin, name), args...), done: make(chan struct{})}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout = syncWriter{p, &p.out}
	p.cmd.Stderr = syncWriter{p, &p.errOut}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.waited = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop(syscall.SIGKILL)
		if t.Failed() {
			t.Logf("%s stderr:\n%s", name, p.stderr())
		}
	})
	return p
}

func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

func (p *proc) stderr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.errOut.String()
}

// stop signals the process and waits for it to exit.
func (p *proc) stop(sig os.Signal) error {
	select {
	case <-p.done:
		return p.waited
	default:
	}
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		p.t.Errorf("%s did not exit after %v", p.name, sig)
	}
	return p.waited
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func startNATS(t *testing.T, port int) *proc {
	t.Helper()
	p := start(t, "nats-server", nil, "-a", "127.0.0.1", "-p", strconv.Itoa(port))
	waitFor(t, "nats-server", func() bool {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return p
}

// katcpcmd runs katcpcmd and returns its stdout and exit code.
func katcpcmd(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "katcpcmd"), args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("katcpcmd: %v", err)
	}
	return out.String(), errOut.String(), code
}

type env struct {
	natsPort  int
	natsURL   string
	nats      *proc
	sim       *proc
	simPort   int
	bridge    *proc
	bridgeEnv []string
	nc        *nats.Conn
}

// setup starts nats-server, two simulated devices and the bridge.
func setup(t *testing.T) *env {
	t.Helper()
	e := &env{natsPort: freePort(t)}
	e.natsURL = fmt.Sprintf("nats://127.0.0.1:%d", e.natsPort)
	e.nats = startNATS(t, e.natsPort)
	e.simPort = freePort(t)
	e.startSim(t)
	e.bridgeEnv = []string{
		"KATCP_BRIDGE_NATS_URL=" + e.natsURL,
		fmt.Sprintf("KATCP_BRIDGE_DEVICES=sim000=127.0.0.1:%d,sim001=127.0.0.1:%d", e.simPort, e.simPort+1),
		"KATCP_BRIDGE_HTTP_ADDR=127.0.0.1:0",
		"KATCP_BRIDGE_SHUTDOWN_TIMEOUT=20s",
		"OTEL_TRACES_EXPORTER=console",
		"OTEL_SERVICE_NAME=katcp-bridge-e2e",
	}
	e.bridge = start(t, "katcp-bridge", e.bridgeEnv)
	nc, err := nats.Connect(e.natsURL, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	e.nc = nc
	waitFor(t, "both devices connected", func() bool {
		return e.state(t, "sim000") == "connected" && e.state(t, "sim001") == "connected"
	})
	return e
}

func (e *env) startSim(t *testing.T) {
	e.sim = start(t, "katcp-sim", nil, "--listen", fmt.Sprintf("127.0.0.1:%d", e.simPort), "--devices", "2", "--sensors", "2", "--period", "50ms")
	waitFor(t, "katcp-sim", func() bool { return strings.Count(e.sim.output(), "127.0.0.1:") >= 2 })
}

func (e *env) state(t *testing.T, device string) string {
	m, err := e.nc.Request("katcp."+device+".status", nil, 2*time.Second)
	if err != nil {
		return ""
	}
	var st struct{ State string }
	json.Unmarshal(m.Data, &st)
	return st.State
}

func TestRequestsThroughTheBridge(t *testing.T) {
	e := setup(t)
	dev := e.natsURL + "/sim000"
	out, stderr, code := katcpcmd(t, dev, "add", "1", "2.5")
	if code != 0 || out != "!add ok 3.5\n" {
		t.Errorf("add: exit %d, %q %q", code, out, stderr)
	}
	out, _, code = katcpcmd(t, dev, "echo", "a b", "")
	if code != 0 || out != "!echo ok a\\_b \\@\n" {
		t.Errorf("echo: exit %d, %q", code, out)
	}
	out, _, code = katcpcmd(t, dev, "fail", "broken")
	if code != 2 || out != "!fail fail broken\n" {
		t.Errorf("fail: exit %d, %q", code, out)
	}
	out, _, code = katcpcmd(t, dev, "help", "add")
	if code != 0 || out != "#help add Add\\_two\\_numbers.\\_?add\\_a\\_b\n!help ok 1\n" {
		t.Errorf("help: exit %d, %q", code, out)
	}
	_, stderr, code = katcpcmd(t, dev, "nosuch")
	if code != 1 || !strings.Contains(stderr, "has no request nosuch") {
		t.Errorf("unknown request: exit %d, %q", code, stderr)
	}
	_, stderr, code = katcpcmd(t, "--request-timeout", "500ms", dev, "slow", "5")
	if code != 1 || !strings.Contains(stderr, "did not reply") && !strings.Contains(stderr, "deadline") {
		t.Errorf("slow: exit %d, %q", code, stderr)
	}
	_, stderr, code = katcpcmd(t, e.natsURL+"/nobody", "help")
	if code != 1 || !strings.Contains(stderr, "no bridge serves") {
		t.Errorf("unserved: exit %d, %q", code, stderr)
	}
	// Any NATS client: a plain request shows KATCP lines and the headers.
	m, err := e.nc.Request("katcp.sim001.req.add", []byte("2 2"), 5*time.Second)
	if err != nil || string(m.Data) != "!add ok 4.0\n" || m.Header.Get("Katcp-Status") != "ok" {
		t.Errorf("nats request: %v %q %v", err, m.Data, m.Header)
	}
}

func TestFanOutStatusAndDeviceRestart(t *testing.T) {
	e := setup(t)
	var mu sync.Mutex
	counts := [2]int{}
	last := map[string]string{}
	for i := range 2 {
		nc, err := nats.Connect(e.natsURL)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		_, err = nc.Subscribe("katcp.*.sensor.int.>", func(m *nats.Msg) {
			var u struct{ Status string }
			json.Unmarshal(m.Data, &u)
			mu.Lock()
			counts[i]++
			last[m.Subject] = u.Status
			mu.Unlock()
		})
		if err != nil {
			t.Fatal(err)
		}
		nc.Flush()
	}
	var statuses []string
	_, err := e.nc.Subscribe("katcp.sim000.status", func(m *nats.Msg) {
		var st struct{ State string }
		json.Unmarshal(m.Data, &st)
		mu.Lock()
		statuses = append(statuses, st.State)
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	e.nc.Flush()
	waitFor(t, "both subscribers to get updates", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return counts[0] > 10 && counts[1] > 10
	})

	// The devices stop: status and unreachable sensors.
	e.sim.stop(syscall.SIGTERM)
	waitFor(t, "disconnected status and unreachable sensors", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(statuses) > 0 && statuses[len(statuses)-1] == "disconnected" && last["katcp.sim000.sensor.int.0"] == "unreachable"
	})
	// They come back on the same ports: updates resume.
	e.startSim(t)
	waitFor(t, "updates after the restart", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return last["katcp.sim000.sensor.int.0"] == "nominal" && statuses[len(statuses)-1] == "connected"
	})
}

func TestBridgeSurvivesNATSRestart(t *testing.T) {
	e := setup(t)
	e.nats.stop(syscall.SIGTERM)
	e.nats = startNATS(t, e.natsPort)
	waitFor(t, "requests to work again", func() bool {
		out, _, code := katcpcmd(t, e.natsURL+"/sim000", "add", "1", "1")
		return code == 0 && out == "!add ok 2.0\n"
	})
}

func TestTraceEndToEnd(t *testing.T) {
	e := setup(t)
	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	const callerSpan = "00f067aa0ba902b7"
	msg := &nats.Msg{Subject: "katcp.sim000.req.add", Data: []byte("1 2"), Header: nats.Header{}}
	msg.Header.Set("traceparent", "00-"+traceID+"-"+callerSpan+"-01")
	reply, err := e.nc.RequestMsg(msg, 5*time.Second)
	if err != nil || reply.Header.Get("Katcp-Status") != "ok" {
		t.Fatalf("request: %v %v", err, reply)
	}
	if tp := reply.Header.Get("traceparent"); !strings.Contains(tp, traceID) {
		t.Errorf("reply traceparent %q", tp)
	}
	// Stop the bridge so that its exporter flushes, then read the spans.
	if err := e.bridge.stop(syscall.SIGTERM); err != nil {
		t.Fatalf("bridge exit: %v", err)
	}
	type span struct {
		Name        string
		SpanContext struct{ TraceID, SpanID string }
		Parent      struct{ TraceID, SpanID string }
		SpanKind    int
	}
	spans := map[string]span{}
	dec := json.NewDecoder(strings.NewReader(e.bridge.output())) // the console exporter's JSON on stdout
	for dec.More() {
		var s span
		if err := dec.Decode(&s); err != nil {
			t.Fatalf("bridge stdout is not span JSON: %v", err)
		}
		if s.SpanContext.TraceID == traceID {
			spans[s.Name] = s
		}
	}
	process, okP := spans["process katcp.{device}.req.{request}"]
	hop, okH := spans["katcp add"]
	if !okP || !okH {
		t.Fatalf("spans of the trace: %v", spans)
	}
	if process.Parent.SpanID != callerSpan {
		t.Errorf("process span's parent %s, want the caller's %s", process.Parent.SpanID, callerSpan)
	}
	if hop.Parent.SpanID != process.SpanContext.SpanID {
		t.Errorf("katcp span's parent %s, want %s", hop.Parent.SpanID, process.SpanContext.SpanID)
	}
}

// metricsURL finds the bridge's /metrics address in its log.
func (e *env) metricsURL(t *testing.T) string {
	t.Helper()
	var addr string
	waitFor(t, "the bridge's HTTP address", func() bool {
		for _, line := range strings.Split(e.bridge.stderr(), "\n") {
			if strings.Contains(line, "serving /metrics") {
				_, a, ok := strings.Cut(line, "address=")
				addr = strings.Fields(a + " ")[0]
				return ok
			}
		}
		return false
	})
	return "http://" + addr + "/metrics"
}

func get(t *testing.T, url string) string {
	resp, err := http.Get(url)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func TestGracefulShutdownLosesNoReply(t *testing.T) {
	e := setup(t)
	type result struct {
		m   *nats.Msg
		err error
	}
	replies := make(chan result, 5)
	for range 5 {
		go func() {
			m, err := e.nc.Request("katcp.sim000.req.slow", []byte("1"), 10*time.Second)
			replies <- result{m, err}
		}()
	}
	metrics := e.metricsURL(t)
	waitFor(t, "5 requests in flight", func() bool { return strings.Contains(get(t, metrics), "katcp_bridge_requests_in_flight 5\n") })
	if err := e.bridge.stop(syscall.SIGTERM); err != nil {
		t.Fatalf("bridge exit: %v", err)
	}
	for range 5 {
		r := <-replies
		if r.err != nil || r.m.Header.Get("Katcp-Status") != "ok" {
			t.Errorf("in-flight request: %v %v", r.err, r.m)
		}
	}
}
