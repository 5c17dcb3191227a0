package bridge

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Metrics are the bridge's counters and gauges, written in the Prometheus
// text format by WritePrometheus. It is safe for concurrent use.
type Metrics struct {
	devicesConnected atomic.Int64
	reconnects       atomic.Uint64
	informs          atomic.Uint64
	sensorUpdates    atomic.Uint64
	drops            atomic.Uint64
	natsConnected    atomic.Int64
	inFlight         atomic.Int64

	queueDrops     atomic.Uint64                 // by the clients of stopped workers
	liveQueueDrops atomic.Pointer[func() uint64] // by the clients of running workers

	leasesHeld         atomic.Int64
	leasesAcquired     atomic.Uint64
	leasesLost         atomic.Uint64
	leasesReleased     atomic.Uint64
	leaseRenewFailures atomic.Uint64

	mu      sync.Mutex
	devices map[string]*deviceStats
}

// deviceStats are one device's request counters, under their own lock:
// devices' requests do not contend for one.
type deviceStats struct {
	mu       sync.Mutex
	requests map[string]uint64 // status -> count
	duration histogram
}

// NewMetrics returns empty metrics.
func NewMetrics() *Metrics {
	return &Metrics{devices: map[string]*deviceStats{}}
}

// device returns a device's counters, created on first use.
func (m *Metrics) device(name string) *deviceStats {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.devices[name]
	if d == nil {
		d = &deviceStats{requests: map[string]uint64{}}
		m.devices[name] = d
	}
	return d
}

// histogram buckets request durations in seconds.
type histogram struct {
	counts [len(buckets) + 1]uint64
	sum    float64
	n      uint64
}

var buckets = [...]float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// request counts a request that ended with status after d.
func (ds *deviceStats) request(status string, d time.Duration) {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	ds.requests[status]++
	h := &ds.duration
	s := d.Seconds()
	i := 0
	for i < len(buckets) && s > buckets[i] {
		i++
	}
	h.counts[i]++
	h.sum += s
	h.n++
}

// SetNATSConnected records the NATS connection's state.
func (m *Metrics) SetNATSConnected(up bool) {
	if up {
		m.natsConnected.Store(1)
	} else {
		m.natsConnected.Store(0)
	}
}

// Requests returns how many requests to device ended with status.
func (m *Metrics) Requests(device, status string) uint64 {
	m.mu.Lock()
	ds := m.devices[device]
	m.mu.Unlock()
	if ds == nil {
		return 0
	}
	ds.mu.Lock()
	defer ds.mu.Unlock()
	return ds.requests[status]
}

// SensorUpdates returns how many sensor updates were published.
func (m *Metrics) SensorUpdates() uint64 { return m.sensorUpdates.Load() }

// Leases returns the leases held now, and how many were acquired, lost
// and released so far.
func (m *Metrics) Leases() (held int64, acquired, lost, released uint64) {
	return m.leasesHeld.Load(), m.leasesAcquired.Load(), m.leasesLost.Load(), m.leasesReleased.Load()
}

// QueueDrops returns how many informs and sensor updates were dropped
// because a device sent them faster than the bridge could publish them.
func (m *Metrics) QueueDrops() uint64 {
	n := m.queueDrops.Load()
	if f := m.liveQueueDrops.Load(); f != nil {
		n += (*f)()
	}
	return n
}

// Informs returns how many informs were published.
func (m *Metrics) Informs() uint64 { return m.informs.Load() }

// WritePrometheus writes every metric in the Prometheus text format.
func (m *Metrics) WritePrometheus(w io.Writer) {
	gauge := func(name, help string, v int64) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s gauge\n%s %d\n", name, help, name, name, v)
	}
	counter := func(name, help string, v uint64) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", name, help, name, name, v)
	}
	gauge("katcp_bridge_devices_connected", "Devices with a live KATCP connection.", m.devicesConnected.Load())
	counter("katcp_bridge_reconnects_total", "KATCP reconnections.", m.reconnects.Load())
	counter("katcp_bridge_informs_published_total", "Asynchronous informs published to NATS.", m.informs.Load())
	counter("katcp_bridge_sensor_updates_published_total", "Sensor updates published to NATS.", m.sensorUpdates.Load())
	counter("katcp_bridge_drops_total", "Informs or updates dropped (queues full, publish errors).", m.drops.Load())
	counter("katcp_bridge_inform_queue_drops_total", "Informs and sensor updates a device sent faster than the bridge could publish them (dropped from the KATCP client's queue).", m.QueueDrops())
	gauge("katcp_bridge_nats_connected", "1 when the NATS connection is up.", m.natsConnected.Load())
	gauge("katcp_bridge_requests_in_flight", "Requests being handled.", m.inFlight.Load())
	gauge("katcp_bridge_leases_held", "Device leases this replica holds.", m.leasesHeld.Load())
	counter("katcp_bridge_leases_acquired_total", "Device leases taken.", m.leasesAcquired.Load())
	counter("katcp_bridge_leases_lost_total", "Device leases lost (expired or taken by another replica).", m.leasesLost.Load())
	counter("katcp_bridge_leases_released_total", "Device leases given up (hand-over, shutdown).", m.leasesReleased.Load())
	counter("katcp_bridge_lease_renew_failures_total", "Lease or heartbeat writes that failed.", m.leaseRenewFailures.Load())

	m.mu.Lock()
	names := make([]string, 0, len(m.devices))
	for name := range m.devices {
		names = append(names, name)
	}
	devs := make(map[string]*deviceStats, len(m.devices))
	maps.Copy(devs, m.devices)
	m.mu.Unlock()
	slices.Sort(names)
	type snapshot struct {
		statuses []string
		requests map[string]uint64
		duration histogram
	}
	snaps := make([]snapshot, len(names))
	for i, name := range names {
		ds := devs[name]
		ds.mu.Lock()
		snaps[i] = snapshot{requests: maps.Clone(ds.requests), duration: ds.duration}
		ds.mu.Unlock()
		snaps[i].statuses = slices.Sorted(maps.Keys(snaps[i].requests))
	}
	fmt.Fprintf(w, "# HELP katcp_bridge_requests_total Requests by device and outcome.\n# TYPE katcp_bridge_requests_total counter\n")
	for i, name := range names {
		for _, st := range snaps[i].statuses {
			fmt.Fprintf(w, "katcp_bridge_requests_total{device=%q,status=%q} %d\n", name, st, snaps[i].requests[st])
		}
	}
	fmt.Fprintf(w, "# HELP katcp_bridge_request_duration_seconds Time from NATS request to reply.\n# TYPE katcp_bridge_request_duration_seconds histogram\n")
	for i, name := range names {
		h := snaps[i].duration
		if h.n == 0 {
			continue
		}
		var cum uint64
		for j, b := range buckets {
			cum += h.counts[j]
			fmt.Fprintf(w, "katcp_bridge_request_duration_seconds_bucket{device=%q,le=\"%g\"} %d\n", name, b, cum)
		}
		cum += h.counts[len(buckets)]
		fmt.Fprintf(w, "katcp_bridge_request_duration_seconds_bucket{device=%q,le=\"+Inf\"} %d\n", name, cum)
		fmt.Fprintf(w, "katcp_bridge_request_duration_seconds_sum{device=%q} %g\n", name, h.sum)
		fmt.Fprintf(w, "katcp_bridge_request_duration_seconds_count{device=%q} %d\n", name, h.n)
	}
}
