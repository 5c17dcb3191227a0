package katcp

import (
	"math"
	"strconv"
)

// AppendFloat appends f written as Python's repr writes floats, which is what
// both Python KATCP libraries send: the shortest digits that read back
// exactly, fixed notation for decimal exponents -4..15 with ".0" on
// integral values, otherwise scientific notation with a signed exponent of
// at least two digits; "nan", "inf" and "-inf" for the special values.
// Examples: 0.0, 234.5, 123456789.0, 1e+20, 1.5e-07.
func AppendFloat(dst []byte, f float64) []byte {
	switch {
	case math.IsNaN(f):
		return append(dst, "nan"...)
	case math.IsInf(f, 1):
		return append(dst, "inf"...)
	case math.IsInf(f, -1):
		return append(dst, "-inf"...)
	}
	// strconv gives "-d.ddde±XX" with the shortest digits.
	var tmp [32]byte
	s := strconv.AppendFloat(tmp[:0], f, 'e', -1, 64)
	if s[0] == '-' {
		dst = append(dst, '-')
		s = s[1:]
	}
	e := 0
	for i, c := range s {
		if c == 'e' {
			e = i
			break
		}
	}
	exp := 0
	for _, c := range s[e+2:] {
		exp = exp*10 + int(c-'0')
	}
	if s[e+1] == '-' {
		exp = -exp
	}
	var digs [24]byte
	d := append(digs[:0], s[0])
	if e > 1 {
		d = append(d, s[2:e]...) // skip the '.'
	}
	if exp < -4 || exp > 15 {
		dst = append(dst, d[0])
		if len(d) > 1 {
			dst = append(dst, '.')
			dst = append(dst, d[1:]...)
		}
		dst = append(dst, 'e')
		if exp < 0 {
			dst = append(dst, '-')
			exp = -exp
		} else {
			dst = append(dst, '+')
		}
		if exp < 10 {
			dst = append(dst, '0')
		}
		return strconv.AppendInt(dst, int64(exp), 10)
	}
	if exp < 0 {
		dst = append(dst, '0', '.')
		for range -exp - 1 {
			dst = append(dst, '0')
		}
		return append(dst, d...)
	}
	// exp >= 0: digits before the point are d[:exp+1], padded with zeros.
	if len(d) <= exp+1 {
		dst = append(dst, d...)
		for range exp + 1 - len(d) {
			dst = append(dst, '0')
		}
		return append(dst, '.', '0')
	}
	dst = append(dst, d[:exp+1]...)
	dst = append(dst, '.')
	return append(dst, d[exp+1:]...)
}

// ParseFloat parses a float the way C99's strtod reads decimal input,
// without leading spaces: an optional sign, digits with an optional point
// and optional exponent, or inf, infinity and nan in any case. Hexadecimal
// floats, digit separators and trailing bytes are errors. Values beyond
// the float64 range become ±Inf or 0, as strtod returns them.
func ParseFloat(b []byte) (float64, error) {
	if !isDecimalFloat(b) {
		return 0, valueError("float", b)
	}
	if n := len(b); n >= 3 && equalFold(b[n-3:], "nan") {
		return math.NaN(), nil // strconv refuses a signed NaN
	}
	f, err := strconv.ParseFloat(string(b), 64)
	if err != nil {
		if ne, ok := err.(*strconv.NumError); ok && ne.Err == strconv.ErrRange {
			return f, nil
		}
		return 0, valueError("float", b)
	}
	return f, nil
}

// isDecimalFloat checks the C99 decimal float syntax.
func isDecimalFloat(b []byte) bool {
	i := 0
	if i < len(b) && (b[i] == '+' || b[i] == '-') {
		i++
	}
	switch rest := b[i:]; {
	case equalFold(rest, "inf"), equalFold(rest, "infinity"), equalFold(rest, "nan"):
		return true
	}
	digits := 0
	for i < len(b) && isDigit(b[i]) {
		i++
		digits++
	}
	if i < len(b) && b[i] == '.' {
		i++
		for i < len(b) && isDigit(b[i]) {
			i++
			digits++
		}
	}
	if digits == 0 {
		return false
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		expDigits := 0
		for i < len(b) && isDigit(b[i]) {
			i++
			expDigits++
		}
		if expDigits == 0 {
			return false
		}
	}
	return i == len(b)
}

// equalFold reports whether b equals the lower-case ASCII word s in any case.
func equalFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range b {
		if b[i]|0x20 != s[i] {
			return false
		}
	}
	return true
}
