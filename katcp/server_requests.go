package katcp

import (
	"context"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"strings"
	"time"
)

// LogLevel is a KATCP log level; higher is more severe.
type LogLevel int

// The KATCP log levels, from all (everything) to off (nothing).
const (
	LogAll LogLevel = iota
	LogTrace
	LogDebug
	LogInfo
	LogWarn
	LogError
	LogFatal
	LogOff
)

var logLevelNames = [...]string{"all", "trace", "debug", "info", "warn", "error", "fatal", "off"}

func (l LogLevel) String() string {
	if l >= 0 && int(l) < len(logLevelNames) {
		return logLevelNames[l]
	}
	return fmt.Sprintf("LogLevel(%d)", int(l))
}

// ParseLogLevel parses a KATCP log level name (case-insensitive).
func ParseLogLevel(b []byte) (LogLevel, error) {
	for i, n := range logLevelNames {
		if equalFold(b, n) {
			return LogLevel(i), nil
		}
	}
	return 0, valueError("log level", b)
}

// logLevelFromSlog maps slog levels onto KATCP's.
func logLevelFromSlog(l slog.Level) LogLevel {
	switch {
	case l >= slog.LevelError+4:
		return LogFatal
	case l >= slog.LevelError:
		return LogError
	case l >= slog.LevelWarn:
		return LogWarn
	case l >= slog.LevelInfo:
		return LogInfo
	case l >= slog.LevelDebug:
		return LogDebug
	}
	return LogTrace
}

// LogLevel returns the level set by ?log-level (default info).
func (s *Server) LogLevel() LogLevel {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.logLevel
}

func (s *Server) logInform(level, name, msg string) (Message, error) {
	now := time.Now()
	var ts any = now
	if s.cfg.V4 {
		ts = timestampMS(now)
	}
	return NewInform("log", level, ts, name, msg)
}

// LogHandler returns a slog.Handler that sends each record at or above
// the ?log-level to every client as #log level timestamp name message,
// where name is the handler's group path (or the given name) and message
// is the record's message followed by its attributes as key=value.
func (s *Server) LogHandler(name string) slog.Handler {
	return &logHandler{srv: s, name: name}
}

type logHandler struct {
	srv   *Server
	name  string
	attrs []slog.Attr
}

func (h *logHandler) Enabled(_ context.Context, l slog.Level) bool {
	lvl := h.srv.LogLevel()
	return lvl != LogOff && logLevelFromSlog(l) >= lvl
}

func (h *logHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	write := func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	}
	for _, a := range h.attrs {
		write(a)
	}
	r.Attrs(write)
	m, err := h.srv.logInform(logLevelFromSlog(r.Level).String(), h.name, b.String())
	if err != nil {
		return err
	}
	h.srv.mu.Lock()
	conns := h.srv.connList()
	h.srv.mu.Unlock()
	for _, c := range conns {
		c.send(&m)
	}
	return nil
}

func (h *logHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &logHandler{srv: h.srv, name: h.name, attrs: append(append([]slog.Attr(nil), h.attrs...), attrs...)}
}

func (h *logHandler) WithGroup(name string) slog.Handler {
	n := name
	if h.name != "" {
		n = h.name + "." + name
	}
	return &logHandler{srv: h.srv, name: n, attrs: h.attrs}
}

func (s *Server) addStandardRequests() {
	std := map[string]struct {
		help string
		h    HandlerFunc
	}{
		"halt":            {"Halt the device server. ?halt", s.reqHalt},
		"help":            {"List the requests, or describe one. ?help [name]", s.reqHelp},
		"restart":         {"Restart the device. ?restart", s.reqRestart},
		"watchdog":        {"Check that the connection is alive. ?watchdog", s.reqWatchdog},
		"version-list":    {"List the versions of the device's components. ?version-list", s.reqVersionList},
		"log-level":       {"Query or set the log level. ?log-level [all|trace|debug|info|warn|error|fatal|off]", s.reqLogLevel},
		"sensor-list":     {"List sensors, all or by name or /regex/. ?sensor-list [name|/regex/]", s.reqSensorList},
		"sensor-value":    {"Report sensor values, all or by name or /regex/. ?sensor-value [name|/regex/]", s.reqSensorValue},
		"sensor-sampling": {"Query or set sampling strategies. ?sensor-sampling name[,name...] [strategy [params...]]", s.reqSensorSampling},
		"client-list":     {"List the connected clients. ?client-list", s.reqClientList},
	}
	if !s.cfg.V4 {
		std["request-timeout-hint"] = struct {
			help string
			h    HandlerFunc
		}{"Report request timeout hints, all or for one request. ?request-timeout-hint [name]", s.reqTimeoutHint}
	}
	for name, e := range std {
		s.requests[name] = &requestEntry{help: e.help, handler: e.h, builtin: true}
	}
}

func (s *Server) reqHalt(ctx context.Context, w *ReplyWriter, r *Request) error {
	if err := r.Decode(); err != nil {
		return err
	}
	w.Reply()
	if s.cfg.Halt != nil {
		s.cfg.Halt()
	}
	// Stop without waiting: Close would wait for this very handler. Each
	// connection flushes what is queued (this reply first) and ends.
	for _, c := range s.beginShutdown() {
		c.close("device halting")
	}
	return nil
}

func (s *Server) reqHelp(ctx context.Context, w *ReplyWriter, r *Request) error {
	list, err := s.namedRequests(r, func(*requestEntry) bool { return true })
	if err != nil {
		return err
	}
	for _, e := range list {
		w.Inform(e.name, e.help)
	}
	return w.Reply(len(list))
}

// namedRequest is a request's name with its entry.
type namedRequest struct {
	name string
	*requestEntry
}

// namedRequests resolves the optional request name of ?help and
// ?request-timeout-hint: that request (an unknown one is a failure), or
// every request that keep accepts, sorted by name.
func (s *Server) namedRequests(r *Request, keep func(*requestEntry) bool) ([]namedRequest, error) {
	if len(r.Args) > 1 {
		return nil, Fail("?%s takes at most one argument", r.Name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(r.Args) == 1 {
		name := string(r.Args[0])
		e := s.requests[name]
		if e == nil {
			return nil, Fail("unknown request %s", name)
		}
		return []namedRequest{{name, e}}, nil
	}
	var list []namedRequest
	for n, e := range s.requests {
		if keep(e) {
			list = append(list, namedRequest{n, e})
		}
	}
	sortBy(list, func(e namedRequest) string { return e.name })
	return list, nil
}

func (s *Server) reqRestart(ctx context.Context, w *ReplyWriter, r *Request) error {
	if s.cfg.Restart == nil {
		return Fail("restart is not supported by this device")
	}
	return s.cfg.Restart(ctx)
}

func (s *Server) reqWatchdog(ctx context.Context, w *ReplyWriter, r *Request) error {
	return nil
}

func (s *Server) versions() [][3]string {
	cfg := s.cfg
	return [][3]string{
		{"katcp-protocol", s.Version().String(), ""},
		{"katcp-library", LibraryVersion, LibraryVersion},
		{"katcp-device", cfg.DeviceName + "-" + cfg.DeviceVersion, cfg.BuildState},
	}
}

func (s *Server) reqVersionList(ctx context.Context, w *ReplyWriter, r *Request) error {
	vs := s.versions()
	for _, v := range vs {
		if v[2] == "" {
			w.Inform(v[0], v[1])
		} else {
			w.Inform(v[0], v[1], v[2])
		}
	}
	return w.Reply(len(vs))
}

func (s *Server) reqLogLevel(ctx context.Context, w *ReplyWriter, r *Request) error {
	switch len(r.Args) {
	case 0:
	case 1:
		l, err := ParseLogLevel(r.Args[0])
		if err != nil {
			return Fail("unknown log level %q", r.Args[0])
		}
		s.mu.Lock()
		s.logLevel = l
		s.mu.Unlock()
	default:
		return Fail("?log-level takes at most one argument")
	}
	return w.Reply(s.LogLevel().String())
}

// selectSensors resolves "", a name or a /regex/.
func (s *Server) selectSensors(args [][]byte) ([]*Sensor, error) {
	if len(args) > 1 {
		return nil, Fail("takes at most one argument")
	}
	all := s.sensors.Sorted()
	if len(args) == 0 {
		return all, nil
	}
	arg := string(args[0])
	if len(arg) >= 2 && arg[0] == '/' && arg[len(arg)-1] == '/' {
		re, err := regexp.Compile(arg[1 : len(arg)-1])
		if err != nil {
			return nil, Fail("bad regular expression: %v", err)
		}
		var out []*Sensor
		for _, sn := range all {
			if re.MatchString(sn.Name()) {
				out = append(out, sn)
			}
		}
		return out, nil
	}
	sn, ok := s.sensors.Get(arg)
	if !ok {
		return nil, Fail("unknown sensor %s", arg)
	}
	return []*Sensor{sn}, nil
}

func (s *Server) reqSensorList(ctx context.Context, w *ReplyWriter, r *Request) error {
	list, err := s.selectSensors(r.Args)
	if err != nil {
		return err
	}
	// The informs are built from the sensors' strings in buffers reused
	// for each: thousands of sensors cost no allocation each.
	var buf []byte
	var ends []int
	var args [][]byte
	for _, sn := range list {
		buf, ends = buf[:0], ends[:0]
		for _, a := range [...]string{sn.info.Name, sn.info.Description, sn.info.Units, sn.info.Type.String()} {
			buf = append(buf, a...)
			ends = append(ends, len(buf))
		}
		for _, p := range sn.info.Params {
			buf = append(buf, p...)
			ends = append(ends, len(buf))
		}
		args = args[:0]
		start := 0
		for _, end := range ends { // once buf is complete: appends may have moved it
			args = append(args, buf[start:end])
			start = end
		}
		if err := w.informArgs(args); err != nil {
			return err
		}
	}
	return w.Reply(len(list))
}

func (s *Server) reqSensorValue(ctx context.Context, w *ReplyWriter, r *Request) error {
	list, err := s.selectSensors(r.Args)
	if err != nil {
		return err
	}
	for _, sn := range list {
		rd := sn.Reading()
		var ts any = rd.Timestamp
		if s.cfg.V4 {
			ts = timestampMS(rd.Timestamp)
		}
		w.Inform(ts, 1, rd.Name, rd.Status, w.conn.v4Value(&rd))
	}
	return w.Reply(len(list))
}

func (s *Server) reqSensorSampling(ctx context.Context, w *ReplyWriter, r *Request) error {
	if len(r.Args) == 0 {
		return Fail("?sensor-sampling needs a sensor name")
	}
	names := strings.Split(string(r.Args[0]), ",")
	if len(names) > 1 && s.cfg.V4 {
		return Fail("bulk sampling is not available in KATCP v4")
	}
	sensors := make([]*Sensor, len(names))
	for i, n := range names {
		sn, ok := s.sensors.Get(n)
		if !ok {
			return Fail("unknown sensor %s", n)
		}
		sensors[i] = sn
	}
	if len(r.Args) == 1 { // query
		if len(names) > 1 {
			return Fail("querying the strategy takes one sensor name")
		}
		p, ok := w.conn.sampling(names[0])
		if !ok {
			return w.Reply(names[0], StrategyNone)
		}
		return w.Reply(append([]any{names[0]}, p.args()...)...)
	}
	// Check everything first: bulk is all or nothing.
	params := make([]samplingParams, len(sensors))
	for i, sn := range sensors {
		p, err := parseSampling(r.Args[1:], sn.info.Type, s.cfg.V4)
		if err != nil {
			return Fail("%s: %v", sn.Name(), err)
		}
		params[i] = p
	}
	for i, sn := range sensors {
		if params[i].strategy == StrategyNone {
			w.conn.setSampler(sn.Name(), nil)
			continue
		}
		w.conn.setSampler(sn.Name(), startSampler(w.conn, sn, params[i]))
	}
	return w.Reply(append([]any{r.Args[0]}, params[0].args()...)...)
}

func (s *Server) reqClientList(ctx context.Context, w *ReplyWriter, r *Request) error {
	s.mu.Lock()
	conns := s.connList()
	s.mu.Unlock()
	sortBy(conns, func(c *serverConn) string { return c.remote })
	for _, c := range conns {
		w.Inform(c.remote)
	}
	return w.Reply(len(conns))
}

func (s *Server) reqTimeoutHint(ctx context.Context, w *ReplyWriter, r *Request) error {
	list, err := s.namedRequests(r, func(e *requestEntry) bool { return e.hint > 0 })
	if err != nil {
		return err
	}
	for _, e := range list {
		w.Inform(e.name, e.hint.Seconds())
	}
	return w.Reply(len(list))
}

// sortBy sorts xs by a string key.
func sortBy[T any](xs []T, key func(T) string) {
	slices.SortFunc(xs, func(a, b T) int { return strings.Compare(key(a), key(b)) })
}
