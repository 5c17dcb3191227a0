package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/katcp-go/katcp-bridge/bridge"
	"github.com/katcp-go/katcp-bridge/bridge/natsclient"
	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/katcp/katcptest"
)

// The lease settings of the replicas test: short, so that the test is
// quick. KATCP_E2E_LEASE_TTL (a duration; renewal a quarter of it)
// measures others, e.g. the default 5s.
var e2eLeaseTTL, e2eLeaseRenew = func() (time.Duration, time.Duration) {
	ttl := 2 * time.Second
	if d, err := time.ParseDuration(os.Getenv("KATCP_E2E_LEASE_TTL")); err == nil && d >= time.Second {
		ttl = d
	}
	return ttl, ttl / 4
}()

// cluster is three nats-server processes with JetStream, clustered.
type cluster struct {
	t       *testing.T
	ports   []int
	cports  []int
	dirs    []string
	servers []*proc
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	c := &cluster{t: t}
	for range 3 {
		c.ports = append(c.ports, freePort(t))
		c.cports = append(c.cports, freePort(t))
		c.dirs = append(c.dirs, t.TempDir())
	}
	c.servers = make([]*proc, 3)
	for i := range 3 {
		c.startNode(i)
	}
	nc := c.connect()
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "JetStream in the cluster", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := js.AccountInfo(ctx)
		return err == nil
	})
	return c
}

func (c *cluster) startNode(i int) {
	c.t.Helper()
	var routes []string
	for j, p := range c.cports {
		if j != i {
			routes = append(routes, fmt.Sprintf("nats://127.0.0.1:%d", p))
		}
	}
	c.servers[i] = start(c.t, "nats-server", nil,
		"-a", "127.0.0.1", "-p", strconv.Itoa(c.ports[i]), "-js", "-sd", c.dirs[i],
		"--server_name", fmt.Sprintf("n%d", i), "--cluster_name", "e2e",
		"--cluster", fmt.Sprintf("nats://127.0.0.1:%d", c.cports[i]), "--routes", strings.Join(routes, ","))
	port := c.ports[i]
	waitFor(c.t, "nats-server node", func() bool {
		nc, err := nats.Connect(fmt.Sprintf("nats://127.0.0.1:%d", port), nats.NoReconnect())
		if err == nil {
			nc.Close()
		}
		return err == nil
	})
}

func (c *cluster) urls() string {
	var u []string
	for _, p := range c.ports {
		u = append(u, fmt.Sprintf("nats://127.0.0.1:%d", p))
	}
	return strings.Join(u, ",")
}

func (c *cluster) connect() *nats.Conn {
	c.t.Helper()
	nc, err := nats.Connect(c.urls(), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		c.t.Fatal(err)
	}
	return nc
}

// fleet is the devices and the bridge replicas serving them.
type fleet struct {
	t        *testing.T
	cl       *cluster
	names    []string
	devices  []*katcptest.Device
	temps    []*katcp.Sensor
	env      []string
	replicas map[string]*proc
	client   *natsclient.Client
}

func (f *fleet) startReplica(name string) {
	f.t.Helper()
	f.replicas[name] = start(f.t, "katcp-bridge", append(slices.Clone(f.env), "KATCP_BRIDGE_INSTANCE="+name))
}

// owners asks the replicas which of them serves which device.
func (f *fleet) owners() map[string]string {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	o, err := f.client.Owners(ctx)
	if err != nil {
		return nil
	}
	m := map[string]string{}
	for _, d := range o.Devices {
		if d.Instance != "" {
			m[d.Device] = d.Instance
		}
	}
	return m
}

// served reports whether every device answers through NATS and has
// exactly one bridge connection.
func (f *fleet) served() bool {
	for i, name := range f.names {
		if f.devices[i].Clients() != 1 || f.ping(name, time.Second) != nil {
			return false
		}
	}
	return true
}

func (f *fleet) ping(device string, wait time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	_, err := f.client.Request(ctx, device, "ping")
	return err
}

func (f *fleet) checkNoDoubleConnections() {
	f.t.Helper()
	for i, d := range f.devices {
		if p := d.PeakClients(); p > 1 {
			f.t.Errorf("device %s had %d bridge connections at once", f.names[i], p)
		}
	}
}

func (f *fleet) spread(owners map[string]string) map[string]int {
	n := map[string]int{}
	for _, inst := range owners {
		n[inst]++
	}
	return n
}

// waitEven waits until every device is served, each by one replica, and
// the live replicas share them evenly.
func (f *fleet) waitEven(what string, live ...string) {
	f.t.Helper()
	per := (len(f.names) + len(live) - 1) / len(live)
	waitFor(f.t, what, func() bool {
		o := f.owners()
		if len(o) != len(f.names) {
			return false
		}
		for inst, n := range f.spread(o) {
			if !slices.Contains(live, inst) || n > per {
				return false
			}
		}
		return f.served()
	})
}

// TestReplicas runs three bridge replicas against a three-node NATS
// cluster and thirty devices: spread, failover after SIGKILL, hand-over
// on SIGTERM, a NATS node's restart and last values for late subscribers.
func TestReplicas(t *testing.T) {
	cl := startCluster(t)
	f := &fleet{t: t, cl: cl, replicas: map[string]*proc{}}
	var devs []string
	for i := range 30 {
		name := fmt.Sprintf("dev%02d", i)
		d := katcptest.NewDevice(t, katcp.ServerConfig{DeviceName: name})
		d.HandleReply("ping", "pong")
		d.HandleReply("slow", "done")
		d.SetDelay("slow", 300*time.Millisecond)
		temp := d.AddSensor(katcp.SensorFloat, "temp", katcp.SensorOptions{})
		temp.Set(float64(i))
		f.names = append(f.names, name)
		f.devices = append(f.devices, d)
		f.temps = append(f.temps, temp)
		devs = append(devs, name+"="+d.Addr())
	}
	f.env = []string{
		"KATCP_BRIDGE_NATS_URL=" + cl.urls(),
		"KATCP_BRIDGE_DEVICES=" + strings.Join(devs, ","),
		"KATCP_BRIDGE_LEASES=on",
		"KATCP_BRIDGE_LEASE_REPLICAS=3",
		"KATCP_BRIDGE_LEASE_TTL=" + e2eLeaseTTL.String(),
		"KATCP_BRIDGE_LEASE_RENEW=" + e2eLeaseRenew.String(),
		"KATCP_BRIDGE_LAST_VALUES_REPLICAS=3",
		"KATCP_BRIDGE_HTTP_ADDR=127.0.0.1:0",
		"KATCP_BRIDGE_SHUTDOWN_TIMEOUT=20s",
	}
	nc := cl.connect()
	t.Cleanup(nc.Close)
	var err error
	if f.client, err = natsclient.New(nc, natsclient.Options{}); err != nil {
		t.Fatal(err)
	}
	live := []string{"r0", "r1", "r2"}
	for _, r := range live {
		f.startReplica(r)
	}
	f.waitEven("30 devices served by 3 replicas, 10 each", live...)
	f.checkNoDoubleConnections()

	// katcpcmd shows the same owners.
	out, errOut, code := katcpcmd(t, fmt.Sprintf("nats://127.0.0.1:%d", cl.ports[1]), "--owners")
	if code != 0 {
		t.Fatalf("katcpcmd --owners: exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 31 || !strings.Contains(lines[0], "leases in bucket KATCP_OWNERS; 3 replicas") {
		t.Fatalf("katcpcmd --owners printed:\n%s", out)
	}
	owners := f.owners()
	for _, l := range lines[1:] {
		fields := strings.Split(l, "\t")
		if len(fields) != 3 || owners[fields[0]] != fields[1] || !strings.HasPrefix(fields[2], fields[1]+"-") {
			t.Errorf("katcpcmd --owners: line %q, want the device, its owner's instance and replica id", l)
		}
	}

	t.Run("failover after SIGKILL", func(t *testing.T) {
		var times []time.Duration
		for run, victim := range []string{"r0", "r1", "r2"} {
			o := f.owners()
			var lost []string
			for dev, inst := range o {
				if inst == victim {
					lost = append(lost, dev)
				}
			}
			t0 := time.Now()
			f.replicas[victim].stop(syscall.SIGKILL)
			pending := slices.Clone(lost)
			waitFor(t, "the killed replica's devices served again", func() bool {
				pending = slices.DeleteFunc(pending, func(dev string) bool { return f.ping(dev, 500*time.Millisecond) == nil })
				return len(pending) == 0
			})
			d := time.Since(t0)
			times = append(times, d)
			t.Logf("run %d: SIGKILL %s: its %d devices served again after %v (lease TTL %v)", run, victim, len(lost), d.Round(time.Millisecond), e2eLeaseTTL)
			rest := slices.DeleteFunc(slices.Clone(live), func(r string) bool { return r == victim })
			f.waitEven("the survivors to share all devices", rest...)
			f.checkNoDoubleConnections()
			f.startReplica(victim)
			f.waitEven("the restarted replica to get its share back", live...)
			f.checkNoDoubleConnections()
		}
		sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
		t.Logf("failover after SIGKILL: median %v, worst %v over %d runs (lease TTL %v, renew %v)",
			times[len(times)/2].Round(time.Millisecond), times[len(times)-1].Round(time.Millisecond), len(times), e2eLeaseTTL, e2eLeaseRenew)
	})

	t.Run("hand-over on SIGTERM", func(t *testing.T) {
		victim := "r1"
		var moving []string
		for dev, inst := range f.owners() {
			if inst == victim {
				moving = append(moving, dev)
			}
		}
		var (
			wg          sync.WaitGroup
			stop        atomic.Bool
			ok, missed  atomic.Int64
			slowOK      atomic.Int64
			mu          sync.Mutex
			failures    []error
			recordError = func(err error) {
				mu.Lock()
				failures = append(failures, err)
				mu.Unlock()
			}
		)
		for _, dev := range moving {
			for _, req := range []string{"ping", "slow"} {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for !stop.Load() {
						ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
						_, err := f.client.Request(ctx, dev, req)
						cancel()
						switch {
						case err == nil && req == "slow":
							slowOK.Add(1)
						case err == nil:
							ok.Add(1)
						case errors.Is(err, natsclient.ErrNotServed):
							missed.Add(1)
						default:
							recordError(fmt.Errorf("%s ?%s: %w", dev, req, err))
						}
					}
				}()
			}
		}
		waitFor(t, "requests flowing", func() bool { return slowOK.Load() >= int64(len(moving)) })
		if err := f.replicas[victim].stop(syscall.SIGTERM); err != nil {
			t.Errorf("%s exited with %v after SIGTERM", victim, err)
		}
		rest := []string{"r0", "r2"}
		f.waitEven("the others to take the stopped replica's devices", rest...)
		before := ok.Load()
		waitFor(t, "requests flowing again", func() bool { return ok.Load() > before+int64(len(moving)) })
		stop.Store(true)
		wg.Wait()
		for _, err := range failures {
			t.Errorf("a request failed during the hand-over otherwise than not served: %v", err)
		}
		t.Logf("hand-over of %d devices: %d ok, %d slow ok, %d not served, %d other failures", len(moving), ok.Load(), slowOK.Load(), missed.Load(), len(failures))
		f.checkNoDoubleConnections()
		f.startReplica(victim)
		f.waitEven("the restarted replica to get its share back", live...)
	})

	t.Run("NATS node restart", func(t *testing.T) {
		cl.servers[0].stop(syscall.SIGTERM)
		waitFor(t, "every device served with one NATS node down", f.served)
		cl.startNode(0)
		f.waitEven("every device served after the node's return", live...)
		f.checkNoDoubleConnections()
	})

	t.Run("late subscriber gets last values", func(t *testing.T) {
		got := map[string]float64{}
		var mu sync.Mutex
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		stop, err := f.client.SubscribeLastSensors(ctx, "*", ">", func(_ context.Context, u bridge.SensorUpdate) {
			if u.Status != "nominal" {
				return
			}
			v, err := strconv.ParseFloat(fmt.Sprint(u.Value), 64)
			if err != nil {
				return
			}
			mu.Lock()
			got[u.Device] = v
			mu.Unlock()
		})
		if err != nil {
			t.Fatal(err)
		}
		defer stop()
		waitFor(t, "the last value of every sensor", func() bool {
			mu.Lock()
			defer mu.Unlock()
			if len(got) != len(f.names) {
				return false
			}
			for i, name := range f.names {
				if got[name] != float64(i) {
					return false
				}
			}
			return true
		})
		f.temps[7].Set(1007.0)
		waitFor(t, "a live update after the snapshot", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return got["dev07"] == 1007
		})
	})
}
