package bridge

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// LeaseMode says how replicas share the devices (Config.Leases).
type LeaseMode string

// The lease modes.
const (
	LeasesAuto LeaseMode = "auto" // leases when JetStream is available
	LeasesOn   LeaseMode = "on"   // leases, or nothing served until they work
	LeasesOff  LeaseMode = "off"  // every configured device, no leases
)

// Lease defaults.
const (
	DefaultLeaseBucket = "KATCP_OWNERS"
	DefaultLeaseTTL    = 5 * time.Second
)

// Keys in the lease bucket: "device.<name>" holds a Lease,
// "replica.<id>" a Replica (the replica's heartbeat).
const (
	deviceKeyPrefix  = "device."
	replicaKeyPrefix = "replica."
)

// Lease is the value of a device's key in the lease bucket.
type Lease struct {
	Owner    string  `json:"owner"`    // the owning replica's id
	Instance string  `json:"instance"` // its instance name
	Since    float64 `json:"since"`    // when it took the device (Unix seconds)
}

// leaseKVHook, when set (by tests), wraps the lease bucket.
var leaseKVHook func(jetstream.KeyValue) jetstream.KeyValue

// Replica is the value of a replica's heartbeat key.
type Replica struct {
	ID       string  `json:"id"`
	Instance string  `json:"instance"`
	Started  float64 `json:"started"`
}

// leases shares the devices among replicas through a JetStream key-value
// bucket. One goroutine (run) owns the leases: it takes free devices,
// renews what it holds with compare-and-set on the revision, hands devices
// over to better placed replicas and releases everything on shutdown.
// Leases expire by per-message TTL; the bucket's limit markers tell every
// watcher at once that a device is free.
type leases struct {
	b       *Bridge
	js      jetstream.JetStream
	kv      jetstream.KeyValue
	bucket  string
	id      string
	log     *slog.Logger
	devices []string // configured, sorted
	ttl     time.Duration
	renew   time.Duration
	margin  time.Duration // a lease is dropped this long (TTL/4) before it would expire

	mu       sync.Mutex // guards the view, also read by owners requests
	replicas map[string]*peer
	owners   map[string]*ownerView

	// Used by run only.
	held        map[string]*heldLease
	freeSince   map[string]time.Time
	started     time.Time
	synced      bool      // the watcher has delivered the bucket's contents
	selfSeen    time.Time // our heartbeat last came back through the watch
	hbAcked     time.Time // our heartbeat was last stored
	dirty       bool      // something changed that may call for taking devices
	draining    bool
	gone        bool // released everything: renews nothing, only watches
	noHeartbeat bool // the heartbeat is deleted and no longer written

	handovers sync.WaitGroup
	released  chan handedOver // hand-overs whose devices are no longer served
	drainCh   chan chan struct{}
	releaseCh chan chan struct{}
	stopCh    chan struct{}
	done      chan struct{}
}

type peer struct {
	Replica
	seen    time.Time // first seen here
	updated time.Time // last heartbeat seen here
}

type ownerView struct {
	Lease
	rev     uint64
	updated time.Time
	since   time.Time // when this owner was first seen here
}

type handedOver struct {
	dev string
	h   *heldLease
}

type heldLease struct {
	since     time.Time
	rev       uint64
	sent      time.Time // when the last successful write was sent
	releasing bool      // being handed over
	// timer closes the device when the lease could not be renewed in
	// time, even if the loop is held up in a call to NATS; closed
	// records that it did.
	timer   *time.Timer
	closed  atomic.Bool
	done    atomic.Bool            // given up or released: the timer must do nothing
	pending jetstream.PubAckFuture // a renewal not yet acknowledged
	pendAt  time.Time              // when it was sent
}

// newHeld records a lease just taken.
func (l *leases) newHeld(dev string, rev uint64, sent time.Time) *heldLease {
	h := &heldLease{since: sent, rev: rev, sent: sent}
	h.timer = time.AfterFunc(time.Until(sent.Add(l.ttl-l.margin)), func() {
		if h.done.Load() {
			return
		}
		h.closed.Store(true)
		l.b.unserve([]string{dev}, true, "lease lost: it could not be renewed in time")
	})
	return h
}

// replicaID names this process in the bucket: the instance (sanitised
// for a key) and a random suffix, so that two processes never share one.
func replicaID(instance string) string {
	var b strings.Builder
	for i := 0; i < len(instance) && b.Len() < 64; i++ {
		if c := instance[i]; plainByte(c) {
			b.WriteByte(c)
		} else {
			b.WriteByte('_')
		}
	}
	var r [4]byte
	rand.Read(r[:])
	return b.String() + "-" + hex.EncodeToString(r[:])
}

// setupLeases binds (creating if needed) the lease bucket. notAvailable
// reports that the NATS system has no JetStream at all.
func (b *Bridge) setupLeases(ctx context.Context) (l *leases, notAvailable bool, err error) {
	// Renewals lost in a leader election must fail, not pile up.
	js, err := jetstream.New(b.nc, jetstream.WithPublishAsyncTimeout(b.cfg.LeaseRenew))
	if err != nil {
		return nil, false, err
	}
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:         b.cfg.LeaseBucket,
		Description:    "katcp-bridge: which replica owns which device",
		History:        1,
		Storage:        jetstream.FileStorage, // leases survive a NATS restart
		Replicas:       max(b.cfg.LeaseReplicas, 1),
		LimitMarkerTTL: max(2*b.cfg.LeaseTTL, time.Minute),
	})
	if errors.Is(err, jetstream.ErrBucketExists) {
		kv, err = js.KeyValue(ctx, b.cfg.LeaseBucket)
		if err == nil {
			var st jetstream.KeyValueStatus
			if st, err = kv.Status(ctx); err == nil && st.LimitMarkerTTL() <= 0 {
				err = fmt.Errorf("bucket %s exists without limit markers (per-key TTL); remove it or configure another bucket", b.cfg.LeaseBucket)
			}
		}
	}
	if err != nil {
		na := errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) ||
			errors.Is(err, nats.ErrNoResponders)
		return nil, na, fmt.Errorf("lease bucket %s: %w", b.cfg.LeaseBucket, err)
	}
	if leaseKVHook != nil {
		kv = leaseKVHook(kv)
	}
	devices := slices.Sorted(maps.Keys(b.devices))
	return &leases{
		b:         b,
		js:        js,
		kv:        kv,
		bucket:    b.cfg.LeaseBucket,
		id:        b.id,
		log:       b.log,
		devices:   devices,
		ttl:       b.cfg.LeaseTTL,
		renew:     b.cfg.LeaseRenew,
		margin:    b.cfg.LeaseTTL / 4,
		replicas:  map[string]*peer{},
		owners:    map[string]*ownerView{},
		held:      map[string]*heldLease{},
		freeSince: map[string]time.Time{},
		released:  make(chan handedOver, len(devices)),
		drainCh:   make(chan chan struct{}),
		releaseCh: make(chan chan struct{}),
		stopCh:    make(chan struct{}),
		done:      make(chan struct{}),
	}, false, nil
}

// start runs the lease loop.
func (l *leases) start() {
	l.started = time.Now()
	go l.run()
}

// drain stops taking and handing over devices; it returns once the loop
// has seen it.
func (l *leases) drain() { l.ask(l.drainCh) }

// release gives up every lease and the heartbeat (the devices must no
// longer be served); the loop goes on watching the bucket, so that
// lingering endpoints end as other replicas take the devices.
func (l *leases) release() { l.ask(l.releaseCh) }

// ask sends a request to the loop and waits until it is done.
func (l *leases) ask(ch chan chan struct{}) {
	ack := make(chan struct{})
	select {
	case ch <- ack:
		<-ack
	case <-l.done:
	}
}

// close releases every lease and the heartbeat and stops the loop. The
// devices must no longer be served.
func (l *leases) close() {
	select {
	case <-l.stopCh:
	default:
		close(l.stopCh)
	}
	<-l.done
}

func (l *leases) run() {
	defer close(l.done)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	l.heartbeat(ctx)
	w := l.watch(ctx)
	tick := time.NewTicker(l.renew)
	defer tick.Stop()
	for {
		var updates <-chan jetstream.KeyValueEntry
		if w != nil {
			updates = w.Updates()
		}
		select {
		case e, ok := <-updates:
			if !ok {
				w = nil // watched again at the next tick
				break
			}
			l.apply(e)
		more: // take whatever else is waiting before acting on it
			for {
				select {
				case e, ok := <-updates:
					if !ok {
						w = nil
						break more
					}
					l.apply(e)
				default:
					break more
				}
			}
		case <-tick.C:
			if w != nil && l.synced && !l.noHeartbeat && l.hbAcked.Sub(l.selfSeen) > 2*l.renew {
				// Heartbeats stored for two renew intervals have not come
				// back: the watch is stuck.
				l.log.Warn("leases: the bucket watch delivers nothing; watching again")
				stopWatch(w)
				w = nil
			}
			if w == nil {
				w = l.watch(ctx)
			}
			l.endLingers()
			if !l.gone {
				l.renewAll(ctx)
				l.releaseUnserved(ctx)
			}
			l.dirty = true
		case r := <-l.released:
			// Not lost and taken again meanwhile, and closed (else a later
			// tick releases it: releaseUnserved).
			if l.held[r.dev] == r.h && !l.b.busy(r.dev) {
				l.deleteLease(ctx, r.dev)
			}
		case ack := <-l.drainCh:
			l.draining = true
			l.deleteHeartbeat(ctx) // so that no device is placed here any more
			close(ack)
		case ack := <-l.releaseCh:
			l.handovers.Wait()
			l.releaseAll(ctx)
			l.gone = true
			close(ack)
		case <-l.stopCh:
			l.handovers.Wait()
			if !l.gone {
				l.releaseAll(ctx)
			}
			stopWatch(w)
			return
		}
		l.expire()
		if l.dirty && l.synced && !l.draining && time.Since(l.started) >= l.renew {
			l.dirty = false
			l.reconcile(ctx)
		}
	}
}

// watch starts watching the bucket afresh: the view is rebuilt from its
// contents.
func (l *leases) watch(ctx context.Context) jetstream.KeyWatcher {
	w, err := l.kv.WatchAll(ctx)
	if err != nil {
		l.log.Warn("leases: cannot watch the bucket; retrying", "bucket", l.bucket, "err", err)
		return nil
	}
	l.synced = false
	l.selfSeen = time.Now()
	l.mu.Lock()
	clear(l.replicas)
	clear(l.owners)
	l.mu.Unlock()
	return w
}

// stopWatch stops a watcher, reading what it still delivers so that its
// callback is not left blocked on a full channel.
func stopWatch(w jetstream.KeyWatcher) {
	if w == nil {
		return
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range w.Updates() { // closed once the subscription is
		}
	}()
	w.Stop()
	select {
	case <-done:
	case <-time.After(time.Second): // a closed connection may never close it
	}
}

// apply updates the view with one entry from the watcher (nil marks the
// end of the bucket's initial contents).
func (l *leases) apply(e jetstream.KeyValueEntry) {
	if e == nil {
		l.synced = true
		l.dirty = true
		return
	}
	now := time.Now()
	gone := e.Operation() != jetstream.KeyValuePut
	l.mu.Lock()
	defer l.mu.Unlock()
	switch key := e.Key(); {
	case strings.HasPrefix(key, replicaKeyPrefix):
		id := key[len(replicaKeyPrefix):]
		if gone {
			if _, ok := l.replicas[id]; ok {
				delete(l.replicas, id)
				l.dirty = true
			}
			return
		}
		var r Replica
		if err := json.Unmarshal(e.Value(), &r); err != nil {
			l.log.Warn("leases: bad replica entry", "key", key, "err", err)
			return
		}
		p := l.replicas[id]
		if p == nil {
			p = &peer{seen: now}
			l.replicas[id] = p
			l.dirty = true
		}
		p.Replica, p.updated = r, now
		if id == l.id {
			l.selfSeen = now
		}
	case strings.HasPrefix(key, deviceKeyPrefix):
		dev := key[len(deviceKeyPrefix):]
		h := l.held[dev]
		if gone {
			delete(l.owners, dev)
			l.freeSince[dev] = now
			l.dirty = true
			if h != nil && e.Revision() > h.rev {
				l.mu.Unlock()
				l.lose(dev, "lease expired in the bucket")
				l.mu.Lock()
			}
			return
		}
		var le Lease
		if err := json.Unmarshal(e.Value(), &le); err != nil {
			l.log.Warn("leases: bad lease entry", "key", key, "err", err)
			return
		}
		since := now
		if old := l.owners[dev]; old != nil && old.Owner == le.Owner {
			since = old.since
		}
		l.owners[dev] = &ownerView{Lease: le, rev: e.Revision(), updated: now, since: since}
		delete(l.freeSince, dev)
		if h != nil && le.Owner != l.id && e.Revision() > h.rev {
			l.mu.Unlock()
			l.lose(dev, "lease taken by "+le.Instance)
			l.mu.Lock()
		}
	}
}

// othersAlive reports whether another replica's heartbeat is current.
func (l *leases) othersAlive() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for id, p := range l.replicas {
		if id != l.id && time.Since(p.updated) < l.ttl+l.renew {
			return true
		}
	}
	return false
}

// releaseUnserved gives up leases on devices that this replica holds
// but no longer serves (the timer closed them, or serving failed), so
// that they are taken afresh rather than held by nobody.
func (l *leases) releaseUnserved(ctx context.Context) {
	if l.draining {
		return
	}
	for _, dev := range slices.Sorted(maps.Keys(l.held)) {
		if h := l.held[dev]; !l.b.busy(dev) {
			if h.closed.Load() {
				l.b.metrics.leasesLost.Add(1) // the timer closed it
			}
			if !h.releasing {
				l.log.Warn("leases: releasing a lease on a device no longer served here", "device", dev)
			}
			l.deleteLease(ctx, dev)
		}
	}
}

// endLingers removes the lingering endpoints of devices that another
// replica has served for a while (time for its subscription to reach
// every NATS server), or that nobody took within a TTL.
func (l *leases) endLingers() {
	devs := l.b.lingeringDevices()
	if len(devs) == 0 {
		return
	}
	var taken []string
	l.mu.Lock()
	for _, dev := range devs {
		if o := l.owners[dev]; o != nil && o.Owner != l.id && time.Since(o.since) >= l.renew/2 {
			taken = append(taken, dev)
		}
	}
	l.mu.Unlock()
	l.b.endLinger(taken, 0)
	l.b.endLinger(devs, l.ttl)
}

// heartbeat writes this replica's key, with the lease TTL.
func (l *leases) heartbeat(ctx context.Context) {
	if l.noHeartbeat {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, l.wait())
	defer cancel()
	_, err := l.js.PublishMsg(ctx, l.heartbeatMsg(), jetstream.WithMsgTTL(l.ttl))
	if err != nil {
		l.b.metrics.leaseRenewFailures.Add(1)
		l.log.Warn("leases: heartbeat failed", "err", err)
	}
}

func (l *leases) heartbeatMsg() *nats.Msg {
	doc := mustJSON(Replica{ID: l.id, Instance: l.b.instance, Started: float64(l.started.UnixNano()) / 1e9})
	return &nats.Msg{Subject: l.subject(replicaKeyPrefix + l.id), Data: doc}
}

// wait bounds the loop's calls to JetStream (renewals, takes, deletes;
// not the creation of a watcher). The loop may still be held up, e.g.
// closing a device; each lease's timer closes its device in time
// regardless.
func (l *leases) wait() time.Duration { return l.renew / 2 }

func (l *leases) subject(key string) string { return "$KV." + l.bucket + "." + key }

// renewAll writes the heartbeat and renews every held lease with
// compare-and-set, all at once.
func (l *leases) renewAll(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, l.wait())
	defer cancel()
	var hb jetstream.PubAckFuture
	if !l.noHeartbeat {
		f, err := l.js.PublishMsgAsync(l.heartbeatMsg(), jetstream.WithMsgTTL(l.ttl))
		if err != nil {
			l.b.metrics.leaseRenewFailures.Add(1)
		} else {
			hb = f
		}
	}
	for _, dev := range slices.Sorted(maps.Keys(l.held)) {
		h := l.held[dev]
		if h.pending != nil || h.closed.Load() {
			continue // unanswered: no second compare-and-set; closed: released once it is
		}
		sent := time.Now()
		doc := l.leaseDoc(h.since)
		f, err := l.js.PublishMsgAsync(&nats.Msg{Subject: l.subject(deviceKeyPrefix + dev), Data: doc},
			jetstream.WithExpectLastSequencePerSubject(h.rev), jetstream.WithMsgTTL(l.ttl))
		if err != nil {
			l.b.metrics.leaseRenewFailures.Add(1)
			continue
		}
		h.pending, h.pendAt = f, sent
	}
	if hb != nil {
		select {
		case <-hb.Ok():
			l.hbAcked = time.Now()
		case err := <-hb.Err():
			l.b.metrics.leaseRenewFailures.Add(1)
			l.log.Warn("leases: heartbeat failed", "err", err)
		case <-ctx.Done():
		}
	}
	l.collect(ctx)
}

// collect records the answers to renewals, waiting for them until ctx
// ends. An answer that comes later is collected at the next tick (a
// renewal unanswered for a whole TTL is abandoned). A refusal is checked
// against the bucket before the lease is given up, since a renewal that
// was stored but whose answer was lost (a reconnect) also moves the
// revision on.
func (l *leases) collect(ctx context.Context) {
	for _, dev := range slices.Sorted(maps.Keys(l.held)) {
		h := l.held[dev]
		if h == nil || h.pending == nil {
			continue
		}
		select {
		case ack := <-h.pending.Ok():
			l.renewed(dev, h, ack)
		case err := <-h.pending.Err():
			l.refused(dev, h, err)
		case <-ctx.Done():
			select { // an answer may be there as well
			case ack := <-h.pending.Ok():
				l.renewed(dev, h, ack)
			case err := <-h.pending.Err():
				l.refused(dev, h, err)
			default:
				if time.Since(h.pendAt) >= l.ttl {
					h.pending = nil
				}
			}
		}
	}
}

func (l *leases) renewed(dev string, h *heldLease, ack *jetstream.PubAck) {
	h.pending = nil
	if ack.Sequence < h.rev {
		return
	}
	if h.closed.Load() || !h.timer.Stop() {
		// The timer closed the device meanwhile: give the lease up.
		l.lose(dev, "it could not be renewed in time")
		return
	}
	h.rev, h.sent = ack.Sequence, h.pendAt
	h.timer.Reset(time.Until(h.pendAt.Add(l.ttl - l.margin)))
}

func (l *leases) refused(dev string, h *heldLease, err error) {
	h.pending = nil
	l.b.metrics.leaseRenewFailures.Add(1)
	if !conflict(err) {
		l.log.Warn("leases: renewal failed", "device", dev, "err", err)
		return
	}
	gctx, cancel := context.WithTimeout(context.Background(), l.wait())
	e, gerr := l.kv.Get(gctx, deviceKeyPrefix+dev)
	cancel()
	var le Lease
	if gerr == nil && json.Unmarshal(e.Value(), &le) == nil && le.Owner == l.id && le.Since == float64(h.since.UnixNano())/1e9 {
		// Ours, written by a renewal whose answer was lost: it was sent at
		// pendAt at the earliest.
		l.renewed(dev, h, &jetstream.PubAck{Sequence: e.Revision()})
		return
	}
	l.lose(dev, "lease renewal refused: another replica holds it")
}

func (l *leases) leaseDoc(since time.Time) []byte {
	return mustJSON(Lease{Owner: l.id, Instance: l.b.instance, Since: float64(since.UnixNano()) / 1e9})
}

func conflict(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// expire drops leases that could not be renewed in time: the device must
// be closed before another replica may take it.
func (l *leases) expire() {
	for dev, h := range l.held {
		if time.Since(h.sent) >= l.ttl-l.margin {
			l.lose(dev, "lease could not be renewed in time")
		}
	}
}

// drop forgets a held lease: its timer does nothing from now on.
func (l *leases) drop(dev string, h *heldLease) {
	h.done.Store(true)
	h.timer.Stop()
	delete(l.held, dev)
	l.b.metrics.leasesHeld.Add(-1)
}

// lose stops serving a device whose lease is gone, at once.
func (l *leases) lose(dev, reason string) {
	h := l.held[dev]
	if h == nil {
		return
	}
	l.drop(dev, h)
	l.b.metrics.leasesLost.Add(1)
	l.log.Warn("leases: lost a device", "device", dev, "reason", reason)
	l.b.unserve([]string{dev}, true, "lease lost: "+reason)
	l.dirty = true
}

// reconcile takes free devices meant for this replica (or free for too
// long) and hands over devices that another replica should have.
func (l *leases) reconcile(ctx context.Context) {
	now := time.Now()
	l.mu.Lock()
	live := []string{l.id}
	for id, p := range l.replicas {
		if id != l.id && now.Sub(p.updated) < l.ttl+l.renew {
			live = append(live, id)
		}
	}
	slices.Sort(live)
	target := assign(l.devices, live)
	var take []string
	for _, dev := range l.devices {
		if l.held[dev] != nil || l.b.busy(dev) {
			continue // ours, or our last worker for it is still closing
		}
		if o := l.owners[dev]; o != nil && now.Sub(o.updated) < l.ttl+l.renew {
			continue // held by another replica
		}
		since, ok := l.freeSince[dev]
		if !ok {
			since = now
			l.freeSince[dev] = now
		}
		if target[dev] == l.id || now.Sub(since) >= l.ttl/2 {
			take = append(take, dev)
		}
	}
	var give []string
	fair := (len(l.devices) + len(live) - 1) / len(live)
	keep := 0 // held and not being handed over
	for _, h := range l.held {
		if !h.releasing {
			keep++
		}
	}
	for _, dev := range slices.Sorted(maps.Keys(l.held)) {
		if keep <= fair {
			break
		}
		// Hand over only to a replica alive for a TTL, and only a device
		// held for two: replicas whose views differ for a moment do not
		// pass devices back and forth.
		t, h := target[dev], l.held[dev]
		if p := l.replicas[t]; t != l.id && !h.releasing && p != nil && now.Sub(p.seen) >= l.ttl && now.Sub(h.since) >= 2*l.ttl {
			give = append(give, dev)
			keep--
		}
	}
	l.mu.Unlock()

	var got []string
	for _, dev := range take {
		sent := time.Now()
		cctx, cancel := context.WithTimeout(ctx, l.wait())
		doc := l.leaseDoc(sent)
		rev, err := l.kv.Create(cctx, deviceKeyPrefix+dev, doc, jetstream.KeyTTL(l.ttl))
		cancel()
		if err != nil && !errors.Is(err, jetstream.ErrKeyExists) && !conflict(err) {
			rev, err = l.confirm(ctx, dev, doc, err)
		}
		if err != nil {
			if !errors.Is(err, jetstream.ErrKeyExists) && !conflict(err) {
				l.log.Warn("leases: could not take a device", "device", dev, "err", err)
				break
			}
			continue // another replica was quicker
		}
		l.held[dev] = l.newHeld(dev, rev, sent)
		l.b.metrics.leasesAcquired.Add(1)
		l.b.metrics.leasesHeld.Add(1)
		got = append(got, dev)
	}
	if len(got) > 0 {
		l.log.Info("leases: took devices", "devices", strings.Join(got, ","))
		for _, dev := range l.b.serve(got) {
			l.deleteLease(ctx, dev) // cannot serve it: let another replica try
		}
	}
	for _, dev := range give {
		h := l.held[dev]
		h.releasing = true
		l.log.Info("leases: handing a device over", "device", dev, "to", target[dev])
		l.handovers.Add(1)
		go func() {
			defer l.handovers.Done()
			l.b.unserve([]string{dev}, false, "handed over to another bridge replica")
			l.released <- handedOver{dev, h}
		}()
	}
}

// confirm looks for the lease a Create that failed with err may have
// written all the same (its answer lost, say): a lease that is ours byte
// for byte is ours, and is taken rather than left to expire unserved.
func (l *leases) confirm(ctx context.Context, dev string, doc []byte, err error) (uint64, error) {
	gctx, cancel := context.WithTimeout(ctx, l.wait())
	defer cancel()
	e, gerr := l.kv.Get(gctx, deviceKeyPrefix+dev)
	if gerr != nil || !bytes.Equal(e.Value(), doc) {
		return 0, err
	}
	l.log.Info("leases: a device's lease was written although the answer was lost", "device", dev, "err", err)
	return e.Revision(), nil
}

// deleteLease releases a lease this replica holds, with compare-and-set:
// never a lease it no longer holds.
func (l *leases) deleteLease(ctx context.Context, dev string) {
	h := l.held[dev]
	if h == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, l.wait())
	defer cancel()
	if h.pending != nil { // a renewal in flight moves the revision on
		select {
		case ack := <-h.pending.Ok():
			h.rev = max(h.rev, ack.Sequence)
		case <-h.pending.Err():
		case <-ctx.Done():
		}
		h.pending = nil
	}
	l.drop(dev, h)
	if err := l.kv.Delete(ctx, deviceKeyPrefix+dev, jetstream.LastRevision(h.rev)); err != nil {
		l.log.Warn("leases: could not release a device (it will expire)", "device", dev, "err", err)
	} else if !h.closed.Load() {
		l.b.metrics.leasesReleased.Add(1)
	}
	l.dirty = true
}

func (l *leases) releaseAll(ctx context.Context) {
	for _, dev := range slices.Sorted(maps.Keys(l.held)) {
		l.deleteLease(ctx, dev)
	}
	l.deleteHeartbeat(ctx)
}

// deleteHeartbeat removes this replica's key: the others stop placing
// devices here. Renewals write it no more.
func (l *leases) deleteHeartbeat(ctx context.Context) {
	if l.noHeartbeat {
		return
	}
	l.noHeartbeat = true
	dctx, cancel := context.WithTimeout(ctx, l.wait())
	defer cancel()
	if err := l.kv.Delete(dctx, replicaKeyPrefix+l.id); err != nil {
		l.log.Warn("leases: could not remove the heartbeat (it will expire)", "err", err)
	}
}

// assign places each device on one of the live replicas: rendezvous
// (highest random weight) hashing, so that a replica coming or going
// moves few devices, with a bound of ceil(N/R) devices per replica so
// that the spread is even. Every replica computes the same answer from
// the same view.
func assign(devices, replicas []string) map[string]string {
	if len(replicas) == 0 {
		return nil
	}
	capacity := (len(devices) + len(replicas) - 1) / len(replicas)
	load := make(map[string]int, len(replicas))
	out := make(map[string]string, len(devices))
	type scored struct {
		id    string
		score uint64
	}
	ranked := make([]scored, len(replicas))
	for _, d := range devices {
		for i, r := range replicas {
			ranked[i] = scored{r, weight(d, r)}
		}
		slices.SortFunc(ranked, func(a, b scored) int {
			if a.score != b.score {
				if a.score > b.score {
					return -1
				}
				return 1
			}
			return strings.Compare(a.id, b.id)
		})
		for _, s := range ranked {
			if load[s.id] < capacity {
				out[d] = s.id
				load[s.id]++
				break
			}
		}
	}
	return out
}

func weight(device, replica string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(device))
	h.Write([]byte{0})
	h.Write([]byte(replica))
	x := h.Sum64() // splitmix64's finaliser spreads FNV's low bits
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// Owners is the answer to a request on the owners subject: which replica
// serves which device, as the answering replica sees the lease bucket.
type Owners struct {
	Leases     bool          `json:"leases"` // false: a single replica without leases
	Bucket     string        `json:"bucket,omitempty"`
	AnsweredBy string        `json:"answered_by"` // the answering replica's instance
	Replicas   []Replica     `json:"replicas"`
	Devices    []DeviceOwner `json:"devices"`
}

// DeviceOwner is one device's owner; Owner is empty when the device is
// free.
type DeviceOwner struct {
	Device   string  `json:"device"`
	Owner    string  `json:"owner,omitempty"`    // replica id
	Instance string  `json:"instance,omitempty"` // replica instance
	Since    float64 `json:"since,omitempty"`
}

// snapshot returns the view as an Owners document.
func (l *leases) snapshot() Owners {
	l.mu.Lock()
	defer l.mu.Unlock()
	o := Owners{Leases: true, Bucket: l.bucket, AnsweredBy: l.b.instance, Replicas: []Replica{}, Devices: []DeviceOwner{}}
	for _, id := range slices.Sorted(maps.Keys(l.replicas)) {
		o.Replicas = append(o.Replicas, l.replicas[id].Replica)
	}
	names := slices.Clone(l.devices)
	for dev := range l.owners {
		if _, ok := slices.BinarySearch(l.devices, dev); !ok {
			names = append(names, dev)
		}
	}
	slices.Sort(names)
	for _, dev := range names {
		d := DeviceOwner{Device: dev}
		if v := l.owners[dev]; v != nil {
			d.Owner, d.Instance, d.Since = v.Owner, v.Instance, v.Since
		}
		o.Devices = append(o.Devices, d)
	}
	return o
}
