// Package bridge serves KATCP devices on NATS. It is the only package of
// the project that imports NATS and the OpenTelemetry API (never the SDK).
//
// # Parts
//
// A Bridge runs one worker per device it serves. The worker owns the
// device's katcp.Client (kept connected, with backoff), its sensor
// watchers and its publications; nothing else touches the connection. The
// bridge registers one NATS micro service, "katcp-bridge", with an
// endpoint per served device, so $SRV.PING, $SRV.INFO and $SRV.STATS work
// with standard tools (STATS carries each device's Status; the service
// metadata names the instance and replica id, each endpoint's metadata its
// device, address and owner). As devices come and go the service is
// replaced: the new one subscribes before the old one stops, so the
// devices that stay are served throughout (their STATS counters restart).
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
//	katcp.owners                     request-reply: which replica serves which
//	                                 device (JSON, Owners)
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
//	too many requests in flight                 503   -             bridge
//	not served here (moving, stopping) (*)      503   -             bridge
//	device did not answer in time               504   -             bridge
//
// (*) with the header "Katcp-Not-Served: true": the replica that got the
// request has stopped serving the device (it hands it over, or stops), or
// has just taken it and is still connecting; a retry reaches the owner.
// A device that no bridge serves has no subscriber: callers get NATS's
// "no responders" at once. natsclient returns ErrNotServed for both.
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
// # Replicas and leases
//
// Any number of bridges may serve one set of devices. With JetStream
// (Config.Leases auto or on) they share them through the key-value bucket
// KATCP_OWNERS: key "device.<name>" holds the owner's Lease, key
// "replica.<id>" each replica's heartbeat (Replica). Every lease and
// heartbeat write carries a per-message TTL (Config.LeaseTTL, default 5 s); the bucket's limit
// markers make an expiry visible to every watcher at once. A replica
//
//   - writes its heartbeat and watches the whole bucket;
//   - takes a free device with Create when the device is placed on it
//     (rendezvous hashing over the live replicas, at most ceil(N/R) per
//     replica), or when the device has stayed free for half a TTL; a
//     Create whose answer is lost is checked against the bucket (a lease
//     that is ours byte for byte is taken, not left to expire unserved);
//   - renews its leases every Config.LeaseRenew with compare-and-set on
//     the revision; a refused renewal, or a lease it could not renew for
//     TTL minus a quarter TTL (measured from when it sent the last
//     successful renewal; a timer per lease, independent of the loop),
//     makes it stop serving the device at once and close its connection,
//     before the lease can expire in the bucket; a refused renewal is
//     checked against the bucket first (a stored renewal whose answer
//     was lost in a reconnect is still ours);
//   - gives up a lease on a device it no longer serves (closed by the
//     timer, or failing to start), so that the device is taken afresh,
//     but only once its worker has closed the connection; it takes no
//     device whose previous worker is still closing. A forced stop (lost
//     lease) closes the connection first and waits for nothing before;
//   - hands a device over when it holds more than its share, has held the
//     device for two TTLs and the device is placed on a replica alive for
//     at least a TTL: it stops
//     serving (requests in flight finish), closes the connection, then
//     deletes the lease with compare-and-set; the new owner sees the
//     delete and takes the device at once;
//   - on Shutdown, does the same for every device, then deletes its
//     heartbeat.
//
// So a device has at most one bridge connection at a time, provided the
// NATS servers' clocks agree (run NTP: a lease expires by the clock of
// the stream's leader) and a replica closes a device within a quarter
// TTL. A replica takes a device again only once its previous worker for
// it has closed. Only the owner subscribes the device's request and
// status subjects and publishes its informs and sensors. A replica that
// stops serving a device keeps its endpoint for a while, answering
// 503 with Katcp-Not-Served, until another replica has served the device
// for half a renew interval (or a TTL passes): in a NATS cluster a
// request already routed to the old owner's server when it unsubscribes
// then goes to the new owner instead of being lost. A graceful hand-over
// lets requests in flight finish for at most a TTL, then cancels them
// (they get the not-served error).
//
// Every replica should be configured with the same devices: placement is
// computed over each replica's own list, so while the lists differ (a
// rolling update that adds devices) replicas may disagree about where a
// device belongs and move it more than needed (never to two owners).
//
// Without JetStream (Leases auto) or with Leases off a bridge serves every
// configured device: run one replica only.
//
// # Tracing
//
// For a request, the bridge continues the caller's trace with a server
// span "process katcp.{device}.req.{request}" and a client span
// "katcp {request}" for the KATCP hop (rpc.system=katcp, rpc.method,
// server.address, katcp.mid, katcp.status, katcp.informs); the reply
// carries the context. Spans get their attributes once started, and only
// when they are recorded: a sampler sees a span's name and kind.
//
// Published informs and sensor updates get producer spans
// ("publish katcp.{device}.sensor", "publish katcp.{device}.inform"), one
// per batch: the messages the device's connection hands over together,
// at most 256. Every message carries its batch span's context in its
// headers, so subscribers continue the trace. A batch span has
// messaging.batch.message_count when it covers several messages,
// messaging.destination.template always and messaging.destination.name
// when all its messages went to one subject (as the OpenTelemetry
// messaging conventions have it for batch publishing). A span per update
// would cost more than the update itself for devices that send thousands
// a second. Status documents get a span each. Span names are templates;
// the device and names are attributes.
//
// # Concurrency
//
// A Bridge is safe for concurrent use. Requests to one device run
// concurrently (with message ids when the device has them), up to
// Config.MaxInFlight.
package bridge
