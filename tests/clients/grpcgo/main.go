// A Go gRPC client (grpc-go) through keyhole, configured only by the environment: grpc-go
// reads HTTPS_PROXY, and crypto/x509 reads SSL_CERT_FILE on Linux. It makes one call of each
// shape to the echo.Echo service of tests/support/h2_upstream.py on raw bytes (no protobuf) and
// prints what came back, trailers included, as one JSON line.
// Usage: grpcgo <host:port> <marker>
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// raw passes messages through as bytes: the service speaks no protobuf.
type raw struct{}

func (raw) Marshal(v any) ([]byte, error)      { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(data []byte, v any) error { *(v.(*[]byte)) = append([]byte(nil), data...); return nil }
func (raw) Name() string                       { return "proto" }

type result struct {
	Unary        string            `json:"unary"`
	UnaryTrailer map[string]string `json:"unary_trailer"`
	Server       []string          `json:"server"`
	Client       string            `json:"client"`
	Bidi         []string          `json:"bidi"`
	FailCode     string            `json:"fail_code"`
	FailMessage  string            `json:"fail_message"`
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func main() {
	target, marker := os.Args[1], os.Args[2]
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{})),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(raw{})))
	check(err)
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "x-marker", marker)
	var out result

	var trailer metadata.MD
	in, reply := []byte("hello"), []byte(nil)
	check(conn.Invoke(ctx, "/echo.Echo/Unary", &in, &reply, grpc.Trailer(&trailer)))
	out.Unary = string(reply)
	out.UnaryTrailer = map[string]string{}
	for k, v := range trailer {
		out.UnaryTrailer[k] = v[0]
	}

	desc := &grpc.StreamDesc{ServerStreams: true}
	stream, err := conn.NewStream(ctx, desc, "/echo.Echo/ServerStream")
	check(err)
	count := []byte("3")
	check(stream.SendMsg(&count))
	check(stream.CloseSend())
	for {
		var part []byte
		if err := stream.RecvMsg(&part); err == io.EOF {
			break
		} else {
			check(err)
		}
		out.Server = append(out.Server, string(part))
	}

	stream, err = conn.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true}, "/echo.Echo/ClientStream")
	check(err)
	for _, piece := range []string{"a", "b", "c"} {
		b := []byte(piece)
		check(stream.SendMsg(&b))
	}
	check(stream.CloseSend())
	var joined []byte
	check(stream.RecvMsg(&joined))
	out.Client = string(joined)

	stream, err = conn.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}, "/echo.Echo/Chat")
	check(err)
	for _, piece := range []string{"x", "y"} {
		b := []byte(piece)
		check(stream.SendMsg(&b))
		var echoed []byte
		check(stream.RecvMsg(&echoed)) // each answer before the next message
		out.Bidi = append(out.Bidi, string(echoed))
	}
	check(stream.CloseSend())

	fail := []byte("fail")
	err = conn.Invoke(ctx, "/echo.Echo/Unary", &fail, &reply)
	st, _ := status.FromError(err)
	out.FailCode, out.FailMessage = st.Code().String(), st.Message()

	encoded, err := json.Marshal(out)
	check(err)
	fmt.Println(string(encoded))
}
