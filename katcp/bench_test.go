package katcp

import (
	"bytes"
	"strconv"
	"testing"
)

// Targets from BENCHMARKS.md, reported as metrics so that a run shows
// measured against target.
const (
	targetShortParseNS = 100    // ns per short request
	targetBigParseNS   = 100000 // ns per 60 KiB, 4100-argument message
)

func BenchmarkParseShortRequest(b *testing.B) {
	line := []byte("?sensor-value[12] foo\n")
	r := NewReader(&repeatReader{line: line})
	b.ReportAllocs()
	b.SetBytes(int64(len(line)))
	for b.Loop() {
		if _, err := r.ReadMessage(); err != nil {
			b.Fatal(err)
		}
	}
	reportRatio(b, targetShortParseNS)
}

func BenchmarkParseMessageOwned(b *testing.B) {
	line := []byte("?sensor-value[12] foo\n")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseMessage(line); err != nil {
			b.Fatal(err)
		}
	}
}

// bigMessage is a 60 KiB inform with 4100 arguments, some escaped, like a
// large ?sensor-list reply line.
func bigMessage() []byte {
	m := Message{Type: TypeInform, Name: "big"}
	for i := range 4100 {
		arg := []byte("value-" + strconv.Itoa(i))
		if i%10 == 0 {
			arg = append(arg, " with space"...)
		}
		m.Args = append(m.Args, arg)
	}
	out, _ := AppendMessage(nil, &m)
	for len(out) < 60<<10 { // pad the last argument to 60 KiB
		out = append(out[:len(out)-1], "x\n"...)
	}
	return out
}

func BenchmarkParseBig(b *testing.B) {
	line := bigMessage()
	r := NewReader(&repeatReader{line: line})
	m, err := r.ReadMessage()
	if err != nil || len(m.Args) != 4100 {
		b.Fatalf("got %d args, %v", len(m.Args), err)
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(line)))
	for b.Loop() {
		if _, err := r.ReadMessage(); err != nil {
			b.Fatal(err)
		}
	}
	reportRatio(b, targetBigParseNS)
}

func BenchmarkFormatReused(b *testing.B) {
	m := Message{Type: TypeInform, Name: "sensor-status", Args: [][]byte{
		[]byte("1700000000.5"), []byte("1"), []byte("pump.speed"), []byte("nominal"), []byte("12.5"),
	}}
	buf := make([]byte, 0, 128)
	b.ReportAllocs()
	for b.Loop() {
		var err error
		buf, err = AppendMessage(buf[:0], &m)
		if err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(len(buf)))
}

func BenchmarkFormatBig(b *testing.B) {
	m, err := ParseMessage(bigMessage())
	if err != nil {
		b.Fatal(err)
	}
	buf, _ := AppendMessage(nil, &m)
	b.ReportAllocs()
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		buf, _ = AppendMessage(buf[:0], &m)
	}
	if !bytes.HasSuffix(buf, []byte("\n")) {
		b.Fatal("bad format")
	}
}

func BenchmarkAppendFloat(b *testing.B) {
	buf := make([]byte, 0, 32)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		buf = AppendFloat(buf[:0], float64(i)*1.5e-3)
	}
}

// reportRatio reports time per op as a fraction of the target (<= 1 meets it).
func reportRatio(b *testing.B, targetNS float64) {
	nsPerOp := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
	b.ReportMetric(nsPerOp/targetNS, "of-target")
}
