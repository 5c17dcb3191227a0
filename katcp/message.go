package katcp

import (
	"errors"
	"fmt"
)

// Type is the kind of a KATCP message, written as its first byte on the wire.
type Type byte

// The three message types.
const (
	TypeRequest Type = '?'
	TypeReply   Type = '!'
	TypeInform  Type = '#'
)

// String returns "request", "reply" or "inform".
func (t Type) String() string {
	switch t {
	case TypeRequest:
		return "request"
	case TypeReply:
		return "reply"
	case TypeInform:
		return "inform"
	}
	return fmt.Sprintf("Type(%#x)", byte(t))
}

// Valid reports whether t is one of the three message types.
func (t Type) Valid() bool {
	return t == TypeRequest || t == TypeReply || t == TypeInform
}

// MaxMID is the largest message identifier KATCP allows (2^31-1).
const MaxMID = 1<<31 - 1

// Message is one KATCP message.
//
// MID is the message identifier, 1..MaxMID, or 0 when the message has none.
// Args hold the unescaped argument bytes; they need not be UTF-8.
//
// A Message returned by a Reader borrows the Reader's memory (see
// Reader.ReadMessage); Clone makes an independent copy.
type Message struct {
	Type Type
	Name string
	MID  int
	Args [][]byte
}

// Sentinel errors for invalid message fields. Constructors and
// AppendMessage wrap them with the offending value.
var (
	ErrBadType = errors.New("katcp: message type must be '?', '!' or '#'")
	ErrBadName = errors.New("katcp: message name must be a letter followed by letters, digits or '-'")
	ErrBadMID  = errors.New("katcp: message id must be 1..2147483647 without leading zeros")
)

// NewMessage builds a message of type t. Each argument is converted with
// AppendArg, so it may be a string, []byte, a number, a bool, a time.Time,
// an Address, a Status and the other types AppendArg documents. mid is 0 for
// none or 1..MaxMID. All arguments share one allocation.
func NewMessage(t Type, name string, mid int, args ...any) (Message, error) {
	return newMessage(t, name, mid, "", args)
}

// newMessage is NewMessage with an optional first argument (a reply's
// status) that saves the caller building a new argument list.
func newMessage(t Type, name string, mid int, first string, args []any) (Message, error) {
	m := Message{Type: t, Name: name, MID: mid}
	if err := m.Validate(); err != nil {
		return Message{}, err
	}
	n := len(args)
	if first != "" {
		n++
	}
	if n == 0 {
		return m, nil
	}
	var endsBuf [16]int
	ends := endsBuf[:0]
	if n > len(endsBuf) {
		ends = make([]int, 0, n)
	}
	var data []byte
	m.Args, data = newArgs(n, len(first)+8*len(args)) // appending past the estimate reallocates data
	if first != "" {
		data = append(data, first...)
		ends = append(ends, len(data))
	}
	for i, a := range args {
		var err error
		data, err = AppendArg(data, a)
		if err != nil {
			return Message{}, fmt.Errorf("katcp: %s %s argument %d: %w", t, name, i+1, err)
		}
		ends = append(ends, len(data))
	}
	start := 0
	for i, end := range ends {
		m.Args[i] = data[start:end:end]
		start = end
	}
	return m, nil
}

// NewRequest builds a request without a message id. See NewMessage.
func NewRequest(name string, args ...any) (Message, error) {
	return NewMessage(TypeRequest, name, 0, args...)
}

// NewReply builds a reply without a message id. The first argument is
// normally "ok", "fail" or "invalid". See NewMessage.
func NewReply(name string, args ...any) (Message, error) {
	return NewMessage(TypeReply, name, 0, args...)
}

// NewInform builds an inform without a message id. See NewMessage.
func NewInform(name string, args ...any) (Message, error) {
	return NewMessage(TypeInform, name, 0, args...)
}

// Validate reports whether the type, name and message id are valid.
func (m *Message) Validate() error {
	if !m.Type.Valid() {
		return fmt.Errorf("%w: got %q", ErrBadType, byte(m.Type))
	}
	if !ValidName(m.Name) {
		return fmt.Errorf("%w: got %q", ErrBadName, m.Name)
	}
	if m.MID < 0 || m.MID > MaxMID {
		return fmt.Errorf("%w: got %d", ErrBadMID, m.MID)
	}
	return nil
}

// ValidName reports whether name is a valid message name: an ASCII letter
// followed by ASCII letters, digits and '-'.
func ValidName(name string) bool {
	if name == "" || !isAlpha(name[0]) {
		return false
	}
	for i := 1; i < len(name); i++ {
		if c := name[i]; !isAlpha(c) && !isDigit(c) && c != '-' {
			return false
		}
	}
	return true
}

func isAlpha(c byte) bool { return c|0x20 >= 'a' && c|0x20 <= 'z' }
func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// Clone returns a deep copy of m whose arguments share new memory: one
// allocation for a small message (most informs and requests), two otherwise.
func (m Message) Clone() Message {
	if m.Args == nil {
		return m
	}
	n := 0
	for _, a := range m.Args {
		n += len(a)
	}
	args, data := newArgs(len(m.Args), n)
	for i, a := range m.Args {
		start := len(data)
		data = append(data, a...)
		args[i] = data[start:len(data):len(data)]
	}
	m.Args = args
	return m
}

// Small messages keep their argument list and bytes in one allocation.
type (
	argStore2 struct {
		args [2][]byte
		data [32]byte
	}
	argStore6 struct {
		args [6][]byte
		data [64]byte
	}
)

// newArgs returns an argument list of length n and an empty buffer of
// capacity size for the arguments' bytes, together when they are small.
func newArgs(n, size int) ([][]byte, []byte) {
	switch {
	case n <= 2 && size <= 32:
		s := new(argStore2)
		return s.args[:n:n], s.data[:0]
	case n <= 6 && size <= 64:
		s := new(argStore6)
		return s.args[:n:n], s.data[:0]
	}
	return make([][]byte, n), make([]byte, 0, size)
}

// Arg returns argument i as a string, or "" when there is no such argument.
func (m *Message) Arg(i int) string {
	if i < 0 || i >= len(m.Args) {
		return ""
	}
	return string(m.Args[i])
}

// String returns the message in its wire form without the final newline.
// Invalid names and ids are written as they are.
func (m Message) String() string {
	b := appendMessage(nil, &m)
	return string(b[:len(b)-1])
}

// Equal reports whether m and o have the same type, name, id and arguments.
// A nil argument list equals an empty one.
func (m *Message) Equal(o *Message) bool {
	if m.Type != o.Type || m.Name != o.Name || m.MID != o.MID || len(m.Args) != len(o.Args) {
		return false
	}
	for i := range m.Args {
		if string(m.Args[i]) != string(o.Args[i]) {
			return false
		}
	}
	return true
}
