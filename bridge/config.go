package bridge

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/katcp-go/katcp-bridge/katcp"
	"github.com/katcp-go/katcp-bridge/subjects"
)

// Device configures one bridged device.
type Device struct {
	Name    string `json:"name"`    // subject token: letters, digits, '-', '_'
	Address string `json:"address"` // host:port
	// Sensors to subscribe and publish. Empty means every sensor with the
	// default strategy.
	Sensors []SensorSubscription `json:"sensors,omitempty"`
	// Timeout applies to requests whose caller sent no Katcp-Timeout;
	// zero means Config.DefaultTimeout.
	Timeout Duration `json:"timeout,omitempty"`
	// Allow, when not empty, lists the only requests callers may send;
	// Deny lists requests they may not. ReadOnly allows only requests that
	// read (see ReadOnlyRequests).
	Allow    []string `json:"allow,omitempty"`
	Deny     []string `json:"deny,omitempty"`
	ReadOnly bool     `json:"read_only,omitempty"`
}

// SensorSubscription selects sensors by name, by /regex/ or all ("" or
// "*"), with a sampling strategy ("event" when empty) and its parameters
// ("period 0.5" is Strategy "period", Params ["0.5"]).
type SensorSubscription struct {
	Pattern  string   `json:"pattern"`
	Strategy string   `json:"strategy,omitempty"`
	Params   []string `json:"params,omitempty"`
}

// ReadOnlyRequests are the requests a read-only device still accepts.
var ReadOnlyRequests = []string{"help", "watchdog", "version-list", "sensor-list", "sensor-value", "client-list", "request-timeout-hint", "log-level"}

// Duration is a time.Duration that reads "1.5s" or a number of seconds
// from JSON.
type Duration time.Duration

// UnmarshalJSON reads "1.5s" or 1.5.
func (d *Duration) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	if v, err := time.ParseDuration(s); err == nil {
		if v < 0 {
			return fmt.Errorf("bad duration %s: negative", b)
		}
		*d = Duration(v)
		return nil
	}
	f, err := katcp.ParseFloat([]byte(s))
	if err != nil || f < 0 || f > 1e6 {
		return fmt.Errorf("bad duration %s: want \"1.5s\" or seconds (at most 1e6)", b)
	}
	*d = Duration(f * float64(time.Second))
	return nil
}

// MarshalJSON writes "1.5s".
func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(`"` + time.Duration(d).String() + `"`), nil
}

// Config configures a Bridge.
type Config struct {
	Devices []Device
	Prefix  string // subject prefix; "" is subjects.DefaultPrefix
	// Instance names this bridge process in status documents and service
	// metadata (default: the NATS connection's name or "katcp-bridge").
	Instance string
	// DefaultTimeout bounds requests without Katcp-Timeout (default 5 s);
	// MaxTimeout caps what callers may ask for (default 60 s).
	DefaultTimeout time.Duration
	MaxTimeout     time.Duration
	// MaxInFlight bounds the requests being handled per device (default
	// 256); beyond it callers get a 503.
	MaxInFlight int
	// NoLastValues turns off the JetStream stream that keeps the last
	// update of every sensor (on by default when JetStream is available).
	// LastValuesStream names it (default DefaultLastValuesStream),
	// LastValuesReplicas sets its replication (default 1) and
	// LastValuesMemory keeps it in memory instead of files.
	NoLastValues       bool
	LastValuesStream   string
	LastValuesReplicas int
	LastValuesMemory   bool
	// Leases decides how replicas share the devices: LeasesAuto (the
	// default) uses a JetStream key-value bucket when the NATS system has
	// JetStream and serves every device without leases otherwise;
	// LeasesOn insists on the bucket (serving nothing until it works);
	// LeasesOff serves every configured device (one replica only).
	Leases LeaseMode
	// LeaseBucket names the bucket (default DefaultLeaseBucket);
	// LeaseReplicas sets its replication (default 1).
	LeaseBucket   string
	LeaseReplicas int
	// LeaseTTL is how long a lease lives without renewal (default 5 s):
	// the time a dead replica's devices wait for a new owner. LeaseRenew
	// is how often leases are renewed (default LeaseTTL/4; at most half
	// of LeaseTTL).
	LeaseTTL   time.Duration
	LeaseRenew time.Duration
	// Client is the template for the devices' KATCP clients (backoff,
	// limits). Its callbacks and logger are set by the bridge.
	Client katcp.ClientConfig

	Logger         *slog.Logger
	TracerProvider trace.TracerProvider // default: otel.GetTracerProvider()
	Propagator     propagation.TextMapPropagator
	Metrics        *Metrics // default: a new one
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	var errs []error
	if _, err := subjects.New(c.Prefix); err != nil {
		errs = append(errs, err)
	}
	seen := map[string]bool{}
	for i, d := range c.Devices {
		if err := subjects.ValidDevice(d.Name); err != nil {
			errs = append(errs, fmt.Errorf("device %d: %w", i, err))
		}
		if seen[d.Name] {
			errs = append(errs, fmt.Errorf("device %q is configured twice", d.Name))
		}
		seen[d.Name] = true
		if host, port, err := net.SplitHostPort(d.Address); err != nil || host == "" || !validPort(port) {
			errs = append(errs, fmt.Errorf("device %q: address %q is not host:port", d.Name, d.Address))
		}
		if d.Timeout < 0 {
			errs = append(errs, fmt.Errorf("device %q: negative timeout", d.Name))
		}
		for _, s := range d.Sensors {
			if _, err := s.compile(); err != nil {
				errs = append(errs, fmt.Errorf("device %q: %w", d.Name, err))
			}
		}
		for _, r := range slices.Concat(d.Allow, d.Deny) {
			if !katcp.ValidName(r) {
				errs = append(errs, fmt.Errorf("device %q: %q is not a request name", d.Name, r))
			}
		}
	}
	if c.LastValuesReplicas < 0 || c.LastValuesReplicas > 5 {
		errs = append(errs, fmt.Errorf("last-values replicas must be 1..5, not %d", c.LastValuesReplicas))
	}
	if n := c.LastValuesStream; n != "" && strings.ContainsAny(n, " .*>\t/\\") {
		errs = append(errs, fmt.Errorf("last-values stream name %q may not contain spaces, '.', '*', '>', '/' or '\\'", n))
	}
	switch c.Leases {
	case "", LeasesAuto, LeasesOn, LeasesOff:
	default:
		errs = append(errs, fmt.Errorf("leases must be auto, on or off, not %q", c.Leases))
	}
	if c.LeaseReplicas < 0 || c.LeaseReplicas > 5 {
		errs = append(errs, fmt.Errorf("lease bucket replicas must be 1..5, not %d", c.LeaseReplicas))
	}
	if n := c.LeaseBucket; n != "" && !validBucket(n) {
		errs = append(errs, fmt.Errorf("lease bucket name %q may hold only letters, digits, '-' and '_'", n))
	}
	if c.LeaseTTL < 0 || c.LeaseRenew < 0 {
		errs = append(errs, errors.New("lease TTL and renew interval must not be negative"))
	}
	if c.LeaseTTL > 0 && c.LeaseTTL < time.Second {
		errs = append(errs, fmt.Errorf("lease TTL %v is below JetStream's minimum of 1s", c.LeaseTTL))
	}
	ttl := c.LeaseTTL
	if ttl == 0 {
		ttl = DefaultLeaseTTL
	}
	if c.LeaseRenew > ttl/2 {
		errs = append(errs, fmt.Errorf("lease renew interval %v must be at most half the TTL %v", c.LeaseRenew, ttl))
	}
	if c.DefaultTimeout < 0 || c.MaxTimeout < 0 {
		errs = append(errs, errors.New("timeouts must not be negative"))
	}
	if c.DefaultTimeout > 0 && c.MaxTimeout > 0 && c.MaxTimeout < c.DefaultTimeout {
		errs = append(errs, fmt.Errorf("the maximum timeout %v is below the default %v", c.MaxTimeout, c.DefaultTimeout))
	}
	return errors.Join(errs...)
}

func validBucket(n string) bool {
	for i := 0; i < len(n); i++ {
		if c := n[i]; !plainByte(c) {
			return false
		}
	}
	return true
}

func plainByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_'
}

func validPort(p string) bool {
	n, err := strconv.Atoi(p)
	return err == nil && n > 0 && n < 65536
}

// compiled is a SensorSubscription ready to use.
type compiled struct {
	match    func(name string) bool
	strategy katcp.Strategy
	params   []any
}

func (s SensorSubscription) compile() (compiled, error) {
	var c compiled
	st := s.Strategy
	if st == "" {
		st = "event"
	}
	strategy, err := katcp.ParseStrategy([]byte(st))
	if err != nil {
		return c, fmt.Errorf("sensor pattern %q: unknown strategy %q", s.Pattern, st)
	}
	if len(s.Params) != strategy.NumParams() {
		return c, fmt.Errorf("sensor pattern %q: strategy %s takes %d parameters", s.Pattern, st, strategy.NumParams())
	}
	c.strategy = strategy
	for _, p := range s.Params {
		if _, err := katcp.ParseFloat([]byte(p)); err != nil {
			return c, fmt.Errorf("sensor pattern %q: parameter %q is not a number", s.Pattern, p)
		}
		c.params = append(c.params, p)
	}
	switch p := s.Pattern; {
	case p == "" || p == "*":
		c.match = func(string) bool { return true }
	case len(p) >= 2 && p[0] == '/' && p[len(p)-1] == '/':
		re, err := regexp.Compile(p[1 : len(p)-1])
		if err != nil {
			return c, fmt.Errorf("sensor pattern %q: %v", p, err)
		}
		c.match = re.MatchString
	default:
		c.match = func(name string) bool { return name == p }
	}
	return c, nil
}

func (c *Config) withDefaults() Config {
	cfg := *c
	if cfg.DefaultTimeout <= 0 {
		cfg.DefaultTimeout = 5 * time.Second
	}
	if cfg.MaxTimeout <= 0 {
		cfg.MaxTimeout = 60 * time.Second
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 256
	}
	if cfg.Leases == "" {
		cfg.Leases = LeasesAuto
	}
	if cfg.LeaseBucket == "" {
		cfg.LeaseBucket = DefaultLeaseBucket
	}
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.LeaseRenew <= 0 {
		cfg.LeaseRenew = cfg.LeaseTTL / 4
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics()
	}
	return cfg
}
