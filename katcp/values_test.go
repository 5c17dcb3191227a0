package katcp

import (
	"errors"
	"math"
	"net/netip"
	"strconv"
	"testing"
	"time"
)

func TestAppendFloat(t *testing.T) {
	tests := []struct {
		f    float64
		want string
	}{
		{0, "0.0"},
		{math.Copysign(0, -1), "-0.0"},
		{1, "1.0"},
		{-2.5, "-2.5"},
		{234.5, "234.5"},
		{123456789, "123456789.0"},
		{1e15, "1000000000000000.0"},
		{1234567890123456, "1234567890123456.0"},
		{1e16, "1e+16"},
		{1.5e16, "1.5e+16"},
		{1e20, "1e+20"},
		{1.7976931348623157e308, "1.7976931348623157e+308"},
		{0.0001, "0.0001"},
		{0.00012345, "0.00012345"},
		{0.00001, "1e-05"},
		{1.5e-7, "1.5e-07"},
		{5e-324, "5e-324"},
		{0.1, "0.1"},
		{1.0 / 3, "0.3333333333333333"},
		{-1.234e-05, "-1.234e-05"},
		{1700000000.123456, "1700000000.123456"},
		{math.NaN(), "nan"},
		{math.Inf(1), "inf"},
		{math.Inf(-1), "-inf"},
	}
	for _, tt := range tests {
		if got := string(AppendFloat(nil, tt.f)); got != tt.want {
			t.Errorf("AppendFloat(%v) = %q, want %q", tt.f, got, tt.want)
		}
		if math.IsNaN(tt.f) {
			continue
		}
		back, err := ParseFloat([]byte(tt.want))
		if err != nil || back != tt.f || math.Signbit(back) != math.Signbit(tt.f) {
			t.Errorf("ParseFloat(%q) = %v, %v; want %v", tt.want, back, err, tt.f)
		}
	}
}

func TestParseFloat(t *testing.T) {
	good := map[string]float64{
		"1": 1, "-1.5": -1.5, "+2": 2, "1.": 1, ".5": 0.5, "1e3": 1000, "1E+3": 1000, "2.5e-1": 0.25,
		"-1.234e-05": -1.234e-05, "1.7": 1.7, "007": 7,
		"inf": math.Inf(1), "-Inf": math.Inf(-1), "INFINITY": math.Inf(1), "+infinity": math.Inf(1),
		"1e999": math.Inf(1), "-1e999": math.Inf(-1), "1e-999": 0,
	}
	for in, want := range good {
		got, err := ParseFloat([]byte(in))
		if err != nil || got != want {
			t.Errorf("ParseFloat(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"nan", "NaN", "-nan"} {
		if got, err := ParseFloat([]byte(in)); err != nil || !math.IsNaN(got) {
			t.Errorf("ParseFloat(%q) = %v, %v; want NaN", in, got, err)
		}
	}
	for _, in := range []string{"", " 1", "1 ", "0x1p3", "1_000", "e5", ".", "-", "1e", "1e+", "1.2.3", "infin", "nan(1)", "1f", "１"} {
		if _, err := ParseFloat([]byte(in)); !errors.Is(err, ErrBadValue) {
			t.Errorf("ParseFloat(%q) error = %v, want ErrBadValue", in, err)
		}
	}
}

func TestParseInt(t *testing.T) {
	good := map[string]int64{"0": 0, "123": 123, "-546": -546, "+5": 5, "9223372036854775807": math.MaxInt64, "-9223372036854775808": math.MinInt64, "007": 7}
	for in, want := range good {
		if got, err := ParseInt([]byte(in)); err != nil || got != want {
			t.Errorf("ParseInt(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-", "+", "1.0", "1e3", " 1", "1 ", "0x10", "1_000", "9223372036854775808", "12a"} {
		if _, err := ParseInt([]byte(in)); !errors.Is(err, ErrBadValue) {
			t.Errorf("ParseInt(%q) error = %v, want ErrBadValue", in, err)
		}
	}
}

func TestBool(t *testing.T) {
	if got := string(AppendBool(AppendBool(nil, true), false)); got != "10" {
		t.Errorf("AppendBool = %q", got)
	}
	for in, want := range map[string]bool{"1": true, "0": false} {
		if got, err := ParseBool([]byte(in)); err != nil || got != want {
			t.Errorf("ParseBool(%q) = %v, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "true", "false", "01", "2", "yes", "T"} {
		if _, err := ParseBool([]byte(in)); !errors.Is(err, ErrBadValue) {
			t.Errorf("ParseBool(%q) error = %v, want ErrBadValue", in, err)
		}
	}
}

func TestParseDiscrete(t *testing.T) {
	values := []string{"initialise", "operate", "maintain"}
	if got, err := ParseDiscrete([]byte("operate"), values); err != nil || got != "operate" {
		t.Errorf("got %q, %v", got, err)
	}
	for _, in := range []string{"", "Operate", "stop"} {
		if _, err := ParseDiscrete([]byte(in), values); !errors.Is(err, ErrBadValue) {
			t.Errorf("ParseDiscrete(%q) error = %v, want ErrBadValue", in, err)
		}
	}
}

func TestTimestamp(t *testing.T) {
	tests := []struct {
		t    time.Time
		want string
	}{
		{time.Unix(1700000000, 0), "1700000000.0"},
		{time.Unix(1700000000, 500_000_000), "1700000000.5"},
		{time.Unix(1700000000, 123456000), "1700000000.123456"},
		{time.Unix(1700000000, 1), "1700000000.000000001"},
		{time.Unix(0, 0), "0.0"},
		{time.Unix(-1, 500_000_000), "-0.5"},
		{time.Unix(-2, 250_000_000), "-1.75"},
	}
	for _, tt := range tests {
		got := string(AppendTimestamp(nil, tt.t))
		if got != tt.want {
			t.Errorf("AppendTimestamp(%v) = %q, want %q", tt.t, got, tt.want)
		}
		back, err := ParseTimestamp([]byte(got))
		if err != nil || !back.Equal(tt.t) {
			t.Errorf("ParseTimestamp(%q) = %v, %v; want %v", got, back, err, tt.t)
		}
	}
	good := map[string]time.Time{
		"1234.000000":           time.Unix(1234, 0),
		"1700000000":            time.Unix(1700000000, 0),
		"1222195721.660237":     time.Unix(1222195721, 660237000),
		"1.5":                   time.Unix(1, 500_000_000),
		".25":                   time.Unix(0, 250_000_000),
		"1.0000000019":          time.Unix(1, 1),
		"1.7e9":                 time.Unix(1700000000, 0),
		"+5":                    time.Unix(5, 0),
		"1222180721660213.1234": time.Unix(1222180721660213, 123400000),
	}
	for in, want := range good {
		got, err := ParseTimestamp([]byte(in))
		if err != nil || !got.Equal(want) {
			t.Errorf("ParseTimestamp(%q) = %v, %v; want %v", in, got, err, want)
		}
		if err == nil && got.Location() != time.UTC {
			t.Errorf("ParseTimestamp(%q) is not in UTC", in)
		}
	}
	for _, in := range []string{"", "nan", "inf", "abc", "1.2.3", "1e999", "99999999999999999999", " 1"} {
		if _, err := ParseTimestamp([]byte(in)); !errors.Is(err, ErrBadValue) {
			t.Errorf("ParseTimestamp(%q) error = %v, want ErrBadValue", in, err)
		}
	}
}

func TestTimestampMS(t *testing.T) {
	ts := time.Unix(1700000000, 123_456_789)
	if got := string(AppendTimestampMS(nil, ts)); got != "1700000000123" {
		t.Errorf("AppendTimestampMS = %q", got)
	}
	good := map[string]time.Time{
		"1700000000123":     time.Unix(1700000000, 123_000_000),
		"1700000000123.5":   time.Unix(1700000000, 123_500_000),
		"1222180721660":     time.Unix(1222180721, 660_000_000),
		"1.7e12":            time.Unix(1700000000, 0),
		"0":                 time.Unix(0, 0),
		"-1500":             time.Unix(-2, 500_000_000),
		"1700000000123.000": time.Unix(1700000000, 123_000_000),
	}
	for in, want := range good {
		got, err := ParseTimestampMS([]byte(in))
		if err != nil || !got.Equal(want) {
			t.Errorf("ParseTimestampMS(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := ParseTimestampMS([]byte("x")); !errors.Is(err, ErrBadValue) {
		t.Errorf("ParseTimestampMS(x) error = %v", err)
	}
}

func TestAddress(t *testing.T) {
	tests := []struct {
		in   string
		want Address
	}{
		{"192.168.1.1:4000", Address{Addr: netip.MustParseAddr("192.168.1.1"), Port: 4000, HasPort: true}},
		{"127.0.0.1", Address{Addr: netip.MustParseAddr("127.0.0.1")}},
		{"[2001:db8:85a3::8a2e:370:7334]:4000", Address{Addr: netip.MustParseAddr("2001:db8:85a3::8a2e:370:7334"), Port: 4000, HasPort: true}},
		{"[::1]", Address{Addr: netip.MustParseAddr("::1")}},
		{"[::1]:80", Address{Addr: netip.MustParseAddr("::1"), Port: 80, HasPort: true}},
		{"[::1]:7147", Address{Addr: netip.MustParseAddr("::1"), Port: 7147, HasPort: true}},
		{"1.2.3.4:0", Address{Addr: netip.MustParseAddr("1.2.3.4"), Port: 0, HasPort: true}},
		{"1.2.3.4:65535", Address{Addr: netip.MustParseAddr("1.2.3.4"), Port: 65535, HasPort: true}},
	}
	for _, tt := range tests {
		got, err := ParseAddress([]byte(tt.in))
		if err != nil || got != tt.want {
			t.Errorf("ParseAddress(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
			continue
		}
		if s := got.String(); s != tt.in && tt.in != "[2001:db8:85a3::8a2e:370:7334]:4000" {
			t.Errorf("ParseAddress(%q).String() = %q", tt.in, s)
		}
	}
	// The spec's long form reads, and is written back in canonical form.
	a, err := ParseAddress([]byte("[2001:0db8:85a3:0000:0000:8a2e:0370:7334]:4000"))
	if err != nil || a.String() != "[2001:db8:85a3::8a2e:370:7334]:4000" {
		t.Errorf("spec IPv6 example: %v, %v", a, err)
	}
	for _, in := range []string{"", "::1", "::1:80", "[1.2.3.4]", "[::1", "[::1]x", "[::1]:", "1.2.3.4:", "1.2.3.4:65536",
		"1.2.3.4:123456", "1.2.3.4:-1", "1.2.3.4:+1", "1.2.3", "01.2.3.4", "host:80", " 1.2.3.4", "1.2.3.4:80:1"} {
		if _, err := ParseAddress([]byte(in)); !errors.Is(err, ErrBadValue) {
			t.Errorf("ParseAddress(%q) error = %v, want ErrBadValue", in, err)
		}
	}
}

func TestNames(t *testing.T) {
	for i, name := range []string{"unknown", "nominal", "warn", "error", "failure", "unreachable", "inactive"} {
		s, err := ParseStatus([]byte(name))
		if err != nil || s != Status(i) || s.String() != name {
			t.Errorf("ParseStatus(%q) = %v, %v", name, s, err)
		}
		if want := name == "nominal" || name == "warn" || name == "error"; s.ValidValue() != want {
			t.Errorf("%v.ValidValue() = %v", s, !want)
		}
	}
	params := map[string]int{"none": 0, "auto": 0, "period": 1, "event": 0, "differential": 1, "event-rate": 2, "differential-rate": 3}
	for i, name := range []string{"none", "auto", "period", "event", "differential", "event-rate", "differential-rate"} {
		s, err := ParseStrategy([]byte(name))
		if err != nil || s != Strategy(i) || s.String() != name || s.NumParams() != params[name] {
			t.Errorf("ParseStrategy(%q) = %v, %v", name, s, err)
		}
		if want := i <= 4; s.InV4() != want {
			t.Errorf("%v.InV4() = %v", s, !want)
		}
	}
	for i, name := range []string{"integer", "float", "boolean", "discrete", "lru", "string", "timestamp", "address"} {
		s, err := ParseSensorType([]byte(name))
		if err != nil || s != SensorType(i) || s.String() != name {
			t.Errorf("ParseSensorType(%q) = %v, %v", name, s, err)
		}
	}
	for _, bad := range []string{"", "Nominal", "ok", "nominal "} {
		if _, err := ParseStatus([]byte(bad)); !errors.Is(err, ErrBadValue) {
			t.Errorf("ParseStatus(%q) error = %v", bad, err)
		}
		if _, err := ParseStrategy([]byte(bad)); !errors.Is(err, ErrBadValue) {
			t.Errorf("ParseStrategy(%q) error = %v", bad, err)
		}
		if _, err := ParseSensorType([]byte(bad)); !errors.Is(err, ErrBadValue) {
			t.Errorf("ParseSensorType(%q) error = %v", bad, err)
		}
	}
	if got := Status(99).String(); got != "Status(99)" {
		t.Errorf("Status(99) = %q", got)
	}
}

func TestProtocolVersion(t *testing.T) {
	tests := []struct {
		in   string
		want ProtocolVersion
	}{
		{"5.1-MIB", ProtocolVersion{5, 1, "MIB"}},
		{"5.0-IM", ProtocolVersion{5, 0, "IM"}},
		{"5.0-M", ProtocolVersion{5, 0, "M"}},
		{"4.9", ProtocolVersion{4, 9, ""}},
		{"5.1-MITBXZ", ProtocolVersion{5, 1, "MITBXZ"}},
		{"10.12", ProtocolVersion{10, 12, ""}},
	}
	for _, tt := range tests {
		got, err := ParseProtocolVersion([]byte(tt.in))
		if err != nil || got != tt.want {
			t.Errorf("ParseProtocolVersion(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
		if got.String() != tt.in {
			t.Errorf("String() = %q, want %q", got.String(), tt.in)
		}
	}
	v := ProtocolVersion{5, 1, "MIB"}
	if !v.Has(FlagMessageIDs) || !v.Has(FlagBulkSensors) || !v.Has(FlagMultiClient) || v.Has(FlagTimeoutHint) {
		t.Errorf("Has on %v wrong", v)
	}
	for _, in := range []string{"", "5", "5.", ".1", "5.1-", "5.1MIB", "5.1-M I", "v5.1", "5.1.2", "a.b", "5.1-M1", "9999999.1"} {
		if _, err := ParseProtocolVersion([]byte(in)); !errors.Is(err, ErrBadValue) {
			t.Errorf("ParseProtocolVersion(%q) error = %v, want ErrBadValue", in, err)
		}
	}
}

func TestAppendArg(t *testing.T) {
	tests := []struct {
		v    any
		want string
	}{
		{"s", "s"}, {[]byte("b"), "b"}, {-3, "-3"}, {int8(-8), "-8"}, {int16(16), "16"}, {int32(32), "32"}, {int64(64), "64"},
		{uint(1), "1"}, {uint8(8), "8"}, {uint16(16), "16"}, {uint32(32), "32"}, {uint64(math.MaxUint64), strconv.FormatUint(math.MaxUint64, 10)},
		{float32(0.5), "0.5"}, {2.0, "2.0"}, {true, "1"}, {false, "0"},
		{time.Unix(5, 0), "5.0"}, {250 * time.Millisecond, "0.25"},
		{netip.MustParseAddr("10.0.0.1"), "10.0.0.1"}, {netip.MustParseAddrPort("10.0.0.1:7147"), "10.0.0.1:7147"},
		{Address{Addr: netip.MustParseAddr("::1")}, "[::1]"},
		{StatusWarn, "warn"}, {StrategyDifferentialRate, "differential-rate"}, {SensorDiscrete, "discrete"}, {ProtocolVersion{5, 1, "MIB"}, "5.1-MIB"},
	}
	for _, tt := range tests {
		got, err := AppendArg(nil, tt.v)
		if err != nil || string(got) != tt.want {
			t.Errorf("AppendArg(%T %v) = %q, %v; want %q", tt.v, tt.v, got, err, tt.want)
		}
	}
	for _, v := range []any{nil, struct{}{}, 1i, []string{"a"}} {
		if _, err := AppendArg(nil, v); !errors.Is(err, ErrBadValue) {
			t.Errorf("AppendArg(%T) error = %v, want ErrBadValue", v, err)
		}
	}
}

func TestValueErrorMessage(t *testing.T) {
	_, err := ParseInt([]byte("1\xff2"))
	var ve *ValueError
	if !errors.As(err, &ve) || ve.Type != "integer" {
		t.Fatalf("got %v", err)
	}
	if got, want := err.Error(), `katcp: invalid integer "1\xff2"`; got != want {
		t.Errorf("Error() = %s, want %s", got, want)
	}
}
