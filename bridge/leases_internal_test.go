package bridge

import (
	"context"
	"encoding/json"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/katcp/katcptest"
)

func jetStreamServer(t *testing.T) *server.Server {
	t.Helper()
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true, JetStream: true, StoreDir: t.TempDir()})
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

// startTestBridge connects to url and starts a bridge with cfg; t.Cleanup
// stops both.
func startTestBridge(t *testing.T, url string, cfg Config) *Bridge {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	b, err := New(nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Shutdown(context.Background()) })
	return b
}

// leaseBucket opens the lease bucket on a connection of its own.
func leaseBucket(t *testing.T, ns *server.Server) jetstream.KeyValue {
	t.Helper()
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(context.Background(), DefaultLeaseBucket)
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

func poll(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A device closed behind the lease loop's back (as the renewal timer
// does) must not stay held by a replica that serves it no more.
func TestLeaseOnUnservedDeviceIsReleased(t *testing.T) {
	ns := jetStreamServer(t)
	dev := katcptest.NewDevice(t, katcp.ServerConfig{})
	b := startTestBridge(t, ns.ClientURL(), Config{Devices: []Device{{Name: "d0", Address: dev.Addr()}}, Leases: LeasesOn,
		LeaseTTL: time.Second, LeaseRenew: 100 * time.Millisecond, NoLastValues: true})
	poll(t, "d0 served", func() bool { return len(b.Serving()) == 1 && dev.Clients() == 1 })
	b.unserve([]string{"d0"}, true, "lease lost: it could not be renewed in time")
	poll(t, "d0 released and served again", func() bool {
		_, acquired, _, released := b.Metrics().Leases()
		return released == 1 && acquired == 2 && len(b.Serving()) == 1 && dev.Clients() == 1
	})
	if p := dev.PeakClients(); p > 1 {
		t.Errorf("%d connections at once", p)
	}
}

func TestShutdownAfterFailedStart(t *testing.T) {
	ns := jetStreamServer(t)
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(nc, Config{Devices: []Device{{Name: "x", Address: "127.0.0.1:1"}}, Leases: LeasesOff, NoLastValues: true})
	if err != nil {
		t.Fatal(err)
	}
	nc.Close()
	if err := b.Start(); err == nil {
		t.Fatal("Start on a closed connection worked")
	}
	if err := b.Shutdown(context.Background()); err != nil {
		t.Errorf("Shutdown after a failed Start: %v", err)
	}
}

// stallProxy forwards TCP connections to target; while held, it keeps
// what the clients send (a NATS connection that stalls without
// breaking).
type stallProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	cond   *sync.Cond
	held   bool
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newStallProxy(t *testing.T, target string) *stallProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &stallProxy{ln: ln, target: target}
	p.cond = sync.NewCond(&p.mu)
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		ln.Close()
		p.hold(false)
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *stallProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, s)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(c, s, true)
		go p.pipe(s, c, false)
	}
}

func (p *stallProxy) pipe(from, to net.Conn, holdable bool) {
	defer p.wg.Done()
	defer to.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := from.Read(buf)
		if n > 0 && holdable {
			p.mu.Lock()
			for p.held {
				p.cond.Wait()
			}
			p.mu.Unlock()
		}
		if n > 0 {
			if _, werr := to.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *stallProxy) hold(on bool) {
	p.mu.Lock()
	p.held = on
	p.mu.Unlock()
	p.cond.Broadcast()
}

// A NATS connection that stalls for longer than a renewal may take, but
// less than the lease's margin, loses nothing: the late answers count,
// and no second compare-and-set races the first.
func TestLeasesSurviveAStall(t *testing.T) {
	ns := jetStreamServer(t)
	proxy := newStallProxy(t, ns.Addr().String())
	dev := katcptest.NewDevice(t, katcp.ServerConfig{})
	b := startTestBridge(t, "nats://"+proxy.ln.Addr().String(), Config{Devices: []Device{{Name: "d0", Address: dev.Addr()}}, Leases: LeasesOn,
		LeaseTTL: 4 * time.Second, LeaseRenew: 400 * time.Millisecond, NoLastValues: true})
	poll(t, "d0 served", func() bool { return len(b.Serving()) == 1 && dev.Clients() == 1 })

	// A second connection, not through the proxy, reads the lease.
	kv := leaseBucket(t, ns)
	rev := func() uint64 {
		e, err := kv.Get(context.Background(), "device.d0")
		if err != nil {
			return 0
		}
		return e.Revision()
	}

	failures := func() uint64 { return b.metrics.leaseRenewFailures.Load() }
	before := failures()
	proxy.hold(true)
	// Two rounds: a second compare-and-set must not race the first.
	poll(t, "two renewal rounds to time out", func() bool { return failures() >= before+2 })
	stalled := rev()
	proxy.hold(false)
	poll(t, "renewals to go on after the stall", func() bool { return rev() > stalled+2 })
	if _, _, lost, _ := b.Metrics().Leases(); lost != 0 {
		t.Errorf("%d leases lost to a short stall", lost)
	}
	if len(b.Serving()) != 1 || dev.Clients() != 1 || dev.PeakClients() != 1 {
		t.Errorf("after the stall: serving %v, %d clients (peak %d)", b.Serving(), dev.Clients(), dev.PeakClients())
	}
}

// Updates a device sends faster than the bridge publishes them are
// dropped from the client's queue, and counted.
func TestQueueDropsCounted(t *testing.T) {
	ns := jetStreamServer(t)
	dev := katcptest.NewDevice(t, katcp.ServerConfig{})
	s := dev.AddSensor(katcp.SensorInteger, "fast", katcp.SensorOptions{})
	b := startTestBridge(t, ns.ClientURL(), Config{Devices: []Device{{Name: "d0", Address: dev.Addr()}}, Leases: LeasesOff, NoLastValues: true,
		Client: katcp.ClientConfig{InformQueue: 1}})
	i := 0
	poll(t, "updates dropped and counted", func() bool {
		for range 1000 {
			i++
			s.Set(int64(i))
		}
		return b.Metrics().QueueDrops() > 0
	})
	var sb strings.Builder
	b.Metrics().WritePrometheus(&sb)
	if !strings.Contains(sb.String(), "katcp_bridge_inform_queue_drops_total ") || strings.Contains(sb.String(), "katcp_bridge_inform_queue_drops_total 0\n") {
		t.Errorf("metrics lack the drops: %s", sb.String())
	}
	before := b.Metrics().QueueDrops()
	b.Shutdown(context.Background())
	if after := b.Metrics().QueueDrops(); after < before {
		t.Errorf("drops went from %d to %d when the worker stopped", before, after)
	}
}

// A device whose worker is still closing keeps its lease: another
// replica must not connect before the connection is closed.
func TestLeaseKeptWhileWorkerCloses(t *testing.T) {
	ns := jetStreamServer(t)
	dev := katcptest.NewDevice(t, katcp.ServerConfig{})
	start := func(inst string) *Bridge {
		return startTestBridge(t, ns.ClientURL(), Config{Instance: inst, Devices: []Device{{Name: "d0", Address: dev.Addr()}}, Leases: LeasesOn,
			LeaseTTL: time.Second, LeaseRenew: 100 * time.Millisecond, NoLastValues: true})
	}
	a := start("a")
	poll(t, "d0 served by a", func() bool { return len(a.Serving()) == 1 && dev.Clients() == 1 })
	b := start("b")

	// a stops serving d0 but is slow to close it (as a graceful stop
	// waiting for requests is).
	a.mu.Lock()
	w := a.workers["d0"]
	delete(a.workers, "d0")
	w.stopServing()
	st := &stopper{w, make(chan struct{})}
	a.stopping["d0"] = st
	a.publishServedLocked()
	a.mu.Unlock()
	var closeOnce sync.Once
	finish := func() {
		closeOnce.Do(func() {
			w.stop("test")
			a.mu.Lock()
			delete(a.stopping, "d0")
			a.mu.Unlock()
			close(st.done)
		})
	}
	t.Cleanup(finish) // before the bridges' Shutdown, should the test fail

	kv := leaseBucket(t, ns)
	owner := func() (string, uint64) {
		e, err := kv.Get(context.Background(), "device.d0")
		if err != nil {
			return "", 0
		}
		var le Lease
		json.Unmarshal(e.Value(), &le)
		return le.Instance, e.Revision()
	}
	kw, err := kv.Watch(context.Background(), "device.d0", jetstream.UpdatesOnly())
	if err != nil {
		t.Fatal(err)
	}
	defer kw.Stop()
	renewals := 0
	for renewals < 5 { // a renews; nobody deletes the lease meanwhile
		select {
		case e := <-kw.Updates():
			if e == nil {
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				t.Fatalf("the lease was released while a still closes d0")
			}
			renewals++
		case <-time.After(10 * time.Second):
			t.Fatal("no renewals")
		}
	}
	if inst, _ := owner(); inst != "a" || len(b.Serving()) != 0 || dev.PeakClients() > 1 {
		t.Fatalf("lease held by %q, b serves %v while a still closes d0 (peak %d clients)", inst, b.Serving(), dev.PeakClients())
	}
	// Once closed, the lease goes and d0 is served again (by whichever
	// replica it is placed on).
	finish()
	poll(t, "d0 served again", func() bool { return len(a.Serving())+len(b.Serving()) == 1 && dev.Clients() == 1 })
	if p := dev.PeakClients(); p > 1 {
		t.Errorf("%d connections at once", p)
	}
}

// lostAnswerKV writes the first lease it is asked to create but reports a
// timeout, as when the answer is lost on the way back.
type lostAnswerKV struct {
	jetstream.KeyValue
	mu    sync.Mutex
	first uint64 // the revision written by the first Create
}

func (kv *lostAnswerKV) Create(ctx context.Context, key string, value []byte, opts ...jetstream.KVCreateOpt) (uint64, error) {
	rev, err := kv.KeyValue.Create(ctx, key, value, opts...)
	kv.mu.Lock()
	defer kv.mu.Unlock()
	if err != nil || kv.first != 0 || !strings.HasPrefix(key, deviceKeyPrefix) {
		return rev, err
	}
	kv.first = rev
	return 0, context.DeadlineExceeded
}

func TestLeaseWrittenDespiteLostAnswer(t *testing.T) {
	ns := jetStreamServer(t)
	dev := katcptest.NewDevice(t, katcp.ServerConfig{})
	var lost *lostAnswerKV
	leaseKVHook = func(kv jetstream.KeyValue) jetstream.KeyValue {
		lost = &lostAnswerKV{KeyValue: kv}
		return lost
	}
	t.Cleanup(func() { leaseKVHook = nil })
	// A TTL longer than poll waits: the device must be served on the lease
	// whose answer was lost, not after it expires.
	b := startTestBridge(t, ns.ClientURL(), Config{Devices: []Device{{Name: "d0", Address: dev.Addr()}}, Leases: LeasesOn,
		LeaseTTL: time.Minute, LeaseRenew: 100 * time.Millisecond, NoLastValues: true})
	poll(t, "d0 served", func() bool { return len(b.Serving()) == 1 && dev.Clients() == 1 })
	lost.mu.Lock()
	first := lost.first
	lost.mu.Unlock()
	if first == 0 {
		t.Fatal("no lease was created")
	}
	if _, acquired, _, _ := b.Metrics().Leases(); acquired != 1 {
		t.Errorf("%d leases acquired, want 1", acquired)
	}
	// Renewals go on from the first lease's revision.
	kv := leaseBucket(t, ns)
	poll(t, "the lease renewed", func() bool {
		e, err := kv.Get(context.Background(), "device.d0")
		return err == nil && e.Revision() > first
	})
}
