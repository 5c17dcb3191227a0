package bench

import (
	"context"
	"fmt"
	"math"
	"net"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/katcp-go/katcp-bridge/katcp"
)

// device runs a katcp.Server with ?echo on 127.0.0.1.
type device struct {
	srv  *katcp.Server
	addr string
	done chan struct{}
}

func startDevice(sensors int) (*device, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	srv := katcp.NewServer(katcp.ServerConfig{DeviceName: "bench", MaxBacklog: 64 << 20})
	srv.Handle("echo", "?echo args", func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		args := make([]any, len(r.Args))
		for i, a := range r.Args {
			args[i] = a
		}
		return w.Reply(args...)
	})
	for i := range sensors {
		srv.Sensors().Add(katcp.MustSensor(katcp.SensorInteger, "s."+strconv.Itoa(i), katcp.SensorOptions{Description: "bench sensor", Units: "count", Nominal: &[2]float64{0, 1e6}}))
	}
	d := &device{srv: srv, addr: ln.Addr().String(), done: make(chan struct{})}
	go func() {
		defer close(d.done)
		srv.Serve(ln)
	}()
	return d, nil
}

func (d *device) close() {
	d.srv.Close()
	<-d.done
}

func dial(addr string) (*katcp.Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return katcp.Dial(ctx, addr, katcp.ClientConfig{NoReconnect: true, InformQueue: 1 << 16})
}

// KATCPRows measures the client and server rows.
func KATCPRows(o Options) ([]Row, error) {
	echo, err := StartEchoServer()
	if err != nil {
		return nil, err
	}
	defer echo.Close()
	dev, err := startDevice(0)
	if err != nil {
		return nil, err
	}
	defer dev.close()
	c, err := dial(dev.addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	ctx := context.Background()
	var rows []Row

	b, u, spread, err := o.pair(
		func() (float64, error) { return RawPingPong(echo.Addr(), o.Duration) },
		func() (float64, error) {
			return rate(o.Duration, 1, func() error { _, err := c.Request(ctx, "echo", "hello"); return err })
		})
	if err != nil {
		return nil, err
	}
	rows = append(rows, Row{Name: "client+server: one request at a time", Baseline: "raw TCP ping-pong", Base: b, Ours: u, Unit: "req/s", Ratio: u / b, Target: 0.8, Higher: true, Spread: spread})

	// The same traffic with one goroutine hand-over on each side and nothing
	// else: the structure any client and device with concurrent requests and
	// asynchronous informs has, as a ceiling for the row above.
	handoff, err := StartHandoffEchoServer()
	if err != nil {
		return nil, err
	}
	defer handoff.Close()
	b, u, spread, err = o.pair(
		func() (float64, error) { return RawPingPong(echo.Addr(), o.Duration) },
		func() (float64, error) { return HandoffPingPong(handoff.Addr(), o.Duration) })
	if err != nil {
		return nil, err
	}
	rows = append(rows, Row{Name: "  reference: raw TCP, a goroutine hand-over each side", Baseline: "raw TCP ping-pong", Base: b, Ours: u, Unit: "req/s", Ratio: u / b, Info: true, Spread: spread + " (the structure alone: the ceiling of the row above)"})

	b, u, spread, err = o.pair(
		func() (float64, error) { return RawPipelined(echo.Addr(), o.Duration, 100) },
		func() (float64, error) {
			return rate(o.Duration, 100, func() error { _, err := c.Request(ctx, "echo", "hello"); return err })
		})
	if err != nil {
		return nil, err
	}
	rows = append(rows, Row{Name: "client+server: 100 in flight with message ids", Baseline: "raw TCP pipelined", Base: b, Ours: u, Unit: "req/s", Ratio: u / b, Target: 0.1, Higher: true, Spread: spread})

	v, spread, err := o.median(func() (float64, error) { return SensorFlatOut(o.Duration) })
	if err != nil {
		return nil, err
	}
	rows = append(rows, Row{Name: "client receives #sensor-status, event, flat out", Ours: v, Unit: "updates/s", Ratio: v / 1e6, Target: 1, Higher: true, Spread: spread})

	sub, list, err := Sensors20k(o)
	if err != nil {
		return nil, err
	}
	rows = append(rows, sub, list)
	return rows, nil
}

// SensorFlatOut measures #sensor-status updates received by a client per
// second while the server sets one sensor as fast as it can.
func SensorFlatOut(d time.Duration) (float64, error) {
	dev, err := startDevice(1)
	if err != nil {
		return 0, err
	}
	defer dev.close()
	c, err := dial(dev.addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	p := newPacer()
	c.HandleInform("sensor-status", func(m katcp.Message) { p.received() })
	if err := c.SetSampling(context.Background(), []string{"s.0"}, katcp.StrategyEvent); err != nil {
		return 0, err
	}
	s, _ := dev.srv.Sensors().Get("s.0")
	r, _ := paced(d, p, math.MaxInt64, func(i int64) { s.Set(i) }) // flat out: no window
	return r, nil
}

// Sensors20k measures bulk-subscribing 20k sensors and ?sensor-list of 20k.
func Sensors20k(o Options) (Row, Row, error) {
	const n = 20000
	dev, err := startDevice(n)
	if err != nil {
		return Row{}, Row{}, err
	}
	defer dev.close()
	names := make([]string, n)
	for i := range names {
		names[i] = "s." + strconv.Itoa(i)
	}
	ctx := context.Background()
	sub, subSpread, err := o.median(func() (float64, error) {
		c, err := dial(dev.addr)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		start := time.Now()
		if err := c.SetSampling(ctx, names, katcp.StrategyEvent); err != nil {
			return 0, err
		}
		return time.Since(start).Seconds(), nil
	})
	if err != nil {
		return Row{}, Row{}, err
	}
	c, err := dial(dev.addr)
	if err != nil {
		return Row{}, Row{}, err
	}
	defer c.Close()
	list, listSpread, err := o.median(func() (float64, error) {
		start := time.Now()
		r, err := c.Request(ctx, "sensor-list")
		if err != nil {
			return 0, err
		}
		if len(r.Informs) != n {
			return 0, fmt.Errorf("?sensor-list gave %d sensors", len(r.Informs))
		}
		return time.Since(start).Seconds(), nil
	})
	if err != nil {
		return Row{}, Row{}, err
	}
	return Row{Name: "server: bulk-subscribe 20k sensors", Ours: sub, Unit: "s", Ratio: sub, Target: 0.2, Spread: subSpread},
		Row{Name: "server: ?sensor-list of 20k sensors", Ours: list, Unit: "s", Ratio: list, Target: 0.04, Spread: listSpread},
		nil
}

// pacer counts the items a consumer receives and wakes a producer that
// waits for them: paced production is how the sensor rows give a
// pipeline work at the rate it can take it, as a NATS connection's
// buffer paces a plain publisher.
type pacer struct {
	got  atomic.Int64
	wake chan struct{}
}

func newPacer() *pacer { return &pacer{wake: make(chan struct{}, 1)} }

// received counts one item; it is called by the consumer.
func (p *pacer) received() {
	if p.got.Add(1)%256 == 0 {
		select {
		case p.wake <- struct{}{}:
		default:
		}
	}
}

// paced runs produce(i) for i = 1, 2, ... keeping at most window items
// produced and not yet received, for d after a warm-up of d/10. It
// returns the items received per second and the share of the items
// produced that were received (items that do not arrive within 50 ms
// are counted lost, and production goes on).
func paced(d time.Duration, p *pacer, window int64, produce func(i int64)) (rate, delivered float64) {
	stop := make(chan struct{})
	done := make(chan struct{})
	var produced, lost atomic.Int64
	go func() {
		defer close(done)
		t := time.NewTimer(time.Hour)
		defer t.Stop()
		for i := int64(1); ; i++ {
			for i-lost.Load()-p.got.Load() > window {
				t.Reset(50 * time.Millisecond)
				select {
				case <-p.wake:
				case <-t.C:
					lost.Store(i - p.got.Load())
				case <-stop:
					return
				}
			}
			if i%1024 == 0 {
				select {
				case <-stop:
					return
				default:
				}
			}
			produce(i)
			produced.Store(i)
		}
	}()
	time.Sleep(d / 10) // warm up
	start, n0, p0 := time.Now(), p.got.Load(), produced.Load()
	time.Sleep(d)
	n, np := p.got.Load()-n0, produced.Load()-p0
	elapsed := time.Since(start)
	close(stop)
	<-done
	if np > 0 {
		delivered = float64(n) / float64(np)
	}
	return float64(n) / elapsed.Seconds(), delivered
}
