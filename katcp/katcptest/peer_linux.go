package katcptest

import (
	"net"

	"golang.org/x/sys/unix"
)

// peerClosed reports whether the other end of c has closed it (the
// socket is in CLOSE_WAIT after a FIN, or CLOSE after a reset, which a
// client that closes with unread data sends), even if the server has
// not read the end of the stream yet.
func peerClosed(c net.Conn) bool {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return false
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return false
	}
	closed := false
	raw.Control(func(fd uintptr) {
		info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		closed = err == nil && (info.State == unix.BPF_TCP_CLOSE_WAIT || info.State == unix.BPF_TCP_CLOSE)
	})
	return closed
}
