// Package bench measures the rows of the project's performance targets
// against raw baselines measured in the same run (see BENCHMARKS.md in the
// project's shared notes and cmd/katcp-bench). Everything runs on
// 127.0.0.1.
package bench

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Options control a run.
type Options struct {
	Duration time.Duration // per measurement
	Repeats  int           // measurements per figure; the median is kept
	Only     string        // bridge rows: comma-separated subset of one, inflight, sensors ("" for all)
	Tracing  string        // bridge rows: "off", "on" or "" for both
	// ProfileOurs, when set, is called around each measurement of ours
	// (not of the baseline): it starts a CPU profile and returns its stop.
	ProfileOurs func() func()
	ProfileBase func() func() // the same around each measurement of the baseline
}

// wants reports whether the bridge row k is selected.
func (o Options) wants(k string) bool {
	return o.Only == "" || slices.Contains(strings.Split(o.Only, ","), k)
}

// Row is one line of the results table.
type Row struct {
	Name     string
	Baseline string  // what the baseline is
	Base     float64 // baseline figure
	Ours     float64 // our figure
	Unit     string  // "req/s", "updates/s", "s", ...
	// Ratio is Ours/Base (rates) or the figure itself against an absolute
	// target; Target and Better say what meets it.
	Ratio  float64
	Target float64
	Higher bool // a higher Ratio is better
	Info   bool // a reference figure, with no target
	Spread string
}

// Met reports whether the row meets its target.
func (r Row) Met() bool {
	if r.Higher {
		return r.Ratio >= r.Target
	}
	return r.Ratio <= r.Target
}

// Print writes the table.
func Print(w io.Writer, rows []Row) {
	fmt.Fprintf(w, "%-58s %14s %14s %-10s %9s %9s  %s\n", "row", "baseline", "ours", "unit", "ratio", "target", "met")
	for _, r := range rows {
		base := "-"
		if r.Base != 0 {
			base = human(r.Base)
		}
		cmp := "<="
		if r.Higher {
			cmp = ">="
		}
		if r.Info {
			fmt.Fprintf(w, "%-58s %14s %14s %-10s %9.3g %9s  %s %s\n", r.Name, base, human(r.Ours), r.Unit, r.Ratio, "-", "info", r.Spread)
			continue
		}
		met := "yes"
		if !r.Met() {
			met = "NO"
		}
		fmt.Fprintf(w, "%-58s %14s %14s %-10s %9.3g %3s%6.3g  %s %s\n", r.Name, base, human(r.Ours), r.Unit, r.Ratio, cmp, r.Target, met, r.Spread)
	}
}

func human(f float64) string {
	switch {
	case f >= 1e6:
		return fmt.Sprintf("%.3gM", f/1e6)
	case f >= 1e4:
		return fmt.Sprintf("%.3gk", f/1e3)
	case f < 1:
		return fmt.Sprintf("%.3g", f)
	}
	return fmt.Sprintf("%.4g", f)
}

// median runs f Repeats times and returns the median and the spread
// (min..max) as text.
func (o Options) median(f func() (float64, error)) (float64, string, error) {
	n := max(o.Repeats, 1)
	vals := make([]float64, 0, n)
	for range n {
		v, err := f()
		if err != nil {
			return 0, "", err
		}
		vals = append(vals, v)
	}
	sort.Float64s(vals)
	return vals[len(vals)/2], fmt.Sprintf("[%s..%s]", human(vals[0]), human(vals[len(vals)-1])), nil
}

// pair measures a baseline and ours alternately, Repeats times each, and
// returns both medians.
func (o Options) pair(base, ours func() (float64, error)) (b, u float64, spread string, err error) {
	n := max(o.Repeats, 1)
	bs, us := make([]float64, 0, n), make([]float64, 0, n)
	for range n {
		var stopBase func()
		if o.ProfileBase != nil {
			stopBase = o.ProfileBase()
		}
		v, err := base()
		if stopBase != nil {
			stopBase()
		}
		if err != nil {
			return 0, 0, "", fmt.Errorf("baseline: %w", err)
		}
		bs = append(bs, v)
		var stop func()
		if o.ProfileOurs != nil {
			stop = o.ProfileOurs()
		}
		v, err = ours()
		if stop != nil {
			stop()
		}
		if err != nil {
			return 0, 0, "", err
		}
		us = append(us, v)
	}
	slices.Sort(bs)
	slices.Sort(us)
	return bs[n/2], us[n/2], fmt.Sprintf("base [%s..%s] ours [%s..%s]", human(bs[0]), human(bs[n-1]), human(us[0]), human(us[n-1])), nil
}

// rate runs op from workers goroutines for d and returns operations per
// second.
func rate(d time.Duration, workers int, op func() error) (float64, error) {
	var n atomic.Int64
	var firstErr atomic.Value
	deadline := time.Now().Add(d)
	start := time.Now()
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				if err := op(); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	if err, ok := firstErr.Load().(error); ok {
		return 0, err
	}
	return float64(n.Load()) / time.Since(start).Seconds(), nil
}

// EchoServer is the raw TCP baseline: it echoes each line.
type EchoServer struct {
	ln net.Listener
	wg sync.WaitGroup
}

// StartEchoServer listens on 127.0.0.1.
func StartEchoServer() (*EchoServer, error) {
	return startLineServer(func(s *EchoServer, c net.Conn) {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			r := bufio.NewReader(c)
			w := bufio.NewWriter(c)
			for {
				line, err := r.ReadSlice('\n')
				if err != nil {
					return
				}
				w.Write(line)
				if r.Buffered() == 0 {
					if w.Flush() != nil {
						return
					}
				}
			}
		}()
	})
}

// startLineServer listens on 127.0.0.1 and hands each connection to
// serve, which starts its goroutines (counted in s.wg).
func startLineServer(serve func(s *EchoServer, c net.Conn)) (*EchoServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &EchoServer{ln: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			serve(s, c)
		}
	}()
	return s, nil
}

// Addr returns the server's address.
func (s *EchoServer) Addr() string { return s.ln.Addr().String() }

// Close stops the server once its clients have gone.
func (s *EchoServer) Close() {
	s.ln.Close()
	s.wg.Wait()
}

// RawPingPong measures one line at a time over raw TCP.
func RawPingPong(addr string, d time.Duration) (float64, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	r := bufio.NewReader(c)
	line := []byte("?echo hello\n")
	return rate(d, 1, func() error {
		if _, err := c.Write(line); err != nil {
			return err
		}
		_, err := r.ReadSlice('\n')
		return err
	})
}

// StartHandoffEchoServer is the raw echo server with the structure of a
// device that runs requests concurrently: each connection's reader copies
// every line and hands it to a worker goroutine, which writes the echo.
// No KATCP, no pool, no bookkeeping: the cost of the two goroutines alone.
func StartHandoffEchoServer() (*EchoServer, error) {
	return startLineServer(func(s *EchoServer, c net.Conn) {
		lines := make(chan []byte, 1)
		s.wg.Add(2)
		go func() { // worker
			defer s.wg.Done()
			for line := range lines {
				if _, err := c.Write(line); err != nil {
					c.Close()
				}
			}
		}()
		go func() { // reader
			defer s.wg.Done()
			defer c.Close()
			defer close(lines)
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadSlice('\n')
				if err != nil {
					return
				}
				lines <- append([]byte(nil), line...)
			}
		}()
	})
}

// HandoffPingPong measures one line at a time against a
// StartHandoffEchoServer with the structure of a client that allows
// concurrent requests and asynchronous messages: the caller writes its
// line and waits while a reader goroutine receives the answer and hands
// it over.
func HandoffPingPong(addr string, d time.Duration) (float64, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	answers := make(chan []byte, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(answers)
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadSlice('\n')
			if err != nil {
				return
			}
			answers <- append([]byte(nil), line...)
		}
	}()
	defer func() {
		c.Close()
		<-done
	}()
	line := []byte("?echo hello\n")
	return rate(d, 1, func() error {
		if _, err := c.Write(line); err != nil {
			return err
		}
		if _, ok := <-answers; !ok {
			return io.ErrUnexpectedEOF
		}
		return nil
	})
}

// RawPipelined measures lines echoed with up to window in flight.
func RawPipelined(addr string, d time.Duration, window int) (float64, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	credits := make(chan struct{}, window)
	for range window {
		credits <- struct{}{}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // writer
		defer wg.Done()
		w := bufio.NewWriterSize(c, 64<<10)
		line := []byte("?echo hello\n")
		for {
			select {
			case <-credits:
				w.Write(line)
				if len(credits) == 0 {
					if w.Flush() != nil {
						return
					}
				}
			case <-stop:
				return
			default:
				if w.Flush() != nil {
					return
				}
				select {
				case <-credits:
					w.Write(line)
				case <-stop:
					return
				}
			}
		}
	}()
	r := bufio.NewReaderSize(c, 64<<10)
	n := 0
	start := time.Now()
	deadline := start.Add(d)
	for time.Now().Before(deadline) {
		for range 64 {
			if _, err := r.ReadSlice('\n'); err != nil {
				close(stop)
				wg.Wait()
				return 0, err
			}
			n++
			credits <- struct{}{}
		}
	}
	elapsed := time.Since(start)
	close(stop)
	c.Close()
	wg.Wait()
	return float64(n) / elapsed.Seconds(), nil
}
