// Package subjects maps KATCP devices, requests, informs and sensors to
// NATS subjects and back. It is the one place that knows the scheme:
//
//	<prefix>.<device>.req.<request>     request-reply: a KATCP request to the device
//	<prefix>.<device>.inform.<inform>   published: the device's asynchronous informs
//	<prefix>.<device>.sensor.<sensor>   published: sensor updates; the sensor name's
//	                                    dots are subject tokens
//	<prefix>.<device>.status            published on change; request-reply: current state
//	<prefix>.owners                     request-reply: which bridge replica serves which device
//
// The prefix is "katcp" unless configured; it may itself have several
// tokens ("site.katcp"). Wildcards then do what one expects:
// "katcp.*.sensor.>" is every sensor of every device,
// "katcp.m000.sensor.pump.>" every sensor of m000 whose name starts "pump.",
// "katcp.*.status" every device's state.
//
// Device names are ASCII letters, digits, '-' and '_'. Request and inform
// names are KATCP message names, which are valid tokens as they are.
// Sensor names are split at dots; within each part, a byte that is not a
// letter, digit, '-' or '_' is written as '~' and two upper-case hex
// digits, and an empty part (from "a..b" or a leading or trailing dot) is
// written as a lone '~'. Names that follow the KATCP rules (letters,
// digits, '.', '-', '_', no empty parts) are therefore unchanged, and the
// escape is reversible for any name.
//
// Everything here is a pure function, safe for concurrent use.
package subjects

import (
	"errors"
	"fmt"
	"strings"
)

// DefaultPrefix is the default first token(s) of every subject.
const DefaultPrefix = "katcp"

// Errors returned by the validators and by Parse.
var (
	ErrBadDevice  = errors.New("subjects: device name must be ASCII letters, digits, '-' and '_'")
	ErrBadPrefix  = errors.New("subjects: prefix must be dot-separated tokens of letters, digits, '-' and '_'")
	ErrBadName    = errors.New("subjects: invalid request or inform name")
	ErrBadSubject = errors.New("subjects: not a subject of this scheme")
)

// Kind is what a subject addresses.
type Kind int

// The kinds of subject.
const (
	KindRequest Kind = iota + 1
	KindInform
	KindSensor
	KindStatus
)

func (k Kind) String() string {
	switch k {
	case KindRequest:
		return "req"
	case KindInform:
		return "inform"
	case KindSensor:
		return "sensor"
	case KindStatus:
		return "status"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// Scheme builds and parses subjects under one prefix. The zero value uses
// DefaultPrefix.
type Scheme struct {
	prefix string
}

// New returns the scheme for prefix ("" for DefaultPrefix).
func New(prefix string) (Scheme, error) {
	if prefix == "" {
		return Scheme{}, nil
	}
	for _, tok := range strings.Split(prefix, ".") {
		if !validToken(tok) {
			return Scheme{}, fmt.Errorf("%w: %q", ErrBadPrefix, prefix)
		}
	}
	return Scheme{prefix: prefix}, nil
}

// Prefix returns the scheme's prefix.
func (s Scheme) Prefix() string {
	if s.prefix == "" {
		return DefaultPrefix
	}
	return s.prefix
}

// validToken reports whether t is non-empty and only [A-Za-z0-9_-].
func validToken(t string) bool {
	if t == "" {
		return false
	}
	for i := 0; i < len(t); i++ {
		if !plain(t[i]) {
			return false
		}
	}
	return true
}

func plain(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_'
}

// ValidDevice checks a device name.
func ValidDevice(device string) error {
	if !validToken(device) {
		return fmt.Errorf("%w: %q", ErrBadDevice, device)
	}
	return nil
}

// validName checks a KATCP request or inform name.
func validName(name string) bool {
	if name == "" || !(name[0] >= 'a' && name[0] <= 'z' || name[0] >= 'A' && name[0] <= 'Z') {
		return false
	}
	for i := 1; i < len(name); i++ {
		if c := name[i]; !plain(c) || c == '_' {
			return false
		}
	}
	return true
}

// Device returns "<prefix>.<device>", the root of a device's subjects.
func (s Scheme) Device(device string) string { return s.Prefix() + "." + device }

// Request returns the subject of a request to a device.
func (s Scheme) Request(device, request string) string {
	return s.Device(device) + ".req." + request
}

// Requests returns the wildcard subject of every request to a device.
func (s Scheme) Requests(device string) string { return s.Device(device) + ".req.*" }

// Inform returns the subject a device's inform is published on.
func (s Scheme) Inform(device, inform string) string {
	return s.Device(device) + ".inform." + inform
}

// Sensor returns the subject a sensor's updates are published on.
func (s Scheme) Sensor(device, sensor string) string {
	return s.Prefix() + "." + device + ".sensor." + EscapeSensor(sensor) // one allocation
}

// Sensors returns the wildcard subject of every sensor of a device
// (device "*" for every device).
func (s Scheme) Sensors(device string) string { return s.Device(device) + ".sensor.>" }

// Status returns a device's status subject.
func (s Scheme) Status(device string) string { return s.Device(device) + ".status" }

// Owners returns the subject on which the bridge replicas answer which
// of them serves which device ("katcp.owners"). It has two tokens, so no
// device subject (three or more) can be mistaken for it.
func (s Scheme) Owners() string { return s.Prefix() + ".owners" }

// EscapeSensor turns a sensor name into subject tokens (see the package
// documentation).
func EscapeSensor(name string) string {
	if plainSensor(name) {
		return name // nothing to escape: the common case, without allocating
	}
	return escapeSensor(name)
}

// escapeSensor is EscapeSensor without the fast path for plain names.
func escapeSensor(name string) string {
	var b strings.Builder
	for i, part := range strings.Split(name, ".") {
		if i > 0 {
			b.WriteByte('.')
		}
		if part == "" {
			b.WriteByte('~')
			continue
		}
		for j := 0; j < len(part); j++ {
			c := part[j]
			if plain(c) {
				b.WriteByte(c)
				continue
			}
			const hex = "0123456789ABCDEF"
			b.WriteByte('~')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		}
	}
	return b.String()
}

// plainSensor reports whether EscapeSensor leaves name as it is: plain
// bytes in non-empty parts separated by single dots.
func plainSensor(name string) bool {
	if name == "" || name[0] == '.' || name[len(name)-1] == '.' {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c == '.' {
			if name[i-1] == '.' {
				return false
			}
			continue
		}
		if !plain(c) {
			return false
		}
	}
	return true
}

// UnescapeSensor reverses EscapeSensor.
func UnescapeSensor(tokens string) (string, error) {
	var b strings.Builder
	for i, part := range strings.Split(tokens, ".") {
		if i > 0 {
			b.WriteByte('.')
		}
		if part == "~" {
			continue
		}
		if part == "" {
			return "", fmt.Errorf("%w: empty token in sensor %q", ErrBadSubject, tokens)
		}
		for j := 0; j < len(part); j++ {
			c := part[j]
			if plain(c) {
				b.WriteByte(c)
				continue
			}
			if c != '~' || j+2 >= len(part) {
				return "", fmt.Errorf("%w: bad escape in sensor %q", ErrBadSubject, tokens)
			}
			hi, ok1 := unhex(part[j+1])
			lo, ok2 := unhex(part[j+2])
			if !ok1 || !ok2 {
				return "", fmt.Errorf("%w: bad escape in sensor %q", ErrBadSubject, tokens)
			}
			b.WriteByte(hi<<4 | lo)
			j += 2
		}
	}
	return b.String(), nil
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// Parsed is what Parse found in a subject.
type Parsed struct {
	Kind   Kind
	Device string
	Name   string // request, inform or (unescaped) sensor name; "" for status
}

// Parse maps a subject of this scheme back to what it addresses.
func (s Scheme) Parse(subject string) (Parsed, error) {
	rest, ok := strings.CutPrefix(subject, s.Prefix()+".")
	if !ok {
		return Parsed{}, fmt.Errorf("%w: %q does not start with %q", ErrBadSubject, subject, s.Prefix()+".")
	}
	device, rest, _ := strings.Cut(rest, ".")
	if ValidDevice(device) != nil {
		return Parsed{}, fmt.Errorf("%w: %q: bad device", ErrBadSubject, subject)
	}
	kind, name, _ := strings.Cut(rest, ".")
	p := Parsed{Device: device}
	switch kind {
	case "req", "inform":
		p.Kind, p.Name = KindRequest, name
		if kind == "inform" {
			p.Kind = KindInform
		}
		if !validName(name) {
			return Parsed{}, fmt.Errorf("%w: %q: %w", ErrBadSubject, subject, ErrBadName)
		}
	case "sensor":
		sensor, err := UnescapeSensor(name)
		if err != nil || name == "" {
			return Parsed{}, fmt.Errorf("%w: %q: bad sensor", ErrBadSubject, subject)
		}
		p.Kind, p.Name = KindSensor, sensor
	case "status":
		if name != "" || strings.HasSuffix(rest, ".") {
			return Parsed{}, fmt.Errorf("%w: %q", ErrBadSubject, subject)
		}
		p.Kind = KindStatus
	default:
		return Parsed{}, fmt.Errorf("%w: %q: unknown kind %q", ErrBadSubject, subject, kind)
	}
	return p, nil
}
