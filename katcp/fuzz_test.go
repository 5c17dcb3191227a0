package katcp

import (
	"bytes"
	"errors"
	"io"
	"math"
	"testing"
)

// Seed corpora live in testdata/fuzz/<target>; the f.Add calls below add
// the grammar's corner cases on top.

var fuzzSeeds = []string{
	"?sensor-value[12] foo\n",
	"#e \\\\ \\_ \\0 \\n \\r \\e \\t \\@ a\\@b\r\n",
	"!a[2147483647] ok\n?a[2147483648]\n?a[0]\n?a[01]\n?a[1]x\n?a [1]\n",
	" ?a\n\n\t\n?b\\q\n?c\\\n?d \x00\n?e \x1b\n#f \xff\xfe\f\v\n?unterminated",
}

func FuzzReader(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s), uint16(0))
		f.Add([]byte(s), uint16(8))
	}
	f.Fuzz(func(t *testing.T, in []byte, limit uint16) {
		maxLine := int(limit)
		if maxLine == 0 {
			maxLine = DefaultMaxLineLength
		}
		r := NewReaderSize(bytes.NewReader(in), maxLine)
		for range len(in) + 2 {
			m, err := r.ReadMessage()
			if cap(r.buf) > r.maxLine || cap(r.data) > r.maxLine || len(r.args) > r.maxLine {
				t.Fatalf("memory over the bound: buf %d, data %d, args %d, limit %d", cap(r.buf), cap(r.data), len(r.args), r.maxLine)
			}
			if err == io.EOF {
				return
			}
			var pe *ParseError
			if errors.As(err, &pe) {
				if len(pe.Line) > excerptLen || pe.Offset < 0 || pe.Offset > int64(len(in)) {
					t.Fatalf("bad ParseError %+v", pe)
				}
				continue
			}
			if err != nil {
				t.Fatalf("unexpected error %v", err)
			}
			// Whatever parses formats and parses back the same.
			b, err := AppendMessage(nil, &m)
			if err != nil {
				t.Fatalf("parsed message %v does not format: %v", m, err)
			}
			back, err := ParseMessage(b)
			if err != nil || !back.Equal(&m) {
				t.Fatalf("%q parsed to %v, formatted as %q, parsed back to %v, %v", in, m, b, back, err)
			}
		}
		t.Fatalf("reader did not reach EOF")
	})
}

func FuzzRoundTrip(f *testing.F) {
	f.Add(byte('?'), "sensor-value", uint32(12), []byte("foo"))
	f.Add(byte('#'), "e", uint32(0), []byte("\\\x00 \n\r\x1b\t@\x00\xff"))
	f.Add(byte('!'), "a-1", uint32(MaxMID), []byte("\x00\x00"))
	f.Fuzz(func(t *testing.T, typ byte, name string, mid uint32, args []byte) {
		m := Message{Type: Type(typ), Name: name, MID: int(mid)}
		// A NUL in the fuzzed bytes separates arguments, so that empty
		// arguments occur.
		if len(args) > 0 {
			m.Args = bytes.Split(args, []byte{0})
		}
		b, err := AppendMessage(nil, &m)
		if err != nil {
			if m.Validate() == nil {
				t.Fatalf("valid message %+v does not format: %v", m, err)
			}
			return
		}
		r := NewReader(bytes.NewReader(b))
		got, err := r.ReadMessage()
		if err != nil || !got.Equal(&m) {
			t.Fatalf("%+v formatted as %q parsed back to %+v, %v", m, b, got, err)
		}
		if _, err := r.ReadMessage(); err != io.EOF {
			t.Fatalf("formatted message %q is more than one line: %v", b, err)
		}
	})
}

// readResult summarises a ReadMessage readResult for comparison.
type readResult struct {
	msg    string
	err    error
	offset int64
	column int
	line   string
}

func readResults(r *Reader, limit int) []readResult {
	var out []readResult
	for range limit {
		m, err := r.ReadMessage()
		if err == io.EOF {
			break
		}
		var res readResult
		var pe *ParseError
		if errors.As(err, &pe) {
			res = readResult{err: pe.Err, offset: pe.Offset, column: pe.Column, line: string(pe.Line)}
		} else if err != nil {
			res = readResult{err: err}
		} else {
			res = readResult{msg: m.String()}
		}
		out = append(out, res)
	}
	return out
}

// chunkReader returns the input in pieces whose sizes come from sizes.
type chunkReader struct {
	in    []byte
	sizes []byte
	i     int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.in) == 0 {
		return 0, io.EOF
	}
	n := 1
	if len(c.sizes) > 0 {
		n = int(c.sizes[c.i%len(c.sizes)])%17 + 1
		c.i++
	}
	n = min(n, len(p), len(c.in))
	copy(p, c.in[:n])
	c.in = c.in[n:]
	return n, nil
}

func FuzzChunks(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s), []byte{0, 3, 16, 1}, uint8(0))
		f.Add([]byte(s), []byte{5}, uint8(7))
	}
	f.Fuzz(func(t *testing.T, in, sizes []byte, limit uint8) {
		maxLine := int(limit)
		if maxLine == 0 {
			maxLine = DefaultMaxLineLength
		}
		want := readResults(NewReaderSize(bytes.NewReader(in), maxLine), len(in)+2)
		got := readResults(NewReaderSize(&chunkReader{in: in, sizes: sizes}, maxLine), len(in)+2)
		if len(got) != len(want) {
			t.Fatalf("chunked: %d results, whole: %d\n%v\n%v", len(got), len(want), got, want)
		}
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("readResult %d: chunked %+v, whole %+v", i, got[i], want[i])
			}
		}
	})
}

func FuzzFloat(f *testing.F) {
	for _, v := range []float64{0, 234.5, 123456789, 1e20, 1.5e-7, 1e16, 1e15, 1e-5, 1e-4, math.MaxFloat64, math.SmallestNonzeroFloat64} {
		f.Add(v)
	}
	f.Fuzz(func(t *testing.T, v float64) {
		b := AppendFloat(nil, v)
		back, err := ParseFloat(b)
		if err != nil {
			t.Fatalf("AppendFloat(%v) = %q does not parse: %v", v, b, err)
		}
		if math.IsNaN(v) {
			if !math.IsNaN(back) {
				t.Fatalf("NaN came back as %v", back)
			}
			return
		}
		if back != v || math.Signbit(back) != math.Signbit(v) {
			t.Fatalf("AppendFloat(%v) = %q parses to %v", v, b, back)
		}
	})
}
