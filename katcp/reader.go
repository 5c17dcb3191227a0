package katcp

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
)

// DefaultMaxLineLength is the default limit on one line, terminator
// included: 2 MiB, as in the Python KATCP libraries.
const DefaultMaxLineLength = 2 << 20

// Sentinel errors wrapped by *ParseError.
var (
	ErrBadEscape    = errors.New("katcp: invalid escape sequence")
	ErrBadCharacter = errors.New("katcp: raw NUL or ESC byte in message")
	ErrLineTooLong  = errors.New("katcp: line too long")
	// ErrBadType, ErrBadName and ErrBadMID (see message.go) are also
	// wrapped by *ParseError. An input that ends in the middle of a line
	// yields a *ParseError wrapping io.ErrUnexpectedEOF.
)

// ParseError describes one malformed line. The Reader skips the line and
// goes on with the next one.
type ParseError struct {
	Offset int64  // byte offset of the start of the line in the stream
	Column int    // byte offset of the offending byte within the line
	Line   []byte // the start of the line (at most 64 bytes), raw
	Err    error  // ErrBadType, ErrBadName, ErrBadMID, ErrBadEscape, ErrBadCharacter, ErrLineTooLong or io.ErrUnexpectedEOF
}

// excerptLen bounds ParseError.Line.
const excerptLen = 64

func (e *ParseError) Error() string {
	return fmt.Sprintf("katcp: malformed line at byte %d, column %d: %s: %q",
		e.Offset, e.Column, strings.TrimPrefix(e.Err.Error(), "katcp: "), e.Line)
}

func (e *ParseError) Unwrap() error { return e.Err }

// Reader reads KATCP messages from a byte stream, one at a time.
//
// It follows the KATCP v5.1 grammar: a line ends at LF or CR; empty and
// whitespace-only lines are skipped silently; a malformed line yields one
// *ParseError and reading resumes at the next line. A line longer than the
// limit (terminator included) yields a *ParseError wrapping ErrLineTooLong
// as soon as the limit is reached; the rest of that line is discarded.
// The Reader's memory stays proportional to the limit whatever the input:
// its buffers never exceed the limit, and the argument index of one line
// is at most 12 times the limit (a line of one-byte arguments).
//
// A Reader is not safe for concurrent use.
type Reader struct {
	rd      io.Reader
	maxLine int
	buf     []byte // buf[start:end] is unread input
	start   int
	end     int
	scanned int   // buf[start:start+scanned] holds no terminator
	off     int64 // stream offset of buf[0]
	skip    bool  // discarding the rest of an over-long line
	err     error // sticky error from rd
	args    [][]byte
	data    []byte // unescaped arguments that contained escapes
	names   map[string]string
	// beforeFill, when set, runs before each read from the stream (when no
	// complete line is buffered, so the read may block).
	beforeFill func()
}

const (
	initialBufSize = 4 << 10
	maxNames       = 1024 // interned message names
	maxNameLen     = 64   // longest name that is interned
)

// NewReader returns a Reader with the default line limit.
func NewReader(rd io.Reader) *Reader {
	return NewReaderSize(rd, DefaultMaxLineLength)
}

// NewReaderSize returns a Reader whose lines, terminator included, may be
// at most maxLine bytes. A maxLine below 2 is raised to 2.
func NewReaderSize(rd io.Reader, maxLine int) *Reader {
	if maxLine < 2 {
		maxLine = 2
	}
	return &Reader{rd: rd, maxLine: maxLine, names: make(map[string]string)}
}

// Buffered returns how many bytes have been read from the stream but not
// yet returned as messages.
func (r *Reader) Buffered() int { return r.end - r.start }

// MaxLineLength returns the Reader's line limit.
func (r *Reader) MaxLineLength() int { return r.maxLine }

// ReadMessage returns the next message.
//
// The returned message's Args point into the Reader's buffers and stay
// valid only until the next call; Clone the message to keep it. Name is an
// ordinary string.
//
// Errors: a *ParseError for a malformed line (call again for the next
// line); io.EOF at the end of the input; otherwise the error of the
// underlying reader, which is returned again by every later call.
func (r *Reader) ReadMessage() (Message, error) {
	for {
		line, lineOff, err := r.readLine()
		if err != nil {
			return Message{}, err
		}
		if isBlank(line) {
			continue
		}
		m, col, err := r.parse(line)
		if err != nil {
			return Message{}, newParseError(lineOff, col, line, err)
		}
		return m, nil
	}
}

func newParseError(off int64, col int, line []byte, err error) *ParseError {
	n := min(len(line), excerptLen)
	return &ParseError{Offset: off, Column: col, Line: bytes.Clone(line[:n]), Err: err}
}

func isBlank(line []byte) bool {
	for _, c := range line {
		if c != ' ' && c != '\t' {
			return false
		}
	}
	return true
}

// readLine returns the next line without its terminator, and the stream
// offset of its first byte. The line is valid until the next call.
func (r *Reader) readLine() ([]byte, int64, error) {
	for {
		if i := r.findEOL(); i >= 0 {
			line := r.buf[r.start : r.start+i]
			lineOff := r.off + int64(r.start)
			r.start += i + 1
			r.scanned = 0
			if r.skip {
				r.skip = false
				continue
			}
			return line, lineOff, nil
		}
		n := r.end - r.start
		if !r.skip && n >= r.maxLine {
			// maxLine bytes and no terminator among them: the line,
			// terminator included, cannot fit.
			line := r.buf[r.start:r.end]
			lineOff := r.off + int64(r.start)
			r.discard()
			r.skip = true
			return nil, 0, newParseError(lineOff, r.maxLine, line, ErrLineTooLong)
		}
		if r.skip {
			r.discard()
		}
		if r.err != nil {
			if r.skip || r.start == r.end {
				return nil, 0, r.err
			}
			line := r.buf[r.start:r.end]
			lineOff := r.off + int64(r.start)
			r.discard()
			if r.err == io.EOF {
				if isBlank(line) {
					return nil, 0, io.EOF
				}
				return nil, 0, newParseError(lineOff, len(line), line, io.ErrUnexpectedEOF)
			}
			return nil, 0, r.err
		}
		if r.beforeFill != nil {
			r.beforeFill()
		}
		r.fill()
	}
}

// findEOL returns the index of the first LF or CR in the unread input, or
// -1. It remembers how far it has looked so that a long line arriving in
// small pieces is scanned once.
func (r *Reader) findEOL() int {
	seg := r.buf[r.start+r.scanned : r.end]
	lf := bytes.IndexByte(seg, '\n')
	if lf >= 0 {
		seg = seg[:lf]
	}
	if cr := bytes.IndexByte(seg, '\r'); cr >= 0 {
		return r.scanned + cr
	}
	if lf >= 0 {
		return r.scanned + lf
	}
	r.scanned += len(seg)
	return -1
}

// discard drops the unread input (used for over-long and final lines).
func (r *Reader) discard() {
	r.off += int64(r.end)
	r.start, r.end, r.scanned = 0, 0, 0
}

// fill reads more input, compacting or growing the buffer first. The
// buffer never grows beyond maxLine bytes.
func (r *Reader) fill() {
	if r.start > 0 {
		n := copy(r.buf, r.buf[r.start:r.end])
		r.off += int64(r.start)
		r.start, r.end = 0, n
	}
	if r.end == len(r.buf) {
		size := max(initialBufSize, 2*len(r.buf))
		size = min(size, r.maxLine)
		nb := make([]byte, size)
		copy(nb, r.buf[:r.end])
		r.buf = nb
	}
	for range 100 {
		n, err := r.rd.Read(r.buf[r.end:])
		if n < 0 || n > len(r.buf)-r.end {
			r.err = errors.New("katcp: reader returned invalid count")
			return
		}
		r.end += n
		if err != nil {
			r.err = err
			return
		}
		if n > 0 {
			return
		}
	}
	r.err = io.ErrNoProgress
}

// class holds, for each byte, how the argument scanner treats it.
var class = [256]byte{
	' ':  clsSpace,
	'\t': clsSpace,
	'\\': clsEscape,
	0:    clsBad,
	0x1b: clsBad,
}

const (
	clsPlain = iota
	clsSpace
	clsEscape
	clsBad
)

// unescape maps the letter after a backslash to the byte it stands for;
// '@' is handled separately and 0 marks an invalid escape.
var unescape = [256]byte{
	'\\': '\\',
	'_':  ' ',
	'0':  0,
	'n':  '\n',
	'r':  '\r',
	'e':  0x1b,
	't':  '\t',
}

// validEscape marks the letters allowed after a backslash.
var validEscape = [256]bool{'\\': true, '_': true, '0': true, 'n': true, 'r': true, 'e': true, 't': true, '@': true}

// parse parses one non-blank line. On error it returns the column of the
// offending byte.
func (r *Reader) parse(line []byte) (Message, int, error) {
	var m Message
	m.Type = Type(line[0])
	if !m.Type.Valid() {
		return m, 0, ErrBadType
	}
	i := 1
	for i < len(line) && (isAlpha(line[i]) || isDigit(line[i]) || line[i] == '-') {
		i++
	}
	if i == 1 || !isAlpha(line[1]) {
		return m, 1, ErrBadName
	}
	name := line[1:i]
	if i < len(line) && line[i] == '[' {
		mid, n, ok := parseMID(line[i:])
		if !ok {
			return m, i, ErrBadMID
		}
		m.MID = mid
		i += n
	}
	if i < len(line) && class[line[i]] != clsSpace {
		if m.MID != 0 {
			return m, i, ErrBadMID
		}
		return m, i, ErrBadName
	}
	args, col, err := r.parseArgs(line, i)
	if err != nil {
		return m, col, err
	}
	m.Name = r.intern(name)
	m.Args = args
	return m, 0, nil
}

// parseMID parses "[n]" at the start of b and returns n and the length of
// the bracketed text.
func parseMID(b []byte) (mid, n int, ok bool) {
	i := 1
	for i < len(b) && isDigit(b[i]) {
		mid = mid*10 + int(b[i]-'0')
		if mid > MaxMID {
			return 0, 0, false
		}
		i++
	}
	if i == 1 || i >= len(b) || b[i] != ']' || b[1] == '0' {
		return 0, 0, false
	}
	return mid, i + 1, true
}

// parseArgs splits line[i:] into arguments. Arguments without escapes
// point into line; the others are unescaped into r.data, which is sized
// up front so that it never moves while a line is parsed.
func (r *Reader) parseArgs(line []byte, i int) ([][]byte, int, error) {
	args := r.args[:0]
	if cap(r.data) < len(line) {
		r.data = make([]byte, 0, len(line))
	}
	data := r.data[:0]
	for {
		for i < len(line) && class[line[i]] == clsSpace {
			i++
		}
		if i == len(line) {
			break
		}
		start := i
		escaped := false
		for i < len(line) {
			c := class[line[i]]
			if c == clsPlain {
				i++
				continue
			}
			if c == clsSpace {
				break
			}
			if c == clsBad {
				return nil, i, ErrBadCharacter
			}
			if i+1 >= len(line) || !validEscape[line[i+1]] {
				return nil, i, ErrBadEscape
			}
			escaped = true
			i += 2
		}
		if !escaped {
			args = append(args, line[start:i:i])
			continue
		}
		from := len(data)
		for j := start; j < i; j++ {
			c := line[j]
			if c != '\\' {
				data = append(data, c)
				continue
			}
			j++
			if line[j] != '@' {
				data = append(data, unescape[line[j]])
			}
		}
		args = append(args, data[from:len(data):len(data)])
	}
	r.args = args
	if len(args) == 0 {
		return nil, 0, nil
	}
	return args, 0, nil
}

// intern returns name as a string, reusing earlier strings for names seen
// before so that steady traffic does not allocate.
func (r *Reader) intern(name []byte) string {
	if s, ok := r.names[string(name)]; ok {
		return s
	}
	s := string(name)
	if r.names != nil && len(name) <= maxNameLen && len(r.names) < maxNames {
		r.names[s] = s
	}
	return s
}

// ParseMessage parses one line, with or without its final LF or CR, into a
// message that owns its memory. It is a convenience for tests and tools;
// use a Reader for streams.
func ParseMessage(line []byte) (Message, error) {
	line = bytes.TrimSuffix(line, []byte{'\n'})
	line = bytes.TrimSuffix(line, []byte{'\r'})
	if i := bytes.IndexAny(line, "\r\n"); i >= 0 {
		return Message{}, newParseError(0, i, line, fmt.Errorf("%w: line terminator inside the message", ErrBadCharacter))
	}
	if isBlank(line) {
		return Message{}, newParseError(0, 0, line, fmt.Errorf("%w: empty line", ErrBadType))
	}
	var r Reader
	m, col, err := r.parse(line)
	if err != nil {
		return Message{}, newParseError(0, col, line, err)
	}
	return m.Clone(), nil
}
