// Command katcp-bench measures the project against its performance
// targets, each as a ratio to a raw baseline measured in the same run, and
// prints one table: row, baseline, ours, unit, ratio, target, met, spread.
// It starts everything it needs on 127.0.0.1 and stops it.
//
//	katcp-bench [--duration 1s] [--repeats 3] [--rows katcp,bridge,memory] [--devices 1000]
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/katcp-go/katcp-bridge/internal/bench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if err != flag.ErrHelp {
			fmt.Fprintln(os.Stderr, "katcp-bench:", err)
		}
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("katcp-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o bench.Options
	fs.DurationVar(&o.Duration, "duration", time.Second, "length of each measurement")
	fs.IntVar(&o.Repeats, "repeats", 3, "measurements per figure (the median is reported)")
	rowsFlag := fs.String("rows", "katcp,bridge,memory", "comma-separated groups of rows: katcp, bridge, memory")
	memDevices := fs.Int("devices", 1000, "idle devices for the memory row")
	simDevices := fs.Int("sim-devices", 0, "internal: serve this many idle devices (the memory row's child process)")
	simPort := fs.Int("sim-port", 0, "internal: first port of --sim-devices")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile of the run to this file")
	oursprofile := fs.String("oursprofile", "", "write CPU profiles of the measurements of ours (not the baselines) to this file with suffixes .1, .2, ...")
	fs.StringVar(&o.Only, "only", "", "bridge rows: comma-separated subset of one, inflight, sensors (default all)")
	fs.StringVar(&o.Tracing, "tracing", "", "bridge rows: off, on, or both (default both)")
	baseprofile := fs.String("baseprofile", "", "like --oursprofile, for the baselines' measurements")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *baseprofile != "" {
		o.ProfileBase = profiler(*baseprofile)
	}
	if *oursprofile != "" {
		o.ProfileOurs = profiler(*oursprofile)
	}
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	if *simDevices > 0 {
		return bench.RunSimDevices(ctx, *simDevices, *simPort)
	}
	var rows []bench.Row
	for _, g := range strings.Split(*rowsFlag, ",") {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		switch g {
		case "katcp":
			r, err := bench.KATCPRows(o)
			if err != nil {
				return fmt.Errorf("katcp rows: %w", err)
			}
			rows = append(rows, r...)
		case "bridge":
			r, err := bench.BridgeRows(o)
			if err != nil {
				return fmt.Errorf("bridge rows: %w", err)
			}
			rows = append(rows, r...)
		case "memory":
			r, err := bench.MemoryRow(*memDevices)
			if err != nil {
				return fmt.Errorf("memory row: %w", err)
			}
			rows = append(rows, r)
		default:
			return fmt.Errorf("unknown row group %q", g)
		}
	}
	bench.Print(stdout, rows)
	return nil
}

// profiler returns a function that starts a CPU profile in the next of
// the files prefix.1, prefix.2, ... and returns its stop.
func profiler(prefix string) func() func() {
	n := 0
	return func() func() {
		n++
		f, err := os.Create(fmt.Sprintf("%s.%d", prefix, n))
		if err != nil {
			return nil
		}
		if pprof.StartCPUProfile(f) != nil {
			f.Close()
			return nil
		}
		return func() { pprof.StopCPUProfile(); f.Close() }
	}
}
