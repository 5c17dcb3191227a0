package subjects

import (
	"errors"
	"testing"
)

func TestSubjects(t *testing.T) {
	var s Scheme
	tests := []struct{ got, want string }{
		{s.Request("m000", "sensor-value"), "katcp.m000.req.sensor-value"},
		{s.Requests("m000"), "katcp.m000.req.*"},
		{s.Inform("m000", "log"), "katcp.m000.inform.log"},
		{s.Sensor("m000", "pump.speed"), "katcp.m000.sensor.pump.speed"},
		{s.Sensor("m000", "rfe_3.temp-1"), "katcp.m000.sensor.rfe_3.temp-1"},
		{s.Sensors("*"), "katcp.*.sensor.>"},
		{s.Status("m000"), "katcp.m000.status"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
	site, err := New("site.katcp")
	if err != nil {
		t.Fatal(err)
	}
	if got := site.Status("a"); got != "site.katcp.a.status" {
		t.Errorf("prefix: %q", got)
	}
	for _, bad := range []string{"a..b", ".a", "a b", "a*", ">", "a.>"} {
		if _, err := New(bad); !errors.Is(err, ErrBadPrefix) {
			t.Errorf("New(%q) error = %v", bad, err)
		}
	}
}

func TestEscapeSensor(t *testing.T) {
	tests := []struct{ name, want string }{
		{"pump.speed", "pump.speed"},
		{"a..b", "a.~.b"},
		{".a", "~.a"},
		{"a.", "a.~"},
		{"a b*c>d~e", "a~20b~2Ac~3Ed~7Ee"},
		{"\xff", "~FF"},
		{"", "~"},
	}
	for _, tt := range tests {
		got := EscapeSensor(tt.name)
		if got != tt.want {
			t.Errorf("EscapeSensor(%q) = %q, want %q", tt.name, got, tt.want)
		}
		back, err := UnescapeSensor(got)
		if err != nil || back != tt.name {
			t.Errorf("UnescapeSensor(%q) = %q, %v; want %q", got, back, err, tt.name)
		}
	}
	for _, bad := range []string{"a..b", "~1", "~zz", "a~", "~2"} {
		if _, err := UnescapeSensor(bad); !errors.Is(err, ErrBadSubject) {
			t.Errorf("UnescapeSensor(%q) error = %v", bad, err)
		}
	}
}

func FuzzEscapeSensor(f *testing.F) {
	f.Add("pump.speed")
	f.Add("a..b.~")
	f.Fuzz(func(t *testing.T, name string) {
		esc := EscapeSensor(name)
		for i := 0; i < len(esc); i++ {
			if c := esc[i]; c == ' ' || c == '*' || c == '>' || c < 0x21 || c > 0x7e {
				t.Fatalf("EscapeSensor(%q) = %q has %q", name, esc, c)
			}
		}
		back, err := UnescapeSensor(esc)
		if err != nil || back != name {
			t.Fatalf("round trip %q -> %q -> %q, %v", name, esc, back, err)
		}
	})
}

func TestParse(t *testing.T) {
	var s Scheme
	tests := []struct {
		subject string
		want    Parsed
	}{
		{"katcp.m000.req.sensor-value", Parsed{KindRequest, "m000", "sensor-value"}},
		{"katcp.m000.inform.log", Parsed{KindInform, "m000", "log"}},
		{"katcp.m000.sensor.pump.speed", Parsed{KindSensor, "m000", "pump.speed"}},
		{"katcp.m000.sensor.a.~.b~20", Parsed{KindSensor, "m000", "a..b "}},
		{"katcp.m000.status", Parsed{KindStatus, "m000", ""}},
	}
	for _, tt := range tests {
		got, err := s.Parse(tt.subject)
		if err != nil || got != tt.want {
			t.Errorf("Parse(%q) = %+v, %v; want %+v", tt.subject, got, err, tt.want)
		}
	}
	for _, bad := range []string{"other.m000.status", "katcp.m0 0.status", "katcp.m000", "katcp.m000.bogus.x",
		"katcp.m000.req.bad_name", "katcp.m000.req.", "katcp.m000.sensor.", "katcp.m000.status.x", "katcp..status"} {
		if _, err := s.Parse(bad); !errors.Is(err, ErrBadSubject) {
			t.Errorf("Parse(%q) error = %v", bad, err)
		}
	}
	if err := ValidDevice("m000_a-1"); err != nil {
		t.Error(err)
	}
	if err := ValidDevice("m.0"); !errors.Is(err, ErrBadDevice) {
		t.Errorf("ValidDevice(m.0) = %v", err)
	}
}

func TestEscapeSensorFastPath(t *testing.T) {
	for _, n := range []string{"", ".", "..", "a", "a.b", "a..b", ".a", "a.", "s.0", "pump.speed-1_x", "a b", "a~b", "a*b", "a>b", "é"} {
		if got, want := EscapeSensor(n), escapeSensor(n); got != want {
			t.Errorf("EscapeSensor(%q) = %q, want %q", n, got, want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { EscapeSensor("pump.speed") }); n != 0 {
		t.Errorf("EscapeSensor of a plain name: %v allocations", n)
	}
}
