package katcp_test

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/katcp-go/katcp-bridge/katcp"
)

func ExampleReader() {
	input := "#version-connect katcp-protocol 5.1-MIB\n" +
		"?bad[0]\n" + // a malformed line is one error; reading goes on
		"!sensor-value[3] ok 1\r" +
		"#sensor-value[3] 1700000000.5 1 pump.speed nominal 12.5\n"
	r := katcp.NewReader(strings.NewReader(input))
	for {
		m, err := r.ReadMessage()
		if err == io.EOF {
			break
		}
		var pe *katcp.ParseError
		if errors.As(err, &pe) {
			fmt.Println("error:", pe.Err == katcp.ErrBadMID, pe.Column)
			continue
		}
		fmt.Printf("%s %s mid=%d args=%q\n", m.Type, m.Name, m.MID, m.Args)
	}
	// Output:
	// inform version-connect mid=0 args=["katcp-protocol" "5.1-MIB"]
	// error: true 4
	// reply sensor-value mid=3 args=["ok" "1"]
	// inform sensor-value mid=3 args=["1700000000.5" "1" "pump.speed" "nominal" "12.5"]
}

func ExampleAppendMessage() {
	m, err := katcp.NewMessage(katcp.TypeInform, "sensor-status", 0,
		time.Unix(1700000000, 250e6), 1, "pump speed", katcp.StatusNominal, 123456789.0)
	if err != nil {
		panic(err)
	}
	var buf []byte // reuse buf across messages: formatting then allocates nothing
	buf, err = katcp.AppendMessage(buf[:0], &m)
	if err != nil {
		panic(err)
	}
	fmt.Printf("%q\n", buf)

	empty := katcp.Message{Type: katcp.TypeReply, Name: "echo", MID: 9, Args: [][]byte{[]byte("ok"), {}}}
	buf, _ = katcp.AppendMessage(buf[:0], &empty)
	fmt.Printf("%q\n", buf)
	// Output:
	// "#sensor-status 1700000000.25 1 pump\\_speed nominal 123456789.0\n"
	// "!echo[9] ok \\@\n"
}

func ExampleParseProtocolVersion() {
	v, err := katcp.ParseProtocolVersion([]byte("5.1-MIBX"))
	if err != nil {
		panic(err)
	}
	fmt.Println(v.Major, v.Minor, v.Has(katcp.FlagMessageIDs), v.Has(katcp.FlagTimeoutHint), v.Flags)
	// Output: 5 1 true false MIBX
}

func ExampleAppendFloat() {
	for _, f := range []float64{0, 234.5, 123456789, 1e20, 1.5e-7} {
		fmt.Println(string(katcp.AppendFloat(nil, f)))
	}
	// Output:
	// 0.0
	// 234.5
	// 123456789.0
	// 1e+20
	// 1.5e-07
}
