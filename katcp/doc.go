// Package katcp implements the Karoo Array Telescope Control Protocol
// (KATCP), the line-based protocol spoken by MeerKAT-style telescope
// devices.
//
// # Codec
//
// The codec has no networking, goroutines or clocks:
//
//   - Message is one request ('?'), reply ('!') or inform ('#'): a name, an
//     optional message id and raw argument bytes. NewMessage, NewRequest,
//     NewReply and NewInform validate the name and id and format typed
//     arguments.
//   - Reader reads messages from a stream following the KATCP v5.1 grammar.
//     A malformed line is one *ParseError and reading goes on at the next
//     line; lines are bounded by a configurable limit (DefaultMaxLineLength,
//     2 MiB, terminator included). Messages borrow the Reader's buffers
//     until the next read, so steady reading does not allocate.
//   - AppendMessage formats a message into a caller's buffer without
//     allocating.
//   - Typed values both ways: ParseInt, ParseFloat/AppendFloat (written as
//     Python writes floats, like the Python KATCP libraries), ParseBool,
//     ParseDiscrete, ParseTimestamp/AppendTimestamp (v5 seconds),
//     ParseTimestampMS/AppendTimestampMS (v4 milliseconds),
//     ParseAddress/AppendAddress, Status, Strategy, SensorType and
//     ProtocolVersion. Decoding is strict; errors are *ValueError.
//
// Arguments are bytes: nothing in the package assumes UTF-8, and non-UTF-8
// bytes pass through untouched.
//
// # Client
//
// Client talks to one device: NewClient or Dial, then Request (typed
// *ReplyError for fail and invalid, ErrConnection for connection problems),
// RequestRaw, RequestStream, Go and RequestFunc; HandleInform for asynchronous informs;
// SensorList, SensorValues, SetSampling and Watch for sensors. It
// reconnects with backoff, uses message ids when the device has them, and
// runs user callbacks off its read loop. README.md in this directory maps
// the aiokatcp and katcp-python client APIs onto it.
//
// # Concurrency
//
// A Client is safe for concurrent use by many goroutines, and so is a
// SensorWatcher. Values of the codec's types are safe to share once built;
// a Reader is used by one goroutine at a time.
package katcp
