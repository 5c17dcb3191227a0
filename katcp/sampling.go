package katcp

import (
	"bytes"
	"fmt"
	"math"
	"sync"
	"time"
)

// Limits on sampling periods.
const (
	minSamplingPeriod = time.Millisecond
	maxSamplingPeriod = 1000 * 24 * time.Hour
)

// samplingParams is a parsed strategy with its parameters.
type samplingParams struct {
	strategy Strategy
	diff     float64       // differential threshold
	period   time.Duration // period, or shortest period for the rate strategies
	longest  time.Duration // longest period for the rate strategies (0: none)
	raw      [][]byte      // the parameters as given, for the reply
}

// parseSampling parses "strategy [params]" for sensor s. v4 periods are
// milliseconds.
func parseSampling(args [][]byte, typ SensorType, v4 bool) (samplingParams, error) {
	var p samplingParams
	st, err := ParseStrategy(args[0])
	if err != nil {
		return p, fmt.Errorf("unknown strategy %q", args[0])
	}
	p.strategy = st
	if v4 && !st.InV4() {
		return p, fmt.Errorf("strategy %v does not exist in KATCP v4", st)
	}
	params := args[1:]
	if len(params) != st.NumParams() {
		return p, fmt.Errorf("strategy %v takes %d parameters, got %d", st, st.NumParams(), len(params))
	}
	p.raw = params
	nums := make([]float64, len(params))
	for i, b := range params {
		f, err := ParseFloat(b)
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) || f < 0 {
			return p, fmt.Errorf("strategy %v: parameter %q is not a non-negative number", st, b)
		}
		nums[i] = f
	}
	unit := time.Second
	if v4 {
		unit = time.Millisecond
	}
	for _, f := range nums {
		if f*float64(unit) > float64(maxSamplingPeriod) {
			return p, fmt.Errorf("strategy %v: parameter %v is too large", st, f)
		}
	}
	// Periods below minSamplingPeriod are raised to it, so that no client
	// can make the server spin.
	dur := func(f float64) time.Duration {
		if f == 0 {
			return 0
		}
		return max(time.Duration(f*float64(unit)), minSamplingPeriod)
	}
	numeric := typ == SensorInteger || typ == SensorFloat
	switch st {
	case StrategyPeriod:
		p.period = dur(nums[0])
		if p.period <= 0 {
			return p, fmt.Errorf("period must be positive")
		}
	case StrategyDifferential:
		if !numeric {
			return p, fmt.Errorf("strategy differential applies only to integer and float sensors, not %v", typ)
		}
		p.diff = nums[0]
	case StrategyEventRate:
		p.period, p.longest = dur(nums[0]), dur(nums[1])
	case StrategyDifferentialRate:
		if !numeric {
			return p, fmt.Errorf("strategy differential-rate applies only to integer and float sensors, not %v", typ)
		}
		p.diff, p.period, p.longest = nums[0], dur(nums[1]), dur(nums[2])
	}
	if p.longest > 0 && p.period > p.longest {
		return p, fmt.Errorf("shortest period is longer than the longest")
	}
	return p, nil
}

// sampler sends one sensor's readings to one client by one strategy.
type sampler struct {
	conn   *serverConn
	sensor *Sensor
	p      samplingParams

	mu       sync.Mutex // guards the fields below
	stopped  bool
	sent     bool      // something was sent
	lastRaw  []byte    // last value sent
	lastStat Status    // last status sent
	lastNum  float64   // last value sent, as a number (differential)
	lastAt   time.Time // when the last update was sent
	pending  bool      // a change waits for the shortest period
	timer    *time.Timer
	stopObs  func()
}

// startSampler sends the current reading and starts following the sensor.
func startSampler(conn *serverConn, s *Sensor, p samplingParams) *sampler {
	sm := &sampler{conn: conn, sensor: s, p: p}
	sm.mu.Lock()
	// Observe before reading the current value: a Set in between waits
	// for sm.mu and is then judged against what was sent, so none is lost.
	if p.strategy != StrategyPeriod {
		sm.stopObs = s.Observe(sm.update)
	}
	sm.sendLocked(s.Reading())
	switch p.strategy {
	case StrategyPeriod:
		sm.timer = time.AfterFunc(p.period, sm.tick)
	case StrategyEventRate, StrategyDifferentialRate:
		if p.longest > 0 {
			sm.timer = time.AfterFunc(p.longest, sm.tick)
		}
	}
	sm.mu.Unlock()
	return sm
}

func (sm *sampler) stop() {
	if sm.stopObs != nil {
		sm.stopObs()
	}
	sm.mu.Lock()
	sm.stopped = true
	if sm.timer != nil {
		sm.timer.Stop()
	}
	sm.mu.Unlock()
}

// sendLocked queues r for the client and records it.
func (sm *sampler) sendLocked(r Reading) {
	sm.sent = true
	sm.lastRaw = append(sm.lastRaw[:0], r.Value...)
	sm.lastStat = r.Status
	if sm.p.diff > 0 || sm.p.strategy == StrategyDifferential || sm.p.strategy == StrategyDifferentialRate {
		sm.lastNum, _ = ParseFloat(r.Value)
	}
	if sm.p.period > 0 || sm.p.longest > 0 { // only the timed strategies need it
		sm.lastAt = time.Now()
	}
	sm.pending = false
	sm.conn.sendSensorStatus(&r)
}

// changed reports whether r differs enough from what was last sent.
func (sm *sampler) changedLocked(r *Reading) bool {
	if !sm.sent || r.Status != sm.lastStat {
		return true
	}
	switch sm.p.strategy {
	case StrategyDifferential, StrategyDifferentialRate:
		f, err := ParseFloat(r.Value)
		return err != nil || math.Abs(f-sm.lastNum) > sm.p.diff
	}
	return !bytes.Equal(r.Value, sm.lastRaw)
}

// update is the sensor observer.
func (sm *sampler) update(_ *Sensor, r Reading) {
	sm.mu.Lock()
	defer sm.mu.Unlock()
	if sm.stopped {
		return
	}
	switch sm.p.strategy {
	case StrategyAuto:
		sm.sendLocked(r)
	case StrategyEvent, StrategyDifferential:
		if sm.changedLocked(&r) {
			sm.sendLocked(r)
		}
	case StrategyEventRate, StrategyDifferentialRate:
		if !sm.changedLocked(&r) {
			return
		}
		wait := sm.p.period - time.Since(sm.lastAt)
		if wait <= 0 {
			sm.sendLocked(r)
			sm.rearmLocked()
			return
		}
		if !sm.pending {
			sm.pending = true
			sm.armLocked(wait)
		}
	}
}

// tick runs on the timer: the period strategy's beat, the rate
// strategies' delayed change or longest-period refresh.
func (sm *sampler) tick() {
	sm.mu.Lock()
	defer sm.mu.Unlock()
	if sm.stopped {
		return
	}
	switch sm.p.strategy {
	case StrategyPeriod:
		sm.sendLocked(sm.sensor.Reading())
		sm.timer.Reset(sm.p.period)
		return
	}
	if sm.pending || (sm.p.longest > 0 && time.Since(sm.lastAt) >= sm.p.longest) {
		sm.sendLocked(sm.sensor.Reading())
	}
	sm.rearmLocked()
}

// rearmLocked sets the rate strategies' timer for the longest period.
func (sm *sampler) rearmLocked() {
	if sm.p.longest > 0 {
		sm.armLocked(sm.p.longest - time.Since(sm.lastAt))
	} else if sm.timer != nil {
		sm.timer.Stop()
	}
}

func (sm *sampler) armLocked(d time.Duration) {
	if sm.timer == nil {
		sm.timer = time.AfterFunc(d, sm.tick)
		return
	}
	sm.timer.Reset(d)
}

// paramsArgs returns the strategy and its parameters as reply arguments.
func (p samplingParams) args() []any {
	out := []any{p.strategy}
	for _, r := range p.raw {
		out = append(out, r)
	}
	return out
}
