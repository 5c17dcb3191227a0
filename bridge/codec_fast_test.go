package bridge

import (
	"math/rand"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/katcp-go/katcp-bridge/katcp"
)

// decodeSlow is DecodeArgs without its fast path.
func decodeSlow(body []byte) ([][]byte, error) {
	line := append([]byte("?x "), body...)
	m, err := katcp.ParseMessage(line)
	if err != nil {
		return nil, err
	}
	return m.Args, nil
}

func TestDecodeArgsFastPathMatchesParser(t *testing.T) {
	alphabet := []byte("ab \t\\_0\r\n\x00\x1b@é")
	r := rand.New(rand.NewSource(1))
	cases := [][]byte{nil, {}, []byte(" "), []byte("a"), []byte(" a  b\t"), []byte("hello"), []byte("a\\_b 3")}
	for range 20000 {
		b := make([]byte, r.Intn(8))
		for i := range b {
			b[i] = alphabet[r.Intn(len(alphabet))]
		}
		cases = append(cases, b)
	}
	for _, body := range cases {
		got, gerr := DecodeArgs(body, false)
		want, werr := decodeSlow(body)
		if (gerr != nil) != (werr != nil) {
			t.Fatalf("%q: err %v, parser %v", body, gerr, werr)
		}
		if gerr == nil && !cmp.Equal(got, want) {
			t.Fatalf("%q: %q, parser %q", body, got, want)
		}
	}
}

func BenchmarkDecodeArgs(b *testing.B) {
	body := []byte("hello")
	b.ReportAllocs()
	for b.Loop() {
		DecodeArgs(body, false)
	}
}
