package katcp

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// ErrBadSensorName is returned for sensor names with characters other than
// ASCII letters, digits, '.', '-' and '_'.
var ErrBadSensorName = errors.New("katcp: sensor name must be letters, digits, '.', '-' and '_'")

// ValidSensorName reports whether name is a valid sensor name.
func ValidSensorName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !isAlpha(c) && !isDigit(c) && c != '.' && c != '-' && c != '_' {
			return false
		}
	}
	return true
}

// SensorOptions are the optional parts of a sensor.
type SensorOptions struct {
	Description string
	Units       string
	// Values lists the values of a discrete sensor (required for one).
	Values []string
	// Nominal and Warn are [min, max] ranges of an integer or float
	// sensor, reported by ?sensor-list. When Nominal is set, Set computes
	// the status: nominal inside Nominal; warn inside Warn (or anywhere
	// outside Nominal when Warn is not set); error otherwise.
	Nominal *[2]float64
	Warn    *[2]float64
}

// Sensor is a device sensor: a typed value with a status and a timestamp,
// observed by the clients that sample it. It is safe for concurrent use.
type Sensor struct {
	info    SensorInfo
	nominal *[2]float64
	warn    *[2]float64

	notifyMu sync.Mutex // held while a reading is stored and observed
	mu       sync.Mutex // guards reading and value
	reading  Reading    // Value holds the v5 wire form
	value    any

	observers atomic.Pointer[[]*sensorObserver] // copy on write
	obsMu     sync.Mutex                        // serialises writers of observers
}

type sensorObserver struct {
	f func(*Sensor, Reading)
}

// NewSensor makes a sensor of type t with status unknown. The name must
// be valid; a discrete sensor needs Values; ranges apply to integer and
// float sensors only.
func NewSensor(t SensorType, name string, opts SensorOptions) (*Sensor, error) {
	if !ValidSensorName(name) {
		return nil, fmt.Errorf("%w: %q", ErrBadSensorName, name)
	}
	info := SensorInfo{Name: name, Description: opts.Description, Units: opts.Units, Type: t}
	numeric := t == SensorInteger || t == SensorFloat
	switch {
	case t > SensorAddress:
		return nil, fmt.Errorf("%w: unknown sensor type %d", ErrBadValue, t)
	case t == SensorDiscrete && len(opts.Values) == 0:
		return nil, fmt.Errorf("%w: discrete sensor %s needs values", ErrBadValue, name)
	case (opts.Nominal != nil || opts.Warn != nil) && !numeric:
		return nil, fmt.Errorf("%w: ranges apply only to integer and float sensors, not %v", ErrBadValue, t)
	case opts.Warn != nil && opts.Nominal == nil:
		return nil, fmt.Errorf("%w: a warn range needs a nominal range", ErrBadValue)
	}
	s := &Sensor{info: info, nominal: opts.Nominal, warn: opts.Warn}
	if t == SensorDiscrete {
		s.info.Params = slices.Clone(opts.Values)
	}
	if opts.Nominal != nil {
		s.info.Params = append(s.info.Params, s.formatBound(opts.Nominal[0]), s.formatBound(opts.Nominal[1]))
		if opts.Warn != nil {
			s.info.Params = append(s.info.Params, s.formatBound(opts.Warn[0]), s.formatBound(opts.Warn[1]))
		}
	}
	s.reading = Reading{Name: name, Timestamp: time.Now(), Status: StatusUnknown, Value: s.zeroValue()}
	return s, nil
}

// MustSensor is NewSensor that panics on error, for sensors defined in code.
func MustSensor(t SensorType, name string, opts SensorOptions) *Sensor {
	s, err := NewSensor(t, name, opts)
	if err != nil {
		panic(err)
	}
	return s
}

func (s *Sensor) formatBound(f float64) string {
	if s.info.Type == SensorInteger {
		return fmt.Sprint(int64(f))
	}
	return string(AppendFloat(nil, f))
}

// zeroValue is the wire form of the type's zero value, sent while the
// status is unknown.
func (s *Sensor) zeroValue() []byte {
	switch s.info.Type {
	case SensorInteger, SensorBoolean:
		return []byte("0")
	case SensorFloat, SensorTimestamp:
		return []byte("0.0")
	case SensorDiscrete:
		return []byte(s.info.Params[0])
	case SensorLRU:
		return []byte("nominal")
	case SensorAddress:
		return []byte("0.0.0.0")
	}
	return []byte{}
}

// Name returns the sensor's name.
func (s *Sensor) Name() string { return s.info.Name }

// Info returns the sensor's description as ?sensor-list reports it.
func (s *Sensor) Info() SensorInfo {
	info := s.info
	info.Params = slices.Clone(info.Params)
	return info
}

// Reading returns the current reading; Value is in v5 wire form.
func (s *Sensor) Reading() Reading {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.reading
	r.Value = slices.Clone(r.Value)
	return r
}

// Value returns the current typed value (nil until set) and reading.
func (s *Sensor) Value() (any, Reading) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.reading
	r.Value = slices.Clone(r.Value)
	return s.value, r
}

// Set sets the value with the current time, and the status the ranges
// give (nominal without ranges).
func (s *Sensor) Set(v any) error {
	return s.SetReading(time.Now(), StatusUnknown, v)
}

// SetReading sets timestamp, status and value. StatusUnknown with a value
// means "compute the status" (from the ranges, nominal without them). A
// status that carries no valid value (failure, unreachable, inactive)
// may come with a nil value, which keeps the last one. The value's Go type
// must suit the sensor: integer: any int type; float: float64 or float32
// (or an int type); boolean: bool; discrete and lru: string (one of the
// values); string: string or []byte; timestamp: time.Time; address:
// Address, netip.Addr or netip.AddrPort.
func (s *Sensor) SetReading(ts time.Time, status Status, v any) error {
	var raw []byte
	var typed any
	if v != nil {
		var num float64
		var err error
		typed, num, err = s.check(v)
		if err != nil {
			return err
		}
		if raw, err = AppendArg(nil, typed); err != nil {
			return err
		}
		if status == StatusUnknown {
			status = s.statusFor(num)
		}
	} else if status.ValidValue() || status == StatusUnknown {
		return fmt.Errorf("%w: sensor %s: status %v needs a value", ErrBadValue, s.info.Name, status)
	}
	// notifyMu keeps observers seeing readings in the order they were
	// stored, even when several goroutines set the sensor.
	s.notifyMu.Lock()
	defer s.notifyMu.Unlock()
	s.mu.Lock()
	if raw == nil {
		raw, typed = s.reading.Value, s.value
	}
	s.reading = Reading{Name: s.info.Name, Timestamp: ts, Status: status, Value: raw}
	s.value = typed
	r := s.reading
	s.mu.Unlock()
	if obs := s.observers.Load(); obs != nil {
		for _, o := range *obs {
			o.f(s, r)
		}
	}
	return nil
}

// check converts v to the sensor's canonical Go type; num is its numeric
// value for range checks.
func (s *Sensor) check(v any) (typed any, num float64, err error) {
	bad := func() (any, float64, error) {
		return nil, 0, fmt.Errorf("%w: sensor %s (%v) cannot take %T %v", ErrBadValue, s.info.Name, s.info.Type, v, v)
	}
	switch s.info.Type {
	case SensorInteger:
		n, ok := asInt(v)
		if !ok {
			return bad()
		}
		if _, canonical := v.(int64); canonical {
			return v, float64(n), nil // no second boxing
		}
		return n, float64(n), nil
	case SensorFloat:
		switch f := v.(type) {
		case float64:
			return f, f, nil
		case float32:
			return float64(f), float64(f), nil
		}
		if n, ok := asInt(v); ok {
			return float64(n), float64(n), nil
		}
		return bad()
	case SensorBoolean:
		if b, ok := v.(bool); ok {
			return b, 0, nil
		}
	case SensorDiscrete, SensorLRU:
		str, ok := v.(string)
		values := s.info.Params
		if s.info.Type == SensorLRU {
			values = []string{"nominal", "error"}
		}
		if ok && slices.Contains(values, str) {
			return str, 0, nil
		}
	case SensorString:
		switch b := v.(type) {
		case string:
			return b, 0, nil
		case []byte:
			return slices.Clone(b), 0, nil
		}
	case SensorTimestamp:
		if t, ok := v.(time.Time); ok {
			return t, 0, nil
		}
	case SensorAddress:
		switch a := v.(type) {
		case Address:
			return a, 0, nil
		case netip.Addr:
			return Address{Addr: a}, 0, nil
		case netip.AddrPort:
			return Address{Addr: a.Addr(), Port: a.Port(), HasPort: true}, 0, nil
		}
	}
	return bad()
}

func asInt(v any) (int64, bool) {
	switch n := v.(type) {
	case int:
		return int64(n), true
	case int8:
		return int64(n), true
	case int16:
		return int64(n), true
	case int32:
		return int64(n), true
	case int64:
		return n, true
	case uint8:
		return int64(n), true
	case uint16:
		return int64(n), true
	case uint32:
		return int64(n), true
	case uint:
		if uint64(n) <= math.MaxInt64 {
			return int64(n), true
		}
	case uint64:
		if n <= math.MaxInt64 {
			return int64(n), true
		}
	}
	return 0, false
}

func (s *Sensor) statusFor(x float64) Status {
	if s.nominal == nil {
		return StatusNominal
	}
	if s.nominal[0] <= x && x <= s.nominal[1] {
		return StatusNominal
	}
	if s.warn == nil || (s.warn[0] <= x && x <= s.warn[1]) {
		return StatusWarn
	}
	return StatusError
}

// Observe calls f with every new reading, on the goroutine that set it,
// until the returned function is called. f must not block.
func (s *Sensor) Observe(f func(*Sensor, Reading)) (stop func()) {
	o := &sensorObserver{f: f}
	s.obsMu.Lock()
	var next []*sensorObserver
	if cur := s.observers.Load(); cur != nil {
		next = slices.Clone(*cur)
	}
	next = append(next, o)
	s.observers.Store(&next)
	s.obsMu.Unlock()
	return func() {
		s.obsMu.Lock()
		defer s.obsMu.Unlock()
		cur := s.observers.Load()
		if cur == nil {
			return
		}
		next := slices.DeleteFunc(slices.Clone(*cur), func(x *sensorObserver) bool { return x == o })
		s.observers.Store(&next)
	}
}

// SensorSet is a set of sensors by name that can change at run time. It is
// safe for concurrent use.
type SensorSet struct {
	mu       sync.RWMutex
	sensors  map[string]*Sensor
	onChange func(added, removed *Sensor) // set by the Server
}

// NewSensorSet returns an empty set.
func NewSensorSet() *SensorSet { return &SensorSet{sensors: make(map[string]*Sensor)} }

// Add adds sensors, replacing any with the same name.
func (set *SensorSet) Add(sensors ...*Sensor) {
	for _, s := range sensors {
		set.mu.Lock()
		old := set.sensors[s.info.Name]
		set.sensors[s.info.Name] = s
		f := set.onChange
		set.mu.Unlock()
		if f != nil {
			f(s, old)
		}
	}
}

// Remove removes the named sensor and reports whether it was there.
func (set *SensorSet) Remove(name string) bool {
	set.mu.Lock()
	s, ok := set.sensors[name]
	delete(set.sensors, name)
	f := set.onChange
	set.mu.Unlock()
	if ok && f != nil {
		f(nil, s)
	}
	return ok
}

// Get returns the named sensor.
func (set *SensorSet) Get(name string) (*Sensor, bool) {
	set.mu.RLock()
	defer set.mu.RUnlock()
	s, ok := set.sensors[name]
	return s, ok
}

// Len returns the number of sensors.
func (set *SensorSet) Len() int {
	set.mu.RLock()
	defer set.mu.RUnlock()
	return len(set.sensors)
}

// Sorted returns the sensors sorted by name.
func (set *SensorSet) Sorted() []*Sensor {
	set.mu.RLock()
	out := make([]*Sensor, 0, len(set.sensors))
	for _, s := range set.sensors {
		out = append(out, s)
	}
	set.mu.RUnlock()
	slices.SortFunc(out, func(a, b *Sensor) int {
		switch {
		case a.info.Name < b.info.Name:
			return -1
		case a.info.Name > b.info.Name:
			return 1
		}
		return 0
	})
	return out
}
