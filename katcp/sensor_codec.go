package katcp

import (
	"fmt"
	"time"
)

// SensorInfo describes a sensor as #sensor-list does: name, description,
// units, type, and the type's parameters (the range of an integer, float or
// timestamp sensor, the values of a discrete one).
type SensorInfo struct {
	Name        string
	Description string
	Units       string
	Type        SensorType
	Params      []string
}

// ParseSensorInfo decodes the arguments of a #sensor-list inform.
func ParseSensorInfo(args [][]byte) (SensorInfo, error) {
	if len(args) < 4 {
		return SensorInfo{}, fmt.Errorf("%w: #sensor-list wants at least 4 arguments, got %d", ErrBadValue, len(args))
	}
	typ, err := ParseSensorType(args[3])
	if err != nil {
		return SensorInfo{}, err
	}
	info := SensorInfo{Name: string(args[0]), Description: string(args[1]), Units: string(args[2]), Type: typ}
	for _, p := range args[4:] {
		info.Params = append(info.Params, string(p))
	}
	return info, nil
}

// Args returns the #sensor-list arguments for info.
func (info SensorInfo) Args() []any {
	args := []any{info.Name, info.Description, info.Units, info.Type}
	for _, p := range info.Params {
		args = append(args, p)
	}
	return args
}

// Decode converts a raw sensor value of this sensor's type: int64 for
// integer, float64 for float, bool for boolean, string for discrete and
// lru (checked against the listed values when there are any), []byte for
// string, time.Time for timestamp (v4: milliseconds), Address for address.
func (info SensorInfo) Decode(raw []byte, v4 bool) (any, error) {
	return DecodeSensorValue(info.Type, info.Params, raw, v4)
}

// DecodeSensorValue converts a raw value of a sensor of type t; see
// SensorInfo.Decode.
func DecodeSensorValue(t SensorType, params []string, raw []byte, v4 bool) (any, error) {
	switch t {
	case SensorInteger:
		return ParseInt(raw)
	case SensorFloat:
		return ParseFloat(raw)
	case SensorBoolean:
		return ParseBool(raw)
	case SensorDiscrete:
		if len(params) == 0 {
			return string(raw), nil
		}
		return ParseDiscrete(raw, params)
	case SensorLRU:
		return ParseDiscrete(raw, []string{"nominal", "error"})
	case SensorString:
		return append([]byte(nil), raw...), nil
	case SensorTimestamp:
		if v4 {
			return ParseTimestampMS(raw)
		}
		return ParseTimestamp(raw)
	case SensorAddress:
		return ParseAddress(raw)
	}
	return nil, fmt.Errorf("%w: unknown sensor type %v", ErrBadValue, t)
}

// Reading is one sensor reading as #sensor-status and #sensor-value carry
// it. Value is raw; only nominal, warn and error readings carry a valid
// value (Status.ValidValue).
type Reading struct {
	Name      string
	Timestamp time.Time
	Status    Status
	Value     []byte
}

// ParseReadings decodes the body of a #sensor-status or #sensor-value
// inform: timestamp, count, then count (name, status, value) triples.
// v4 timestamps are milliseconds.
func ParseReadings(args [][]byte, v4 bool) ([]Reading, error) {
	var out []Reading
	err := eachReading(args, v4, func(n int, name []byte, ts time.Time, st Status, value []byte) {
		if out == nil {
			out = make([]Reading, 0, n)
		}
		out = append(out, Reading{Name: string(name), Timestamp: ts, Status: st, Value: append([]byte(nil), value...)})
	})
	if err != nil {
		return nil, err
	}
	if out == nil {
		out = []Reading{}
	}
	return out, nil
}

// eachReading checks a #sensor-status or #sensor-value body and then
// calls f for each of its n readings, in order (none when it is bad).
// The byte slices are args' own.
func eachReading(args [][]byte, v4 bool, f func(n int, name []byte, ts time.Time, st Status, value []byte)) error {
	if len(args) < 2 {
		return fmt.Errorf("%w: sensor readings want a timestamp and a count", ErrBadValue)
	}
	var ts time.Time
	var err error
	if v4 {
		ts, err = ParseTimestampMS(args[0])
	} else {
		ts, err = ParseTimestamp(args[0])
	}
	if err != nil {
		return err
	}
	n, err := ParseInt(args[1])
	if err != nil {
		return err
	}
	if rest := len(args) - 2; n < 0 || rest%3 != 0 || n != int64(rest/3) {
		return fmt.Errorf("%w: sensor readings: count %d but %d arguments follow", ErrBadValue, n, len(args)-2)
	}
	for i := range int(n) {
		if _, err := ParseStatus(args[2+3*i+1]); err != nil {
			return err
		}
	}
	for i := range int(n) {
		a := args[2+3*i:]
		st, _ := ParseStatus(a[1])
		f(int(n), a[0], ts, st, a[2])
	}
	return nil
}
