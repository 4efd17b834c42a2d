// An upstream that speaks HTTP/2 and HTTP/1.1, as most public APIs do (Go's net/http): it
// answers every request with the protocol it was asked in and the Authorization header it
// got, as JSON.
// Usage: dual <cert.pem> <key.pem>   (prints its port on 127.0.0.1)
package main

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
)

func main() {
	cert, err := tls.LoadX509KeyPair(os.Args[1], os.Args[2])
	if err != nil {
		panic(err)
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	server := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(map[string]string{
				"proto": r.Proto, "path": r.URL.Path, "authorization": r.Header.Get("Authorization")})
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert},
			NextProtos: []string{"h2", "http/1.1"}},
	}
	fmt.Println(listener.Addr().(*net.TCPAddr).Port)
	panic(server.Serve(tls.NewListener(listener, server.TLSConfig)))
}
