package katcp

import (
	"errors"
	"net/netip"
	"testing"
	"time"
)

func TestAppendMessage(t *testing.T) {
	tests := []struct {
		m    Message
		want string
	}{
		{Message{Type: TypeRequest, Name: "watchdog"}, "?watchdog\n"},
		{Message{Type: TypeReply, Name: "watchdog", Args: [][]byte{[]byte("ok")}}, "!watchdog ok\n"},
		{Message{Type: TypeInform, Name: "a", MID: 7, Args: [][]byte{[]byte("x")}}, "#a[7] x\n"},
		{Message{Type: TypeRequest, Name: "a", MID: MaxMID}, "?a[2147483647]\n"},
		{Message{Type: TypeInform, Name: "e", Args: [][]byte{[]byte("\\ \x00\n\r\x1b\t")}}, `#e \\\_\0\n\r\e\t` + "\n"},
		{Message{Type: TypeInform, Name: "e", Args: [][]byte{{}, nil, []byte("x")}}, `#e \@ \@ x` + "\n"},
		{Message{Type: TypeInform, Name: "e", Args: [][]byte{[]byte("@"), []byte("[1]"), []byte("\f\v")}}, "#e @ [1] \f\v\n"},
		{Message{Type: TypeInform, Name: "e", Args: [][]byte{[]byte("\xff\xfe\x80")}}, "#e \xff\xfe\x80\n"},
		{Message{Type: TypeReply, Name: "set-unknown-parameter", Args: [][]byte{[]byte("invalid"), []byte("Unknown request.")}}, "!set-unknown-parameter invalid Unknown\\_request.\n"},
	}
	for _, tt := range tests {
		got, err := AppendMessage([]byte("prefix:"), &tt.m)
		if err != nil {
			t.Errorf("AppendMessage(%v): %v", tt.m, err)
			continue
		}
		if string(got) != "prefix:"+tt.want {
			t.Errorf("AppendMessage = %q, want %q", got, "prefix:"+tt.want)
		}
	}
}

func TestAppendMessageInvalid(t *testing.T) {
	tests := []struct {
		m    Message
		want error
	}{
		{Message{Type: 'x', Name: "a"}, ErrBadType},
		{Message{Type: TypeRequest, Name: ""}, ErrBadName},
		{Message{Type: TypeRequest, Name: "a b"}, ErrBadName},
		{Message{Type: TypeRequest, Name: "a_b"}, ErrBadName},
		{Message{Type: TypeRequest, Name: "1a"}, ErrBadName},
		{Message{Type: TypeRequest, Name: "a", MID: -1}, ErrBadMID},
		{Message{Type: TypeRequest, Name: "a", MID: MaxMID + 1}, ErrBadMID},
	}
	for _, tt := range tests {
		dst := []byte("keep")
		got, err := AppendMessage(dst, &tt.m)
		if !errors.Is(err, tt.want) {
			t.Errorf("AppendMessage(%+v) error = %v, want %v", tt.m, err, tt.want)
		}
		if string(got) != "keep" {
			t.Errorf("AppendMessage(%+v) changed dst to %q", tt.m, got)
		}
	}
}

func TestAppendMessageNoAllocs(t *testing.T) {
	m := Message{Type: TypeInform, Name: "sensor-status", Args: [][]byte{
		[]byte("1700000000.5"), []byte("1"), []byte("pump speed"), []byte("nominal"), []byte("12.5"),
	}}
	buf := make([]byte, 0, 256)
	allocs := testing.AllocsPerRun(100, func() {
		var err error
		buf, err = AppendMessage(buf[:0], &m)
		if err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("AppendMessage allocates %v times, want 0", allocs)
	}
}

func TestNewMessage(t *testing.T) {
	ts := time.Unix(1700000000, 250_000_000)
	m, err := NewMessage(TypeInform, "sensor-status", 3,
		ts, 1, "pump.speed", StatusNominal, 12.5, true, []byte{}, int64(-7), uint8(9),
		netip.MustParseAddrPort("[::1]:7147"), 1500*time.Millisecond, StrategyEventRate)
	if err != nil {
		t.Fatal(err)
	}
	want := `#sensor-status[3] 1700000000.25 1 pump.speed nominal 12.5 1 \@ -7 9 [::1]:7147 1.5 event-rate`
	if got := m.String(); got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
	if _, err := NewRequest("a", struct{}{}); !errors.Is(err, ErrBadValue) {
		t.Errorf("unsupported argument type: error = %v, want ErrBadValue", err)
	}
	if _, err := NewRequest("a_b"); !errors.Is(err, ErrBadName) {
		t.Errorf("bad name: error = %v, want ErrBadName", err)
	}
	if _, err := NewMessage(TypeReply, "a", -2); !errors.Is(err, ErrBadMID) {
		t.Errorf("bad mid: error = %v, want ErrBadMID", err)
	}
	if _, err := NewMessage('x', "a", 0); !errors.Is(err, ErrBadType) {
		t.Errorf("bad type: error = %v, want ErrBadType", err)
	}
}

func TestNewMessageArgsAreIndependent(t *testing.T) {
	m, err := NewReply("a", "ok", "x")
	if err != nil {
		t.Fatal(err)
	}
	m.Args[0] = append(m.Args[0], "more"...)
	if got := m.Arg(1); got != "x" {
		t.Errorf("appending to one argument changed the next: %q", got)
	}
	if got := m.Arg(5); got != "" {
		t.Errorf("Arg(5) = %q, want empty", got)
	}
}

func TestMessageEqualAndClone(t *testing.T) {
	a := Message{Type: TypeInform, Name: "a", MID: 1, Args: [][]byte{[]byte("x"), nil}}
	b := a.Clone()
	if !a.Equal(&b) {
		t.Errorf("clone differs: %v %v", a, b)
	}
	b.Args[0][0] = 'y'
	if a.Equal(&b) || string(a.Args[0]) != "x" {
		t.Errorf("clone shares memory with the original")
	}
	if got := (Message{Type: TypeRequest, Name: "a"}).Clone(); got.Args != nil {
		t.Errorf("clone of no arguments has %v", got.Args)
	}
}

func TestTypeString(t *testing.T) {
	for typ, want := range map[Type]string{TypeRequest: "request", TypeReply: "reply", TypeInform: "inform", 'x': "Type(0x78)"} {
		if got := typ.String(); got != want {
			t.Errorf("%q.String() = %q, want %q", byte(typ), got, want)
		}
	}
}
