// A Go client configured only by environment variables: HTTPS_PROXY/NO_PROXY (net/http's
// ProxyFromEnvironment) and SSL_CERT_FILE (crypto/x509 on Linux). The default transport offers
// h2 in ALPN, so this also proves Go falls back to HTTP/1.1 through keyhole.
// usage: fetch METHOD URL
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	req, err := http.NewRequest(os.Args[1], os.Args[2], nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}
	resp, err := client.Do(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	headers := [][2]string{}
	for name, values := range resp.Header {
		for _, v := range values {
			headers = append(headers, [2]string{name, v})
		}
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"status": resp.StatusCode, "headers": headers, "body": string(body), "proto": resp.Proto,
	})
}
