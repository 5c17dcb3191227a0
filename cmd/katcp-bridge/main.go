// Command katcp-bridge serves KATCP devices on NATS.
//
// It is configured from the environment (KATCP_BRIDGE_*; run it with
// --help for the list) and a devices file. Without a NATS URL it starts an
// embedded nats-server on 127.0.0.1. With --demo it also runs a simulated
// device named "demo", so that
//
//	go run ./cmd/katcp-bridge --demo
//
// is a working bridge on a fresh machine. Traces are exported when the
// standard OTEL_* variables ask for it (OTEL_TRACES_EXPORTER=otlp or
// console, or an OTEL_EXPORTER_OTLP_*ENDPOINT); otherwise nothing is
// exported and nothing is logged about it.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kelseyhightower/envconfig"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"sigs.k8s.io/yaml"

	"github.com/katcp-go/katcp-bridge/bridge"
	"github.com/katcp-go/katcp-bridge/internal/sim"
)

// EnvPrefix prefixes every environment variable.
const EnvPrefix = "KATCP_BRIDGE"

// Config is the daemon's configuration, read from the environment.
type Config struct {
	NATSURL      string `envconfig:"NATS_URL" desc:"NATS server URL(s), comma-separated; empty starts an embedded nats-server on 127.0.0.1"`
	NATSCreds    string `envconfig:"NATS_CREDS" desc:"NATS credentials (.creds) file"`
	NATSNKey     string `envconfig:"NATS_NKEY" desc:"NATS nkey seed file"`
	NATSTLSCA    string `envconfig:"NATS_TLS_CA" desc:"CA certificate file for NATS TLS"`
	NATSTLSCert  string `envconfig:"NATS_TLS_CERT" desc:"client certificate file for NATS TLS"`
	NATSTLSKey   string `envconfig:"NATS_TLS_KEY" desc:"client key file for NATS TLS"`
	NATSName     string `envconfig:"NATS_NAME" default:"katcp-bridge" desc:"NATS connection name"`
	EmbeddedPort int    `envconfig:"EMBEDDED_NATS_PORT" default:"4222" desc:"port of the embedded nats-server (used when NATS_URL is empty; 0 picks a free port)"`
	EmbeddedDir  string `envconfig:"EMBEDDED_STORE_DIR" desc:"JetStream store of the embedded nats-server (default: katcp-bridge-jetstream in the temporary directory)"`

	LastValues         bool   `envconfig:"LAST_VALUES" default:"true" desc:"keep the last update of every sensor in a JetStream stream, when JetStream is available"`
	LastValuesStream   string `envconfig:"LAST_VALUES_STREAM" default:"KATCP_SENSORS" desc:"name of that stream"`
	LastValuesReplicas int    `envconfig:"LAST_VALUES_REPLICAS" default:"1" desc:"replicas of that stream (up to the JetStream cluster's size)"`
	LastValuesStorage  string `envconfig:"LAST_VALUES_STORAGE" default:"file" desc:"file or memory storage for that stream"`

	Leases        string        `envconfig:"LEASES" default:"auto" desc:"auto, on or off: share the devices with other replicas through leases in a JetStream key-value bucket (auto: when JetStream is available; on: required, nothing served until the bucket works; off: serve every device, one replica only)"`
	LeaseBucket   string        `envconfig:"LEASE_BUCKET" default:"KATCP_OWNERS" desc:"name of the lease bucket"`
	LeaseReplicas int           `envconfig:"LEASE_REPLICAS" default:"1" desc:"replicas of the lease bucket (up to the JetStream cluster's size)"`
	LeaseTTL      time.Duration `envconfig:"LEASE_TTL" default:"5s" desc:"how long a lease lives without renewal: how long a dead replica's devices wait for a new owner (at least 1s)"`
	LeaseRenew    time.Duration `envconfig:"LEASE_RENEW" desc:"how often leases are renewed (default a quarter of LEASE_TTL; at most half)"`

	Devices     string `envconfig:"DEVICES" desc:"devices as name=host:port[,name=host:port...] (added to those of DEVICES_FILE)"`
	DevicesFile string `envconfig:"DEVICES_FILE" desc:"YAML or JSON file with the devices: a list, or {devices: [...]}; each has name, address, sensors [{pattern, strategy, params}], timeout, allow, deny, read_only"`

	Prefix          string        `envconfig:"PREFIX" default:"katcp" desc:"first token(s) of every subject"`
	Instance        string        `envconfig:"INSTANCE" desc:"name of this bridge in status documents (default: the host name)"`
	DefaultTimeout  time.Duration `envconfig:"DEFAULT_TIMEOUT" default:"5s" desc:"request timeout when the caller sends no Katcp-Timeout"`
	MaxTimeout      time.Duration `envconfig:"MAX_TIMEOUT" default:"60s" desc:"largest timeout a caller may ask for"`
	MaxInFlight     int           `envconfig:"MAX_IN_FLIGHT" default:"256" desc:"requests in flight per device before callers get 503"`
	HTTPAddr        string        `envconfig:"HTTP_ADDR" default:":8080" desc:"address serving /metrics, /healthz and /readyz (empty: none)"`
	LogLevel        string        `envconfig:"LOG_LEVEL" default:"info" desc:"debug, info, warn or error"`
	LogFormat       string        `envconfig:"LOG_FORMAT" default:"text" desc:"text or json"`
	ShutdownTimeout time.Duration `envconfig:"SHUTDOWN_TIMEOUT" default:"10s" desc:"how long SIGTERM waits for requests in flight"`
	Demo            bool          `envconfig:"DEMO" desc:"also run a simulated device named demo (same as --demo)"`
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return // usage was asked for and printed
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "katcp-bridge:", err)
		os.Exit(1)
	}
}

func usage(w io.Writer, cfg *Config) {
	fmt.Fprintf(w, "Usage: katcp-bridge [--demo]\n\nkatcp-bridge serves KATCP devices on NATS. It reads these environment variables:\n\n")
	tw := envconfig.Usagef(EnvPrefix, cfg, w, "{{range .}}  {{usage_key .}}\n      {{usage_description .}}{{if usage_default .}} (default {{usage_default .}}){{end}}\n{{end}}")
	if tw != nil {
		fmt.Fprintln(w, tw)
	}
	fmt.Fprintf(w, "\nTracing uses the standard OTEL_* variables (OTEL_TRACES_EXPORTER=otlp|console|none,\nOTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, ...); nothing is exported unless asked.\n")
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("katcp-bridge", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	demo := fs.Bool("demo", false, "also run a simulated device named demo")
	var cfg Config
	if err := fs.Parse(args); err != nil {
		usage(stderr, &cfg)
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w (see --help)", err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q (configuration is in the environment; see --help)", fs.Args())
	}
	if err := envconfig.Process(EnvPrefix, &cfg); err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	cfg.Demo = cfg.Demo || *demo
	log, err := newLogger(stderr, cfg.LogLevel, cfg.LogFormat)
	if err != nil {
		return err
	}
	devices, err := loadDevices(cfg.Devices, cfg.DevicesFile)
	if err != nil {
		return err
	}
	if len(devices) == 0 && !cfg.Demo {
		return errors.New("no devices: set KATCP_BRIDGE_DEVICES or KATCP_BRIDGE_DEVICES_FILE, or run with --demo")
	}
	if cfg.ShutdownTimeout <= 0 {
		return fmt.Errorf("KATCP_BRIDGE_SHUTDOWN_TIMEOUT must be positive, not %v", cfg.ShutdownTimeout)
	}
	if cfg.LastValuesStorage != "file" && cfg.LastValuesStorage != "memory" {
		return fmt.Errorf("KATCP_BRIDGE_LAST_VALUES_STORAGE must be file or memory, not %q", cfg.LastValuesStorage)
	}
	bcfg := bridge.Config{
		Leases:             bridge.LeaseMode(cfg.Leases),
		LeaseBucket:        cfg.LeaseBucket,
		LeaseReplicas:      cfg.LeaseReplicas,
		LeaseTTL:           cfg.LeaseTTL,
		LeaseRenew:         cfg.LeaseRenew,
		NoLastValues:       !cfg.LastValues,
		LastValuesStream:   cfg.LastValuesStream,
		LastValuesReplicas: cfg.LastValuesReplicas,
		LastValuesMemory:   cfg.LastValuesStorage == "memory",
		Devices:            devices,
		Prefix:             cfg.Prefix,
		DefaultTimeout:     cfg.DefaultTimeout,
		MaxTimeout:         cfg.MaxTimeout,
		MaxInFlight:        cfg.MaxInFlight,
		Logger:             log,
	}
	if err := bcfg.Validate(); err != nil { // before starting anything
		return fmt.Errorf("configuration: %w", err)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var cleanups []func()
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}()

	tp, shutdownTracing, err := setupTracing(ctx, stdout)
	if err != nil {
		return fmt.Errorf("tracing: %w", err)
	}
	cleanups = append(cleanups, func() {
		sctx, done := context.WithTimeout(context.Background(), 5*time.Second)
		defer done()
		shutdownTracing(sctx)
	})

	if cfg.Demo {
		addr, stopDemo, err := startDemo(ctx, log)
		if err != nil {
			return fmt.Errorf("demo device: %w", err)
		}
		cleanups = append(cleanups, stopDemo)
		devices = append(devices, bridge.Device{Name: "demo", Address: addr})
	}

	url := cfg.NATSURL
	if url == "" {
		dir := cfg.EmbeddedDir
		if dir == "" {
			dir = filepath.Join(os.TempDir(), "katcp-bridge-jetstream")
		}
		ns, err := startEmbeddedNATS(cfg.EmbeddedPort, dir)
		if err != nil {
			return fmt.Errorf("embedded nats-server: %w", err)
		}
		cleanups = append(cleanups, func() { ns.Shutdown(); ns.WaitForShutdown() })
		url = ns.ClientURL()
		log.Info("embedded nats-server running", "url", url, "jetstream_store", dir)
	}
	metrics := bridge.NewMetrics()
	nc, err := connectNATS(url, cfg, log, metrics)
	if err != nil {
		return err
	}
	cleanups = append(cleanups, nc.Close)

	instance := cfg.Instance
	if instance == "" {
		instance, _ = os.Hostname()
	}
	bcfg.Devices = devices // with the demo device
	bcfg.Instance = instance
	bcfg.TracerProvider = tp
	bcfg.Metrics = metrics
	b, err := bridge.New(nc, bcfg)
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	if err := b.Start(); err != nil {
		return err
	}
	log.Info("katcp-bridge running", "devices", len(devices), "nats", url, "prefix", b.Scheme().Prefix())
	if cfg.Demo {
		fmt.Fprintf(stdout, "demo device ready: try\n  go run ./cmd/katcpcmd %s/demo help\n  go run ./cmd/katcpcmd %s/demo --watch position,target\n  go run ./cmd/katcpcmd %s/demo set-target 30\n", url, url, url)
	}

	var httpErr chan error
	if cfg.HTTPAddr != "" {
		srv, errs, err := serveHTTP(cfg.HTTPAddr, b, log)
		if err != nil {
			b.Shutdown(context.Background())
			return err
		}
		httpErr = errs
		cleanups = append(cleanups, func() {
			sctx, done := context.WithTimeout(context.Background(), 5*time.Second)
			defer done()
			srv.Shutdown(sctx)
		})
	}

	select {
	case <-ctx.Done():
	case err = <-httpErr:
	}
	log.Info("katcp-bridge shutting down")
	signal.Reset(os.Interrupt, syscall.SIGTERM) // a second signal ends the process at once
	sctx, done := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer done()
	if serr := b.Shutdown(sctx); serr != nil {
		log.Warn("shutdown", "err", serr)
	}
	if derr := drain(nc, cfg.ShutdownTimeout); derr != nil {
		log.Warn("draining NATS", "err", derr)
	}
	return err
}

func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("LOG_LEVEL: %w", err)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("LOG_FORMAT must be text or json, not %q", format)
}

// devicesFile is the devices file: a list, or an object with "devices".
type devicesFile struct {
	Devices []bridge.Device `json:"devices"`
}

func loadDevices(inline, file string) ([]bridge.Device, error) {
	var devices []bridge.Device
	if file != "" {
		data, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("DEVICES_FILE: %w", err)
		}
		js, err := yaml.YAMLToJSON(data)
		if err != nil {
			return nil, fmt.Errorf("DEVICES_FILE %s: %w", file, err)
		}
		var f devicesFile
		if len(js) > 0 && js[0] == '[' {
			err = strictJSON(js, &f.Devices)
		} else {
			err = strictJSON(js, &f)
		}
		if err != nil {
			return nil, fmt.Errorf("DEVICES_FILE %s: %w", filepath.Base(file), err)
		}
		devices = append(devices, f.Devices...)
	}
	for _, item := range strings.Split(inline, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		name, addr, ok := strings.Cut(item, "=")
		if !ok {
			return nil, fmt.Errorf("DEVICES: %q is not name=host:port", item)
		}
		devices = append(devices, bridge.Device{Name: name, Address: addr})
	}
	return devices, nil
}

func strictJSON(data []byte, v any) error {
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

func startDemo(ctx context.Context, log *slog.Logger) (string, func(), error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	d := sim.New(sim.Config{Name: "demo", Sensors: 2, Period: time.Second, Logger: log.With("device", "demo")})
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{}, 2)
	go func() { d.Serve(l); done <- struct{}{} }()
	go func() { d.Run(ctx); done <- struct{}{} }()
	log.Info("demo device running", "address", l.Addr().String())
	return l.Addr().String(), func() {
		cancel()
		d.Close()
		<-done
		<-done
	}, nil
}

func startEmbeddedNATS(port int, storeDir string) (*server.Server, error) {
	if port == 0 {
		port = -1
	}
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: port, NoLog: true, NoSigs: true,
		JetStream: true, StoreDir: storeDir})
	if err != nil {
		return nil, err
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		return nil, errors.New("not ready after 10s (is the port in use?)")
	}
	return ns, nil
}

func connectNATS(url string, cfg Config, log *slog.Logger, m *bridge.Metrics) (*nats.Conn, error) {
	opts := []nats.Option{
		nats.Name(cfg.NATSName),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(time.Second),
		nats.RetryOnFailedConnect(true),
		// A stuck server connection must not hold publishers (and a device
		// whose lease is lost) for the default minute: give up writes after
		// 5 s and notice a dead connection within about 30 s.
		nats.FlusherTimeout(5 * time.Second),
		nats.PingInterval(10 * time.Second),
		nats.MaxPingsOutstanding(3),
		nats.ConnectHandler(func(*nats.Conn) { m.SetNATSConnected(true); log.Info("NATS connected") }),
		nats.ReconnectHandler(func(*nats.Conn) { m.SetNATSConnected(true); log.Info("NATS reconnected") }),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			m.SetNATSConnected(false)
			if err != nil {
				log.Warn("NATS disconnected", "err", err)
			}
		}),
	}
	if cfg.NATSCreds != "" {
		opts = append(opts, nats.UserCredentials(cfg.NATSCreds))
	}
	if cfg.NATSNKey != "" {
		o, err := nats.NkeyOptionFromSeed(cfg.NATSNKey)
		if err != nil {
			return nil, fmt.Errorf("NATS_NKEY: %w", err)
		}
		opts = append(opts, o)
	}
	if cfg.NATSTLSCA != "" {
		opts = append(opts, nats.RootCAs(cfg.NATSTLSCA))
	}
	if cfg.NATSTLSCert != "" || cfg.NATSTLSKey != "" {
		opts = append(opts, nats.ClientCert(cfg.NATSTLSCert, cfg.NATSTLSKey))
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, fmt.Errorf("NATS %s: %w", url, err)
	}
	if nc.IsConnected() {
		m.SetNATSConnected(true)
	}
	return nc, nil
}

// drain sends what is buffered (final replies and statuses) and closes
// the connection, waiting at most timeout, also while reconnecting.
func drain(nc *nats.Conn, timeout time.Duration) error {
	if nc.IsClosed() {
		return nil
	}
	closed := make(chan struct{})
	nc.SetClosedHandler(func(*nats.Conn) { close(closed) })
	if err := nc.Drain(); err != nil {
		nc.Close()
		return err
	}
	select {
	case <-closed:
		return nil
	case <-time.After(timeout):
		nc.Close()
		return errors.New("drain timed out")
	}
}

func serveHTTP(addr string, b *bridge.Bridge, log *slog.Logger) (*http.Server, chan error, error) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		b.Metrics().WritePrometheus(w)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !b.Ready() {
			http.Error(w, "not ready: NATS not connected or bridge not started\n", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ready\n")
	})
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("HTTP_ADDR: %w", err)
	}
	log.Info("serving /metrics, /healthz and /readyz", "address", l.Addr().String())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	errs := make(chan error, 1)
	go func() {
		if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
			errs <- err
		}
	}()
	return srv, errs, nil
}
