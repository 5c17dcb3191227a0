package bridge

import (
	"encoding/json"
	"math"
	"net/netip"
	"testing"
	"time"

	"github.com/katcp-go/katcp-bridge/katcp"
)

func TestAppendSensorJSONMatchesEncodingJSON(t *testing.T) {
	ts := time.Unix(1700000000, 123456789)
	updates := []katcp.SensorUpdate{
		{Reading: katcp.Reading{Name: "pump.speed", Timestamp: ts, Status: katcp.StatusNominal}, Type: katcp.SensorFloat, Value: 12.5},
		{Reading: katcp.Reading{Name: "tiny", Timestamp: ts, Status: katcp.StatusWarn}, Type: katcp.SensorFloat, Value: 1.5e-9},
		{Reading: katcp.Reading{Name: "huge", Timestamp: ts, Status: katcp.StatusError}, Type: katcp.SensorFloat, Value: -2e25},
		{Reading: katcp.Reading{Name: "n", Timestamp: ts, Status: katcp.StatusNominal}, Type: katcp.SensorFloat, Value: math.NaN()},
		{Reading: katcp.Reading{Name: "i", Timestamp: ts, Status: katcp.StatusNominal}, Type: katcp.SensorFloat, Value: math.Inf(-1)},
		{Reading: katcp.Reading{Name: "count", Timestamp: ts, Status: katcp.StatusNominal}, Type: katcp.SensorInteger, Value: int64(-42)},
		{Reading: katcp.Reading{Name: "ok", Timestamp: ts, Status: katcp.StatusNominal}, Type: katcp.SensorBoolean, Value: true},
		{Reading: katcp.Reading{Name: "mode", Timestamp: ts, Status: katcp.StatusNominal}, Type: katcp.SensorDiscrete, Value: "track"},
		{Reading: katcp.Reading{Name: "msg", Timestamp: ts, Status: katcp.StatusNominal}, Type: katcp.SensorString, Value: []byte("a \"q\" <b>&\n\t\x01 é \u2028")},
		{Reading: katcp.Reading{Name: "raw", Timestamp: ts, Status: katcp.StatusNominal}, Type: katcp.SensorString, Value: []byte("caf\xe9")},
		{Reading: katcp.Reading{Name: "when", Timestamp: ts, Status: katcp.StatusNominal}, Type: katcp.SensorTimestamp, Value: time.Unix(1600000000, 5e8)},
		{Reading: katcp.Reading{Name: "peer", Timestamp: ts, Status: katcp.StatusNominal}, Type: katcp.SensorAddress, Value: katcp.Address{Addr: netip.MustParseAddr("::1"), Port: 7147, HasPort: true}},
		{Reading: katcp.Reading{Name: "gone", Timestamp: ts, Status: katcp.StatusUnreachable}, Type: katcp.SensorFloat},
		{Reading: katcp.Reading{Name: "mode2", Timestamp: ts, Status: katcp.StatusNominal}, Type: katcp.SensorDiscrete, Value: "caf\xe9"},
		{Reading: katcp.Reading{Name: "far", Timestamp: time.Unix(1e11, 0), Status: katcp.StatusNominal}, Type: katcp.SensorTimestamp, Value: time.Unix(1e11, 25e7)},
		{Reading: katcp.Reading{Name: "bad\xffname", Timestamp: ts, Status: katcp.StatusFailure}, Type: katcp.SensorInteger, Value: int64(1)},
	}
	for _, u := range updates {
		want, err := json.Marshal(sensorDocument("m000", u))
		if err != nil {
			t.Fatal(err)
		}
		if got := appendSensorJSON(nil, "m000", u); string(got) != string(want) {
			t.Errorf("%s:\n got %s\nwant %s", u.Name, got, want)
		}
	}
}

func BenchmarkSensorJSON(b *testing.B) {
	u := katcp.SensorUpdate{Reading: katcp.Reading{Name: "pump.speed", Timestamp: time.Now(), Status: katcp.StatusNominal}, Type: katcp.SensorFloat, Value: 12.5}
	b.Run("append", func(b *testing.B) {
		buf := make([]byte, 0, 256)
		for b.Loop() {
			buf = appendSensorJSON(buf[:0], "m000", u)
		}
	})
	b.Run("head cached", func(b *testing.B) { // as the worker does
		head := appendSensorHead(nil, "m000", u.Name, u.Type)
		buf := make([]byte, 0, 256)
		for b.Loop() {
			buf = appendSensorRest(append(buf[:0], head...), u)
		}
	})
	b.Run("encoding/json", func(b *testing.B) {
		for b.Loop() {
			json.Marshal(sensorDocument("m000", u))
		}
	})
}

func TestDecodeArgsRejectsNull(t *testing.T) {
	if _, err := DecodeArgs([]byte(`["a", null]`), true); err == nil {
		t.Error("null accepted as an argument")
	}
	args, err := DecodeArgs([]byte(`["a", "", {"base64": "/w=="}, 2.5]`), true)
	if err != nil || len(args) != 4 || string(args[2]) != "\xff" || string(args[3]) != "2.5" {
		t.Errorf("%q %v", args, err)
	}
}

func TestSecondsBeyond2262(t *testing.T) {
	if got := seconds(time.Unix(1e11, 5e8)); got != 1e11+0.5 {
		t.Errorf("seconds = %v", got)
	}
}

// sensorDocument is the published document built the slow way, with
// encoding/json, as the reference appendSensorJSON must match.
func sensorDocument(device string, u katcp.SensorUpdate) SensorUpdate {
	doc := SensorUpdate{
		Device:    device,
		Name:      u.Name,
		Type:      u.Type.String(),
		Timestamp: seconds(u.Timestamp),
		Status:    u.Status.String(),
	}
	if !u.Status.ValidValue() || u.Value == nil {
		return doc
	}
	switch v := u.Value.(type) {
	case float64:
		switch {
		case math.IsNaN(v):
			doc.Value = "nan"
		case math.IsInf(v, 1):
			doc.Value = "inf"
		case math.IsInf(v, -1):
			doc.Value = "-inf"
		default:
			doc.Value = v
		}
	case []byte:
		doc.Value = jsonArg(v)
	case string:
		doc.Value = jsonArg(v) // base64 if a discrete value is not UTF-8
	case time.Time:
		doc.Value = seconds(v)
	case katcp.Address:
		doc.Value = v.String()
	default:
		doc.Value = v
	}
	return doc
}
