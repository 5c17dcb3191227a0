package bridge

import (
	"fmt"
	"testing"
)

func TestAssignSpreadsEvenlyAndMovesLittle(t *testing.T) {
	var devices []string
	for i := range 300 {
		devices = append(devices, fmt.Sprintf("m%03d", i))
	}
	three := []string{"a-1", "b-2", "c-3"}
	got := assign(devices, three)
	if len(got) != len(devices) {
		t.Fatalf("%d devices placed, want %d", len(got), len(devices))
	}
	load := map[string]int{}
	for _, r := range got {
		load[r]++
	}
	for _, r := range three {
		if load[r] != 100 {
			t.Errorf("replica %s has %d devices, want 100: %v", r, load[r], load)
		}
	}
	again := assign(devices, []string{"a-1", "b-2", "c-3"})
	for d, r := range got {
		if again[d] != r {
			t.Fatalf("not deterministic: %s on %s, then %s", d, r, again[d])
		}
	}
	// A fourth replica takes about a quarter; the others keep the rest.
	four := assign(devices, append(three, "d-4"))
	moved, toNew := 0, 0
	for d, r := range got {
		if four[d] != r {
			moved++
			if four[d] == "d-4" {
				toNew++
			}
		}
	}
	if toNew != 75 || moved > 100 {
		t.Errorf("adding a replica moved %d devices, %d to it; want 75 to it and few others", moved, toNew)
	}
	// Losing one replica moves its devices and hardly any other (the
	// bound can move a device that overflowed to its second choice back
	// to its first; replicas hand over only beyond their fair share, so
	// even that does not happen in practice).
	two := assign(devices, []string{"a-1", "b-2"})
	others := 0
	for d, r := range got {
		if r != "c-3" && two[d] != r {
			others++
		}
	}
	if others > len(devices)/20 {
		t.Errorf("%d devices of the surviving replicas moved when c-3 left", others)
	}
	if assign(devices, nil) != nil {
		t.Error("devices placed on no replica")
	}
}
