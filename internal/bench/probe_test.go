package bench

import (
	"fmt"
	"os"
	"testing"
	"time"

	"go.opentelemetry.io/otel/trace/noop"
)

func TestProbe(t *testing.T) {
	which := os.Getenv("PROBE")
	if which == "" {
		t.Skip()
	}
	ns, _ := startNATS()
	defer ns.Shutdown()
	url := ns.ClientURL()
	bb, err := startBridge(url, 10, 1, noop.NewTracerProvider())
	if err != nil {
		t.Fatal(err)
	}
	defer bb.close()
	var ten [10]string
	for i := range ten {
		ten[i] = fmt.Sprintf("katcp.d%03d.req.echo", i)
	}
	d := 2 * time.Second
	var r float64
	switch which {
	case "inflight":
		r, err = natsRequests(url, "", d, 100, func(i int) string { return ten[i%10] })
	case "one":
		r, err = natsRequests(url, "", d, 1, func(i int) string { return ten[0] })
	case "raw":
		raw, _ := rawNATSResponder(url, "raw.req")
		defer raw.Close()
		r, err = natsRequests(url, "raw.req", d, 100, nil)
	case "sensors":
		var del float64
		r, err = bridgeSensorRate(url, bb, d, &del)
		fmt.Println("delivered", del)
	}
	fmt.Printf("%s rate %.0f total %.0f\n", which, r, r*d.Seconds())
}
