package katcp

import (
	"context"
	"errors"
	"net/netip"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func TestClientSensorRequests(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, aiokatcpHello)

		type listResult struct {
			list []SensorInfo
			err  error
		}
		lch := make(chan listResult, 1)
		go func() {
			l, err := c.SensorList(context.Background(), "/pump/")
			lch <- listResult{l, err}
		}()
		d.expect("?sensor-list[1] /pump/\n")
		d.send("#sensor-list[1] pump.speed Pump\\_speed rpm float 0.0 3000.0\n" +
			"#sensor-list[1] pump.mode Mode \\@ discrete idle run\n!sensor-list[1] ok 2\n")
		lr := <-lch
		want := []SensorInfo{
			{Name: "pump.speed", Description: "Pump speed", Units: "rpm", Type: SensorFloat, Params: []string{"0.0", "3000.0"}},
			{Name: "pump.mode", Description: "Mode", Units: "", Type: SensorDiscrete, Params: []string{"idle", "run"}},
		}
		if lr.err != nil || !reflect.DeepEqual(lr.list, want) {
			t.Fatalf("SensorList = %+v, %v", lr.list, lr.err)
		}

		type valueResult struct {
			r   Reading
			err error
		}
		vch := make(chan valueResult, 1)
		go func() {
			r, err := c.SensorValue(context.Background(), "pump.speed")
			vch <- valueResult{r, err}
		}()
		d.expect("?sensor-value[2] pump.speed\n")
		d.send("#sensor-value[2] 1700000000.5 1 pump.speed warn 2900.5\n!sensor-value[2] ok 1\n")
		vr := <-vch
		if vr.err != nil || vr.r.Status != StatusWarn || string(vr.r.Value) != "2900.5" || !vr.r.Timestamp.Equal(time.Unix(1700000000, 5e8)) {
			t.Fatalf("SensorValue = %+v, %v", vr.r, vr.err)
		}
		v, err := want[0].Decode(vr.r.Value, false)
		if err != nil || v != 2900.5 {
			t.Errorf("Decode = %v, %v", v, err)
		}
		if _, err := want[1].Decode([]byte("stop"), false); !errors.Is(err, ErrBadValue) {
			t.Errorf("discrete outside its values: %v", err)
		}

		// Bulk sampling with B.
		ech := make(chan error, 1)
		go func() {
			ech <- c.SetSampling(context.Background(), []string{"a", "b"}, StrategyPeriod, 500*time.Millisecond)
		}()
		d.expect("?sensor-sampling[3] a,b period 0.5\n")
		d.send("!sensor-sampling[3] ok a,b period 0.5\n")
		if err := <-ech; err != nil {
			t.Fatal(err)
		}
		if err := c.SetSampling(context.Background(), []string{"a"}, StrategyPeriod); !errors.Is(err, ErrBadValue) {
			t.Errorf("missing period: %v", err)
		}
	})
}

func TestClientSetSamplingWithoutBulk(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, cLibraryV4Hello)
		ech := make(chan error, 1)
		go func() {
			ech <- c.SetSampling(context.Background(), []string{"a", "b"}, StrategyPeriod, 0.25)
		}()
		d.expect("?sensor-sampling a period 250.0\n") // v4: milliseconds
		d.send("!sensor-sampling ok a period 250\n")
		d.expect("?sensor-sampling b period 250.0\n")
		d.send("!sensor-sampling fail unknown\\_sensor\n")
		if err := <-ech; !errors.Is(err, ErrFail) {
			t.Errorf("err = %v", err)
		}
		if err := c.SetSampling(context.Background(), []string{"a"}, StrategyEventRate, 1, 2); !errors.Is(err, ErrBadValue) {
			t.Errorf("event-rate on v4: %v", err)
		}
	})
}

func TestParseReadings(t *testing.T) {
	args := func(s string) [][]byte {
		m, err := ParseMessage([]byte("#sensor-status " + s))
		if err != nil {
			t.Fatal(err)
		}
		return m.Args
	}
	rs, err := ParseReadings(args("1700000000.25 2 a nominal 1 b unreachable \\@"), false)
	if err != nil || len(rs) != 2 || rs[1].Name != "b" || rs[1].Status != StatusUnreachable || len(rs[1].Value) != 0 {
		t.Fatalf("%+v, %v", rs, err)
	}
	rs, err = ParseReadings(args("1700000000250 1 a nominal 1"), true)
	if err != nil || !rs[0].Timestamp.Equal(time.Unix(1700000000, 25e7)) {
		t.Fatalf("v4: %+v, %v", rs, err)
	}
	for _, bad := range []string{"1.0", "x 1 a nominal 1", "1.0 2 a nominal 1", "1.0 1 a great 1", "1.0 -1",
		"0.0 6148914691236517206 a b", "0.0 9223372036854775807 a b c"} { // counts whose 3*n overflows
		if _, err := ParseReadings(args(bad), false); !errors.Is(err, ErrBadValue) {
			t.Errorf("ParseReadings(%q) error = %v", bad, err)
		}
	}
}

func TestDecodeSensorValue(t *testing.T) {
	tests := []struct {
		typ  SensorType
		raw  string
		v4   bool
		want any
	}{
		{SensorInteger, "-5", false, int64(-5)},
		{SensorFloat, "1e+20", false, 1e20},
		{SensorBoolean, "1", false, true},
		{SensorDiscrete, "run", false, "run"},
		{SensorLRU, "error", false, "error"},
		{SensorString, "\xff x", false, []byte("\xff x")},
		{SensorTimestamp, "1700000000.5", false, time.Unix(1700000000, 5e8).UTC()},
		{SensorTimestamp, "1700000000500", true, time.Unix(1700000000, 5e8).UTC()},
		{SensorAddress, "[::1]:7147", false, Address{Addr: netip.MustParseAddr("::1"), Port: 7147, HasPort: true}},
	}
	for _, tt := range tests {
		got, err := DecodeSensorValue(tt.typ, nil, []byte(tt.raw), tt.v4)
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("DecodeSensorValue(%v, %q) = %#v, %v; want %#v", tt.typ, tt.raw, got, err, tt.want)
		}
	}
	if _, err := DecodeSensorValue(SensorBoolean, nil, []byte("true"), false); !errors.Is(err, ErrBadValue) {
		t.Errorf("bad boolean: %v", err)
	}
}

func TestSensorWatcher(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, fn := connect(t, ClientConfig{}, aiokatcpHello)
		var mu sync.Mutex
		var updates, states []string
		w := c.Watch(WatchConfig{
			Names:    []string{"b", "a"},
			Strategy: StrategyEvent,
			OnUpdate: func(u SensorUpdate) {
				mu.Lock()
				updates = append(updates, u.Name+"="+u.Status.String()+":"+formatAny(u.Value))
				mu.Unlock()
			},
			OnSync: func(s SyncState) {
				mu.Lock()
				states = append(states, s.String())
				mu.Unlock()
			},
		})
		defer w.Close()
		subscribe := func(d *fakeDevice) {
			d.expect("?sensor-list[1] b\n")
			d.send("#sensor-list[1] b B \\@ boolean\n!sensor-list[1] ok 1\n")
			d.expect("?sensor-list[2] a\n")
			d.send("#sensor-list[2] a A V integer 0 10\n!sensor-list[2] ok 1\n")
			d.expect("?sensor-sampling[3] a,b event\n")
			d.send("#sensor-status 1700000000.0 1 a nominal 5\n#sensor-status 1700000000.0 1 b nominal 1\n!sensor-sampling[3] ok a,b event\n")
		}
		subscribe(d)
		if err := w.WaitSynced(context.Background()); err != nil {
			t.Fatal(err)
		}
		// Synced comes after the readings that came before the reply.
		if a, b := mustLast(t, w, "a"), mustLast(t, w, "b"); a.Value != int64(5) || b.Value != true {
			t.Errorf("when synced, a = %v and b = %v; want 5 and true", a.Value, b.Value)
		}
		// Updates for other sensors are ignored; several readings per
		// inform are split.
		d.send("#sensor-status 1700000001.0 2 zzz nominal 1 b warn 0\n")
		if err := w.WaitFor(context.Background(), "b", func(u SensorUpdate) bool { return u.Value == false }); err != nil {
			t.Fatal(err)
		}
		if u, _ := w.Last("a"); u.Value != int64(5) || u.Type != SensorInteger {
			t.Errorf("Last(a) = %+v", u)
		}

		// Disconnect: unreachable, then a new subscription on reconnect.
		d.conn.Close()
		d2 := fn.accept()
		synctest.Wait()
		if u, _ := w.Last("a"); u.Status != StatusUnreachable || u.Value != nil {
			t.Errorf("after disconnect Last(a) = %+v", u)
		}
		d2.send(aiokatcpHello)
		subscribe(d2)
		if err := w.WaitFor(context.Background(), "a", func(u SensorUpdate) bool { return u.Status == StatusNominal }); err != nil {
			t.Fatal(err)
		}
		// #interface-changed: subscribe again.
		d2.send("#interface-changed sensor-list\n")
		d2.expect("?sensor-list[4] b\n")
		d2.send("#sensor-list[4] b B \\@ boolean\n!sensor-list[4] ok 1\n")
		d2.expect("?sensor-list[5] a\n")
		d2.send("!sensor-list[5] fail unknown\\_sensor\n") // skipped: b is still watched
		d2.expect("?sensor-sampling[6] b event\n")
		d2.send("!sensor-sampling[6] fail busy\n")
		synctest.Wait()
		if s, err := w.State(); s != Unsynced || !errors.Is(err, ErrFail) {
			t.Errorf("state after a failed resync = %v, %v", s, err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := w.WaitFor(ctx, "nothing", func(SensorUpdate) bool { return true }); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("WaitFor on a silent sensor: %v", err)
		}
		w.Close()
		synctest.Wait()
		mu.Lock()
		defer mu.Unlock()
		wantUpdates := "a=nominal:5 b=nominal:true b=warn:false a=unreachable:<nil> b=unreachable:<nil> a=nominal:5 b=nominal:true"
		if got := strings.Join(updates, " "); got != wantUpdates {
			t.Errorf("updates:\n got %s\nwant %s", got, wantUpdates)
		}
		wantStates := "syncing synced unsynced syncing synced syncing unsynced closed"
		if got := strings.Join(states, " "); got != wantStates {
			t.Errorf("states: got %s, want %s", got, wantStates)
		}
	})
}

func formatAny(v any) string {
	switch v := v.(type) {
	case nil:
		return "<nil>"
	case int64:
		return strconv.FormatInt(v, 10)
	case bool:
		if v {
			return "true"
		}
		return "false"
	}
	return "?"
}

func TestSensorWatcherSelectV4WithoutBulk(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{}, cLibraryV4Hello)
		w := c.Watch(WatchConfig{Select: func(info SensorInfo) bool { return info.Type == SensorTimestamp }})
		defer w.Close()
		d.expect("?sensor-list\n")
		d.send("#sensor-list t1 T \\@ timestamp\n#sensor-list n N \\@ integer\n#sensor-list t2 T \\@ timestamp\n!sensor-list ok 3\n")
		d.expect("?sensor-sampling t1 auto\n")
		d.send("#sensor-status 1700000000000 1 t1 nominal 1700000000500\n!sensor-sampling ok t1 auto\n")
		d.expect("?sensor-sampling t2 auto\n")
		d.send("!sensor-sampling ok t2 auto\n")
		if err := w.WaitSynced(context.Background()); err != nil {
			t.Fatal(err)
		}
		u, ok := w.Last("t1")
		if !ok || u.Value != time.Unix(1700000000, 5e8).UTC() || !u.Timestamp.Equal(time.Unix(1700000000, 0)) {
			t.Errorf("Last(t1) = %+v", u)
		}
		if n := len(w.Sensors()); n != 2 {
			t.Errorf("watching %d sensors, want 2", n)
		}
		// v4 ?sensor-value readings are in milliseconds too.
		ch := make(chan Reading, 1)
		go func() {
			r, _ := c.SensorValue(context.Background(), "n")
			ch <- r
		}()
		d.expect("?sensor-value n\n")
		d.send("#sensor-value 1700000000250 1 n nominal 3\n!sensor-value ok 1\n")
		if r := <-ch; !r.Timestamp.Equal(time.Unix(1700000000, 25e7)) {
			t.Errorf("v4 reading = %+v", r)
		}
	})
}

func TestClientSendAndStopped(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, _ := connect(t, ClientConfig{NoReconnect: true}, aiokatcpHello)
		m, _ := NewInform("note", "hi there")
		if err := c.Send(m); err != nil {
			t.Fatal(err)
		}
		d.expect("#note hi\\_there\n")
		if err := c.Send(Message{Type: TypeReply, Name: "bad name"}); !errors.Is(err, ErrBadName) {
			t.Errorf("Send invalid: %v", err)
		}
		select {
		case <-c.Stopped():
			t.Fatal("stopped while connected")
		default:
		}
		d.conn.Close()
		<-c.Stopped()
	})
}

func mustLast(t *testing.T, w *SensorWatcher, name string) SensorUpdate {
	t.Helper()
	u, ok := w.Last(name)
	if !ok {
		t.Fatalf("no reading of %s", name)
	}
	return u
}
