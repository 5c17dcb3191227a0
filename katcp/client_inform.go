package katcp

import (
	"fmt"
	"maps"
	"sync"
	"sync/atomic"
)

type eventKind uint8

const (
	evInform eventKind = iota
	evConnected
	evDisconnected
	evFailed
	evFunc // internal: run fn in order with the handlers
)

type event struct {
	kind eventKind
	msg  Message
	info *ProtocolInfo // evConnected (a pointer: informs, the bulk, stay small)
	err  error
	fn   func()
}

// eventQueue is the bounded queue between the read loop (and run) and the
// dispatch goroutine. Informs beyond the bound are refused; connection
// events always get in, so that callbacks see every state change.
type eventQueue struct {
	mu     sync.Mutex
	items  []event
	max    int
	closed bool
	size   atomic.Int32 // len(items), for room
	signal chan struct{}
}

func newEventQueue(max int) *eventQueue {
	return &eventQueue{max: max, signal: make(chan struct{}, 1)}
}

func (q *eventQueue) push(e event, bounded bool) bool {
	q.mu.Lock()
	if q.closed || (bounded && len(q.items) >= q.max) {
		q.mu.Unlock()
		return false
	}
	q.items = append(q.items, e)
	q.size.Store(int32(len(q.items)))
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
	return true
}

// room reports whether pending more informs would fit in the queue now,
// so that a flood of informs beyond the bound is dropped before it is
// copied. It is a hint: pushInforms applies the bound.
func (q *eventQueue) room(pending int) bool {
	return int(q.size.Load())+pending < q.max
}

// pushInforms queues ms, as many as there is room for, and returns how
// many.
func (q *eventQueue) pushInforms(ms []Message) int {
	q.mu.Lock()
	n := 0
	if !q.closed {
		n = max(min(len(ms), q.max-len(q.items)), 0)
	}
	for i := range n {
		q.items = append(q.items, event{kind: evInform, msg: ms[i]})
	}
	q.size.Store(int32(len(q.items)))
	q.mu.Unlock()
	if n > 0 {
		select {
		case q.signal <- struct{}{}:
		default:
		}
	}
	return n
}

func (q *eventQueue) pushEvent(e event) bool { return q.push(e, false) }

// close lets the consumer drain what is queued and then stop.
func (q *eventQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

// take waits for a batch of events; ok is false once the queue is closed
// and drained.
func (q *eventQueue) take(buf []event) ([]event, bool) {
	for {
		q.mu.Lock()
		if len(q.items) > 0 {
			buf = append(buf[:0], q.items...)
			clear(q.items)
			q.items = q.items[:0]
			q.size.Store(0)
			q.mu.Unlock()
			return buf, true
		}
		closed := q.closed
		q.mu.Unlock()
		if closed {
			return buf[:0], false
		}
		<-q.signal
	}
}

// informHandler is one registered handler.
type informHandler struct {
	id uint64
	h  func(Message)
}

// HandleInform registers h for asynchronous informs named name and returns
// a function that removes it. Handlers run one at a time, in arrival
// order, on the client's dispatch goroutine, never on the read loop; a
// slow handler delays the others, and informs beyond ClientConfig.
// InformQueue are dropped and counted. The client's own handling of
// #version-connect, #version, #build-state, #disconnect and #log happens
// whether or not handlers are registered for them. The Message is the
// handlers' to keep; the handlers of one name (and the client's sensor
// watchers, for #sensor-status) share it, so none may modify it.
func (c *Client) HandleInform(name string, h func(Message)) (remove func()) {
	c.mu.Lock()
	c.handlerSeq++
	e := &informHandler{id: c.handlerSeq, h: h}
	c.updateHandlersLocked(func(t *handlerTable) {
		t.byName[name] = append(t.byName[name], e)
	})
	c.mu.Unlock()
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.updateHandlersLocked(func(t *handlerTable) {
			hs := t.byName[name]
			for i, x := range hs {
				if x == e {
					t.byName[name] = append(hs[:i:i], hs[i+1:]...)
					break
				}
			}
			if len(t.byName[name]) == 0 {
				delete(t.byName, name)
			}
		})
	}
}

// HandleUnhandled sets the handler for asynchronous informs that no
// HandleInform handler takes (katcp-python's unhandled_inform). nil
// removes it.
func (c *Client) HandleUnhandled(h func(Message)) {
	c.mu.Lock()
	c.updateHandlersLocked(func(t *handlerTable) { t.unhandled = h })
	c.mu.Unlock()
}

// handlerTable is the inform handlers. It is replaced, never modified,
// so that the dispatch goroutine reads it without a lock.
type handlerTable struct {
	byName    map[string][]*informHandler
	unhandled func(Message)
}

// updateHandlersLocked replaces the handler table with a modified copy;
// c.mu is held.
func (c *Client) updateHandlersLocked(modify func(*handlerTable)) {
	old := c.handlers.Load()
	// The slices are shared with the old table: modify may append to one
	// (that writes past what the old table sees) or build a new one, but
	// never overwrites an element.
	t := &handlerTable{byName: maps.Clone(old.byName), unhandled: old.unhandled}
	modify(t)
	c.handlers.Store(t)
}

// builtinInform reports whether the client itself handles informs named
// name, so that they are not "unhandled".
func builtinInform(name string) bool {
	switch name {
	case "version-connect", "version", "build-state", "disconnect", "log":
		return true
	}
	return false
}

// dispatch runs handlers and connection callbacks, in order.
func (c *Client) dispatch() {
	defer c.wg.Done()
	var batch []event
	for {
		var ok bool
		batch, ok = c.events.take(batch)
		if !ok {
			return
		}
		for i := range batch {
			e := &batch[i]
			switch e.kind {
			case evInform:
				t := c.handlers.Load()
				hs := t.byName[e.msg.Name]
				if len(hs) == 0 && t.unhandled != nil && !builtinInform(e.msg.Name) {
					c.safely("unhandled inform", func() { t.unhandled(e.msg) })
				}
				for _, h := range hs {
					c.safely("inform handler", func() { h.h(e.msg) })
				}
			case evConnected:
				if f := c.cfg.OnConnected; f != nil {
					c.safely("OnConnected", func() { f(*e.info) })
				}
			case evDisconnected:
				if f := c.cfg.OnDisconnected; f != nil {
					c.safely("OnDisconnected", func() { f(e.err) })
				}
			case evFunc:
				c.safely("sensor watcher", e.fn)
			case evFailed:
				if f := c.cfg.OnConnectFailed; f != nil {
					c.safely("OnConnectFailed", func() { f(e.err) })
				}
			}
			*e = event{}
		}
		if f := c.cfg.AfterBatch; f != nil {
			c.safely("AfterBatch", f)
		}
	}
}

// safely runs user code, logging a panic instead of dying.
func (c *Client) safely(what string, f func()) {
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("katcp: panic in "+what, "panic", fmt.Sprint(r))
		}
	}()
	f()
}
