// Package bridge serves KATCP devices on NATS. It is the only package of
// the project that imports NATS and the OpenTelemetry API (never the SDK).
//
// # Parts
//
// A Bridge runs one worker per configured Device. The worker owns the
// device's katcp.Client (kept connected, with backoff), its sensor
// watchers and its publications; nothing else touches the connection. The
// bridge registers one NATS micro service, "katcp-bridge", with an
// endpoint per device, so $SRV.PING, $SRV.INFO and $SRV.STATS work with
// standard tools (STATS carries each device's Status).
//
// # The contract on NATS
//
// Subjects are those of package subjects (prefix "katcp" by default):
//
//	katcp.<device>.req.<request>     request-reply
//	katcp.<device>.inform.<inform>   asynchronous informs (arguments in wire form)
//	katcp.<device>.sensor.<sensor>   sensor updates (JSON, SensorUpdate)
//	katcp.<device>.status            device state (JSON, Status), published on change;
//	                                 a request to it returns the current state
//
// Request body: the KATCP arguments as they follow the request name on the
// wire ("a\_b 3", escaped and space-separated; empty for none), so that
// `nats req katcp.m000.req.sensor-value pump.speed` works. With
// "Content-Type: application/json" the body is a JSON array of strings,
// numbers, or {"base64": "..."} for bytes that are not UTF-8.
//
// Reply body: the in-response informs, then the reply, as KATCP lines
// without message ids ("#help watchdog ...\n!help ok 12\n"). With
// "Accept: application/json" it is JSONReply: {"status", "args",
// "informs"} with the same rule for bytes. A reply larger than the NATS
// server's maximum payload is sent as several messages on the reply
// subject: every message but the last has the header "Katcp-More: 1" and
// the last carries the headers below; natsclient and katcpcmd reassemble
// them (a plain `nats req` shows the first part only).
//
// Request headers: "Katcp-Timeout" (seconds the caller will wait; it
// bounds the KATCP request, capped by Config.MaxTimeout; without it the
// device's Timeout or Config.DefaultTimeout applies), W3C "traceparent"
// and "tracestate".
//
// Reply headers: "Katcp-Status" (ok, fail, invalid, ...) whenever the
// device answered; on every failure "Nats-Service-Error" (the reason),
// "Nats-Service-Error-Code" and "Katcp-Error-Source" ("device" for the
// device's own refusal, "bridge" for the bridge's failures); the trace
// context. Failures:
//
//	situation                                   code  Katcp-Status  source
//	device replied fail                         500   fail          device
//	device replied invalid (or another code)    400   invalid       device
//	malformed body or header                    400   -             bridge
//	request denied by policy or read-only mode  403   -             bridge
//	request the device does not have (?help)    404   -             bridge
//	device not connected (answered at once)     503   -             bridge
//	too many requests in flight, shutting down  503   -             bridge
//	device did not answer in time               504   -             bridge
//
// A device that no bridge serves has no subscriber: callers get NATS's
// "no responders" at once (natsclient.ErrNotServed).
//
// Sensors listed in the device's configuration (names, /regex/ or all,
// each with a strategy; default: every sensor, event strategy) are
// subscribed with bulk sampling where the device allows, again after each
// reconnect and #interface-changed. While the device is disconnected its
// sensors are published with status "unreachable" and a null value.
//
// # Last values
//
// When the NATS system has JetStream, the bridge creates (or updates) a
// stream, KATCP_SENSORS by default, over "<prefix>.*.sensor.>" that keeps
// one message per subject: the last update of every sensor. Updates carry
// a Nats-Msg-Id (device, sensor, timestamp, status), so the copy a second
// bridge might publish is dropped. natsclient.SubscribeLastSensors reads
// it with an ordered consumer: every current value, then live updates.
// Without JetStream the bridge logs so and publishes as before.
//
// # Tracing
//
// For a request, the bridge continues the caller's trace with a server
// span "process katcp.{device}.req.{request}" and a client span
// "katcp {request}" for the KATCP hop (rpc.system=katcp, rpc.method,
// server.address, katcp.mid, katcp.status, katcp.informs); the reply
// carries the context. Each published inform, sensor update and status
// gets a producer span ("publish katcp.{device}.sensor", ...) whose context
// is in the message headers, so subscribers continue the trace. Span names
// are templates; the device and names are attributes.
//
// # Concurrency
//
// A Bridge is safe for concurrent use. Requests to one device run
// concurrently (with message ids when the device has them), up to
// Config.MaxInFlight.
package bridge
