package katcp

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/google/go-cmp/cmp"
)

// item is one result of ReadMessage: a message or an error.
type item struct {
	Msg Message
	Err error // a sentinel, compared with errors.Is
	Off int64 // ParseError.Offset, checked when Err is set
	Col int   // ParseError.Column, checked when Err is set
}

func msg(t Type, name string, mid int, args ...string) item {
	m := Message{Type: t, Name: name, MID: mid}
	for _, a := range args {
		m.Args = append(m.Args, []byte(a))
	}
	return item{Msg: m}
}

func perr(err error, off int64, col int) item { return item{Err: err, Off: off, Col: col} }

// readAll reads until io.EOF (or another non-parse error, returned last).
func readAll(t *testing.T, r *Reader) []item {
	t.Helper()
	var got []item
	for range 10000 {
		m, err := r.ReadMessage()
		if err == io.EOF {
			return got
		}
		if err != nil {
			var pe *ParseError
			if !errors.As(err, &pe) {
				return append(got, item{Err: err})
			}
			got = append(got, item{Err: pe.Err, Off: pe.Offset, Col: pe.Column})
			continue
		}
		got = append(got, item{Msg: m.Clone()})
	}
	t.Fatal("reader did not reach EOF")
	return nil
}

func diffItems(got, want []item) string {
	return cmp.Diff(want, got,
		cmp.Comparer(func(a, b error) bool { return errors.Is(a, b) || errors.Is(b, a) }),
		cmp.Comparer(func(a, b []byte) bool { return bytes.Equal(a, b) }))
}

var readerTests = []struct {
	name string
	in   string
	want []item
}{
	{"request", "?watchdog\n", []item{msg(TypeRequest, "watchdog", 0)}},
	{"reply", "!watchdog ok\n", []item{msg(TypeReply, "watchdog", 0, "ok")}},
	{"inform", "#log info 1.0 root hi\n", []item{msg(TypeInform, "log", 0, "info", "1.0", "root", "hi")}},
	{"mid", "?sensor-value[12] foo\n", []item{msg(TypeRequest, "sensor-value", 12, "foo")}},
	{"max mid", "?a[2147483647]\n", []item{msg(TypeRequest, "a", MaxMID)}},
	{"mid then args", "!a[1] ok x\n", []item{msg(TypeReply, "a", 1, "ok", "x")}},
	{"name with digits and dash", "?A-b9-\n", []item{msg(TypeRequest, "A-b9-", 0)}},
	{"names are case-sensitive", "?Help\n", []item{msg(TypeRequest, "Help", 0)}},
	{"argument that looks like a mid", "?a [1]\n", []item{msg(TypeRequest, "a", 0, "[1]")}},
	{"tabs and runs of spaces", "?a \t x\t\ty  z\n", []item{msg(TypeRequest, "a", 0, "x", "y", "z")}},
	{"trailing whitespace", "?a x \t \n", []item{msg(TypeRequest, "a", 0, "x")}},
	{"whitespace only after name", "?a \t\n", []item{msg(TypeRequest, "a", 0)}},
	{"CR ends a line", "?a\r?b\r", []item{msg(TypeRequest, "a", 0), msg(TypeRequest, "b", 0)}},
	{"CRLF is a line and an empty line", "?a\r\n?b\r\n", []item{msg(TypeRequest, "a", 0), msg(TypeRequest, "b", 0)}},
	{"blank lines ignored", "\n\n \t\n\r?a\n\n", []item{msg(TypeRequest, "a", 0)}},
	{"all escapes", `#e \\ \_ \0 \n \r \e \t` + "\n", []item{msg(TypeInform, "e", 0, "\\", " ", "\x00", "\n", "\r", "\x1b", "\t")}},
	{"escapes inside an argument", `#e a\_b\\c\tz` + "\n", []item{msg(TypeInform, "e", 0, "a b\\c\tz")}},
	{"empty argument", `#foo \@` + "\n", []item{msg(TypeInform, "foo", 0, "")}},
	{"at inside an argument adds nothing", `#foo a\@b \@\@ \@x` + "\n", []item{msg(TypeInform, "foo", 0, "ab", "", "x")}},
	{"form feed and vertical tab are bytes", "#f a\fb \v\n", []item{msg(TypeInform, "f", 0, "a\fb", "\v")}},
	{"non-UTF-8 passes through", "#f \xff\xfe \xc3\x28\n", []item{msg(TypeInform, "f", 0, "\xff\xfe", "\xc3\x28")}},
	{"spec request examples", "?set-rate 5.1\n!set-rate ok\n?set-unknown-parameter 6.1\n!set-unknown-parameter invalid Unknown\\_request.\n?set-rate[123] 4.1\n!set-rate[123] ok\n",
		[]item{
			msg(TypeRequest, "set-rate", 0, "5.1"),
			msg(TypeReply, "set-rate", 0, "ok"),
			msg(TypeRequest, "set-unknown-parameter", 0, "6.1"),
			msg(TypeReply, "set-unknown-parameter", 0, "invalid", "Unknown request."),
			msg(TypeRequest, "set-rate", 123, "4.1"),
			msg(TypeReply, "set-rate", 123, "ok"),
		}},
	{"spec sensor-list example", "#sensor-list drive.dc-voltage-elev Drive\\_bus\\_voltage V float 0.0 900.0\n#sensor-list drive.enable-azim Azimuth\\_drive\\_enable\\_signal\\_status \\@ boolean\n",
		[]item{
			msg(TypeInform, "sensor-list", 0, "drive.dc-voltage-elev", "Drive bus voltage", "V", "float", "0.0", "900.0"),
			msg(TypeInform, "sensor-list", 0, "drive.enable-azim", "Azimuth drive enable signal status", "", "boolean"),
		}},

	// Errors: one per malformed line, then the next line parses.
	{"leading whitespace", " ?a\n?b\n", []item{perr(ErrBadType, 0, 0), msg(TypeRequest, "b", 0)}},
	{"bad type", "*a\n?b\n", []item{perr(ErrBadType, 0, 0), msg(TypeRequest, "b", 0)}},
	{"type alone", "?\n", []item{perr(ErrBadName, 0, 1)}},
	{"space before name", "? a\n", []item{perr(ErrBadName, 0, 1)}},
	{"name starts with digit", "?1a\n", []item{perr(ErrBadName, 0, 1)}},
	{"name starts with dash", "?-a\n", []item{perr(ErrBadName, 0, 1)}},
	{"underscore in name", "?a_b\n", []item{perr(ErrBadName, 0, 2)}},
	{"dot in name", "?a.b\n", []item{perr(ErrBadName, 0, 2)}},
	{"non-ASCII in name", "?a\xffb\n", []item{perr(ErrBadName, 0, 2)}},
	{"escape in name", "?a\\_b\n", []item{perr(ErrBadName, 0, 2)}},
	{"mid zero", "?a[0]\n", []item{perr(ErrBadMID, 0, 2)}},
	{"mid leading zero", "?a[01]\n", []item{perr(ErrBadMID, 0, 2)}},
	{"mid empty", "?a[]\n", []item{perr(ErrBadMID, 0, 2)}},
	{"mid negative", "?a[-1]\n", []item{perr(ErrBadMID, 0, 2)}},
	{"mid too big", "?a[2147483648]\n", []item{perr(ErrBadMID, 0, 2)}},
	{"mid huge", "?a[99999999999999999999999]\n", []item{perr(ErrBadMID, 0, 2)}},
	{"mid unclosed", "?a[1\n", []item{perr(ErrBadMID, 0, 2)}},
	{"mid not digits", "?a[x]\n", []item{perr(ErrBadMID, 0, 2)}},
	{"mid followed by text", "?a[1]x\n", []item{perr(ErrBadMID, 0, 5)}},
	{"unknown escape", "?a x\\q\n?b\n", []item{perr(ErrBadEscape, 0, 4), msg(TypeRequest, "b", 0)}},
	{"escaped space is not an escape", "?a x\\ y\n", []item{perr(ErrBadEscape, 0, 4)}},
	{"lone trailing backslash", "?a x\\\n", []item{perr(ErrBadEscape, 0, 4)}},
	{"raw NUL", "?a x\x00y\n", []item{perr(ErrBadCharacter, 0, 4)}},
	{"raw ESC", "?a \x1b\n", []item{perr(ErrBadCharacter, 0, 3)}},
	{"error offsets count earlier lines", "?ok\n\n#bad\\\n", []item{msg(TypeRequest, "ok", 0), perr(ErrBadName, 5, 4)}},
	{"unterminated last line", "?a\n?b", []item{msg(TypeRequest, "a", 0), perr(io.ErrUnexpectedEOF, 3, 2)}},
	{"unterminated whitespace is nothing", "?a\n  ", []item{msg(TypeRequest, "a", 0)}},
	{"empty input", "", nil},
}

func TestReader(t *testing.T) {
	for _, tt := range readerTests {
		t.Run(tt.name, func(t *testing.T) {
			for _, rd := range []struct {
				name string
				r    io.Reader
			}{
				{"whole", strings.NewReader(tt.in)},
				{"one byte at a time", iotest.OneByteReader(strings.NewReader(tt.in))},
				{"data with EOF", iotest.DataErrReader(strings.NewReader(tt.in))},
			} {
				got := readAll(t, NewReader(rd.r))
				if d := diffItems(got, tt.want); d != "" {
					t.Errorf("%s: %q: (-want +got)\n%s", rd.name, tt.in, d)
				}
			}
		})
	}
}

func TestParseErrorDetails(t *testing.T) {
	r := NewReader(strings.NewReader("?ok\n?bad x\\q\xff\n"))
	if _, err := r.ReadMessage(); err != nil {
		t.Fatal(err)
	}
	_, err := r.ReadMessage()
	var pe *ParseError
	if !errors.As(err, &pe) {
		t.Fatalf("got %v, want *ParseError", err)
	}
	if !errors.Is(err, ErrBadEscape) {
		t.Errorf("errors.Is(%v, ErrBadEscape) = false", err)
	}
	if got, want := string(pe.Line), "?bad x\\q\xff"; got != want {
		t.Errorf("Line = %q, want %q", got, want)
	}
	if pe.Offset != 4 || pe.Column != 6 {
		t.Errorf("Offset, Column = %d, %d, want 4, 6", pe.Offset, pe.Column)
	}
	want := `katcp: malformed line at byte 4, column 6: invalid escape sequence: "?bad x\\q\xff"`
	if got := err.Error(); got != want {
		t.Errorf("Error() = %s, want %s", got, want)
	}
}

func TestReaderLineLimit(t *testing.T) {
	tests := []struct {
		name string
		max  int
		in   string
		want []item
	}{
		// The limit counts the terminator: "?abcd\n" is 6 bytes.
		{"exactly at the limit", 6, "?abcd\n?b\n", []item{msg(TypeRequest, "abcd", 0), msg(TypeRequest, "b", 0)}},
		{"one over the limit", 6, "?abcde\n?b\n", []item{perr(ErrLineTooLong, 0, 6), msg(TypeRequest, "b", 0)}},
		{"far over the limit", 6, "?" + strings.Repeat("x", 100) + "\r?b\n", []item{perr(ErrLineTooLong, 0, 6), msg(TypeRequest, "b", 0)}},
		{"offsets after a long line", 6, "?abcdefgh\n?b[0]\n", []item{perr(ErrLineTooLong, 0, 6), perr(ErrBadMID, 10, 2)}},
		{"long line at EOF", 6, "?a\n?abcdefghij", []item{msg(TypeRequest, "a", 0), perr(ErrLineTooLong, 3, 6)}},
		{"long blank line is still too long", 4, "       \n?a\n", []item{perr(ErrLineTooLong, 0, 4), msg(TypeRequest, "a", 0)}},
		{"the limit is per line", 6, "?abcd\n?abcd\n?abcd\n", []item{msg(TypeRequest, "abcd", 0), msg(TypeRequest, "abcd", 0), msg(TypeRequest, "abcd", 0)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, one := range []bool{false, true} {
				var rd io.Reader = strings.NewReader(tt.in)
				if one {
					rd = iotest.OneByteReader(rd)
				}
				r := NewReaderSize(rd, tt.max)
				got := readAll(t, r)
				if d := diffItems(got, tt.want); d != "" {
					t.Errorf("one byte at a time %v: (-want +got)\n%s", one, d)
				}
				if cap(r.buf) > tt.max {
					t.Errorf("buffer grew to %d, limit %d", cap(r.buf), tt.max)
				}
			}
		})
	}
}

func TestReaderDefaultLimit(t *testing.T) {
	if got := NewReader(nil).MaxLineLength(); got != 2<<20 {
		t.Errorf("default limit = %d, want 2 MiB", got)
	}
	long := "?a " + strings.Repeat("x", DefaultMaxLineLength) + "\n?b\n"
	r := NewReader(strings.NewReader(long))
	want := []item{perr(ErrLineTooLong, 0, DefaultMaxLineLength), msg(TypeRequest, "b", 0)}
	if d := diffItems(readAll(t, r), want); d != "" {
		t.Errorf("(-want +got)\n%s", d)
	}
	if cap(r.buf) > DefaultMaxLineLength {
		t.Errorf("buffer grew to %d", cap(r.buf))
	}
}

func TestReaderStickyError(t *testing.T) {
	boom := errors.New("boom")
	r := NewReader(io.MultiReader(strings.NewReader("?a\n?b"), iotest.ErrReader(boom)))
	if m, err := r.ReadMessage(); err != nil || m.Name != "a" {
		t.Fatalf("got %v, %v", m, err)
	}
	for range 2 {
		if _, err := r.ReadMessage(); err != boom {
			t.Fatalf("got %v, want boom", err)
		}
	}
}

func TestReaderNoProgress(t *testing.T) {
	r := NewReader(zeroReader{})
	if _, err := r.ReadMessage(); err != io.ErrNoProgress {
		t.Fatalf("got %v, want io.ErrNoProgress", err)
	}
}

type zeroReader struct{}

func (zeroReader) Read([]byte) (int, error) { return 0, nil }

func TestReaderBorrowsUntilNextRead(t *testing.T) {
	r := NewReader(strings.NewReader("#a x\\_y\n#b z\n"))
	m, err := r.ReadMessage()
	if err != nil {
		t.Fatal(err)
	}
	kept := m.Clone()
	if _, err := r.ReadMessage(); err != nil {
		t.Fatal(err)
	}
	if got := kept.String(); got != `#a x\_y` {
		t.Errorf("clone changed: %s", got)
	}
}

func TestReaderSteadyStateAllocs(t *testing.T) {
	line := []byte("#sensor-status 1700000000.123 1 pump.speed nominal 12.5\n")
	src := &repeatReader{line: line}
	r := NewReader(src)
	if _, err := r.ReadMessage(); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := r.ReadMessage(); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("ReadMessage allocates %v times per message, want 0", allocs)
	}
}

// repeatReader yields line forever.
type repeatReader struct {
	line []byte
	pos  int
}

func (r *repeatReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		c := copy(p[n:], r.line[r.pos:])
		n += c
		r.pos = (r.pos + c) % len(r.line)
	}
	return n, nil
}

func TestParseMessage(t *testing.T) {
	for _, in := range []string{"?a x", "?a x\n", "?a x\r", "?a x\r\n"} {
		m, err := ParseMessage([]byte(in))
		if err != nil {
			t.Errorf("ParseMessage(%q): %v", in, err)
			continue
		}
		if got := m.String(); got != "?a x" {
			t.Errorf("ParseMessage(%q) = %s", in, got)
		}
	}
	for _, tt := range []struct {
		in   string
		want error
	}{
		{"", ErrBadType},
		{"  ", ErrBadType},
		{"?a\n?b", ErrBadCharacter},
		{"?a \\q", ErrBadEscape},
		{"?a[0]", ErrBadMID},
	} {
		if _, err := ParseMessage([]byte(tt.in)); !errors.Is(err, tt.want) {
			t.Errorf("ParseMessage(%q) error = %v, want %v", tt.in, err, tt.want)
		}
	}
}
