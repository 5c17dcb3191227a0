package bench

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel/trace"
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
	var tp trace.TracerProvider = noop.NewTracerProvider()
	if os.Getenv("TRACING") != "" {
		sdk, stop := alwaysOn()
		defer stop()
		tp = sdk
	}
	bb, err := startBridge(url, 10, 1, tp)
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

func TestProbeHeaders(t *testing.T) {
	if os.Getenv("PROBEH") == "" {
		t.Skip()
	}
	ns, _ := startNATS()
	defer ns.Shutdown()
	url := ns.ClientURL()
	for round := 0; round < 3; round++ {
		for _, hdr := range []string{"", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"} {
			sub, _ := nats.Connect(url)
			p := newPacer()
			s, _ := sub.Subscribe("raw.sensor", func(*nats.Msg) { p.received() })
			s.SetPendingLimits(-1, -1)
			sub.Flush()
			pub, _ := nats.Connect(url)
			payload := []byte(`{"device":"d","name":"s.0","type":"integer","timestamp":1700000000.5,"status":"nominal","value":12345}`)
			h := nats.Header{}
			if hdr != "" {
				h.Set("traceparent", hdr)
			}
			r, _ := paced(time.Second, p, sensorWindow, func(i int64) {
				if hdr == "" {
					pub.Publish("raw.sensor", payload)
				} else {
					pub.PublishMsg(&nats.Msg{Subject: "raw.sensor", Data: payload, Header: h})
				}
			})
			fmt.Printf("header %q: %.0f/s\n", hdr, r)
			pub.Close()
			sub.Close()
		}
	}
}
