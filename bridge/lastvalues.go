package bridge

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// DefaultLastValuesStream names the stream that keeps each sensor's last
// update.
const DefaultLastValuesStream = "KATCP_SENSORS"

// setupLastValues creates (or updates) the stream that keeps the last
// update of every sensor subject, so that a subscriber that starts late
// gets every current value first (natsclient.SubscribeSensors with
// Last). Without JetStream the bridge works on and says so.
func (b *Bridge) setupLastValues() {
	if b.cfg.NoLastValues {
		return
	}
	js, err := jetstream.New(b.nc)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		storage := jetstream.FileStorage
		if b.cfg.LastValuesMemory {
			storage = jetstream.MemoryStorage
		}
		_, err = js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
			Name:              b.lastValuesStream(),
			Description:       "katcp-bridge: the last update of every sensor",
			Subjects:          []string{b.scheme.Sensors("*")},
			MaxMsgsPerSubject: 1,
			Discard:           jetstream.DiscardOld,
			Storage:           storage,
			Replicas:          max(b.cfg.LastValuesReplicas, 1),
			Duplicates:        2 * time.Minute,
			AllowDirect:       true, // $JS.API.DIRECT.GET reads a last value without a consumer
		})
	}
	if err != nil {
		if errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, nats.ErrNoResponders) ||
			errors.Is(err, context.DeadlineExceeded) {
			b.log.Warn("JetStream is not available: sensors are published without last values", "err", err)
		} else {
			b.log.Error("could not set up the last-values stream; sensors are published without it", "err", err)
		}
		return
	}
	b.lastValues.Store(true)
	b.log.Info("sensor last values kept in JetStream", "stream", b.lastValuesStream())
}

func (b *Bridge) lastValuesStream() string {
	if b.cfg.LastValuesStream != "" {
		return b.cfg.LastValuesStream
	}
	return DefaultLastValuesStream
}

// LastValues reports whether sensor updates are kept in JetStream.
func (b *Bridge) LastValues() bool { return b.lastValues.Load() }

// msgID identifies one sensor update, so that JetStream drops the copy a
// second bridge publishes during a hand-over.
func msgID(device, sensor string, ts time.Time, status string) string {
	return device + "/" + sensor + "/" + strconv.FormatInt(ts.Unix(), 10) + "." + fmt.Sprintf("%09d", ts.Nanosecond()) + "/" + status
}
