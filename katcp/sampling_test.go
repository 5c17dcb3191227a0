package katcp

import (
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// at is the synctest clock's start (2000-01-01 UTC) plus d, as KATCP seconds.
func at(d time.Duration) string {
	return string(AppendTimestamp(nil, time.Unix(946684800, 0).Add(d)))
}

func status(d time.Duration, name, st, v string) string {
	return "#sensor-status " + at(d) + " 1 " + name + " " + st + " " + v + "\n"
}

func TestServerSensorListAndValue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ts := startServer(t, simConfig)
		ts.Sensors().Add(
			MustSensor(SensorFloat, "pump.speed", SensorOptions{Description: "Pump speed", Units: "rpm", Nominal: &[2]float64{0, 3000}, Warn: &[2]float64{-10, 3500}}),
			MustSensor(SensorInteger, "pump.count", SensorOptions{Nominal: &[2]float64{0, 10}}),
			MustSensor(SensorDiscrete, "mode", SensorOptions{Description: "Mode", Values: []string{"idle", "run"}}),
			MustSensor(SensorString, "note", SensorOptions{}),
		)
		p := ts.connect(3)
		p.roundTrip("?sensor-list\n",
			"#sensor-list mode Mode \\@ discrete idle run\n",
			"#sensor-list note \\@ \\@ string\n",
			"#sensor-list pump.count \\@ \\@ integer 0 10\n",
			"#sensor-list pump.speed Pump\\_speed rpm float 0.0 3000.0 -10.0 3500.0\n",
			"!sensor-list ok 4\n")
		p.roundTrip("?sensor-list /^pump[.]/\n",
			"#sensor-list pump.count \\@ \\@ integer 0 10\n",
			"#sensor-list pump.speed Pump\\_speed rpm float 0.0 3000.0 -10.0 3500.0\n",
			"!sensor-list ok 2\n")
		p.roundTrip("?sensor-list /nothing/\n", "!sensor-list ok 0\n")
		p.roundTrip("?sensor-list nope\n", "!sensor-list fail unknown\\_sensor\\_nope\n")
		p.roundTrip("?sensor-list /(/\n", "!sensor-list fail bad\\_regular\\_expression:\\_error\\_parsing\\_regexp:\\_missing\\_closing\\_):\\_`(`\n")

		speed, _ := ts.Sensors().Get("pump.speed")
		count, _ := ts.Sensors().Get("pump.count")
		note, _ := ts.Sensors().Get("note")
		time.Sleep(1500 * time.Millisecond)
		speed.Set(3200.5)
		count.Set(11)
		note.Set([]byte("hi there\xff"))
		p.roundTrip("?sensor-value\n",
			"#sensor-value "+at(0)+" 1 mode unknown idle\n",
			"#sensor-value "+at(1500*time.Millisecond)+" 1 note nominal hi\\_there\xff\n",
			"#sensor-value "+at(1500*time.Millisecond)+" 1 pump.count warn 11\n",
			"#sensor-value "+at(1500*time.Millisecond)+" 1 pump.speed warn 3200.5\n",
			"!sensor-value ok 4\n")
		speed.Set(4000)
		p.roundTrip("?sensor-value[2] pump.speed\n", "#sensor-value[2] "+at(1500*time.Millisecond)+" 1 pump.speed error 4000.0\n", "!sensor-value[2] ok 1\n")
		speed.SetReading(time.Now(), StatusFailure, nil)
		p.roundTrip("?sensor-value pump.speed\n", "#sensor-value "+at(1500*time.Millisecond)+" 1 pump.speed failure 4000.0\n", "!sensor-value ok 1\n")
		p.roundTrip("?sensor-value nope\n", "!sensor-value fail unknown\\_sensor\\_nope\n")
	})
}

// samplingServer runs a server with one float sensor "x" and one
// connected, sampling peer.
func samplingServer(t *testing.T, v4 bool) (*Sensor, *peer) {
	cfg := simConfig
	cfg.V4 = v4
	ts := startServer(t, cfg)
	x := MustSensor(SensorFloat, "x", SensorOptions{})
	x.Set(0.0)
	ts.Sensors().Add(x, MustSensor(SensorString, "s", SensorOptions{}))
	greeting := 3
	if v4 {
		greeting = 2
	}
	return x, ts.connect(greeting)
}

func TestSamplingAutoEventDifferential(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		x, p := samplingServer(t, false)
		p.roundTrip("?sensor-sampling x auto\n", status(0, "x", "nominal", "0.0"), "!sensor-sampling ok x auto\n")
		x.Set(0.0)
		x.Set(1.0)
		p.expect(status(0, "x", "nominal", "0.0"), status(0, "x", "nominal", "1.0"))

		p.roundTrip("?sensor-sampling x event\n", status(0, "x", "nominal", "1.0"), "!sensor-sampling ok x event\n")
		x.Set(1.0)                                // no change: nothing
		x.SetReading(time.Now(), StatusWarn, 1.0) // status change
		x.Set(2.0)
		p.expect(status(0, "x", "warn", "1.0"), status(0, "x", "nominal", "2.0"))

		p.roundTrip("?sensor-sampling x differential 0.5\n", status(0, "x", "nominal", "2.0"), "!sensor-sampling ok x differential 0.5\n")
		x.Set(2.4) // within 0.5 of 2.0
		x.Set(2.6) // beyond
		x.Set(2.9) // within 0.5 of 2.6
		x.Set(2.0) // beyond
		p.expect(status(0, "x", "nominal", "2.6"), status(0, "x", "nominal", "2.0"))

		p.roundTrip("?sensor-sampling x\n", "!sensor-sampling ok x differential 0.5\n")
		p.roundTrip("?sensor-sampling x none\n", "!sensor-sampling ok x none\n")
		x.Set(100.0)
		p.roundTrip("?sensor-sampling x\n", "!sensor-sampling ok x none\n")
		p.roundTrip("?sensor-sampling s differential 1\n", "!sensor-sampling fail s:\\_strategy\\_differential\\_applies\\_only\\_to\\_integer\\_and\\_float\\_sensors,\\_not\\_string\n")
		p.roundTrip("?sensor-sampling x period\n", "!sensor-sampling fail x:\\_strategy\\_period\\_takes\\_1\\_parameters,\\_got\\_0\n")
		p.roundTrip("?sensor-sampling x period 0\n", "!sensor-sampling fail x:\\_period\\_must\\_be\\_positive\n")
		p.roundTrip("?sensor-sampling x period -1\n", "!sensor-sampling fail x:\\_strategy\\_period:\\_parameter\\_\"-1\"\\_is\\_not\\_a\\_non-negative\\_number\n")
		p.roundTrip("?sensor-sampling x fast\n", "!sensor-sampling fail x:\\_unknown\\_strategy\\_\"fast\"\n")
		p.roundTrip("?sensor-sampling x event-rate 2 1\n", "!sensor-sampling fail x:\\_shortest\\_period\\_is\\_longer\\_than\\_the\\_longest\n")
	})
}

func TestSamplingPeriod(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		x, p := samplingServer(t, false)
		p.roundTrip("?sensor-sampling x period 0.5\n", status(0, "x", "nominal", "0.0"), "!sensor-sampling ok x period 0.5\n")
		time.Sleep(700 * time.Millisecond)
		x.Set(5.0)                                 // at 0.7 s; not sent by itself
		p.expect(status(0, "x", "nominal", "0.0")) // the beat at 0.5 s
		p.expect(status(700*time.Millisecond, "x", "nominal", "5.0"))
		start := time.Now()
		p.expect(status(700*time.Millisecond, "x", "nominal", "5.0"))
		if d := time.Since(start); d != 500*time.Millisecond {
			t.Errorf("period %v", d)
		}
		p.roundTrip("?sensor-sampling x none\n", "!sensor-sampling ok x none\n")
		time.Sleep(2 * time.Second)
		if got := p.readAvailable(); got != "" {
			t.Errorf("after none: %q", got)
		}
	})
}

func TestSamplingEventRate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		x, p := samplingServer(t, false)
		p.roundTrip("?sensor-sampling x event-rate 1 3\n", status(0, "x", "nominal", "0.0"), "!sensor-sampling ok x event-rate 1 3\n")
		x.Set(1.0) // at 0: too soon after the initial update, held until 1 s
		time.Sleep(200 * time.Millisecond)
		x.Set(2.0) // replaces the held value
		if got := p.readAvailable(); got != "" {
			t.Fatalf("sent before the shortest period: %q", got)
		}
		time.Sleep(800 * time.Millisecond) // now 1 s
		if got, want := p.readAvailable(), status(200*time.Millisecond, "x", "nominal", "2.0"); got != want {
			t.Fatalf("at 1s: %q, want %q", got, want)
		}
		time.Sleep(3 * time.Second) // nothing changes: the longest period resends at 4 s
		if got, want := p.readAvailable(), status(200*time.Millisecond, "x", "nominal", "2.0"); got != want {
			t.Fatalf("at 4s: %q, want %q", got, want)
		}
		time.Sleep(1500 * time.Millisecond) // 5.5 s: a change long after the last send goes at once
		x.Set(3.0)
		if got, want := p.readAvailable(), status(5500*time.Millisecond, "x", "nominal", "3.0"); got != want {
			t.Fatalf("at 5.5s: %q, want %q", got, want)
		}
		x.Set(3.0) // no change: nothing, and no held update
		time.Sleep(2 * time.Second)
		if got := p.readAvailable(); got != "" {
			t.Fatalf("unchanged value sent: %q", got)
		}
	})
}

func TestSamplingDifferentialRate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		x, p := samplingServer(t, false)
		p.roundTrip("?sensor-sampling x differential-rate 1 0.5 0\n", status(0, "x", "nominal", "0.0"), "!sensor-sampling ok x differential-rate 1 0.5 0\n")
		time.Sleep(time.Second)
		x.Set(0.5) // under the threshold
		x.Set(1.5) // over: sent at once (last send 1 s ago)
		x.Set(3.0) // over, but within the shortest period: held
		time.Sleep(time.Second)
		want := status(time.Second, "x", "nominal", "1.5") + status(time.Second, "x", "nominal", "3.0")
		if got := p.readAvailable(); got != want {
			t.Fatalf("got %q, want %q", got, want)
		}
		time.Sleep(10 * time.Second) // longest 0: no refresh
		if got := p.readAvailable(); got != "" {
			t.Fatalf("refresh without a longest period: %q", got)
		}
	})
}

func TestSamplingBulk(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		x, p := samplingServer(t, false)
		p.roundTrip("?sensor-sampling x,s,nope event\n", "!sensor-sampling fail unknown\\_sensor\\_nope\n")
		p.roundTrip("?sensor-sampling x,s differential 1\n", "!sensor-sampling fail s:\\_strategy\\_differential\\_applies\\_only\\_to\\_integer\\_and\\_float\\_sensors,\\_not\\_string\n")
		x.Set(1.0)
		if got := p.readAvailable(); got != "" {
			t.Fatalf("a failed bulk request set something: %q", got)
		}
		p.roundTrip("?sensor-sampling x,s event\n",
			status(0, "x", "nominal", "1.0"), status(0, "s", "unknown", "\\@"),
			"!sensor-sampling ok x,s event\n")
		p.roundTrip("?sensor-sampling x,s\n", "!sensor-sampling fail querying\\_the\\_strategy\\_takes\\_one\\_sensor\\_name\n")
	})
}

func TestSamplingV4(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		x, p := samplingServer(t, true)
		p.roundTrip("?sensor-sampling x period 250\n", "#sensor-status 946684800000 1 x nominal 0.0\n", "!sensor-sampling ok x period 250\n")
		x.Set(1.0)
		p.expect("#sensor-status 946684800000 1 x nominal 1.0\n") // at 250 ms
		p.roundTrip("?sensor-sampling x none\n", "!sensor-sampling ok x none\n")
		p.roundTrip("?sensor-sampling x event-rate 1 2\n", "!sensor-sampling fail x:\\_strategy\\_event-rate\\_does\\_not\\_exist\\_in\\_KATCP\\_v4\n")
		p.roundTrip("?sensor-sampling x,s event\n", "!sensor-sampling fail bulk\\_sampling\\_is\\_not\\_available\\_in\\_KATCP\\_v4\n")
		p.roundTrip("?sensor-value x\n", "#sensor-value 946684800000 1 x nominal 1.0\n", "!sensor-value ok 1\n")
		p.roundTrip("?request-timeout-hint\n", "!request-timeout-hint invalid unknown\\_request\\_request-timeout-hint\n")
	})
}

func TestSamplingRemovedSensor(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := simConfig
		ts := startServer(t, cfg)
		x := MustSensor(SensorInteger, "x", SensorOptions{})
		ts.Sensors().Add(x)
		p := ts.connect(3)
		p.roundTrip("?sensor-sampling x auto\n", status(0, "x", "unknown", "0"), "!sensor-sampling ok x auto\n")
		ts.Sensors().Remove("x")
		x.Set(5)
		time.Sleep(time.Second)
		if got := p.readAvailable(); !strings.HasPrefix(got, "#interface-changed") || strings.Contains(got, "sensor-status") {
			t.Errorf("after removal: %q", got)
		}
	})
}
