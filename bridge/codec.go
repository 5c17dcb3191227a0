package bridge

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/katcp-go/katcp-bridge/katcp"
)

// Headers of the contract (see the package documentation).
const (
	HeaderStatus      = "Katcp-Status"       // ok, fail, invalid, ...: the device answered
	HeaderSource      = "Katcp-Error-Source" // "bridge" or "device" on failures
	HeaderTimeout     = "Katcp-Timeout"      // request: seconds the caller will wait
	HeaderMore        = "Katcp-More"         // reply chunk: more chunks follow
	HeaderNotServed   = "Katcp-Not-Served"   // "true": this replica does not serve the device now; retry
	HeaderAccept      = "Accept"
	HeaderContentType = "Content-Type"
	HeaderErrorText   = "Nats-Service-Error"
	HeaderErrorCode   = "Nats-Service-Error-Code"
	ContentJSON       = "application/json"
)

// errBadBody is wrapped by body decoding errors.
var errBadBody = errors.New("malformed request body")

// DecodeArgs decodes a request body: the KATCP arguments as they would
// follow the request name on the wire (escaped, separated by spaces), or,
// with JSON, an array whose elements are strings or {"base64": "..."}
// objects for bytes that are not UTF-8.
func DecodeArgs(body []byte, isJSON bool) ([][]byte, error) {
	if isJSON {
		if len(body) == 0 {
			return nil, nil
		}
		var raw []json.RawMessage
		if err := json.Unmarshal(body, &raw); err != nil {
			return nil, fmt.Errorf("%w: want a JSON array: %v", errBadBody, err)
		}
		args := make([][]byte, len(raw))
		for i, r := range raw {
			a, err := decodeJSONArg(r)
			if err != nil {
				return nil, fmt.Errorf("%w: element %d: %v", errBadBody, i, err)
			}
			args[i] = a
		}
		return args, nil
	}
	if args, ok := splitPlain(body); ok {
		return args, nil
	}
	line := make([]byte, 0, len(body)+3)
	line = append(line, "?x "...)
	line = append(line, body...)
	m, err := katcp.ParseMessage(line)
	if err != nil {
		var pe *katcp.ParseError
		if errors.As(err, &pe) {
			return nil, fmt.Errorf("%w: %v at byte %d", errBadBody, pe.Err, max(pe.Column-3, 0))
		}
		return nil, fmt.Errorf("%w: %v", errBadBody, err)
	}
	return m.Args, nil
}

// splitPlain is DecodeArgs's fast path for a body without escapes, raw
// NUL, ESC, CR or LF (the common case): the arguments are its runs of
// bytes other than space and tab, copied. ok is false for other bodies,
// which go through the full parser.
func splitPlain(body []byte) (args [][]byte, ok bool) {
	n := 0
	inArg := false
	for _, c := range body {
		switch c {
		case '\\', 0, 0x1b, '\r', '\n':
			return nil, false
		case ' ', '\t':
			inArg = false
		default:
			if !inArg {
				n++
				inArg = true
			}
		}
	}
	if n == 0 {
		return nil, true
	}
	data := append([]byte(nil), body...)
	args = make([][]byte, 0, n)
	start := -1
	for i, c := range data {
		if c == ' ' || c == '\t' {
			if start >= 0 {
				args = append(args, data[start:i:i])
				start = -1
			}
		} else if start < 0 {
			start = i
		}
	}
	if start >= 0 {
		args = append(args, data[start:len(data):len(data)])
	}
	return args, true
}

func decodeJSONArg(r json.RawMessage) ([]byte, error) {
	if string(r) == "null" {
		return nil, errors.New(`null is not an argument (use "" for an empty one)`)
	}
	var s string
	if err := json.Unmarshal(r, &s); err == nil {
		return []byte(s), nil
	}
	var n json.Number
	if err := json.Unmarshal(r, &n); err == nil {
		return []byte(n.String()), nil
	}
	var b struct {
		Base64 *string `json:"base64"`
	}
	if err := json.Unmarshal(r, &b); err == nil && b.Base64 != nil {
		return base64.StdEncoding.DecodeString(*b.Base64)
	}
	return nil, errors.New(`want a string, a number or {"base64": "..."}`)
}

// EncodeArgs encodes arguments as a request body in wire form.
func EncodeArgs(args [][]byte) []byte {
	var b []byte
	for i, a := range args {
		if i > 0 {
			b = append(b, ' ')
		}
		b = katcp.AppendEscaped(b, a)
	}
	return b
}

// jsonArg is an argument in JSON: a string when it is UTF-8, else its
// bytes in base64.
type jsonArg []byte

func (a jsonArg) MarshalJSON() ([]byte, error) {
	if utf8.Valid(a) {
		return json.Marshal(string(a))
	}
	return json.Marshal(map[string]string{"base64": base64.StdEncoding.EncodeToString(a)})
}

func (a *jsonArg) UnmarshalJSON(b []byte) error {
	v, err := decodeJSONArg(b)
	*a = v
	return err
}

// JSONReply is a reply in JSON (Accept: application/json).
type JSONReply struct {
	Status  string      `json:"status"`
	Args    []jsonArg   `json:"args"`    // after the status
	Informs [][]jsonArg `json:"informs"` // in-response informs' arguments
}

func toJSONArgs(args [][]byte) []jsonArg {
	out := make([]jsonArg, len(args))
	for i, a := range args {
		out[i] = a
	}
	return out
}

// encodeReply renders a device's reply (and its in-response informs) as
// the reply body: KATCP lines without message ids, or JSON.
func encodeReply(r *katcp.Reply, asJSON bool) ([]byte, error) {
	if asJSON {
		j := JSONReply{Status: r.Status(), Args: toJSONArgs(r.Values()), Informs: make([][]jsonArg, len(r.Informs))}
		for i, inf := range r.Informs {
			j.Informs[i] = toJSONArgs(inf.Args)
		}
		return json.Marshal(j)
	}
	var b []byte
	for i := range r.Informs {
		m := r.Informs[i]
		m.MID = 0
		b, _ = katcp.AppendMessage(b, &m)
	}
	m := r.Message
	m.MID = 0
	b, _ = katcp.AppendMessage(b, &m)
	return b, nil
}

// SensorUpdate is the JSON document published for each sensor update.
type SensorUpdate struct {
	Device    string  `json:"device"`
	Name      string  `json:"name"`
	Type      string  `json:"type"`
	Timestamp float64 `json:"timestamp"` // seconds since the Unix epoch
	Status    string  `json:"status"`
	// Value is typed by the sensor's type: a number (integer, float; NaN
	// and infinities as the strings "nan", "inf", "-inf"), a boolean, a
	// string (discrete, lru, address, and string sensors whose bytes are
	// UTF-8), {"base64": "..."} for other string values, seconds for a
	// timestamp; null when the status carries no value.
	Value any `json:"value"`
}

// seconds returns t as seconds since the Unix epoch, for any year.
func seconds(t time.Time) float64 {
	return float64(t.Unix()) + float64(t.Nanosecond())/1e9
}

// Status is the JSON document of a device's state on its status subject.
type Status struct {
	Device   string  `json:"device"`
	State    string  `json:"state"` // connected, disconnected
	Since    float64 `json:"since"` // seconds since the Unix epoch
	Reason   string  `json:"reason,omitempty"`
	Address  string  `json:"address"`
	Protocol string  `json:"protocol,omitempty"`
	Owner    string  `json:"owner,omitempty"` // the bridge instance serving the device
	// Leases is true when the owner holds the device through a lease
	// (several replicas share the devices), false when it serves every
	// configured device without leases (one replica, no JetStream).
	Leases bool `json:"leases"`
}

// appendSensorJSON appends the SensorUpdate document for u, byte for byte
// what encoding/json writes for sensorDocument(device, u), without
// reflection (it runs for every published update).
func appendSensorJSON(b []byte, device string, u katcp.SensorUpdate) []byte {
	return appendSensorRest(appendSensorHead(b, device, u.Name, u.Type), u)
}

// appendSensorHead appends the start of a sensor's documents, the same for
// all its updates: device, name and type, up to the timestamp's value.
func appendSensorHead(b []byte, device, name string, t katcp.SensorType) []byte {
	b = append(b, `{"device":`...)
	b = appendJSONString(b, device)
	b = append(b, `,"name":`...)
	b = appendJSONString(b, name)
	b = append(b, `,"type":`...)
	b = appendJSONString(b, t.String())
	return append(b, `,"timestamp":`...)
}

// appendSensorRest appends the rest of u's document after
// appendSensorHead: the timestamp onwards.
func appendSensorRest(b []byte, u katcp.SensorUpdate) []byte {
	b = appendJSONFloat(b, seconds(u.Timestamp))
	b = append(b, `,"status":"`...)
	b = append(b, u.Status.String()...) // letters, digits and parentheses: nothing to escape
	b = append(b, '"')
	b = append(b, `,"value":`...)
	if !u.Status.ValidValue() || u.Value == nil {
		return append(b, "null}"...)
	}
	switch v := u.Value.(type) {
	case float64:
		switch {
		case math.IsNaN(v):
			b = append(b, `"nan"`...)
		case math.IsInf(v, 1):
			b = append(b, `"inf"`...)
		case math.IsInf(v, -1):
			b = append(b, `"-inf"`...)
		default:
			b = appendJSONFloat(b, v)
		}
	case int64:
		b = strconv.AppendInt(b, v, 10)
	case bool:
		b = strconv.AppendBool(b, v)
	case string:
		b = appendJSONBytes(b, []byte(v))
	case []byte:
		b = appendJSONBytes(b, v)
	case time.Time:
		b = appendJSONFloat(b, seconds(v))
	case katcp.Address:
		b = appendJSONString(b, v.String())
	default:
		j, _ := json.Marshal(v)
		b = append(b, j...)
	}
	return append(b, '}')
}

// appendJSONBytes writes v as a JSON string when it is UTF-8, else as
// {"base64": "..."}, as jsonArg marshals.
func appendJSONBytes(b, v []byte) []byte {
	if utf8.Valid(v) {
		return appendJSONString(b, string(v))
	}
	b = append(b, `{"base64":"`...)
	b = base64.StdEncoding.AppendEncode(b, v)
	return append(b, `"}`...)
}

// appendJSONFloat writes f as encoding/json does.
func appendJSONFloat(b []byte, f float64) []byte {
	abs := math.Abs(f)
	format := byte('f')
	if abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if format == 'e' {
		// e-09 to e-9, as encoding/json does
		if n := len(b); n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			b[n-2] = b[n-1]
			b = b[:n-1]
		}
	}
	return b
}

// appendJSONString writes s as a JSON string the way encoding/json does
// (HTML-safe escapes, invalid UTF-8 replaced by U+FFFD).
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
