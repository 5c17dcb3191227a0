// Command katcpcmd sends one KATCP request to a device and prints what
// comes back, or watches sensors.
//
//	katcpcmd [--connect-timeout 5s] [--request-timeout 5s] host:port request [args...]
//	katcpcmd host:port --watch name[,name...] [--strategy event]
//	katcpcmd nats://host:4222/<device> request [args...]
//	katcpcmd nats://host:4222/<device> --watch name[,name...]
//
// With a nats:// (or tls://) address, katcpcmd talks to the device through
// katcp-bridge and behaves the same; in watch mode the bridge's own
// subscription strategy applies and names may end in ".>" ("pump.>").
//
// In request mode it prints the device's asynchronous informs as they
// arrive, then the in-response informs and the reply, each formatted as a
// canonical KATCP message (one space between arguments, standard escapes,
// one newline; bytes that are not UTF-8 are written as they are). It exits
// 0 on an ok reply, 2 on any other reply, and 1 on connection errors,
// timeouts and usage errors.
//
// In watch mode it subscribes the sensors with the strategy (with its
// parameters after the name, as in --strategy "period 0.5") and prints
// each update as a #sensor-status message until interrupted; sensors are
// re-subscribed after reconnections and reported unreachable meanwhile.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/katcp-go/katcp-bridge/katcp"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usage = `usage:
  katcpcmd [--connect-timeout T] [--request-timeout T] host:port request [args...]
  katcpcmd [--connect-timeout T] host:port --watch name[,name...] [--strategy "event"]
  katcpcmd nats://host:4222/<device> request [args...]      (through katcp-bridge)
  katcpcmd nats://host:4222/<device> --watch name[,name...]
  katcpcmd nats://host:4222 --owners                        (which bridge replica serves which device)

Flags (before the request name):
  --connect-timeout T   how long to wait for the connection (default 5s)
  --request-timeout T   how long to wait for the reply (default 5s)
  --watch NAMES         watch these sensors (comma-separated) instead of sending a request
  --strategy S          sampling strategy and parameters for --watch (default "event")
  --prefix P            subject prefix of the bridge, for nats:// addresses (default "katcp")
  --owners              list the devices and the bridge replicas serving them

Exit status: 0 ok reply, 2 other reply, 1 connection error, timeout or usage error.
`

type options struct {
	connectTimeout time.Duration
	requestTimeout time.Duration
	watch          []string
	strategy       string
	prefix         string
	owners         bool
	addr           string
	request        string
	args           []string
}

// parseArgs accepts flags anywhere before the request name; everything
// after the request name is its arguments, even if it starts with '-'.
func parseArgs(args []string) (options, error) {
	o := options{connectTimeout: 5 * time.Second, requestTimeout: 5 * time.Second, strategy: "event", prefix: "katcp"}
	var positional []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if len(positional) == 2 || !strings.HasPrefix(a, "-") || a == "-" {
			positional = append(positional, a)
			if len(positional) == 2 {
				o.args = append([]string{}, args[i+1:]...)
				break
			}
			continue
		}
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		switch name {
		case "h", "help":
			return o, errUsage
		case "owners":
			o.owners = true
			continue
		case "connect-timeout", "request-timeout", "watch", "strategy", "prefix":
		default:
			return o, fmt.Errorf("unknown flag %s", a)
		}
		if !hasValue {
			if i+1 >= len(args) {
				return o, fmt.Errorf("flag %s needs a value", a)
			}
			i++
			value = args[i]
		}
		var err error
		switch name {
		case "connect-timeout":
			o.connectTimeout, err = time.ParseDuration(value)
		case "request-timeout":
			o.requestTimeout, err = time.ParseDuration(value)
		case "watch":
			o.watch = strings.Split(value, ",")
		case "strategy":
			o.strategy = value
		case "prefix":
			o.prefix = value
		}
		if err != nil {
			return o, fmt.Errorf("flag %s: %w", a, err)
		}
	}
	switch {
	case len(positional) == 0:
		return o, errors.New("missing host:port")
	case o.owners && (len(positional) > 1 || o.watch != nil):
		return o, errors.New("--owners takes only a nats:// address")
	case o.owners:
		o.addr = positional[0]
		return o, nil
	case o.watch == nil && len(positional) < 2:
		return o, errors.New("missing request name")
	case o.watch != nil && len(positional) > 1:
		return o, errors.New("--watch takes no request")
	}
	o.addr = positional[0]
	if len(positional) > 1 {
		o.request = positional[1]
	}
	return o, nil
}

var errUsage = errors.New("usage")

// printer writes messages to out, one at a time.
type printer struct {
	mu  sync.Mutex
	out io.Writer
	buf []byte
}

func (p *printer) print(m *katcp.Message) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var err error
	p.buf, err = katcp.AppendMessage(p.buf[:0], m)
	if err == nil {
		p.out.Write(p.buf)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, err := parseArgs(args)
	if err != nil {
		if err != errUsage {
			fmt.Fprintf(stderr, "katcpcmd: %v\n", err)
		}
		fmt.Fprint(stderr, usage)
		return 1
	}
	if o.owners {
		return owners(ctx, o, stdout, stderr)
	}
	if o.watch == nil && !katcp.ValidName(o.request) {
		fmt.Fprintf(stderr, "katcpcmd: %q is not a request name: %v\n", o.request, katcp.ErrBadName)
		return 1
	}
	p := &printer{out: stdout}
	server, device, viaNATS, err := natsTarget(o.addr)
	if err != nil {
		fmt.Fprintf(stderr, "katcpcmd: %v\n", err)
		return 1
	}
	if viaNATS {
		return runNATS(ctx, o, server, device, p, stderr)
	}
	cfg := katcp.ClientConfig{RequestTimeout: o.requestTimeout}
	connectCtx, cancel := context.WithTimeout(ctx, o.connectTimeout)
	defer cancel()
	c := katcp.NewClient(o.addr, cfg)
	defer c.Close()
	// Asynchronous informs, as they arrive.
	c.HandleUnhandled(func(m katcp.Message) { p.print(&m) })
	for _, name := range []string{"log", "disconnect"} {
		c.HandleInform(name, func(m katcp.Message) { p.print(&m) })
	}
	if err := c.WaitConnected(connectCtx); err != nil {
		if last := c.LastError(); last != nil && errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("%w (last attempt: %v)", err, last)
		}
		fmt.Fprintf(stderr, "katcpcmd: connecting to %s: %v\n", o.addr, err)
		return 1
	}
	if o.watch != nil {
		return watch(ctx, c, o, p, stderr)
	}
	return request(ctx, c, o, p, stderr)
}

func request(ctx context.Context, c *katcp.Client, o options, p *printer, stderr io.Writer) int {
	args := make([]any, len(o.args))
	for i, a := range o.args {
		args[i] = a
	}
	ctx, cancel := context.WithTimeout(ctx, o.requestTimeout)
	defer cancel()
	r, err := c.RequestStream(ctx, func(inf katcp.Message) { p.print(&inf) }, o.request, args...)
	if err != nil && r == nil {
		fmt.Fprintf(stderr, "katcpcmd: %v\n", err)
		return 1
	}
	p.print(&r.Message)
	if !r.OK() {
		return 2
	}
	return 0
}

func watch(ctx context.Context, c *katcp.Client, o options, p *printer, stderr io.Writer) int {
	fields := strings.Fields(o.strategy)
	if len(fields) == 0 {
		fields = []string{"event"}
	}
	s, err := katcp.ParseStrategy([]byte(fields[0]))
	if err != nil {
		fmt.Fprintf(stderr, "katcpcmd: --strategy: %v\n", err)
		return 1
	}
	params := make([]any, 0, len(fields)-1)
	for _, f := range fields[1:] {
		params = append(params, f)
	}
	if len(params) != s.NumParams() {
		fmt.Fprintf(stderr, "katcpcmd: --strategy %s takes %d parameters\n", s, s.NumParams())
		return 1
	}
	v4 := c.Protocol().Version.Major == 4
	states := make(chan katcp.SyncState, 16)
	w := c.Watch(katcp.WatchConfig{
		Names:    o.watch,
		Strategy: s,
		Params:   params,
		OnUpdate: func(u katcp.SensorUpdate) {
			ts := any(u.Timestamp)
			if v4 {
				ts = c.ConvertSeconds(u.Timestamp)
			}
			m, err := katcp.NewInform("sensor-status", ts, 1, u.Name, u.Status, u.Reading.Value)
			if err == nil {
				p.print(&m)
			}
		},
		OnSync: func(s katcp.SyncState) {
			select {
			case states <- s:
			default: // the loop below reads the current state anyway
			}
		},
	})
	defer w.Close()
	for {
		select {
		case <-ctx.Done():
			return 0
		case <-states:
		}
		state, err := w.State()
		if state != katcp.Unsynced || err == nil {
			continue
		}
		fmt.Fprintf(stderr, "katcpcmd: watch: %v\n", err)
		if errors.Is(err, katcp.ErrFail) || errors.Is(err, katcp.ErrInvalid) {
			return 2 // the device refused the subscription
		}
	}
}
