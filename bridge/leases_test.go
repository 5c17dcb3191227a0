package bridge_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/katcp-go/katcp-bridge/bridge"
	"github.com/katcp-go/katcp-bridge/bridge/natsclient"
	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/katcp/katcptest"
)

type replicaSet struct {
	t       *testing.T
	ns      *server.Server
	devices []*katcptest.Device
	names   []string
	cfg     []bridge.Device
	nconns  []*nats.Conn
	bridges []*bridge.Bridge
}

func newReplicaSet(t *testing.T, devices int) *replicaSet {
	rs := &replicaSet{t: t, ns: startNATS(t, -1)}
	for i := range devices {
		d := katcptest.NewDevice(t, katcp.ServerConfig{DeviceName: fmt.Sprintf("d%02d", i)})
		d.HandleReply("ping", "pong")
		rs.devices = append(rs.devices, d)
		rs.names = append(rs.names, fmt.Sprintf("d%02d", i))
		rs.cfg = append(rs.cfg, bridge.Device{Name: fmt.Sprintf("d%02d", i), Address: d.Addr()})
	}
	return rs
}

// add starts one more replica.
func (rs *replicaSet) add(instance string) *bridge.Bridge {
	t := rs.t
	nc, err := nats.Connect(rs.ns.ClientURL(), nats.Name(instance))
	if err != nil {
		t.Fatal(err)
	}
	b, err := bridge.New(nc, bridge.Config{
		Devices: rs.cfg, Instance: instance, Leases: bridge.LeasesOn,
		LeaseTTL: time.Second, LeaseRenew: 200 * time.Millisecond,
		NoLastValues: true,
		Client:       katcp.ClientConfig{BackoffInitial: 20 * time.Millisecond, BackoffMax: 100 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		b.Shutdown(context.Background())
		nc.Close()
	})
	rs.nconns = append(rs.nconns, nc)
	rs.bridges = append(rs.bridges, b)
	return b
}

// owners maps each served device to the replicas serving it, over the
// replicas whose index is in live.
func (rs *replicaSet) owners(live ...int) map[string][]int {
	m := map[string][]int{}
	for _, i := range live {
		for _, d := range rs.bridges[i].Serving() {
			m[d] = append(m[d], i)
		}
	}
	return m
}

// waitServed waits until every device is served by exactly one of live
// and connected to it alone.
func (rs *replicaSet) waitServed(what string, live ...int) {
	rs.t.Helper()
	waitFor(rs.t, what, func() bool {
		m := rs.owners(live...)
		for i, name := range rs.names {
			if len(m[name]) != 1 || rs.devices[i].Clients() != 1 {
				return false
			}
		}
		return true
	})
}

func (rs *replicaSet) checkNoDoubleConnections() {
	rs.t.Helper()
	for i, d := range rs.devices {
		if p := d.PeakClients(); p > 1 {
			rs.t.Errorf("device %s had %d bridge connections at once", rs.names[i], p)
		}
	}
}

func TestLeasesSpreadFailoverAndHandOver(t *testing.T) {
	rs := newReplicaSet(t, 12)
	for i := range 3 {
		rs.add(fmt.Sprintf("r%d", i))
	}
	rs.waitServed("every device served once", 0, 1, 2)
	waitFor(t, "an even spread", func() bool {
		for i := range 3 {
			if n := len(rs.bridges[i].Serving()); n != 4 {
				return false
			}
		}
		return true
	})
	rs.checkNoDoubleConnections()
	t.Logf("spread: %d, %d, %d", len(rs.bridges[0].Serving()), len(rs.bridges[1].Serving()), len(rs.bridges[2].Serving()))

	// Observability: every replica's view agrees with who serves what.
	c, err := natsclient.New(rs.nconns[0], natsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the owners document to match", func() bool {
		o, err := c.Owners(ctxFor(t))
		if err != nil || !o.Leases || len(o.Replicas) != 3 || len(o.Devices) != 12 {
			return false
		}
		m := rs.owners(0, 1, 2)
		for _, d := range o.Devices {
			if len(m[d.Device]) != 1 || d.Instance != fmt.Sprintf("r%d", m[d.Device][0]) {
				return false
			}
		}
		return true
	})
	// $SRV.INFO: one service per replica, its endpoints the devices it
	// serves. A replica adds a device's endpoint as it starts serving it,
	// so the listing is polled until it is complete.
	srvInfo := func() (map[string]string, []string) {
		inbox := nats.NewInbox()
		sub, err := rs.nconns[0].SubscribeSync(inbox)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		rs.nconns[0].PublishRequest("$SRV.INFO.katcp-bridge", inbox, nil)
		endpoints := map[string]string{}
		var problems []string
		for range 3 {
			m, err := sub.NextMsg(5 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			var info micro.Info
			if err := json.Unmarshal(m.Data, &info); err != nil {
				t.Fatal(err)
			}
			if info.Metadata["leases"] != "true" || info.Metadata["replica"] == "" {
				problems = append(problems, fmt.Sprintf("service metadata %v", info.Metadata))
			}
			for _, e := range info.Endpoints {
				if prev, dup := endpoints[e.Name]; dup {
					problems = append(problems, fmt.Sprintf("device %s has endpoints on %s and %s", e.Name, prev, info.Metadata["instance"]))
				}
				endpoints[e.Name] = e.Metadata["owner"]
			}
		}
		m := rs.owners(0, 1, 2)
		for dev, inst := range endpoints {
			if len(m[dev]) != 1 || fmt.Sprintf("r%d", m[dev][0]) != inst {
				problems = append(problems, fmt.Sprintf("$SRV.INFO says %s serves %s", inst, dev))
			}
		}
		return endpoints, problems
	}
	var problems []string
	waitFor(t, "$SRV.INFO to list the 12 devices", func() bool {
		var endpoints map[string]string
		endpoints, problems = srvInfo()
		return len(endpoints) == 12 || len(problems) > 0
	})
	for _, p := range problems {
		t.Error(p)
	}
	if st, err := c.Status(ctxFor(t), "d00"); err != nil || !st.Leases || st.Owner == "" {
		t.Errorf("status with leases: %+v, %v", st, err)
	}
	for i, b := range rs.bridges {
		held, acquired, _, _ := b.Metrics().Leases()
		if held != int64(len(b.Serving())) || acquired < uint64(held) {
			t.Errorf("replica %d: %d leases held, %d acquired, serving %d", i, held, acquired, len(b.Serving()))
		}
	}

	// A replica that vanishes (its NATS connection dies, it renews
	// nothing): its devices move once its leases expire, never to two
	// connections at once.
	lost := rs.bridges[2].Serving()
	rs.nconns[2].Close()
	rs.waitServed("the lost replica's devices served again", 0, 1)
	waitFor(t, "the vanished replica to let its devices go", func() bool { return len(rs.bridges[2].Serving()) == 0 })
	if _, _, lostN, _ := rs.bridges[2].Metrics().Leases(); lostN < uint64(len(lost)) {
		t.Errorf("the vanished replica counted %d lost leases, want %d", lostN, len(lost))
	}
	rs.checkNoDoubleConnections()

	// A graceful stop hands over at once: requests meanwhile either
	// succeed or get an explicit not-served error, never a timeout.
	var (
		wg       sync.WaitGroup
		stop     atomic.Bool
		ok, miss atomic.Int64
		badMu    sync.Mutex
		bad      []error
	)
	moving := rs.bridges[1].Serving()
	for _, name := range moving {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, err := c.Request(ctx, name, "ping")
				cancel()
				switch {
				case err == nil:
					ok.Add(1)
				case errors.Is(err, natsclient.ErrNotServed):
					miss.Add(1)
				default:
					badMu.Lock()
					bad = append(bad, err)
					badMu.Unlock()
				}
			}
		}()
	}
	waitFor(t, "requests flowing", func() bool { return ok.Load() > 20 })
	if err := rs.bridges[1].Shutdown(ctxFor(t)); err != nil {
		t.Fatal(err)
	}
	rs.waitServed("every device on the last replica", 0)
	before := ok.Load()
	waitFor(t, "requests flowing again", func() bool { return ok.Load() > before+20 })
	stop.Store(true)
	wg.Wait()
	if len(bad) > 0 {
		t.Errorf("%d requests failed otherwise than not served during the hand-over, first: %v", len(bad), bad[0])
	}
	t.Logf("during the hand-over: %d ok, %d not served", ok.Load(), miss.Load())
	_, _, _, released := rs.bridges[1].Metrics().Leases()
	if released != uint64(len(moving)) {
		t.Errorf("stopped replica released %d leases, want %d", released, len(moving))
	}
	rs.checkNoDoubleConnections()
}

func TestLeasesRebalanceToNewReplica(t *testing.T) {
	rs := newReplicaSet(t, 8)
	rs.add("a")
	rs.waitServed("all on one replica", 0)
	rs.add("b")
	waitFor(t, "the newcomer to get its share", func() bool {
		n := len(rs.bridges[1].Serving())
		return n == 4 && len(rs.owners(0, 1)) == 8
	})
	rs.waitServed("every device served once", 0, 1)
	moved := rs.bridges[1].Serving()
	// Nothing moves back and forth once settled: the newcomer's devices
	// stay put while the leases are renewed several times.
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		if got := rs.bridges[1].Serving(); !slices.Equal(got, moved) {
			t.Fatalf("devices moved again: %v, then %v", moved, got)
		}
		time.Sleep(50 * time.Millisecond)
	}
	rs.checkNoDoubleConnections()
}

func TestLeasesOffWithoutJetStream(t *testing.T) {
	ns := startNATS(t, 0) // no JetStream
	dev := katcptest.NewDevice(t, katcp.ServerConfig{})
	nc := connectNATS(t, ns)
	b, err := bridge.New(nc, bridge.Config{Devices: []bridge.Device{{Name: "x", Address: dev.Addr()}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Shutdown(context.Background()) })
	if got := b.Serving(); !slices.Equal(got, []string{"x"}) {
		t.Fatalf("serving %v without JetStream, want every device", got)
	}
	c, _ := natsclient.New(nc, natsclient.Options{})
	o, err := c.Owners(ctxFor(t))
	if err != nil {
		t.Fatal(err)
	}
	if o.Leases || len(o.Devices) != 1 || o.Devices[0].Owner == "" {
		t.Errorf("owners without leases: %+v", o)
	}
	if st, err := c.Status(ctxFor(t), "x"); err != nil || st.Leases {
		t.Errorf("status without leases: %+v, %v", st, err)
	}
}
