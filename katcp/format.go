package katcp

import "strconv"

// escapeCode maps each byte that must be escaped to the letter after the
// backslash; 0 means the byte is written as it is.
var escapeCode = [256]byte{
	'\\': '\\',
	' ':  '_',
	0:    '0',
	'\n': 'n',
	'\r': 'r',
	0x1b: 'e',
	'\t': 't',
}

// AppendMessage appends the wire form of m, including the final '\n', to dst
// and returns the extended buffer. It escapes exactly the seven special
// bytes (backslash, space, NUL, LF, CR, ESC, tab), writes an empty argument
// as `\@`, and separates arguments with one space. It allocates only when
// dst lacks capacity. An invalid type, name or id is an error and dst is
// returned unchanged.
func AppendMessage(dst []byte, m *Message) ([]byte, error) {
	if err := m.Validate(); err != nil {
		return dst, err
	}
	return appendMessage(dst, m), nil
}

func appendMessage(dst []byte, m *Message) []byte {
	dst = append(dst, byte(m.Type))
	dst = append(dst, m.Name...)
	if m.MID != 0 {
		dst = append(dst, '[')
		dst = strconv.AppendInt(dst, int64(m.MID), 10)
		dst = append(dst, ']')
	}
	for _, a := range m.Args {
		dst = append(dst, ' ')
		dst = AppendEscaped(dst, a)
	}
	return append(dst, '\n')
}

// AppendEscaped appends the escaped form of one argument to dst: `\@` when
// arg is empty, otherwise arg with the seven special bytes escaped.
func AppendEscaped(dst, arg []byte) []byte {
	if len(arg) == 0 {
		return append(dst, '\\', '@')
	}
	start := 0
	for i, c := range arg {
		if e := escapeCode[c]; e != 0 {
			dst = append(dst, arg[start:i]...)
			dst = append(dst, '\\', e)
			start = i + 1
		}
	}
	return append(dst, arg[start:]...)
}
