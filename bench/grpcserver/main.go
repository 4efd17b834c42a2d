// The gRPC upstream of the HTTP/2 benchmark (bench/h2.py): one unary method, echo.Echo/Unary,
// answering each message with itself, on raw bytes (no protobuf), over TLS.
// Usage: grpcserver <pem with key and chain> <port>
package main

import (
	"context"
	"crypto/tls"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
)

type raw struct{}

func (raw) Marshal(v any) ([]byte, error)      { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(data []byte, v any) error { *(v.(*[]byte)) = append([]byte(nil), data...); return nil }
func (raw) Name() string                       { return "proto" }

func unary(_ any, ctx context.Context, decode func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	var in []byte
	if err := decode(&in); err != nil {
		return nil, err
	}
	return &in, nil
}

func main() {
	encoding.RegisterCodec(raw{})
	cert, err := tls.LoadX509KeyPair(os.Args[1], os.Args[1])
	if err != nil {
		panic(err)
	}
	listener, err := net.Listen("tcp", "127.0.0.1:"+os.Args[2])
	if err != nil {
		panic(err)
	}
	server := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})))
	server.RegisterService(&grpc.ServiceDesc{
		ServiceName: "echo.Echo",
		HandlerType: (*any)(nil),
		Methods:     []grpc.MethodDesc{{MethodName: "Unary", Handler: unary}},
	}, struct{}{})
	panic(server.Serve(listener))
}
