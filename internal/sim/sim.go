// Package sim is a simulated KATCP device: sensors of every type that
// change on a period (or flat out), and a few realistic requests. It
// backs katcp-sim, the bridge's --demo mode, the end-to-end tests and the
// benchmarks.
package sim

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/katcp-go/katcp-bridge/katcp"
)

// Config describes one simulated device.
type Config struct {
	Name string // device name, reported in #version-connect
	V4   bool   // speak KATCP v4
	// Sensors is how many generic sensors of each type to make:
	// int.N, float.N, bool.N, discrete.N, string.N, timestamp.N, address.N.
	Sensors int
	// Period between updates of the generic sensors; 0 updates them flat
	// out; negative never.
	Period time.Duration
	Logger *slog.Logger
}

// Device is a simulated device: a katcp.Server plus the sensors' updater.
type Device struct {
	*katcp.Server
	cfg      Config
	generic  []*katcp.Sensor
	target   *katcp.Sensor
	position *katcp.Sensor
	clients  *katcp.Sensor
	updates  atomic.Uint64
	targetV  atomic.Uint64 // float64 bits
}

// New builds a device.
func New(cfg Config) *Device {
	if cfg.Name == "" {
		cfg.Name = "sim"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	srv := katcp.NewServer(katcp.ServerConfig{
		DeviceName:    cfg.Name,
		DeviceVersion: "1.0",
		BuildState:    "katcp-sim-1.0",
		V4:            cfg.V4,
		Logger:        cfg.Logger,
	})
	d := &Device{Server: srv, cfg: cfg}
	d.addSensors()
	d.addRequests()
	return d
}

// Updates returns how many sensor updates the device has made.
func (d *Device) Updates() uint64 { return d.updates.Load() }

// Generic returns the generic sensors, in creation order.
func (d *Device) Generic() []*katcp.Sensor { return d.generic }

func (d *Device) addSensors() {
	n := d.cfg.Sensors
	add := func(t katcp.SensorType, prefix string, opts katcp.SensorOptions) {
		for i := range n {
			s := katcp.MustSensor(t, fmt.Sprintf("%s.%d", prefix, i), opts)
			d.generic = append(d.generic, s)
		}
	}
	add(katcp.SensorInteger, "int", katcp.SensorOptions{Description: "A counter", Units: "count", Nominal: &[2]float64{0, 1e9}})
	add(katcp.SensorFloat, "float", katcp.SensorOptions{Description: "A random walk", Units: "V", Nominal: &[2]float64{-50, 50}, Warn: &[2]float64{-100, 100}})
	add(katcp.SensorBoolean, "bool", katcp.SensorOptions{Description: "A toggle"})
	add(katcp.SensorDiscrete, "discrete", katcp.SensorOptions{Description: "A mode", Values: []string{"idle", "track", "slew", "stow"}})
	add(katcp.SensorString, "string", katcp.SensorOptions{Description: "A message"})
	add(katcp.SensorTimestamp, "timestamp", katcp.SensorOptions{Description: "Last update time"})
	add(katcp.SensorAddress, "address", katcp.SensorOptions{Description: "A peer address"})
	for i, s := range d.generic {
		d.set(s, i, 0)
	}
	d.target = katcp.MustSensor(katcp.SensorFloat, "target", katcp.SensorOptions{Description: "Requested position (?set-target)", Units: "deg"})
	d.position = katcp.MustSensor(katcp.SensorFloat, "position", katcp.SensorOptions{Description: "Position, moving towards the target at 10 deg/s", Units: "deg"})
	d.clients = katcp.MustSensor(katcp.SensorInteger, "clients", katcp.SensorOptions{Description: "Connected clients"})
	d.target.Set(0.0)
	d.position.Set(0.0)
	d.clients.Set(0)
	d.Sensors().Add(d.generic...)
	d.Sensors().Add(d.target, d.position, d.clients)
}

// set gives generic sensor i its value for step k.
func (d *Device) set(s *katcp.Sensor, i int, k uint64) {
	var v any
	switch s.Info().Type {
	case katcp.SensorInteger:
		v = int64(k)
	case katcp.SensorFloat:
		v = 40 * math.Sin(float64(k+uint64(i))/10)
	case katcp.SensorBoolean:
		v = (k+uint64(i))%2 == 0
	case katcp.SensorDiscrete:
		v = []string{"idle", "track", "slew", "stow"}[(k+uint64(i))%4]
	case katcp.SensorString:
		v = fmt.Sprintf("update %d", k)
	case katcp.SensorTimestamp:
		v = time.Now()
	case katcp.SensorAddress:
		v = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i), byte(k)}), uint16(7000+k%1000))
	}
	if err := s.Set(v); err == nil {
		d.updates.Add(1)
	}
}

func (d *Device) addRequests() {
	d.Handle("echo", "Reply with the arguments. ?echo [args...]", func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		args := make([]any, len(r.Args))
		for i, a := range r.Args {
			args[i] = a
		}
		return w.Reply(args...)
	})
	d.Handle("add", "Add two numbers. ?add a b", func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		var a, b float64
		if err := r.Decode(&a, &b); err != nil {
			return err
		}
		return w.Reply(a + b)
	})
	d.Handle("slow", "Reply after some seconds. ?slow seconds", func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		var dur time.Duration
		if err := r.Decode(&dur); err != nil {
			return err
		}
		t := time.NewTimer(dur)
		defer t.Stop()
		select {
		case <-t.C:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	d.SetTimeoutHint("slow", 60*time.Second)
	d.Handle("fail", "Always fail. ?fail [reason]", func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		reason := "failed on request"
		if len(r.Args) > 0 {
			reason = string(r.Args[0])
		}
		return w.Fail(reason)
	})
	d.Handle("set-target", "Set the target position; the position sensor follows. ?set-target degrees", func(ctx context.Context, w *katcp.ReplyWriter, r *katcp.Request) error {
		var v float64
		if err := r.Decode(&v); err != nil {
			return err
		}
		if math.IsNaN(v) || math.Abs(v) > 360 {
			return katcp.Fail("target %v out of range -360..360", v)
		}
		d.targetV.Store(math.Float64bits(v))
		d.target.Set(v)
		return nil
	})
}

// Run updates the sensors until ctx ends: generic ones every Period (or
// flat out), the position every 100 ms towards the target, the client
// count every second.
func (d *Device) Run(ctx context.Context) {
	motion := time.NewTicker(100 * time.Millisecond)
	defer motion.Stop()
	var gen <-chan time.Time
	if d.cfg.Period > 0 && len(d.generic) > 0 {
		t := time.NewTicker(d.cfg.Period)
		defer t.Stop()
		gen = t.C
	}
	flat := d.cfg.Period == 0 && len(d.generic) > 0
	var step uint64
	for {
		if flat {
			step++
			for i, s := range d.generic {
				d.set(s, i, step)
			}
			runtime.Gosched()
			select {
			case <-ctx.Done():
				return
			case <-motion.C:
				d.move()
			default:
			}
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-gen:
			step++
			for i, s := range d.generic {
				d.set(s, i, step)
			}
		case <-motion.C:
			d.move()
		}
	}
}

// move steps the position 1 degree (10 deg/s) towards the target and
// refreshes the client count.
func (d *Device) move() {
	n := int64(d.ClientCount())
	if v, _ := d.clients.Value(); v != n {
		d.clients.Set(n)
	}
	target := math.Float64frombits(d.targetV.Load())
	v, _ := d.position.Value()
	pos, _ := v.(float64)
	switch {
	case pos < target:
		pos = math.Min(pos+1, target)
	case pos > target:
		pos = math.Max(pos-1, target)
	default:
		return
	}
	d.position.Set(pos)
	d.updates.Add(1)
}
