// Sequential requests on one kept-alive connection, each timed in microseconds: figure (b).
//
// hey reports latency in steps of 0.1 ms, too coarse for a proxy that adds a fraction of a
// millisecond. This client sends -n requests one after another over one connection (through
// an HTTP proxy's CONNECT tunnel when -proxy is given, or straight to the URL) and prints the
// percentiles as JSON. TLS verification is off: the peers' CAs are not what is measured.
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sort"
	"time"
)

func main() {
	n := flag.Int("n", 2000, "requests to time")
	warmup := flag.Int("warmup", 200, "requests sent first and not timed (the connection, TLS)")
	proxy := flag.String("proxy", "", "an HTTP proxy URL (CONNECT for https:// URLs)")
	host := flag.String("host", "", "a Host header to send instead of the URL's")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: latency [-n N] [-proxy URL] [-host NAME] URL")
		os.Exit(2)
	}
	transport := &http.Transport{
		TLSClientConfig:     &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // see above
		MaxConnsPerHost:     1,
		MaxIdleConnsPerHost: 1,
		DisableCompression:  true,
		ForceAttemptHTTP2:   false,
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{}, // HTTP/1.1
	}
	if *proxy != "" {
		u, err := url.Parse(*proxy)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bad -proxy:", err)
			os.Exit(2)
		}
		transport.Proxy = http.ProxyURL(u)
	}
	client := &http.Client{Transport: transport}
	times := make([]float64, 0, *n)
	for i := 0; i < *warmup+*n; i++ {
		req, err := http.NewRequest("GET", flag.Arg(0), nil)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		if *host != "" {
			req.Host = *host
		}
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			fmt.Fprintln(os.Stderr, "request failed:", err)
			os.Exit(1)
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		elapsed := time.Since(start)
		if err != nil || resp.StatusCode != 200 {
			fmt.Fprintln(os.Stderr, "bad answer:", resp.Status, err)
			os.Exit(1)
		}
		if i >= *warmup {
			times = append(times, float64(elapsed.Nanoseconds())/1e3)
		}
	}
	sort.Float64s(times)
	at := func(q float64) float64 { return times[int(q*float64(len(times)-1))] }
	sum := 0.0
	for _, t := range times {
		sum += t
	}
	json.NewEncoder(os.Stdout).Encode(map[string]float64{
		"p50_us": at(0.50), "p90_us": at(0.90), "p99_us": at(0.99), "mean_us": sum / float64(len(times)),
	})
}
