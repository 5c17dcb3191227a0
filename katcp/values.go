package katcp

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"time"
)

// ErrBadValue is wrapped by every *ValueError.
var ErrBadValue = errors.New("katcp: invalid value")

// ValueError reports an argument that is not a valid value of a KATCP type.
type ValueError struct {
	Type  string // "integer", "float", "boolean", "timestamp", ...
	Value []byte // the start of the offending argument (at most 64 bytes)
	Err   error  // ErrBadValue, or a more specific cause that wraps it
}

func valueError(typ string, b []byte) *ValueError {
	return &ValueError{Type: typ, Value: append([]byte(nil), b[:min(len(b), excerptLen)]...), Err: ErrBadValue}
}

func (e *ValueError) Error() string {
	if e.Err != nil && e.Err != ErrBadValue {
		return fmt.Sprintf("katcp: invalid %s %q: %v", e.Type, e.Value, e.Err)
	}
	return fmt.Sprintf("katcp: invalid %s %q", e.Type, e.Value)
}

func (e *ValueError) Unwrap() error { return e.Err }

// ArgAppender is implemented by values that format themselves as one KATCP
// argument (unescaped: the formatter escapes it).
type ArgAppender interface {
	AppendArg(dst []byte) []byte
}

// AppendArg appends the KATCP form of one argument value to dst, unescaped.
// Supported: string and []byte as they are; signed and unsigned integers
// ("%d"); float32 and float64 (AppendFloat); bool ("1" or "0"); time.Time as
// v5 seconds (AppendTimestamp); time.Duration as seconds (AppendFloat);
// netip.Addr, netip.AddrPort and Address (AppendAddress); and any
// ArgAppender, which includes Status, Strategy, SensorType and
// ProtocolVersion. Any other type is an error.
func AppendArg(dst []byte, v any) ([]byte, error) {
	switch v := v.(type) {
	case string:
		return append(dst, v...), nil
	case []byte:
		return append(dst, v...), nil
	case int:
		return strconv.AppendInt(dst, int64(v), 10), nil
	case int8:
		return strconv.AppendInt(dst, int64(v), 10), nil
	case int16:
		return strconv.AppendInt(dst, int64(v), 10), nil
	case int32:
		return strconv.AppendInt(dst, int64(v), 10), nil
	case int64:
		return strconv.AppendInt(dst, v, 10), nil
	case uint:
		return strconv.AppendUint(dst, uint64(v), 10), nil
	case uint8:
		return strconv.AppendUint(dst, uint64(v), 10), nil
	case uint16:
		return strconv.AppendUint(dst, uint64(v), 10), nil
	case uint32:
		return strconv.AppendUint(dst, uint64(v), 10), nil
	case uint64:
		return strconv.AppendUint(dst, v, 10), nil
	case float32:
		return AppendFloat(dst, float64(v)), nil
	case float64:
		return AppendFloat(dst, v), nil
	case bool:
		return AppendBool(dst, v), nil
	case time.Time:
		return AppendTimestamp(dst, v), nil
	case time.Duration:
		return AppendFloat(dst, v.Seconds()), nil
	case netip.Addr:
		return AppendAddress(dst, Address{Addr: v}), nil
	case netip.AddrPort:
		return AppendAddress(dst, Address{Addr: v.Addr(), Port: v.Port(), HasPort: true}), nil
	case ArgAppender:
		return v.AppendArg(dst), nil
	}
	return dst, fmt.Errorf("%w: cannot format %T as a KATCP argument", ErrBadValue, v)
}

// ParseInt parses an integer as C's strtol reads it in base 10, strictly:
// an optional sign and decimal digits, nothing else, within int64.
func ParseInt(b []byte) (int64, error) {
	i := 0
	if len(b) > 0 && (b[0] == '-' || b[0] == '+') {
		i = 1
	}
	if i == len(b) {
		return 0, valueError("integer", b)
	}
	for _, c := range b[i:] {
		if !isDigit(c) {
			return 0, valueError("integer", b)
		}
	}
	n, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil {
		return 0, valueError("integer", b)
	}
	return n, nil
}

// AppendBool appends "1" for true and "0" for false.
func AppendBool(dst []byte, v bool) []byte {
	if v {
		return append(dst, '1')
	}
	return append(dst, '0')
}

// ParseBool accepts exactly "1" and "0".
func ParseBool(b []byte) (bool, error) {
	if len(b) == 1 {
		switch b[0] {
		case '1':
			return true, nil
		case '0':
			return false, nil
		}
	}
	return false, valueError("boolean", b)
}

// ParseDiscrete returns b as a string if it is one of values.
func ParseDiscrete(b []byte, values []string) (string, error) {
	for _, v := range values {
		if v == string(b) {
			return v, nil
		}
	}
	return "", valueError("discrete", b)
}

// AppendTimestamp appends t as KATCP v5 seconds since the Unix epoch, in
// decimal with as many fractional digits as it needs (at least one, in the
// Python style: "1700000000.0", "1700000000.25"). It is exact to the
// nanosecond.
func AppendTimestamp(dst []byte, t time.Time) []byte {
	sec, ns := t.Unix(), int64(t.Nanosecond())
	if sec < 0 && ns > 0 {
		sec, ns = sec+1, 1e9-ns
		if sec == 0 {
			dst = append(dst, '-')
		}
	}
	dst = strconv.AppendInt(dst, sec, 10)
	dst = append(dst, '.')
	if ns == 0 {
		return append(dst, '0')
	}
	var frac [9]byte
	for i := 8; i >= 0; i-- {
		frac[i] = byte('0' + ns%10)
		ns /= 10
	}
	n := 9
	for frac[n-1] == '0' {
		n--
	}
	return append(dst, frac[:n]...)
}

// AppendTimestampMS appends t as KATCP v4 milliseconds since the Unix
// epoch, an integer (rounded down).
func AppendTimestampMS(dst []byte, t time.Time) []byte {
	ms := t.Unix()*1000 + int64(t.Nanosecond())/1e6
	return strconv.AppendInt(dst, ms, 10)
}

// ParseTimestamp parses KATCP v5 seconds since the Unix epoch: any C99
// decimal float, such as "1700000000", "1700000000.123456" (katcp-python's
// "%.6f") or "1.7e9". Plain decimals are exact to the nanosecond (later
// digits are dropped); exponent forms go through float64. NaN and infinity
// are errors.
func ParseTimestamp(b []byte) (time.Time, error) {
	return parseTimestamp(b, 9, "timestamp")
}

// ParseTimestampMS parses KATCP v4 milliseconds since the Unix epoch, an
// integer or any C99 decimal, as ParseTimestamp does for seconds.
func ParseTimestampMS(b []byte) (time.Time, error) {
	return parseTimestamp(b, 6, "v4 timestamp")
}

// parseTimestamp reads a decimal count of seconds (nsDigits 9: nine
// fractional digits make a nanosecond) or of milliseconds (nsDigits 6).
func parseTimestamp(b []byte, nsDigits int, typ string) (time.Time, error) {
	neg, intPart, frac, ok := splitDecimal(b)
	if !ok {
		f, err := ParseFloat(b)
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
			return time.Time{}, valueError(typ, b)
		}
		unit := 1.0
		if nsDigits == 6 {
			unit = 1e-3
		}
		s := f * unit
		if math.Abs(s) > 1<<62 {
			return time.Time{}, valueError(typ, b)
		}
		sec := math.Floor(s)
		return time.Unix(int64(sec), int64((s-sec)*1e9)).UTC(), nil
	}
	// Whole units and the fraction, exact to the nanosecond.
	var units int64
	for _, c := range intPart {
		if units > (math.MaxInt64-9)/10 {
			return time.Time{}, valueError(typ, b)
		}
		units = units*10 + int64(c-'0')
	}
	var fracNS int64
	for i := range nsDigits {
		fracNS *= 10
		if i < len(frac) {
			fracNS += int64(frac[i] - '0')
		}
	}
	var sec, ns int64
	if nsDigits == 9 {
		sec, ns = units, fracNS
	} else {
		sec, ns = units/1000, (units%1000)*1e6+fracNS
	}
	if neg {
		sec, ns = -sec, -ns
	}
	return time.Unix(sec, ns).UTC(), nil
}

// splitDecimal splits "[sign]digits[.digits]" (at least one digit); ok is
// false for anything else, such as exponents and special values.
func splitDecimal(b []byte) (neg bool, intPart, frac []byte, ok bool) {
	i := 0
	if len(b) > 0 && (b[0] == '-' || b[0] == '+') {
		neg = b[0] == '-'
		i = 1
	}
	start := i
	for i < len(b) && isDigit(b[i]) {
		i++
	}
	intPart = b[start:i]
	if i < len(b) && b[i] == '.' {
		i++
		fs := i
		for i < len(b) && isDigit(b[i]) {
			i++
		}
		frac = b[fs:i]
	}
	ok = i == len(b) && len(intPart)+len(frac) > 0
	return neg, intPart, frac, ok
}

// Address is a KATCP address value: an IPv4 or IPv6 address with an
// optional port.
type Address struct {
	Addr    netip.Addr
	Port    uint16
	HasPort bool
}

// AppendArg appends a in KATCP form.
func (a Address) AppendArg(dst []byte) []byte { return AppendAddress(dst, a) }

// String returns a in KATCP form.
func (a Address) String() string { return string(AppendAddress(nil, a)) }

// AppendAddress appends a as KATCP writes addresses: "1.2.3.4",
// "1.2.3.4:7147", "[::1]", "[::1]:7147".
func AppendAddress(dst []byte, a Address) []byte {
	if a.Addr.Is6() {
		dst = append(dst, '[')
		dst = a.Addr.AppendTo(dst)
		dst = append(dst, ']')
	} else {
		dst = a.Addr.AppendTo(dst)
	}
	if a.HasPort {
		dst = append(dst, ':')
		dst = strconv.AppendUint(dst, uint64(a.Port), 10)
	}
	return dst
}

// ParseAddress parses a KATCP address: dotted-decimal IPv4, or IPv6 in
// square brackets, either optionally followed by ":port".
func ParseAddress(b []byte) (Address, error) {
	var a Address
	host, port := b, []byte(nil)
	if len(b) > 0 && b[0] == '[' {
		end := -1
		for i, c := range b {
			if c == ']' {
				end = i
				break
			}
		}
		if end < 0 {
			return a, valueError("address", b)
		}
		host = b[1:end]
		switch rest := b[end+1:]; {
		case len(rest) == 0:
		case rest[0] == ':':
			port = rest[1:]
			a.HasPort = true
		default:
			return a, valueError("address", b)
		}
		ip, err := netip.ParseAddr(string(host))
		if err != nil || !ip.Is6() {
			return a, valueError("address", b)
		}
		a.Addr = ip
	} else {
		for i, c := range b {
			if c == ':' {
				host, port = b[:i], b[i+1:]
				a.HasPort = true
				break
			}
		}
		ip, err := netip.ParseAddr(string(host))
		if err != nil || !ip.Is4() {
			return a, valueError("address", b)
		}
		a.Addr = ip
	}
	if a.HasPort {
		if len(port) == 0 || len(port) > 5 {
			return Address{}, valueError("address", b)
		}
		p := 0
		for _, c := range port {
			if !isDigit(c) {
				return Address{}, valueError("address", b)
			}
			p = p*10 + int(c-'0')
		}
		if p > math.MaxUint16 {
			return Address{}, valueError("address", b)
		}
		a.Port = uint16(p)
	}
	return a, nil
}

// DecodeArgs decodes args into the values dst points to, in order, with the
// strict parsers of this package. Supported targets: *[]byte (a copy),
// *string, *int, *int64, *int32, *uint16, *float64, *bool, *time.Time (v5
// seconds), *time.Duration (seconds), *Address, *Status, *Strategy,
// *SensorType and *ProtocolVersion. Fewer args than targets is an error;
// extra args are left alone. Errors name the argument's position (from 1).
func DecodeArgs(args [][]byte, dst ...any) error {
	if len(args) < len(dst) {
		return fmt.Errorf("%w: want at least %d arguments, got %d", ErrBadValue, len(dst), len(args))
	}
	for i, d := range dst {
		if err := decodeArg(args[i], d); err != nil {
			return fmt.Errorf("argument %d: %w", i+1, err)
		}
	}
	return nil
}

func decodeArg(b []byte, dst any) error {
	var err error
	switch d := dst.(type) {
	case *[]byte:
		*d = append([]byte(nil), b...)
	case *string:
		*d = string(b)
	case *int:
		var n int64
		n, err = ParseInt(b)
		if err == nil && (n < math.MinInt || n > math.MaxInt) {
			err = valueError("integer", b)
		}
		*d = int(n)
	case *int64:
		*d, err = ParseInt(b)
	case *int32:
		var n int64
		n, err = ParseInt(b)
		if err == nil && (n < math.MinInt32 || n > math.MaxInt32) {
			err = valueError("integer", b)
		}
		*d = int32(n)
	case *uint16:
		var n int64
		n, err = ParseInt(b)
		if err == nil && (n < 0 || n > math.MaxUint16) {
			err = valueError("integer", b)
		}
		*d = uint16(n)
	case *float64:
		*d, err = ParseFloat(b)
	case *bool:
		*d, err = ParseBool(b)
	case *time.Time:
		*d, err = ParseTimestamp(b)
	case *time.Duration:
		var f float64
		f, err = ParseFloat(b)
		if err == nil && (math.IsNaN(f) || math.Abs(f) > math.MaxInt64/1e9) {
			err = valueError("duration", b)
		}
		*d = time.Duration(f * 1e9)
	case *Address:
		*d, err = ParseAddress(b)
	case *Status:
		*d, err = ParseStatus(b)
	case *Strategy:
		*d, err = ParseStrategy(b)
	case *SensorType:
		*d, err = ParseSensorType(b)
	case *ProtocolVersion:
		*d, err = ParseProtocolVersion(b)
	default:
		return fmt.Errorf("%w: cannot decode into %T", ErrBadValue, dst)
	}
	return err
}
