package katcp

import (
	"fmt"
	"strconv"
)

// Status is a sensor status.
type Status uint8

// The sensor statuses, in the spec's order.
const (
	StatusUnknown Status = iota
	StatusNominal
	StatusWarn
	StatusError
	StatusFailure
	StatusUnreachable
	StatusInactive
)

var statusNames = [...]string{"unknown", "nominal", "warn", "error", "failure", "unreachable", "inactive"}

// String returns the status's KATCP name.
func (s Status) String() string {
	if int(s) < len(statusNames) {
		return statusNames[s]
	}
	return "Status(" + strconv.Itoa(int(s)) + ")"
}

// AppendArg appends the status's KATCP name.
func (s Status) AppendArg(dst []byte) []byte { return append(dst, s.String()...) }

// ValidValue reports whether a reading with this status carries a valid
// value: only nominal, warn and error do.
func (s Status) ValidValue() bool {
	return s == StatusNominal || s == StatusWarn || s == StatusError
}

// ParseStatus parses a status name.
func ParseStatus(b []byte) (Status, error) {
	for i, n := range statusNames {
		if n == string(b) {
			return Status(i), nil
		}
	}
	return 0, valueError("sensor status", b)
}

// Strategy is a sensor sampling strategy.
type Strategy uint8

// The sampling strategies.
const (
	StrategyNone Strategy = iota
	StrategyAuto
	StrategyPeriod
	StrategyEvent
	StrategyDifferential
	StrategyEventRate
	StrategyDifferentialRate
)

var strategyNames = [...]string{"none", "auto", "period", "event", "differential", "event-rate", "differential-rate"}

// strategyParams is how many parameters each strategy takes.
var strategyParams = [...]int{0, 0, 1, 0, 1, 2, 3}

// String returns the strategy's KATCP name.
func (s Strategy) String() string {
	if int(s) < len(strategyNames) {
		return strategyNames[s]
	}
	return "Strategy(" + strconv.Itoa(int(s)) + ")"
}

// AppendArg appends the strategy's KATCP name.
func (s Strategy) AppendArg(dst []byte) []byte { return append(dst, s.String()...) }

// NumParams returns how many parameters the strategy takes: period 1 (the
// period), differential 1 (the threshold), event-rate 2 (shortest and
// longest period), differential-rate 3 (threshold, shortest, longest),
// the others 0.
func (s Strategy) NumParams() int {
	if int(s) < len(strategyParams) {
		return strategyParams[s]
	}
	return 0
}

// InV4 reports whether KATCP v4 has the strategy (v4 lacks the two rate
// strategies).
func (s Strategy) InV4() bool { return s <= StrategyDifferential }

// ParseStrategy parses a strategy name.
func ParseStrategy(b []byte) (Strategy, error) {
	for i, n := range strategyNames {
		if n == string(b) {
			return Strategy(i), nil
		}
	}
	return 0, valueError("sampling strategy", b)
}

// SensorType is the type of a sensor's value.
type SensorType uint8

// The sensor types. LRU is deprecated since v5 but still seen.
const (
	SensorInteger SensorType = iota
	SensorFloat
	SensorBoolean
	SensorDiscrete
	SensorLRU
	SensorString
	SensorTimestamp
	SensorAddress
)

var sensorTypeNames = [...]string{"integer", "float", "boolean", "discrete", "lru", "string", "timestamp", "address"}

// String returns the type's KATCP name.
func (t SensorType) String() string {
	if int(t) < len(sensorTypeNames) {
		return sensorTypeNames[t]
	}
	return "SensorType(" + strconv.Itoa(int(t)) + ")"
}

// AppendArg appends the type's KATCP name.
func (t SensorType) AppendArg(dst []byte) []byte { return append(dst, t.String()...) }

// ParseSensorType parses a sensor type name.
func ParseSensorType(b []byte) (SensorType, error) {
	for i, n := range sensorTypeNames {
		if n == string(b) {
			return SensorType(i), nil
		}
	}
	return 0, valueError("sensor type", b)
}

// ProtocolVersion is the value of `#version-connect katcp-protocol`, such as
// "5.1-MIB": major and minor version and the flags after the dash.
type ProtocolVersion struct {
	Major, Minor int
	Flags        string // every flag as sent, unknown ones included
}

// The protocol flags defined by KATCP v5.1.
const (
	FlagMultiClient = 'M' // the device accepts several clients
	FlagMessageIDs  = 'I' // the device supports message ids
	FlagTimeoutHint = 'T' // the device implements ?request-timeout-hint
	FlagBulkSensors = 'B' // ?sensor-sampling accepts several sensors
)

// Has reports whether flag f is set.
func (v ProtocolVersion) Has(f byte) bool {
	for i := 0; i < len(v.Flags); i++ {
		if v.Flags[i] == f {
			return true
		}
	}
	return false
}

// String returns the version in wire form, such as "5.1-MIB".
func (v ProtocolVersion) String() string { return string(v.AppendArg(nil)) }

// AppendArg appends the version in wire form.
func (v ProtocolVersion) AppendArg(dst []byte) []byte {
	dst = strconv.AppendInt(dst, int64(v.Major), 10)
	dst = append(dst, '.')
	dst = strconv.AppendInt(dst, int64(v.Minor), 10)
	if v.Flags != "" {
		dst = append(dst, '-')
		dst = append(dst, v.Flags...)
	}
	return dst
}

// ParseProtocolVersion parses "<major>.<minor>[-<flags>]". Flags are ASCII
// letters; unknown ones are kept.
func ParseProtocolVersion(b []byte) (ProtocolVersion, error) {
	var v ProtocolVersion
	i := 0
	num := func() (int, bool) {
		start, n := i, 0
		for i < len(b) && isDigit(b[i]) && i-start < 6 {
			n = n*10 + int(b[i]-'0')
			i++
		}
		return n, i > start && (i == len(b) || !isDigit(b[i]))
	}
	var ok bool
	if v.Major, ok = num(); !ok || i == len(b) || b[i] != '.' {
		return ProtocolVersion{}, versionError(b)
	}
	i++
	if v.Minor, ok = num(); !ok {
		return ProtocolVersion{}, versionError(b)
	}
	if i < len(b) {
		if b[i] != '-' || i+1 == len(b) {
			return ProtocolVersion{}, versionError(b)
		}
		for _, c := range b[i+1:] {
			if !isAlpha(c) {
				return ProtocolVersion{}, versionError(b)
			}
		}
		v.Flags = string(b[i+1:])
	}
	return v, nil
}

func versionError(b []byte) error {
	e := valueError("protocol version", b)
	e.Err = fmt.Errorf("%w: want <major>.<minor>[-<flags>]", ErrBadValue)
	return e
}
