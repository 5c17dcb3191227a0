// Command katcp-sim runs simulated KATCP devices for demos, end-to-end
// tests and benchmarks.
//
//	katcp-sim [--listen 127.0.0.1:7147] [--name sim] [--sensors 10]
//	          [--period 1s] [--protocol 5] [--devices 1]
//
// Each device has --sensors sensors of each type (int.N, float.N, bool.N,
// discrete.N, string.N, timestamp.N, address.N) updated every --period
// (0: flat out), plus target, position (follows ?set-target at 10 deg/s)
// and clients (how many clients are connected). Requests: ?echo, ?add a b,
// ?slow seconds, ?fail [reason], ?set-target degrees, and the standard
// ones. With --devices N, devices listen on N consecutive ports from the
// --listen port and are named <name>000, <name>001, ...
// It logs to stderr and exits cleanly on SIGINT or SIGTERM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/katcp-go/katcp-bridge/internal/sim"
	"github.com/katcp-go/katcp-bridge/katcp"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return // usage was asked for and printed
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "katcp-sim:", err)
		os.Exit(1)
	}
}

type options struct {
	listen   string
	name     string
	sensors  int
	period   time.Duration
	protocol int
	devices  int
	logLevel string
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("katcp-sim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.listen, "listen", "127.0.0.1:7147", "address of the first device (port 0: any free port)")
	fs.StringVar(&o.name, "name", "sim", "device name")
	fs.IntVar(&o.sensors, "sensors", 10, "sensors of each type per device")
	fs.DurationVar(&o.period, "period", time.Second, "update period of the sensors (0: flat out, negative: never)")
	fs.IntVar(&o.protocol, "protocol", 5, "KATCP protocol version, 5 or 4")
	fs.IntVar(&o.devices, "devices", 1, "how many devices, on consecutive ports")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	switch {
	case fs.NArg() > 0:
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	case o.protocol != 4 && o.protocol != 5:
		return o, fmt.Errorf("--protocol must be 4 or 5, not %d", o.protocol)
	case o.devices < 1 || o.devices > 10000:
		return o, fmt.Errorf("--devices must be 1..10000, not %d", o.devices)
	case o.sensors < 0 || o.sensors > 100000:
		return o, fmt.Errorf("--sensors must be 0..100000, not %d", o.sensors)
	}
	return o, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	host, portStr, err := net.SplitHostPort(o.listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("--listen: bad port %q", portStr)
	}
	var listeners []net.Listener
	closeAll := func() {
		for _, l := range listeners {
			l.Close()
		}
	}
	for i := range o.devices {
		p := port
		if port != 0 {
			p = port + i
		}
		l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(p)))
		if err != nil {
			closeAll()
			return err
		}
		listeners = append(listeners, l)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	devices := make([]*sim.Device, len(listeners))
	errs := make(chan error, len(listeners))
	for i, l := range listeners {
		name := o.name
		if o.devices > 1 {
			name = fmt.Sprintf("%s%03d", o.name, i)
		}
		d := sim.New(sim.Config{Name: name, V4: o.protocol == 4, Sensors: o.sensors, Period: o.period, Logger: log.With("device", name)})
		devices[i] = d
		fmt.Fprintf(stdout, "%s %s\n", name, l.Addr())
		wg.Add(2)
		go func() {
			defer wg.Done()
			if err := d.Serve(l); !errors.Is(err, katcp.ErrServerClosed) {
				errs <- fmt.Errorf("%s: %w", name, err)
			}
		}()
		go func() {
			defer wg.Done()
			d.Run(ctx)
		}()
	}
	log.Info("katcp-sim running", "devices", len(devices), "sensors_per_type", o.sensors, "period", o.period, "protocol", o.protocol)
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errs:
	}
	log.Info("katcp-sim stopping")
	cancel()
	shutdownCtx, done := context.WithTimeout(context.Background(), 5*time.Second)
	defer done()
	for _, d := range devices {
		d.Shutdown(shutdownCtx)
	}
	wg.Wait()
	return runErr
}
