package katcp

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"
)

// SensorList asks the device for its sensors (?sensor-list). filter is ""
// for all, a sensor name, or a /regex/ as the device understands it.
func (c *Client) SensorList(ctx context.Context, filter string) ([]SensorInfo, error) {
	var args []any
	if filter != "" {
		args = append(args, filter)
	}
	r, err := c.Request(ctx, "sensor-list", args...)
	if err != nil {
		return nil, err
	}
	out := make([]SensorInfo, 0, len(r.Informs))
	for _, inf := range r.Informs {
		info, err := ParseSensorInfo(inf.Args)
		if err != nil {
			return nil, fmt.Errorf("katcp: ?sensor-list: %w", err)
		}
		out = append(out, info)
	}
	return out, nil
}

// SensorValues asks the device for current readings (?sensor-value);
// filter as for SensorList.
func (c *Client) SensorValues(ctx context.Context, filter string) ([]Reading, error) {
	var args []any
	if filter != "" {
		args = append(args, filter)
	}
	r, err := c.Request(ctx, "sensor-value", args...)
	if err != nil {
		return nil, err
	}
	v4 := c.v4()
	var out []Reading
	for _, inf := range r.Informs {
		rs, err := ParseReadings(inf.Args, v4)
		if err != nil {
			return nil, fmt.Errorf("katcp: ?sensor-value: %w", err)
		}
		out = append(out, rs...)
	}
	return out, nil
}

// SensorValue returns the current reading of one sensor.
func (c *Client) SensorValue(ctx context.Context, name string) (Reading, error) {
	rs, err := c.SensorValues(ctx, name)
	if err != nil {
		return Reading{}, err
	}
	if len(rs) != 1 {
		return Reading{}, fmt.Errorf("katcp: ?sensor-value %s: %d readings, want 1", name, len(rs))
	}
	return rs[0], nil
}

// SetSampling sets the sampling strategy of the named sensors
// (?sensor-sampling). With several names it sends one bulk request when
// the device advertises B (atomic: all or nothing), otherwise one request
// per sensor (stopping at the first refusal). params are the strategy's
// parameters: periods as time.Duration or seconds, thresholds as numbers.
func (c *Client) SetSampling(ctx context.Context, names []string, s Strategy, params ...any) error {
	if len(names) == 0 {
		return nil
	}
	if len(params) != s.NumParams() {
		return fmt.Errorf("%w: strategy %v takes %d parameters, got %d", ErrBadValue, s, s.NumParams(), len(params))
	}
	v := c.Protocol().Version
	if v.Major == 4 {
		if !s.InV4() {
			return fmt.Errorf("%w: strategy %v does not exist in KATCP v4", ErrBadValue, s)
		}
		if s == StrategyPeriod {
			params = v4Period(params)
		}
	}
	send := func(name string) error {
		args := append([]any{name, s}, params...)
		_, err := c.Request(ctx, "sensor-sampling", args...)
		return err
	}
	if len(names) > 1 && v.Has(FlagBulkSensors) {
		return send(strings.Join(names, ","))
	}
	for _, n := range names {
		if err := send(n); err != nil {
			return err
		}
	}
	return nil
}

// v4Period writes a period in milliseconds, as v4 wants it: a
// time.Duration, or a number of seconds (as for v5).
func v4Period(params []any) []any {
	var ms any = params[0]
	switch p := params[0].(type) {
	case time.Duration:
		ms = p.Milliseconds()
	case float64:
		ms = p * 1000
	case float32:
		ms = float64(p) * 1000
	case int:
		ms = p * 1000
	case int64:
		ms = p * 1000
	}
	return []any{ms}
}

// SyncState is a SensorWatcher's state.
type SyncState int

// The watcher states.
const (
	Unsynced SyncState = iota // not connected, or not yet subscribed
	Syncing                   // connected, reading the sensor list and setting strategies
	Synced                    // every watched sensor is subscribed
	WatchClosed
)

func (s SyncState) String() string {
	switch s {
	case Unsynced:
		return "unsynced"
	case Syncing:
		return "syncing"
	case Synced:
		return "synced"
	case WatchClosed:
		return "closed"
	}
	return fmt.Sprintf("SyncState(%d)", int(s))
}

// SensorUpdate is a reading delivered by a SensorWatcher, with its value
// decoded by the sensor's type (see SensorInfo.Decode). Value is nil when
// the status carries no valid value or the value does not decode; Err
// then says why, for the latter. Reading.Value, the raw bytes, may be
// shared with other watchers: read it, do not modify it.
type SensorUpdate struct {
	Reading
	Type  SensorType
	Value any
	Err   error
}

// WatchConfig says which sensors a SensorWatcher follows and how.
type WatchConfig struct {
	// Names lists sensors by exact name; Filter (a name or /regex/)
	// selects them by ?sensor-list. Both may be set; neither means all.
	Names  []string
	Filter string
	// Select, when set, further chooses among the listed sensors (like
	// aiokatcp's SensorWatcher.filter).
	Select func(SensorInfo) bool
	// Strategy and Params are the sampling strategy applied to each
	// sensor; the zero Strategy (none) means auto.
	Strategy Strategy
	Params   []any
	// OnUpdate receives every update, including the unreachable ones made
	// up while disconnected; OnSync every state change. Both run on the
	// client's dispatch goroutine.
	OnUpdate func(SensorUpdate)
	OnSync   func(SyncState)
}

// SensorWatcher follows a set of sensors across reconnections: it reads
// their types, sets their sampling strategy (in bulk when the device
// advertises B), sets it again after every reconnect and every
// #interface-changed, and marks every sensor unreachable while the device
// is disconnected. It is safe for concurrent use.
type SensorWatcher struct {
	c      *Client
	cfg    WatchConfig
	stop   context.CancelFunc
	done   chan struct{}
	resync chan struct{}
	remove []func()

	mu      sync.Mutex // guards the fields below
	state   SyncState
	types   map[string]SensorInfo
	last    map[string]SensorUpdate
	changed chan struct{}
	watched bool // a waiter holds changed
	lastErr error
}

// Watch starts a SensorWatcher. Close it when done.
func (c *Client) Watch(cfg WatchConfig) *SensorWatcher {
	if cfg.Strategy == StrategyNone {
		cfg.Strategy = StrategyAuto
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := &SensorWatcher{
		c:       c,
		cfg:     cfg,
		stop:    cancel,
		done:    make(chan struct{}),
		resync:  make(chan struct{}, 1),
		types:   make(map[string]SensorInfo),
		last:    make(map[string]SensorUpdate),
		changed: make(chan struct{}),
	}
	w.remove = append(w.remove,
		c.HandleInform("sensor-status", w.onStatus),
		c.HandleInform("interface-changed", func(Message) { w.kick() }),
	)
	go w.loop(ctx)
	return w
}

func (w *SensorWatcher) kick() {
	select {
	case w.resync <- struct{}{}:
	default:
	}
}

// Close stops the watcher and waits for it. It does not change the
// device's strategies: they end with the connection.
func (w *SensorWatcher) Close() {
	w.stop()
	<-w.done
	for _, r := range w.remove {
		r()
	}
}

// State returns the watcher's state and the error of the last failed sync.
func (w *SensorWatcher) State() (SyncState, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.state, w.lastErr
}

// Last returns the last update of a sensor.
func (w *SensorWatcher) Last(name string) (SensorUpdate, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	u, ok := w.last[name]
	return u, ok
}

// Sensors returns what the watcher knows of the sensors it follows.
func (w *SensorWatcher) Sensors() []SensorInfo {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]SensorInfo, 0, len(w.types))
	for _, info := range w.types {
		out = append(out, info)
	}
	return out
}

// WaitFor waits until the last update of sensor name satisfies cond, or
// ctx ends.
func (w *SensorWatcher) WaitFor(ctx context.Context, name string, cond func(SensorUpdate) bool) error {
	for {
		w.mu.Lock()
		u, ok := w.last[name]
		ch, state := w.changed, w.state
		w.watched = true
		w.mu.Unlock()
		if ok && cond(u) {
			return nil
		}
		if state == WatchClosed {
			return fmt.Errorf("katcp: waiting for sensor %s: watcher closed", name)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("katcp: waiting for sensor %s: %w", name, ctx.Err())
		}
	}
}

// WaitSynced waits until the watcher is Synced.
func (w *SensorWatcher) WaitSynced(ctx context.Context) error {
	for {
		w.mu.Lock()
		ch, state := w.changed, w.state
		w.watched = true
		w.mu.Unlock()
		switch state {
		case Synced:
			return nil
		case WatchClosed:
			return fmt.Errorf("katcp: watcher closed")
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// notifyLocked wakes the goroutines in WaitFor and WaitSynced. The
// channel is only replaced when one of them has taken it, so that a
// stream of updates nobody waits for costs nothing here.
func (w *SensorWatcher) notifyLocked() {
	if !w.watched {
		return
	}
	close(w.changed)
	w.changed = make(chan struct{})
	w.watched = false
}

// setState records a state change. It goes through the client's dispatch
// queue, so that it is seen after the informs that came before it: once
// Synced, the initial readings have been delivered.
func (w *SensorWatcher) setState(s SyncState, err error) {
	apply := func() {
		w.mu.Lock()
		if w.state == s || w.state == WatchClosed {
			w.mu.Unlock()
			return
		}
		w.state = s
		if err != nil || s != WatchClosed {
			w.lastErr = err
		}
		w.notifyLocked()
		w.mu.Unlock()
		if f := w.cfg.OnSync; f != nil {
			f(s)
		}
	}
	if s == WatchClosed || !w.c.events.pushEvent(event{kind: evFunc, fn: apply}) {
		apply()
	}
}

func (w *SensorWatcher) onStatus(m Message) {
	v4 := w.c.v4()
	err := eachReading(m.Args, v4, func(_ int, name []byte, ts time.Time, st Status, value []byte) {
		// m is the client's copy, shared by the handlers of
		// #sensor-status and never modified: the reading keeps its bytes.
		w.deliver(name, Reading{Timestamp: ts, Status: st, Value: value}, v4)
	})
	if err != nil {
		w.c.log.Warn("katcp: bad #sensor-status", "err", err)
	}
}

// deliver decodes, records and reports one reading of sensor name, if
// the watcher follows it. It runs on the dispatch goroutine.
func (w *SensorWatcher) deliver(name []byte, r Reading, v4 bool) {
	w.mu.Lock()
	info, ok := w.types[string(name)]
	if !ok {
		w.mu.Unlock()
		return
	}
	r.Name = info.Name // no string to allocate
	u := SensorUpdate{Reading: r, Type: info.Type}
	if r.Status.ValidValue() {
		u.Value, u.Err = info.Decode(r.Value, v4)
	}
	w.last[r.Name] = u
	w.notifyLocked()
	w.mu.Unlock()
	if f := w.cfg.OnUpdate; f != nil {
		f(u)
	}
}

// loop subscribes on every connection and marks the sensors unreachable
// on every disconnection.
func (w *SensorWatcher) loop(ctx context.Context) {
	defer close(w.done)
	defer w.setState(WatchClosed, nil)
	c := w.c
	const firstRetry = 5 * time.Second
	backoff := firstRetry
	var retryTimer *time.Timer
	defer func() {
		if retryTimer != nil {
			retryTimer.Stop()
		}
	}()
	for {
		if retryTimer != nil {
			retryTimer.Stop()
			retryTimer = nil
		}
		if err := c.WaitConnected(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			w.mu.Lock()
			w.lastErr = err // the client stopped for good
			w.mu.Unlock()
			return
		}
		gen, _, _ := c.connState()
		w.setState(Syncing, nil)
		err := w.sync(ctx)
		if ctx.Err() != nil {
			return
		}
		var retry <-chan time.Time
		if err != nil {
			w.setState(Unsynced, err)
			c.log.Warn("katcp: sensor watcher could not subscribe; retrying", "err", err, "in", backoff)
			retryTimer = time.NewTimer(backoff)
			retry = retryTimer.C
			backoff = min(2*backoff, 60*time.Second)
		} else {
			w.setState(Synced, nil)
			backoff = firstRetry
		}
		// Wait for the connection to end, for #interface-changed, or for
		// the time to retry a failed subscription.
		resync := false
		for !resync {
			now, connected, changed := c.connState()
			if now != gen || !connected {
				break
			}
			select {
			case <-changed:
			case <-w.resync:
				resync = true
			case <-retry:
				resync = true
			case <-ctx.Done():
				return
			}
		}
		if resync {
			continue
		}
		w.setState(Unsynced, nil)
		w.markUnreachable()
	}
}

// markUnreachable reports every watched sensor as unreachable.
func (w *SensorWatcher) markUnreachable() {
	now := time.Now()
	w.mu.Lock()
	names := slices.Sorted(maps.Keys(w.types))
	w.mu.Unlock()
	w.c.events.pushEvent(event{kind: evFunc, fn: func() {
		for _, n := range names {
			w.deliver([]byte(n), Reading{Timestamp: now, Status: StatusUnreachable}, false)
		}
	}})
}

// sync reads the sensor list and sets the strategy.
func (w *SensorWatcher) sync(ctx context.Context) error {
	c := w.c
	types := make(map[string]SensorInfo)
	if w.cfg.Filter != "" || len(w.cfg.Names) == 0 {
		list, err := c.SensorList(ctx, w.cfg.Filter)
		if err != nil {
			return err
		}
		for _, info := range list {
			types[info.Name] = info
		}
	}
	for _, n := range w.cfg.Names {
		list, err := c.SensorList(ctx, n)
		if errors.Is(err, ErrFail) {
			c.log.Warn("katcp: sensor watcher: the device has no such sensor", "sensor", n, "err", err)
			continue // the others are still watched
		}
		if err != nil {
			return err
		}
		for _, info := range list {
			types[info.Name] = info
		}
	}
	if w.cfg.Select != nil {
		maps.DeleteFunc(types, func(_ string, info SensorInfo) bool { return !w.cfg.Select(info) })
	}
	w.mu.Lock()
	w.types = types
	w.mu.Unlock()
	names := slices.Sorted(maps.Keys(types))
	return c.SetSampling(ctx, names, w.cfg.Strategy, w.cfg.Params...)
}
